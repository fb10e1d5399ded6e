"""Ingest into a real DuckDB file: row counts, idempotency, incremental skips, bad files and rows."""

from __future__ import annotations

import gzip
from datetime import timedelta
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from helpers import START, V2022_HEADER, shared_file
from tasks.ingest.files import discover_files
from tasks.ingest.stage import hours_in_sources, ingest_hour
from tasks.settings import parse_utc


def _one(settings, sql: str, params=()):
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def _calls_in_hour(settings, hour) -> int:
    end = hour + timedelta(hours=1)
    return _one(
        settings,
        "SELECT count(*) FROM calls WHERE ts >= ? AND ts < ?",
        [hour.replace(tzinfo=None), end.replace(tzinfo=None)],
    )[0][0]


def _ingest_all(settings, source: Path) -> tuple[int, int, int]:
    read = kept = quarantined = 0
    for hour in hours_in_sources(settings, [source]):
        report = ingest_hour(settings, hour, [source])
        assert not report.failed_files, [f.error for f in report.failed_files]
        read, kept, quarantined = (
            read + report.rows_read,
            kept + report.rows_kept,
            quarantined + report.rows_quarantined,
        )
    return read, kept, quarantined


def test_synthetic_hour_lands_exactly_the_manifest_rows(settings, synth_source):
    source, manifest = synth_source
    report = ingest_hour(settings, START, [source])
    assert report.rows_read == report.rows_kept == manifest["rows_per_hour"]["2026-01-01T00:00"]
    assert report.rows_quarantined == 0
    assert _calls_in_hour(settings, START) == report.rows_kept
    nulls = _one(settings, "SELECT count(*) FROM calls WHERE caller IS NULL OR callee IS NULL OR batch_id IS NULL")
    assert nulls[0][0] == 0


def test_reingest_is_skipped_when_unchanged_and_identical_when_forced(settings, synth_source):
    source, _ = synth_source
    first = ingest_hour(settings, START, [source])
    fingerprint = _one(settings, "SELECT count(*), sum(hash(trace_id, call_id, ts, rt_ms)) FROM calls")
    again = ingest_hour(settings, START, [source])
    assert again.skipped_unchanged and again.rows_kept == first.rows_kept
    forced = ingest_hour(settings, START, [source], force=True)
    assert not forced.skipped_unchanged
    assert _one(settings, "SELECT count(*), sum(hash(trace_id, call_id, ts, rt_ms)) FROM calls") == fingerprint
    assert _one(settings, "SELECT count(*) FROM ingest_log")[0][0] == len(first.files)


def test_changed_file_reingests_its_hour_without_duplicates(settings, synth_copy):
    source, manifest = synth_copy
    ingest_hour(settings, START, [source])
    part = sorted((source / "dt=2026-01-01" / "hour=00").glob("*.parquet"))[0]
    table = pq.read_table(part)
    pq.write_table(table.slice(0, 1000), part)
    report = ingest_hour(settings, START, [source])
    assert not report.skipped_unchanged
    expected = manifest["rows_per_hour"]["2026-01-01T00:00"] - table.num_rows + 1000
    assert _calls_in_hour(settings, START) == report.rows_kept == expected


def test_corrupt_parquet_is_logged_while_good_files_land(settings, synth_copy):
    source, manifest = synth_copy
    bad = source / "dt=2026-01-01" / "hour=00" / "part-corrupt.parquet"
    bad.write_bytes(b"PAR1 this is not a parquet file")
    report = ingest_hour(settings, START, [source])
    assert [f.path for f in report.failed_files] == [bad]
    status, error = _one(settings, "SELECT status, error FROM ingest_log WHERE path = ?", [str(bad)])[0]
    assert status == "error" and str(bad) in error
    assert _calls_in_hour(settings, START) == manifest["rows_per_hour"]["2026-01-01T00:00"]
    assert bad.exists(), "the raw file stays where it is"


def _write_v2022_csv(path: Path, rows: list[str], header: str) -> None:
    with gzip.open(path, "wt") as handle:
        handle.write(header + "\n" + "\n".join(rows) + "\n")


