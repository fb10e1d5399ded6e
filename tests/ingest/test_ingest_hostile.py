"""Hostile and drifting input: SQL in file names and headers, missing or empty sources, column drift.

Issue 10: no text from outside reaches SQL; a landed hour is only replaced by a good new batch;
ordinary drift lands (bad values quarantined, bad files recorded); empty files are recorded.
"""

from __future__ import annotations

import gzip
import json
import shutil
from datetime import timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from helpers import START, V2022_HEADER, shared_file
from tasks.app.cli import main
from tasks.ingest.formats import MAPPINGS
from tasks.ingest.stage import IngestError, hours_in_sources, ingest_hour
from tasks.ingest.validate import validate_hour

H0 = "dt=2026-01-01/hour=00"
H1 = "dt=2026-01-01/hour=01"
HOSTILE = (
    "x'); DELETE FROM calls WHERE ts < TIMESTAMP '2026-01-01 01:00'; CREATE TABLE pwned AS "
    "SELECT 42 AS a; SELECT name FROM (SELECT 'a' AS name, 0 AS num_children, '"
)
# the same attack shaped for the CSV reader: a comment swallows the rest of the generated line
HOSTILE_CSV = "x'); DELETE FROM calls WHERE ts < TIMESTAMP '2026-01-01 01:00'; CREATE TABLE pwned AS SELECT 42 AS a; --"
V2022 = V2022_HEADER.split(",")


def _q(settings, sql: str, params=()) -> list[tuple]:
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def _snapshot(settings) -> dict[str, list]:
    """Everything ingest may touch, comparable before/after."""
    return {t: sorted(_q(settings, f"SELECT * FROM {t}"), key=repr) for t in ("calls", "quarantine", "ingest_log")} | {
        "tables": sorted(_q(settings, "SELECT table_name FROM duckdb_tables()"))
    }


def _landed(settings, source: Path) -> dict[str, list]:
    """Ingest START from `source`; the snapshot of what landed."""
    ingest_hour(settings, START, [source])
    return _snapshot(settings)


def _refused(settings, source: Path, match: str, before: dict[str, list]) -> str:
    """Ingesting START again raises `IngestError` matching `match` and keeps `before`; the error text."""
    with pytest.raises(IngestError, match=match) as failure:
        ingest_hour(settings, START, [source])
    assert _snapshot(settings) == before
    return str(failure.value)


def _hour_calls(settings, hour) -> int:
    start, end = hour.replace(tzinfo=None), (hour + timedelta(hours=1)).replace(tzinfo=None)
    return _q(settings, "SELECT count(*) FROM calls WHERE ts >= ? AND ts < ?", [start, end])[0][0]


def _part(source: Path, folder: str = H0) -> Path:
    return sorted((source / folder).glob("part-*.parquet"))[-1]


def _renamed(table: pa.Table, prefix: str, n: int = 40) -> pa.Table:
    """`n` rows of `table` as new traces (so they are not duplicates of the original rows)."""
    table = table.slice(0, n)
    ids = pc.binary_join_element_wise(prefix, table["traceid"], "")
    return table.set_column(table.schema.get_field_index("traceid"), "traceid", ids)


def _write_csv(path: Path, header: list[str], rows: list[list[object]]) -> None:
    def cell(value: object) -> str:
        text = "" if value is None else str(value)
        return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text

    lines: list[list[object]] = [list(header), *rows]
    data = ("\n".join(",".join(cell(v) for v in row) for row in lines) + "\n").encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def _csv_rows(table: pa.Table, columns: list[str]) -> list[list[object]]:
    data = table.select(columns).to_pylist()
    return [[r[c] for c in columns] for r in data]


# --- item 1: SQL built from file paths and header names ------------------------------------------


@pytest.mark.parametrize(
    "name,kind", [(HOSTILE + ".parquet", "parquet"), (HOSTILE + ".csv", "csv"), (HOSTILE_CSV + ".csv", "csv")]
)
def test_hostile_file_name_runs_no_sql(settings, synth_copy, name, kind):
    source, manifest = synth_copy
    ingest_hour(settings, START, [source])
    before = _snapshot(settings)
    extra = _renamed(pq.read_table(_part(source, H1)), "hostile-")
    hour1 = source / H1
    for target in (hour1 / name, hour1 / "x"):  # `x` makes the first injected statement succeed
        if kind == "parquet":
            pq.write_table(extra, target)
        else:
            _write_csv(target, extra.column_names, _csv_rows(extra, extra.column_names))
    report = ingest_hour(settings, START + timedelta(hours=1), [source])
    assert not _q(settings, "SELECT * FROM duckdb_tables() WHERE table_name = 'pwned'"), "SQL from a file name ran"
    hour0 = START.replace(tzinfo=None) + timedelta(hours=1)
    assert [r for r in _snapshot(settings)["calls"] if r[0] < hour0] == [r for r in before["calls"] if r[0] < hour0]
    logged = _q(settings, "SELECT status, error, rows_kept FROM ingest_log WHERE path = ?", [str(hour1 / name)])
    assert logged == [("ingested", None, 40)] and not report.failed_files
    assert _hour_calls(settings, START + timedelta(hours=1)) == manifest["rows_per_hour"]["2026-01-01T01:00"] + 40


