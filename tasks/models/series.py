"""A pattern's traffic as a dense tensor, exported to Parquet so training never opens DuckDB.

Export (inside the DuckDB writer pool): `pattern_series` rows of one pattern's graph nodes over a
time range -> `<dir>/pattern-<id>.parquet` plus `<dir>/pattern-<id>.json` (nodes, edges, version,
graph_hash, range, excluded stretches), and the calls of its most recent traces for the trace model ->
`<dir>/pattern-<id>-calls.parquet`. Training (anywhere, in parallel) reads those files only.

History hygiene: a model must never learn an incident as normal (a retrain after a flood would
otherwise widen its band to the flood). The stretches of the range inside an incident of the
pattern, or one touching its RPCs, or a period people marked, are `excluded`: no training,
validation or calibration sample reads or forecasts a bucket in them
(`tasks.models.forecast.prepare`), and the trace model learns from no trace rooted in them.

Reads `patterns`, `pattern_nodes`, `pattern_edges`, `pattern_series`, `trace_patterns`, `calls`,
`incidents`, `incident_actions`; writes no table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.clock import naive_utc
from tasks.models.features import CALLS, FEATURES, LATENCIES
from tasks.patterns.trace_calls import trace_calls

TRACE_MODEL_TRACES = 20_000  # the trace model learns from a pattern's most recent traces


@dataclass
class PatternData:
    """Traffic of one pattern: values[t, n, f] for buckets t, graph nodes n, FEATURES f.

    calls/errors are counts (0 where a node had no traffic); rt_mean/rt_p95 are NaN there."""

    pattern_id: int
    version: int
    graph_hash: str
    nodes: list[str]
    edges: list[tuple[int, int]]
    buckets: np.ndarray  # datetime64[s], evenly spaced
    values: np.ndarray
    bucket_seconds: int
    excluded: np.ndarray | None = None  # [T] bool: buckets inside an incident (none: every bucket is normal)

    @property
    def calls(self) -> np.ndarray:
        return self.values[:, :, CALLS]


# the stretches of [$start, $end) inside an incident of the pattern or touching one of its RPCs, or
# inside a period people marked (tasks.triage.actions: kept as marked, even where a rescoring has
# since cleared the incident)
EXCLUDED_SQL = """
SELECT DISTINCT greatest(start_ts, $start) AS lo, least(end_ts, $end) AS hi FROM (
    SELECT start_ts, end_ts, patterns, nodes FROM incidents
    UNION ALL SELECT start_ts, end_ts, patterns, nodes FROM incident_actions WHERE action = 'mark')
WHERE start_ts < $end AND end_ts > $start AND (list_contains(patterns, $pid) OR list_has_any(nodes, $nodes))
ORDER BY lo, hi"""


def excluded_stretches(
    con: duckdb.DuckDBPyConnection, pattern_id: int, nodes: list[str], start: datetime, end: datetime
) -> list[tuple[datetime, datetime]]:
    """[lo, hi) stretches of [start, end) that training leaves out: the pattern's incidents."""
    params = {"start": naive_utc(start), "end": naive_utc(end), "pid": pattern_id, "nodes": nodes}
    return [(lo, hi) for lo, hi in con.execute(EXCLUDED_SQL, params).fetchall()]


def _outside(calls: pd.DataFrame, stretches: list[tuple[datetime, datetime]]) -> pd.DataFrame:
    """The calls of traces rooted outside every stretch."""
    root = pd.to_datetime(calls["root_ts"])
    inside = np.zeros(len(calls), dtype=bool)
    for lo, hi in stretches:
        inside |= ((root >= pd.Timestamp(lo)) & (root < pd.Timestamp(hi))).to_numpy()
    return calls[~inside]


def _one(con: duckdb.DuckDBPyConnection, sql: str, pattern_id: int) -> tuple[Any, ...]:
    """The one row a query about an existing pattern returns."""
    rows = con.execute(sql, [pattern_id]).fetchall()  # fetchall: leaves no open result on `con`
    if not rows:
        raise ValueError(f"pattern {pattern_id} is not in the warehouse")
    return tuple(rows[0])


