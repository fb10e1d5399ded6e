"""Validation: Great Expectations + DuckDB row checks; batch failures name file/column and expectation."""

from __future__ import annotations

from datetime import timedelta

import duckdb
import pandas as pd
import pyarrow.parquet as pq
import pytest

from helpers import START
from tasks.ingest.stage import IngestError, ingest_hour
from tasks.ingest.validate import BatchValidationError, _ge_context, _ge_suites, _run_ge, _ts_frame, validate_hour


def _runs(settings):
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        return con.execute("SELECT expectation, subject, severity, success, engine FROM validation_runs").fetchall()


def test_clean_synthetic_hour_passes_and_is_recorded(settings, synth_source):
    source, _ = synth_source
    ingest_hour(settings, START, [source])
    report = validate_hour(settings, START)
    assert report.ok
    runs = _runs(settings)
    engines = {r[4] for r in runs}
    assert engines == {"duckdb", "great_expectations"}
    assert all(r[3] for r in runs), [r for r in runs if not r[3]]
    validate_hour(settings, START)
    assert len(_runs(settings)) == len(runs), "revalidating replaces the hour's results"


def test_csv_missing_column_fails_naming_file_column_and_expectation(settings, synth_copy, tmp_path):
    source, _ = synth_copy
    part = sorted((source / "dt=2026-01-01" / "hour=00").glob("*.parquet"))[0]
    frame = pq.read_table(part).slice(0, 50).drop_columns(["rt"]).to_pandas()
    frame.to_csv(part.with_name("extra.csv"), index=False)
    report = ingest_hour(settings, START, [source])
    assert report.rows_kept > 0, "the good Parquet file still lands"
    with pytest.raises(BatchValidationError) as failure:
        validate_hour(settings, START)
    message = str(failure.value)
    assert "expect_table_columns_to_match_set" in message
    assert "extra.csv" in message and "'rt'" in message


def test_corrupt_file_fails_the_batch_naming_it(settings, synth_copy):
    source, _ = synth_copy
    bad = source / "dt=2026-01-01" / "hour=00" / "broken.parquet"
    bad.write_bytes(b"garbage")
    ingest_hour(settings, START, [source])
    with pytest.raises(BatchValidationError, match="expect_file_to_be_readable on .*broken.parquet"):
        validate_hour(settings, START)


def test_empty_hour_is_a_finding_not_a_success(settings, synth_source):
    source, _ = synth_source
    empty_hour = START + timedelta(hours=5)
    with pytest.raises(IngestError, match="no trace files"):  # nothing to land: ingest refuses the hour
        ingest_hour(settings, empty_hour, [source])
    with pytest.raises(BatchValidationError, match="expect_batch_to_have_files"):
        validate_hour(settings, empty_hour)


def test_sudden_volume_drop_against_recent_hours_fails(settings, synth_copy):
    source, _ = synth_copy
    ingest_hour(settings, START, [source])
    for part in (source / "dt=2026-01-01" / "hour=01").glob("*.parquet"):
        table = pq.read_table(part)
        pq.write_table(table.slice(0, max(1, table.num_rows // 20)), part)
    ingest_hour(settings, START + timedelta(hours=1), [source])
    with pytest.raises(BatchValidationError, match="volume_ratio"):
        validate_hour(settings, START + timedelta(hours=1))


def test_row_level_failures_are_recorded_but_do_not_fail_the_batch(settings, synth_copy):
    source, _ = synth_copy
    part = sorted((source / "dt=2026-01-01" / "hour=00").glob("*.parquet"))[0]
    table = pq.read_table(part)
    pq.write_table(table.slice(0, 5), part.with_name("dup.parquet"))  # five repeated calls
    ingest_hour(settings, START, [source])
    report = validate_hour(settings, START)
    [dups] = [f for f in report.findings if f.expectation == "expect_compound_columns_to_be_unique"]
    assert dups.severity == "row" and not dups.success and dups.observed.startswith("5 rows")
    assert report.ok


def test_sample_timestamps_outside_the_hour_fail_the_vectorised_bounds_check(settings):
    """The ts bounds run on nanoseconds (GE checks DuckDB's microseconds row by row in Python) and
    still name the column and the expectation for a value outside the hour."""
    naive = START.replace(tzinfo=None)
    sample = pd.DataFrame({"ts": pd.Series([naive, naive + timedelta(minutes=59), naive + timedelta(hours=1)])})
    sample["ts"] = sample["ts"].astype("datetime64[us]")
    frame = _ts_frame(sample)
    assert str(frame["ts"].dtype) == "datetime64[ns]" and str(sample["ts"].dtype) == "datetime64[us]"
    context = _ge_context()  # GE builds suites on an active context
    suite = _ge_suites(START, settings, history_hours=0)["calls_in_hour"]
    [finding] = _run_ge(context, {"calls_in_hour": frame}, {"calls_in_hour": suite})
    between = ("expect_column_values_to_be_between", "ts", False)
    assert (finding.expectation, finding.subject, finding.success) == between
    assert finding.observed == "1 unexpected"
    [passing] = _run_ge(_ge_context(), {"calls_in_hour": frame[:2]}, {"calls_in_hour": suite})
    assert passing.success
