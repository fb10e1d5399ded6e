"""The naive reference detector both evaluations print next to rpcwatch: what a team writes in an
afternoon. Per RPC (caller, callee, interface; whatever its rpc_type), flag calls or p95 latency
more than `MAD_LIMIT` MADs from the median of the previous hour of buckets, once a quarter of that
hour exists. Its points have no score, so only the persistence part of the incident rule
(`tasks.scoring.incidents`) makes incidents of them. Reads `rpc_series`.
"""

from __future__ import annotations

from datetime import datetime

import duckdb
import numpy as np
import pandas as pd

from tasks.keys import node_key

FEATURES = ("calls", "rt_p95")
HISTORY_S = 3600  # the median and MAD of the previous hour
MIN_HISTORY_SHARE = 4  # ... once 1/4 of it exists
MAD_LIMIT = 5.0
MAD_TO_SIGMA = 1.4826  # a normal distribution's sigma per MAD
KIND = "naive"  # the points' kind (rpcwatch's are traffic_spike, novel_rpc, ...)
ANY_RPC_TYPE = ""  # an RPC's node key in the naive rule: its rpc_types are watched together


def _rpc_frame(con: duckdb.DuckDBPyConnection, end: datetime) -> pd.DataFrame:
    """rpc_series before `end`, each row with the node key of its RPC."""
    frame = con.execute(
        "SELECT bucket_ts, caller, callee, interface, calls, rt_p95 FROM rpc_series WHERE bucket_ts < ? "
        "ORDER BY bucket_ts",
        [end],
    ).df()
    interfaces = [None if pd.isna(i) else i for i in frame.interface]
    frame["node"] = [node_key(c, e, i, ANY_RPC_TYPE) for c, e, i in zip(frame.caller, frame.callee, interfaces)]
    return frame


def _flagged(table: pd.DataFrame, seconds: int) -> pd.DataFrame:
    """(bucket_ts, node) of every value more than MAD_LIMIT MADs from the previous hour's median."""
    window = HISTORY_S // seconds
    table = table.asfreq(f"{seconds}s")
    med = table.rolling(window, min_periods=window // MIN_HISTORY_SHARE).median().shift(1)
    mad = (table - med).abs().rolling(window, min_periods=window // MIN_HISTORY_SHARE).median().shift(1)
    out = ((table - med).abs() > MAD_LIMIT * (MAD_TO_SIGMA * mad + 1e-9)) & (mad.notna())
    stacked = out.stack()
    return stacked[stacked].reset_index()[["bucket_ts", "node"]]


def naive_points(con: duckdb.DuckDBPyConnection, seconds: int, start: datetime, end: datetime) -> pd.DataFrame:
    """The naive rule's points in [start, end): bucket_ts, node, caller, callee, interface, and what
    `tasks.scoring.incidents.incidents_of` reads (grp: the RPC, pattern_id: null, score 0, kind)."""
    frame = _rpc_frame(con, end)
    wide = {f: frame.pivot_table(index="bucket_ts", columns="node", values=f) for f in FEATURES}
    wide["calls"] = wide["calls"].asfreq(f"{seconds}s").fillna(0)  # a bucket without calls had 0 calls
    points = pd.concat([_flagged(table, seconds) for table in wide.values()]).drop_duplicates()
    points = points[points.bucket_ts >= start]
    rpcs = frame.drop_duplicates("node").set_index("node")[["caller", "callee", "interface"]]
    points = points.join(rpcs, on="node")
    return points.assign(
        grp=points.node,
        pattern_id=pd.array([pd.NA] * len(points), dtype="Int32"),
        score=np.zeros(len(points)),
        kind=KIND,
    ).reset_index(drop=True)