def export_pattern(
    con: duckdb.DuckDBPyConnection, pattern_id: int, start: datetime, end: datetime, folder: Path
) -> Path:
    """Write the pattern's graph and its series over [start, end) for training; returns the JSON path."""
    folder.mkdir(parents=True, exist_ok=True)
    version, graph_hash = _one(con, "SELECT version, graph_hash FROM patterns WHERE pattern_id = ?", pattern_id)
    nodes = [
        r[0]
        for r in con.execute(
            "SELECT node FROM pattern_nodes WHERE pattern_id = ? AND version = ? ORDER BY node", [pattern_id, version]
        ).fetchall()
    ]
    index = {n: i for i, n in enumerate(nodes)}
    edges = [
        (index[p], index[c])
        for p, c in con.execute(
            "SELECT parent_node, child_node FROM pattern_edges WHERE pattern_id = ? AND version = ?",
            [pattern_id, version],
        ).fetchall()
        if p in index and c in index
    ]
    (seconds,) = _one(
        con, "SELECT coalesce(max(bucket_seconds), 60) FROM pattern_series WHERE pattern_id = ?", pattern_id
    )
    parquet = folder / f"pattern-{pattern_id}.parquet"
    # written by pyarrow: the path (under the home, from settings) never goes into SQL text
    series = con.sql(  # a relation: `to_arrow_table` on DuckDB 1.4 (the lake's) and 2.0 alike
        """SELECT bucket_ts, node, calls, errors, rt_mean, rt_p95 FROM pattern_series
                            WHERE pattern_id = ? AND bucket_ts >= ? AND bucket_ts < ? ORDER BY bucket_ts, node""",
        params=[pattern_id, start.replace(tzinfo=None), end.replace(tzinfo=None)],
    ).to_arrow_table()
    pq.write_table(series, parquet)
    excluded = excluded_stretches(con, pattern_id, nodes, start, end)
    meta = {
        "pattern_id": pattern_id,
        "version": version,
        "graph_hash": graph_hash,
        "nodes": nodes,
        "edges": edges,
        "bucket_seconds": int(seconds),
        "start": start.isoformat(),
        "end": end.isoformat(),
        "excluded": [[lo.isoformat(), hi.isoformat()] for lo, hi in excluded],
    }
    calls = trace_calls(con, [pattern_id], start, end, most=TRACE_MODEL_TRACES).get(pattern_id)
    if calls is not None:  # the trace model's training traces
        calls = _outside(calls, excluded)
        pq.write_table(pa.Table.from_pandas(calls, preserve_index=False), trace_calls_path(parquet))
    path = folder / f"pattern-{pattern_id}.json"
    path.write_text(json.dumps(meta, indent=1))
    return path


def trace_calls_path(series_parquet: Path) -> Path:
    """Where the export keeps the calls of the pattern's training traces (beside its series)."""
    return series_parquet.with_name(series_parquet.stem + "-calls.parquet")


def load_trace_calls(meta_path: Path) -> pd.DataFrame | None:
    """The exported calls of the pattern's training traces; None when it had no traces."""
    path = trace_calls_path(Path(meta_path).with_suffix(".parquet"))
    return pq.read_table(path).to_pandas() if path.exists() else None


def load_pattern(meta_path: Path) -> PatternData:
    """The exported pattern as a dense [T, N, F] array on a complete bucket grid."""
    meta = json.loads(Path(meta_path).read_text())
    seconds = meta["bucket_seconds"]
    start = np.datetime64(datetime.fromisoformat(meta["start"]).replace(tzinfo=None), "s")
    end = np.datetime64(datetime.fromisoformat(meta["end"]).replace(tzinfo=None), "s")
    buckets = np.arange(start, end, np.timedelta64(seconds, "s"))
    nodes = meta["nodes"]
    values = np.zeros((len(buckets), len(nodes), len(FEATURES)), dtype=np.float64)
    values[:, :, list(LATENCIES)] = np.nan
    table = pq.read_table(Path(meta_path).with_suffix(".parquet")).to_pandas()
    if len(table):  # the grid starts where the pattern's traffic starts, not at the nominal range
        start = max(start, table["bucket_ts"].min().to_datetime64().astype("datetime64[s]"))
        buckets = np.arange(start, end, np.timedelta64(seconds, "s"))
        values = np.zeros((len(buckets), len(nodes), len(FEATURES)), dtype=np.float64)
        values[:, :, list(LATENCIES)] = np.nan
        t = ((table["bucket_ts"].values.astype("datetime64[s]") - start) // np.timedelta64(seconds, "s")).astype(int)
        index = {n: i for i, n in enumerate(nodes)}
        n = table["node"].map(index)
        keep = n.notna().values & (t >= 0) & (t < len(buckets))
        t, n = t[keep], n.values[keep].astype(int)
        for f, column in enumerate(FEATURES):
            values[t, n, f] = table[column].values[keep]
    return PatternData(
        meta["pattern_id"],
        meta["version"],
        meta["graph_hash"],
        nodes,
        [tuple(e) for e in meta["edges"]],
        buckets,
        values,
        seconds,
        _excluded_mask(buckets, seconds, meta.get("excluded", [])),
    )


def _excluded_mask(buckets: np.ndarray, seconds: int, stretches: list[list[str]]) -> np.ndarray | None:
    """Per bucket: does it overlap an excluded stretch? None when nothing is excluded."""
    if not stretches:
        return None
    mask = np.zeros(len(buckets), dtype=bool)
    ends = buckets + np.timedelta64(seconds, "s")
    for lo, hi in stretches:
        lo_ts = np.datetime64(datetime.fromisoformat(lo).replace(tzinfo=None), "s")
        hi_ts = np.datetime64(datetime.fromisoformat(hi).replace(tzinfo=None), "s")
        mask |= (buckets < hi_ts) & (ends > lo_ts)
    return mask


def training_range(hour_end: datetime, history_hours: int) -> tuple[datetime, datetime]:
    return hour_end - timedelta(hours=history_hours), hour_end
