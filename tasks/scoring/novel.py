"""RPCs never seen before become anomalies of kind `novel_rpc`: one per new RPC, in the bucket it
first appears in, scored by its calls; the calling service is the suspect (it calls something it
never did).

"Never seen" is against the history models learn from (`memory`, the training window): an RPC in no
pattern graph (`novel_rpcs`) that `rpc_series` holds in no earlier bucket of that window. A rare RPC
seen an hour ago is not new, however seldom it comes (it alarmed once, when it was). Feature
`new_edge`: the caller never called the callee at all (decisive for the alarm policy, as lateral
movement or a compromised pod would look); `new_interface`: a known edge with an interface never
used on it (weak alone, strong in numbers: endpoint enumeration).

Not judged: a call whose caller is unknown (its parent span was not captured: a trace cut at the
hour's edge, sampling; no edge to judge, and on real traces such calls are new every hour), and
anything until the warehouse holds more than `warmup` of history (in its first buckets every RPC is
new).
Reads `novel_rpcs`, `rpc_series`; replaces the hour's `novel_rpc` rows of `anomalies`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import duckdb

from tasks.clock import HOUR, naive_utc
from tasks.keys import node_key_sql
from tasks.scoring.store import ANOMALY_COLUMNS

KIND = "novel_rpc"
NEW_EDGE, NEW_INTERFACE = "new_edge", "new_interface"
UNKNOWN = "UNKNOWN"  # the caller of a call whose parent span was not captured: no edge to judge
SEEN_SQL = """EXISTS (SELECT 1 FROM rpc_series r
    WHERE r.caller = n.caller AND r.callee = n.callee AND r.rpc_type = n.rpc_type {same_interface}
      AND r.bucket_ts < n.bucket_ts AND r.bucket_ts >= n.bucket_ts - $memory)"""
NOVEL_SQL = f"""
INSERT INTO anomalies ({", ".join(ANOMALY_COLUMNS)})
SELECT bucket_ts, NULL, {node_key_sql("n")}, caller, callee, interface,
       CASE WHEN {SEEN_SQL.format(same_interface="")} THEN '{NEW_INTERFACE}' ELSE '{NEW_EDGE}' END,
       calls, 0, 0, calls, 'up', '{KIND}', NULL, NULL, NULL, $scored_at, caller
FROM novel_rpcs n WHERE bucket_ts >= $start AND bucket_ts < $end AND caller <> '{UNKNOWN}'
  AND (SELECT min(bucket_ts) FROM rpc_series) < n.bucket_ts - $warmup
  AND NOT {SEEN_SQL.format(same_interface="AND r.interface IS NOT DISTINCT FROM n.interface")}"""


def novel_anomalies(
    con: duckdb.DuckDBPyConnection,
    hour: datetime,
    scored_at: datetime,
    memory: timedelta = timedelta(hours=48),
    warmup: timedelta = timedelta(0),
) -> int:
    """Replace the hour's novel-RPC anomalies (RPCs not seen within `memory` before, once the
    warehouse holds `warmup` of history; none in its first bucket); returns how many were written."""
    start, end = naive_utc(hour), naive_utc(hour + HOUR)
    con.execute("DELETE FROM anomalies WHERE kind = 'novel_rpc' AND bucket_ts >= ? AND bucket_ts < ?", [start, end])
    row = con.execute(
        NOVEL_SQL, {"scored_at": scored_at, "start": start, "end": end, "memory": memory, "warmup": warmup}
    ).fetchone()
    return int(row[0]) if row else 0
