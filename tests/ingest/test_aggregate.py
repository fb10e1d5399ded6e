"""rpc_series: every call counted once per bucket, configurable buckets, idempotent per hour."""

from __future__ import annotations

import duckdb

from helpers import START
from tasks.ingest.aggregate import aggregate_hour, bucket_aggregation
from tasks.ingest.stage import ingest_hour
from tasks.warehouse import opened


def _q(settings, sql):
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_series_count_every_call_once(settings, synth_source):
    source, _ = synth_source
    ingest_hour(settings, START, [source])
    report = aggregate_hour(settings, START)
    calls, errors = _q(settings, "SELECT count(*), count(*) FILTER (WHERE is_error) FROM calls")[0]
    assert _q(settings, "SELECT sum(calls), sum(errors) FROM rpc_series")[0] == (calls, errors)
    assert report.series_rows == _q(settings, "SELECT count(*) FROM rpc_series")[0][0]
    buckets = _q(settings, "SELECT count(DISTINCT bucket_ts), min(rt_p50 <= rt_p95) FROM rpc_series")[0]
    assert buckets == (60, True)


def test_rerun_replaces_and_one_second_buckets_work(settings, synth_source):
    source, _ = synth_source
    ingest_hour(settings, START, [source])
    aggregate_hour(settings, START)
    first = _q(settings, "SELECT count(*), sum(calls), sum(hash(bucket_ts, caller, callee, calls)) FROM rpc_series")
    aggregate_hour(settings, START)
    assert (
        _q(settings, "SELECT count(*), sum(calls), sum(hash(bucket_ts, caller, callee, calls)) FROM rpc_series")
        == first
    )
    fine = settings.with_(bucket_seconds=1)
    aggregate_hour(fine, START)
    assert _q(settings, "SELECT min(bucket_seconds), max(bucket_seconds), sum(calls) FROM rpc_series")[0] == (
        1,
        1,
        first[0][1],
    )


def test_one_bucket_aggregation_fills_both_series_tables(settings):
    """`rpc_series` and `pattern_series` take their per-bucket columns from `bucket_aggregation`."""
    with opened(settings.warehouse) as con:
        columns = {t: [r[0] for r in con.execute(f"DESCRIBE {t}").fetchall()] for t in ("rpc_series", "pattern_series")}
    rpc = bucket_aggregation("c", 60, percentiles=(50, 95))
    pattern = bucket_aggregation("c", 60, percentiles=(95,))
    assert rpc.columns.split(", ") == columns["rpc_series"]
    assert sorted(["pattern_id", "node", *pattern.columns.split(", ")]) == sorted(columns["pattern_series"])
    assert rpc.params == pattern.params == {"bucket_seconds": 60}