def test_hostile_csv_header_names_are_data_not_sql(settings, tmp_path):
    base = int(START.timestamp() * 1000)
    header = V2022 + ['we"ird', "x');DROP TABLE calls;--", 'a"); CREATE TABLE pwned AS SELECT 1; --', "c;d)"]
    rows = [
        [base + i, f"T{i}", "S", "0.1", "http", "USER", "U", "/a", "svc", "P", 1.5, '"q"', "'", ";", ")"]
        for i in range(5)
    ]
    source = tmp_path / "flat"
    source.mkdir()
    _write_csv(source / "calls.csv", header, rows)
    assert hours_in_sources(settings, [source]) == [START]
    report = ingest_hour(settings, START, [source])
    assert not report.failed_files, [f.error for f in report.failed_files]
    assert (report.rows_read, report.rows_kept) == (5, 5)
    assert not _q(settings, "SELECT * FROM duckdb_tables() WHERE table_name = 'pwned'")


def test_non_numeric_rt_max_setting_is_refused(settings, synth_source):
    source, _ = synth_source
    with pytest.raises(ValueError, match="rt_max_ms"):
        ingest_hour(settings.with_(rt_max_ms="0 OR true"), START, [source])


# --- item 5: a missing source must not wipe a landed hour -----------------------------------------


def test_missing_hour_folder_keeps_the_landed_hour(settings, synth_copy):
    source, manifest = synth_copy
    before = _landed(settings, source)
    shutil.rmtree(source / H0)
    assert str(source) in _refused(settings, source, r"2026-01-01T00:00.*no trace files", before)
    assert _hour_calls(settings, START) == manifest["rows_per_hour"]["2026-01-01T00:00"]


def test_all_files_unreadable_keeps_the_landed_hour(settings, synth_copy):
    source, _ = synth_copy
    before = _landed(settings, source)
    part = _part(source)
    part.write_bytes(b"PAR1 not parquet any more")
    assert part.name in _refused(settings, source, r"2026-01-01T00:00.*unreadable", before)


def test_cli_ingest_of_a_missing_hour_exits_non_zero_and_names_it(settings, synth_copy, capsys):
    source, _ = synth_copy
    before = _landed(settings, source)
    shutil.rmtree(source / H0)
    code = main(["ingest", "--home", str(settings.home), "--hour", "2026-01-01T00:00", "--source", str(source)])
    assert code != 0
    assert "2026-01-01T00:00" in capsys.readouterr().err
    assert _snapshot(settings) == before


def test_flat_source_without_rows_in_the_hour_keeps_the_landed_hour(settings, tmp_path):
    source = tmp_path / "flat"
    source.mkdir()
    base = int(START.timestamp() * 1000)
    _write_csv(source / "a.csv", V2022, [[base + 1, "T", "S", "0.1", "http", "USER", "U", "/a", "s", "P", 2.0]])
    before = _landed(settings, source)
    _write_csv(source / "a.csv", V2022, [[base + 7_200_000, "T", "S", "0.1", "http", "USER", "U", "/a", "s", "P", 2.0]])
    _refused(settings, source, "no rows", before)