def test_bad_rows_go_to_quarantine_with_their_reason(settings, tmp_path):
    base = int(START.timestamp() * 1000)
    rows = [
        f"{base + 1},T1,S,0.1,http,USER,U,/a,svc-a,P,3.0",  # good
        f"{base + 2},T1,S,0.1.1,rpc,svc-a,P,get,svc-b,P,None",  # rt not numeric
        f"{base + 3},T1,S,0.1.2,carrier-pigeon,svc-a,P,get,svc-c,P,1.0",  # unknown type
        f"{base + 3_600_000 + 5},T2,S,0.1,http,USER,U,/a,svc-a,P,3.0",  # next hour: not this hour's row
        f"{base + 4},T1,S,0.1.3,rpc,svc-a,P,get,svc-d,P,-5",  # negative rt
        f"{base + 1},T1,S,0.1,http,USER,U,/a,svc-a,P,3.0",  # exact duplicate of the first row
        f"{base + 6},,S,0.1,http,USER,U,/a,svc-a,P,3.0",  # no trace id
        f"{base + 7},T3,S,0.1,http,UNKNOWN,UNAVAILABLE,/a,svc-a,P,3.0,EXTRA,COLS",  # shifted columns
    ]
    source = tmp_path / "flat"
    source.mkdir()
    _write_v2022_csv(source / "calls.csv.gz", rows, V2022_HEADER)
    report = ingest_hour(settings, START, [source])
    assert (report.rows_read, report.rows_kept, report.rows_quarantined) == (7, 1, 6), "7 rows of this hour, 1 good"
    reasons = sorted(
        r[0].split(" ")[0] + " " + r[0].split(" ")[1] for r in _one(settings, "SELECT reason FROM quarantine")
    )
    assert reasons == [
        "duplicate of",
        "missing or",
        "missing trace_id",
        "rt -5.0",
        "unknown rpc_type",
        "unparseable CSV",
    ]
    lines = _one(settings, "SELECT file_row FROM quarantine WHERE reason LIKE 'unparseable CSV%'")
    assert lines == [(9,)], "the reject names the file's line (header is line 1)"
    nxt = ingest_hour(settings, START + timedelta(hours=1), [source])
    assert nxt.rows_kept == 1, "the next hour's row is ingested with its own hour"


def test_csv_missing_a_column_is_a_schema_error_naming_file_and_column(settings, tmp_path):
    source = tmp_path / "flat"
    source.mkdir()
    header = V2022_HEADER.replace(",rt", "")
    base = int(START.timestamp() * 1000)
    _write_v2022_csv(source / "no_rt.csv.gz", [f"{base},T,S,0.1,http,USER,U,/a,a,P"], header)
    # a good file next to it: an hour with no usable file at all is refused (tests/ingest/test_ingest_hostile.py)
    _write_v2022_csv(source / "good.csv.gz", [f"{base},T,S,0.1,http,USER,U,/a,a,P,1.0"], V2022_HEADER)
    report = ingest_hour(settings, START, [source])
    [bad] = report.failed_files
    assert bad.error is not None
    assert bad.status == "schema_error" and "'rt'" in bad.error and "no_rt.csv.gz" in bad.error


def test_partitioned_source_reads_only_its_hour(synth_source):
    source, _ = synth_source
    files, partitioned = discover_files([source], START + timedelta(hours=1))
    assert partitioned and files and all("hour=01" in str(f) for f in files)
    files, _ = discover_files([source], START + timedelta(hours=9))
    assert files == []


def test_alibaba_v2022_sample(settings):
    sample = shared_file("alibaba", "v2022-callgraph-sample.csv.gz")
    read, kept, quarantined = _ingest_all(settings, sample)
    # 1,000 rows, of which 103 are exact repeats of another row (a known quirk of the dataset)
    assert (read, kept, quarantined) == (1000, 897, 103)
    assert _one(settings, "SELECT count(DISTINCT trace_id) FROM calls")[0][0] == 196
    assert _one(settings, "SELECT count(*) FROM calls WHERE caller = 'UNKNOWN'")[0][0] > 0
    assert _one(settings, "SELECT count(*) FROM quarantine WHERE reason NOT LIKE 'duplicate of row%'")[0][0] == 0


def test_alibaba_v2021_sample_merges_caller_and_callee_rows(settings):
    sample = shared_file("alibaba", "v2021-callgraph-sample.csv.gz")
    settings = settings.with_(format="alibaba-v2021", trace_epoch=parse_utc("2021-06-01T00:00"))
    read, kept, quarantined = _ingest_all(settings, sample)
    # 967 rows: 52 caller/callee pairs merge into one call each -> 915 calls; 24 rows repeat another
    assert (read, kept, quarantined) == (915, 891, 24)
    assert _one(settings, "SELECT count(DISTINCT trace_id) FROM calls")[0][0] == 17
    assert _one(settings, "SELECT min(rt_ms) FROM calls")[0][0] >= 0


def test_alibaba_v2021_without_epoch_is_a_clear_error(settings):
    sample = shared_file("alibaba", "v2021-callgraph-sample.csv.gz")
    with pytest.raises(ValueError, match="RPCWATCH_TRACE_EPOCH"):
        ingest_hour(settings.with_(format="alibaba-v2021"), START, [sample])


def test_trainticket_minute_ingests_with_a_mapping_only(settings):
    minute = shared_file("nezha-trainticket", "2023-01-29", "trace", "08_43_trace.csv.gz")
    settings = settings.with_(format="spans", span_mapping="nezha-trainticket")
    read, kept, quarantined = _ingest_all(settings, minute)
    # 4445 spans; 714 client spans are paired with their server child, each pair one call
    assert (read, kept, quarantined) == (4445 - 714, 4445 - 714, 0)
    assert _one(settings, "SELECT count(DISTINCT trace_id) FROM calls")[0][0] == 53
    roots = _one(settings, "SELECT count(*) FROM calls WHERE parent_call_id IS NULL AND caller = 'USER'")[0][0]
    assert roots > 0
    services = {r[0] for r in _one(settings, "SELECT DISTINCT callee FROM calls")}
    assert "ts-gateway-service" in services, "pod suffixes are stripped by the mapping's regex"
