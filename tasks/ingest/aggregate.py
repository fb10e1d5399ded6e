"""Aggregate one hour of `calls` into `rpc_series`: per time bucket and RPC, calls/errors/latency.

Reads `calls`; writes `rpc_series`. `bucket_aggregation` is the one definition of the per-bucket
statistics, shared with the patterns stage's `pattern_series`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from tasks.clock import HOUR, hour_floor, naive_utc
from tasks.settings import Settings
from tasks.warehouse import opened

BUCKET_SECONDS = "bucket_seconds"  # the bound parameter the aggregation's SQL expects


@dataclass(frozen=True)
class BucketAggregation:
    """Per time bucket and RPC: `columns` (the target columns, for the INSERT's column list) and
    `select` (their expressions, in the same order) over the calls of table alias `alias`, to be
    grouped by everything else in the SELECT (`GROUP BY ALL`). `params` binds the bucket size."""

    columns: str
    select: str
    params: dict[str, int]


def bucket_aggregation(alias: str, seconds: int, percentiles: tuple[int, ...]) -> BucketAggregation:
    """The bucket, the RPC, calls, errors, mean latency and the latency percentiles `rt_p<N>` for
    each N of `percentiles` (code constants), and the bucket size (bound: a setting, never SQL text)."""
    c = f"{alias}."
    expressions = {
        "bucket_ts": f"time_bucket(to_seconds(${BUCKET_SECONDS}), {c}ts)",
        "caller": f"{c}caller",
        "callee": f"{c}callee",
        "interface": f"{c}interface",
        "rpc_type": f"{c}rpc_type",
        "calls": "count(*)",
        "errors": f"count(*) FILTER (WHERE {c}is_error)",
        "rt_mean": f"avg({c}rt_ms)",
        **{f"rt_p{p}": f"quantile_cont({c}rt_ms, {p / 100})" for p in percentiles},
        "bucket_seconds": f"${BUCKET_SECONDS}",
    }
    return BucketAggregation(
        columns=", ".join(expressions),
        select=", ".join(f"{sql} AS {name}" for name, sql in expressions.items()),
        params={BUCKET_SECONDS: int(seconds)},
    )


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
    series = bucket_aggregation("c", int(settings.bucket_seconds), percentiles=(50, 95))
    with opened(settings.warehouse) as con:
        con.execute("BEGIN")
        con.execute("DELETE FROM rpc_series WHERE bucket_ts >= ? AND bucket_ts < ?", [start, end])
        con.execute(
            f"""INSERT INTO rpc_series ({series.columns})
            SELECT {series.select} FROM calls c WHERE c.ts >= $start AND c.ts < $end
            GROUP BY ALL""",
            {**series.params, "start": start, "end": end},
        )
        [(rows, rpcs)] = con.execute(
            "SELECT count(*), count(DISTINCT (caller, callee, interface, rpc_type)) FROM rpc_series "
            "WHERE bucket_ts >= ? AND bucket_ts < ?",
            [start, end],
        ).fetchall()
        con.execute("COMMIT")
    return AggregateReport(hour, rows, rpcs, series.params[BUCKET_SECONDS])
