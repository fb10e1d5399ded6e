"""The calls of a pattern's traces, as the trace model reads them (one row per call).

A trace is taken by its root time, with every call of it that landed (a trace rooted in the last
instants of an hour may still miss a late tail: too rare to move a window's count). Reads
`trace_patterns` and `calls`; writes nothing. Patterns, times and the node-key expression are
parameters or constants of this module: no outside text enters the SQL.
"""

from __future__ import annotations

from datetime import datetime

import duckdb
import pandas as pd

from tasks.clock import naive_utc
from tasks.keys import node_key_sql

TRACE_CALLS_SQL = f"""
WITH t0 AS (
    SELECT trace_id, pattern_id, root_ts, shape_id FROM trace_patterns
    WHERE pattern_id IN (SELECT unnest($patterns)) AND root_ts >= $lo AND root_ts < $hi AND status <> 'failed'
    QUALIFY row_number() OVER (PARTITION BY trace_id ORDER BY n_calls DESC, hour DESC) = 1),
t AS (  -- the most recent traces of each pattern
    SELECT * FROM t0 QUALIFY row_number() OVER (PARTITION BY pattern_id ORDER BY root_ts DESC, trace_id) <= $most),
c AS (
    SELECT c.trace_id, c.call_id, c.parent_call_id, {node_key_sql("c")} AS node, c.callee,
           c.rt_ms, c.server_rt_ms, c.self_ms
    FROM calls c SEMI JOIN t ON c.trace_id = t.trace_id
    WHERE c.ts >= $lo - INTERVAL 10 MINUTE AND c.ts < $hi + INTERVAL 10 MINUTE),
parents AS (SELECT trace_id, call_id, any_value(node) AS parent_node FROM c GROUP BY ALL)
SELECT t.pattern_id, c.trace_id, c.call_id, c.parent_call_id, c.node, p.parent_node, c.callee,
       c.rt_ms, c.server_rt_ms, c.self_ms, t.shape_id, t.root_ts
FROM c JOIN t USING (trace_id)
LEFT JOIN parents p ON p.trace_id = c.trace_id AND p.call_id = c.parent_call_id
ORDER BY t.pattern_id, t.root_ts, c.trace_id, c.call_id
"""


def trace_calls(
    con: duckdb.DuckDBPyConnection, pattern_ids: list[int], start: datetime, end: datetime, most: int = 10**9
) -> dict[int, pd.DataFrame]:
    """Per pattern: the calls of its (`most` most recent) traces rooted in [start, end)."""
    if not pattern_ids:
        return {}
    params = {"patterns": list(pattern_ids), "lo": naive_utc(start), "hi": naive_utc(end), "most": most}
    frame = con.execute(TRACE_CALLS_SQL, params).df()
    return {int(pid): part.drop(columns="pattern_id") for pid, part in frame.groupby("pattern_id")}
