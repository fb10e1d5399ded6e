"""Aggregate one hour of `calls` into `rpc_series`: per time bucket and RPC, calls/errors/latency."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from tasks.clock import HOUR, hour_floor, naive_utc
from tasks.settings import Settings
from tasks.warehouse import opened


@dataclass(frozen=True)
class AggregateReport:
    hour: datetime
    series_rows: int
    rpcs: int
    bucket_seconds: int


def aggregate_hour(settings: Settings, hour: datetime) -> AggregateReport:
    """Replace `rpc_series` rows of `hour` (idempotent); buckets of `settings.bucket_seconds`."""
    hour = hour_floor(hour)
    start, end = naive_utc(hour), naive_utc(hour + HOUR)
    seconds = int(settings.bucket_seconds)
    with opened(settings.warehouse) as con:
        con.execute("BEGIN")
        con.execute("DELETE FROM rpc_series WHERE bucket_ts >= ? AND bucket_ts < ?", [start, end])
        con.execute(
            """
            INSERT INTO rpc_series
            SELECT time_bucket(to_seconds($seconds), ts) AS bucket_ts, caller, callee, interface,
                   rpc_type, count(*) AS calls, count(*) FILTER (WHERE is_error) AS errors,
                   avg(rt_ms) AS rt_mean, quantile_cont(rt_ms, 0.5) AS rt_p50,
                   quantile_cont(rt_ms, 0.95) AS rt_p95, $seconds AS bucket_seconds
            FROM calls WHERE ts >= $start AND ts < $end
            GROUP BY ALL""",
            {"seconds": seconds, "start": start, "end": end},
        )  # a setting: bound, not SQL text
        rows, rpcs = con.execute(
            "SELECT count(*), count(DISTINCT (caller, callee, interface, rpc_type)) FROM rpc_series "
            "WHERE bucket_ts >= ? AND bucket_ts < ?",
            [start, end],
        ).fetchone()
        con.execute("COMMIT")
    return AggregateReport(hour, rows, rpcs, seconds)