def test_forced_reingest_that_keeps_no_row_keeps_the_landed_hour(settings, tmp_path):
    """Issue 22: a mapping whose start unit is wrong quarantines both spans; `--force` must not
    replace the two landed calls with nothing."""
    source = tmp_path / "incoming"
    (source / H0).mkdir(parents=True)
    ns = int(START.timestamp()) * 10**9
    header = ["TraceID", "SpanID", "ParentID", "PodName", "OperationName", "StartTimeUnixNano", "Duration"]
    rows = [["t", "a", "root", "gw-1-2", "/", ns + 5, 40], ["t", "b", "a", "db-1-2", "q", ns + 9, 20]]
    _write_csv(source / H0 / "spans.csv", header, rows)
    spans = settings.with_(format="spans", span_mapping="nezha-trainticket")
    before = _landed(spans, source)
    assert len(before["calls"]) == 2
    wrong = tmp_path / "wrong-unit.json"  # nanoseconds read as microseconds: no timestamp parses
    mapping = json.loads((MAPPINGS / "nezha-trainticket.json").read_text()) | {"start_unit": "us"}
    wrong.write_text(json.dumps(mapping))
    with pytest.raises(IngestError, match=r"hour 2026-01-01T00:00 not ingested .*keeps none of its 2 rows") as failure:
        ingest_hour(spans.with_(span_mapping=str(wrong)), START, [source], force=True)
    assert "unparseable timestamp" in str(failure.value) and "2 landed calls" in str(failure.value)
    assert _snapshot(spans) == before, "the landed calls, quarantine and ingest_log stay"


# --- item 6: ordinary drift ------------------------------------------------------------------------


def _csv_next_to_parquet_lands(settings, synth_copy, name: str, column: str, value: str) -> None:
    """40 new traces of the hour's Parquet part, written as CSV `name` with one more column, land."""
    source, manifest = synth_copy
    table = _renamed(pq.read_table(_part(source)), f"{Path(name).stem}-")
    columns = table.column_names
    _write_csv(_part(source).with_name(name), columns + [column], [r + [value] for r in _csv_rows(table, columns)])
    report = ingest_hour(settings, START, [source])
    assert not report.failed_files, [f.error for f in report.failed_files]
    assert _hour_calls(settings, START) == manifest["rows_per_hour"]["2026-01-01T00:00"] + 40


def test_csv_with_an_extra_column_next_to_parquet_lands(settings, synth_copy):
    _csv_next_to_parquet_lands(settings, synth_copy, "extra.csv", "zone", "eu-1")
    assert validate_hour(settings, START).ok


def test_two_csvs_with_different_columns_land(settings, tmp_path):
    base = int(START.timestamp() * 1000)
    source = tmp_path / "flat"
    source.mkdir()
    _write_csv(source / "a.csv", V2022, [[base + 1, "A", "S", "0.1", "http", "USER", "U", "/a", "s", "P", 2.0]])
    _write_csv(
        source / "b.csv",
        V2022 + ["error", "region"],
        [[base + 2, "B", "S", "0.1", "http", "USER", "U", "/a", "s", "P", 3.0, 1, "eu"]],
    )
    report = ingest_hour(settings, START, [source])
    assert not report.failed_files, [f.error for f in report.failed_files]
    assert _q(settings, "SELECT trace_id, is_error FROM calls ORDER BY 1") == [("A", False), ("B", True)]


def test_real_v2022_csv_without_error_column_next_to_parquet_with_it(settings, tmp_path):
    sample = shared_file("alibaba", "v2022-callgraph-sample.csv.gz")
    source = tmp_path / "flat"
    source.mkdir()
    shutil.copy(sample, source / sample.name)
    with duckdb.connect() as con:  # 20 distinct real rows, typed as a Parquet writer would, plus `error`
        table = con.sql(
            """SELECT DISTINCT "timestamp"::BIGINT AS "timestamp", traceid, service, rpc_id, rpctype,
                                   um, uminstanceid, interface, dm, dminstanceid, rt::DOUBLE AS rt
                               FROM read_csv(?, all_varchar=true) ORDER BY ALL LIMIT 20""",
            params=[str(sample)],
        ).to_arrow_table()
    table = _renamed(table, "pq-", 20).append_column("error", pa.array([1] * 20, pa.int8()))
    pq.write_table(table, source / "with_error.parquet")
    read = kept = 0
    for hour in hours_in_sources(settings, [source]):
        report = ingest_hour(settings, hour, [source])
        assert not report.failed_files, [f.error for f in report.failed_files]
        read, kept = read + report.rows_read, kept + report.rows_kept
    assert (read, kept) == (1000 + 20, 897 + 20)
    assert _q(settings, "SELECT count(*) FROM calls WHERE is_error")[0][0] == 20


def test_quote_in_a_csv_header_next_to_parquet(settings, synth_copy):
    _csv_next_to_parquet_lands(settings, synth_copy, "quoted.csv", 'say "hi"', "x")


