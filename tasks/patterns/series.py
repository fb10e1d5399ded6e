"""Per-pattern series and novel RPCs of one hour, once the hour's traces have their patterns.

Reads `calls`, `trace_patterns`, `rpc_series`, `patterns`, `pattern_nodes`; writes
`pattern_series`, `novel_rpcs`.
"""

from __future__ import annotations

from datetime import datetime

import duckdb

from tasks.clock import HOUR, naive_utc
from tasks.ingest.aggregate import bucket_aggregation
from tasks.keys import node_key_sql
from tasks.settings import Settings


def pattern_series(con: duckdb.DuckDBPyConnection, settings: Settings, hour: datetime) -> int:
    """Replace the hour's `pattern_series`: per pattern, bucket and RPC, the statistics of
    `rpc_series` (without the median) over the calls of the pattern's traces. Returns the rows."""
    start, end = naive_utc(hour), naive_utc(hour + HOUR)
    series = bucket_aggregation("c", int(settings.bucket_seconds), percentiles=(95,))
    con.execute("DELETE FROM pattern_series WHERE bucket_ts >= ? AND bucket_ts < ?", [start, end])
    [(rows,)] = con.execute(
        f"""INSERT INTO pattern_series (pattern_id, node, {series.columns})
        SELECT t.pattern_id, {node_key_sql("c")} AS node, {series.select}
        FROM calls c JOIN trace_patterns t USING (trace_id)
        WHERE c.ts >= $start AND c.ts < $end AND t.hour >= $previous AND t.pattern_id IS NOT NULL
        GROUP BY ALL""",
        {**series.params, "start": start, "end": end, "previous": naive_utc(hour - HOUR)},
    ).fetchall()
    return int(rows)


def novel_rpcs(con: duckdb.DuckDBPyConnection, hour: datetime) -> int:
    """RPCs of this hour (from `rpc_series`) that are in no active pattern's graph; returns the rows."""
    start, end = naive_utc(hour), naive_utc(hour + HOUR)
    con.execute("DELETE FROM novel_rpcs WHERE bucket_ts >= ? AND bucket_ts < ?", [start, end])
    [(rows,)] = con.execute(
        f"""INSERT INTO novel_rpcs (bucket_ts, caller, callee, interface, rpc_type, calls, first_seen)
        SELECT r.bucket_ts, r.caller, r.callee, r.interface, r.rpc_type, r.calls, NULL FROM rpc_series r
        WHERE r.bucket_ts >= ? AND r.bucket_ts < ?
          AND {node_key_sql("r")} NOT IN (
              SELECT n.node FROM pattern_nodes n JOIN patterns p
              ON p.pattern_id = n.pattern_id AND p.version = n.version AND p.status = 'active')""",
        [start, end],
    ).fetchall()
    con.execute("""UPDATE novel_rpcs SET first_seen = f.first FROM (
        SELECT caller, callee, interface, rpc_type, min(bucket_ts) AS first FROM novel_rpcs GROUP BY ALL) f
        WHERE novel_rpcs.caller = f.caller AND novel_rpcs.callee = f.callee AND novel_rpcs.rpc_type = f.rpc_type
          AND novel_rpcs.interface IS NOT DISTINCT FROM f.interface""")
    return int(rows)
