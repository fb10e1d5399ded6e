"""What scoring reads of a pattern: its graph's nodes on a grid of buckets, as dense [T, N, F]
arrays, and the points of that grid already flagged. Reads `pattern_series` and `anomalies`;
writes nothing.

The series and earlier flags of many patterns are read in one query each: the grids go in as
parameters (`scoring_grid`: a row per pattern node with its index and bucket range) and the rows
come back as columns, split per pattern.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import duckdb
import numpy as np

from tasks.clock import naive_utc
from tasks.models.features import FEATURES, LATENCIES

Columns = dict[str, np.ndarray]  # fetched columns of one pattern, one array per column

GRID_SQL = """
WITH scoring_grid AS (
    SELECT unnest(?::INTEGER[]) AS pattern_id, unnest(?::VARCHAR[]) AS node, unnest(?::BIGINT[]) AS n,
           unnest(?::BIGINT[]) AS start_us, unnest(?::BIGINT[]) AS step_us, unnest(?::BIGINT[]) AS end_us)
"""
SERIES_SQL = (
    GRID_SQL
    + """
SELECT g.pattern_id, (epoch_us(s.bucket_ts) - g.start_us) // g.step_us AS t, g.n, s.calls, s.rt_mean, s.rt_p95, s.errors
FROM pattern_series s JOIN scoring_grid g ON s.pattern_id = g.pattern_id AND s.node = g.node
WHERE s.bucket_ts >= ? AND s.bucket_ts < ? AND epoch_us(s.bucket_ts) >= g.start_us AND epoch_us(s.bucket_ts) < g.end_us
"""
)
FLAGGED_SQL = (
    GRID_SQL
    + """
SELECT g.pattern_id, (epoch_us(a.bucket_ts) - g.start_us) // g.step_us AS t, g.n, list_position(?, a.feature) - 1 AS f,
       a.expected
FROM anomalies a JOIN scoring_grid g ON a.pattern_id = g.pattern_id AND a.node = g.node
WHERE a.bucket_ts >= ? AND a.bucket_ts < ? AND epoch_us(a.bucket_ts) >= g.start_us AND epoch_us(a.bucket_ts) < g.end_us
      AND list_contains(?, a.feature)
"""
)


@dataclass
class Grid:
    """What is read of one pattern: its graph's nodes on `size` buckets of `seconds` from `start`."""

    pattern_id: int
    nodes: list[str]
    start: np.datetime64  # datetime64[s]
    size: int
    seconds: int

    @classmethod
    def between(cls, pattern_id: int, nodes: list[str], start: datetime, end: datetime, seconds: int) -> Grid:
        first, last = np.datetime64(naive_utc(start), "s"), np.datetime64(naive_utc(end), "s")
        return cls(pattern_id, nodes, first, len(np.arange(first, last, np.timedelta64(seconds, "s"))), seconds)

    @classmethod
    def with_lead_in(
        cls, pattern_id: int, nodes: list[str], seconds: int, lead: int, start: datetime, end: datetime
    ) -> Grid:
        """Buckets [start, end) and the `lead` buckets before them that the first windows read."""
        return cls.between(pattern_id, nodes, start - timedelta(seconds=lead * seconds), end, seconds)

    @property
    def buckets(self) -> np.ndarray:
        return self.start + np.arange(self.size) * np.timedelta64(self.seconds, "s")

    @property
    def end(self) -> np.datetime64:
        return self.start + self.size * np.timedelta64(self.seconds, "s")

    def empty(self) -> np.ndarray:
        """[T, N, F] with no traffic: calls/errors 0, latency NaN."""
        values = np.zeros((self.size, len(self.nodes), len(FEATURES)))
        values[:, :, list(LATENCIES)] = np.nan
        return values

    def dense(self, rows: Columns | None) -> tuple[np.ndarray, np.ndarray]:
        """Values [T, N, F] from the grid's fetched series rows, and which buckets had any stored row."""
        values, present = self.empty(), np.zeros(self.size, dtype=bool)
        if rows:
            t, n = rows["t"].astype(np.int64), rows["n"].astype(np.int64)
            values[t, n] = np.column_stack([floats(rows[f]) for f in FEATURES])
            present[t] = True
        return values, present


def floats(column: np.ndarray) -> np.ndarray:
    """A fetched column as float64, NULL as NaN (as assigning None to a float array gives)."""
    return np.ma.filled(np.ma.asarray(column).astype(np.float64), np.nan)


def cleaned(values: np.ndarray, flagged: Columns | None) -> np.ndarray:
    """`values` with the points already flagged replaced by their forecasts."""
    clean = values.copy()
    if flagged:
        t, n, f = (flagged[k].astype(np.int64) for k in ("t", "n", "f"))
        clean[t, n, f] = floats(flagged["expected"])
    return clean


def fetch_series(con: duckdb.DuckDBPyConnection, grids: list[Grid]) -> dict[int, Columns]:
    """Stored pattern_series rows of every grid (bucket index t, node index n, features)."""
    return _fetch(con, grids, SERIES_SQL, list(_bounds(grids))) if grids else {}


def fetch_flagged(con: duckdb.DuckDBPyConnection, grids: list[Grid], until: datetime) -> dict[int, Columns]:
    """Points of every grid before `until` already flagged (t, n, feature index f, expected)."""
    if not grids:
        return {}
    first, last = _bounds(grids, np.datetime64(naive_utc(until), "s"))
    return _fetch(con, grids, FLAGGED_SQL, [list(FEATURES), first, last, list(FEATURES)])


def _bounds(grids: list[Grid], end: np.datetime64 | None = None) -> tuple[datetime, datetime]:
    first = min(g.start for g in grids)
    last = end if end is not None else max(g.end for g in grids)
    return first.astype(datetime), last.astype("datetime64[s]").astype(datetime)


def _grid_params(grids: list[Grid]) -> list[list]:
    """The `scoring_grid` parameters: per pattern node its pattern, name, index and bucket range in
    epoch microseconds."""
    us = [int(g.start.astype("datetime64[us]").astype(np.int64)) for g in grids]
    step = [g.seconds * 1_000_000 for g in grids]
    return [
        [g.pattern_id for g in grids for _ in g.nodes],
        [node for g in grids for node in g.nodes],
        [n for g in grids for n in range(len(g.nodes))],
        [u for g, u in zip(grids, us) for _ in g.nodes],
        [s for g, s in zip(grids, step) for _ in g.nodes],
        [u + s * g.size for g, u, s in zip(grids, us, step) for _ in g.nodes],
    ]


def _fetch(con: duckdb.DuckDBPyConnection, grids: list[Grid], sql: str, params: list) -> dict[int, Columns]:
    """Run `sql` against the grids: one query for all patterns, its columns split per pattern. Node
    names are matched in SQL: no row passes through a Python loop."""
    cols = con.execute(sql, _grid_params(grids) + params).fetchnumpy()
    pid = np.asarray(cols["pattern_id"])
    if not len(pid):
        return {}
    order = np.argsort(pid, kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    cuts = np.flatnonzero(np.diff(pid[order])) + 1
    return {
        int(part["pattern_id"][0]): part
        for part in ({k: v[a:b] for k, v in cols.items()} for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(pid)]))
    }