@pytest.mark.parametrize("bad", ["99999999999999999999", "9999999999999999", "-9999999999999999"])
def test_overflowing_timestamp_is_quarantined(settings, tmp_path, bad):
    base = int(START.timestamp() * 1000)
    source = tmp_path / "flat"
    source.mkdir()
    _write_csv(
        source / "a.csv",
        V2022,
        [
            [base + 1, "A", "S", "0.1", "http", "USER", "U", "/a", "s", "P", 2.0],
            [bad, "B", "S", "0.1", "http", "USER", "U", "/a", "s", "P", 2.0],
        ],
    )
    assert hours_in_sources(settings, [source]) == [START]
    report = ingest_hour(settings, START, [source])
    assert (report.rows_read, report.rows_kept, report.rows_quarantined) == (2, 1, 1)
    assert _q(settings, "SELECT trace_id, reason FROM quarantine") == [("B", "unparseable timestamp")]


def test_overflowing_span_start_is_quarantined(settings, tmp_path):
    source = tmp_path / "flat"
    source.mkdir()
    header = [
        "TraceID",
        "SpanID",
        "ParentID",
        "PodName",
        "OperationName",
        "StartTimeUnixNano",
        "EndTimeUnixNano",
        "Duration",
    ]
    ns = int(START.timestamp()) * 10**9
    _write_csv(
        source / "spans.csv",
        header,
        [
            ["t", "a", "root", "svc-a-1-2", "/", ns + 5, ns + 9, 4],
            ["t", "b", "a", "svc-b-1-2", "/", "9" * 30, ns + 9, 4],
        ],
    )
    settings = settings.with_(format="spans", span_mapping="nezha-trainticket")
    report = ingest_hour(settings, START, [source])
    assert (report.rows_kept, report.rows_quarantined) == (1, 1)


def test_file_that_breaks_normalisation_is_recorded_while_good_files_land(settings, synth_copy):
    source, manifest = synth_copy
    table = _renamed(pq.read_table(_part(source)), "ts-")
    as_time = pc.cast(pc.multiply(table["timestamp"], 1000), pa.timestamp("us"))
    pq.write_table(table.set_column(0, "timestamp", as_time), _part(source).with_name("typed.parquet"))
    report = ingest_hour(settings, START, [source])
    [bad] = report.failed_files
    assert bad.error is not None
    assert bad.path.name == "typed.parquet" and bad.status == "error" and "typed.parquet" in bad.error
    assert _q(settings, "SELECT status FROM ingest_log WHERE path = ?", [str(bad.path)]) == [("error",)]
    assert _hour_calls(settings, START) == manifest["rows_per_hour"]["2026-01-01T00:00"]


# --- item 13: zero-row files -----------------------------------------------------------------------


def test_zero_row_parquet_is_recorded_and_the_rest_lands(settings, synth_copy):
    source, manifest = synth_copy
    empty = _part(source).with_name("empty.parquet")
    pq.write_table(pq.read_table(_part(source)).slice(0, 0), empty)
    report = ingest_hour(settings, START, [source])
    assert not report.failed_files and [f.path for f in report.empty_files] == [empty]
    assert _hour_calls(settings, START) == manifest["rows_per_hour"]["2026-01-01T00:00"]
    status, error = _q(settings, "SELECT status, error FROM ingest_log WHERE path = ?", [str(empty)])[0]
    assert status == "empty" and "no rows" in error
    validation = validate_hour(settings, START)
    assert validation.ok
    [finding] = [f for f in validation.findings if f.subject == str(empty)]
    assert not finding.success and finding.severity != "batch"
    assert ingest_hour(settings, START, [source]).skipped_unchanged, "an unchanged hour with an empty file is skipped"


def test_hour_with_only_empty_files_fails_and_keeps_the_landed_hour(settings, synth_copy):
    source, _ = synth_copy
    before = _landed(settings, source)
    part = _part(source)
    pq.write_table(pq.read_table(part).slice(0, 0), part)
    _refused(settings, source, "no rows", before)


def test_null_rpctype_in_parquet_lands_as_unknown(settings, synth_copy):
    source, manifest = synth_copy
    table = _renamed(pq.read_table(_part(source)), "nulltype-")
    column = table.schema.get_field_index("rpctype")
    pq.write_table(
        table.set_column(column, "rpctype", pa.nulls(len(table), pa.string())),
        _part(source).with_name("nulltype.parquet"),
    )
    report = ingest_hour(settings, START, [source])
    assert not report.failed_files, [f.error for f in report.failed_files]
    assert (
        _q(settings, "SELECT count(*) FROM calls WHERE trace_id LIKE 'nulltype-%' AND rpc_type = 'UNKNOWN'")[0][0] == 40
    )
