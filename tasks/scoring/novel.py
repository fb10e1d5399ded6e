"""RPCs in no pattern graph become anomalies of kind `novel_rpc` (one per novel RPC and bucket,
scored by its calls; the calling service is the suspect: it calls something it never did).
Reads `novel_rpcs`; replaces the hour's `novel_rpc` rows of `anomalies`.
"""

from __future__ import annotations

from datetime import datetime

import duckdb

from tasks.clock import HOUR, naive_utc
from tasks.keys import node_key_sql
from tasks.scoring.store import ANOMALY_COLUMNS

NOVEL_SQL = f"""
INSERT INTO anomalies ({", ".join(ANOMALY_COLUMNS)})
SELECT bucket_ts, NULL, {node_key_sql()}, caller, callee,
       interface, 'calls', calls, 0, 0, calls, 'up', 'novel_rpc', NULL, NULL, NULL, ?, caller
FROM novel_rpcs WHERE bucket_ts >= ? AND bucket_ts < ?"""


def novel_anomalies(con: duckdb.DuckDBPyConnection, hour: datetime, scored_at: datetime) -> int:
    """Replace the hour's novel-RPC anomalies; returns how many were written."""
    start, end = naive_utc(hour), naive_utc(hour + HOUR)
    con.execute("DELETE FROM anomalies WHERE kind = 'novel_rpc' AND bucket_ts >= ? AND bucket_ts < ?", [start, end])
    row = con.execute(NOVEL_SQL, [scored_at, start, end]).fetchone()
    return int(row[0]) if row else 0
