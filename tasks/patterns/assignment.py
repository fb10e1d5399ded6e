"""Assign the hour's rebuilt traces to patterns, by shape or by re-clustering the hour's shapes.

By shape: a shape seen at the last clustering keeps its pattern (`exact`, or `noise`), a new shape
joins the active pattern whose graph contains its RPCs (`nearest`), anything else stays
`unassigned` until the next clustering. Re-clustering groups the hour's distinct shapes (HDBSCAN)
and keeps pattern identities stable (`identity`).

Reads `shapes`, `shape_patterns`, `patterns`, `pattern_nodes` and the TEMP table `SCOPE_REBUILT`;
writes `shape_patterns` (and, re-clustering, what `identity` writes) and the TEMP table `ASSIGNMENT`.
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

import duckdb
import numpy as np

from tasks.clock import naive_utc
from tasks.patterns.clustering import (
    Graph,
    Shapes,
    build_graph,
    cluster_labels,
    containment,
    critical,
    jaccard,
    match_clusters,
    shape_features,
)
from tasks.patterns.identity import Changes, ClusterSummary, active_graphs, retire_unmatched, upsert_pattern
from tasks.patterns.temp_tables import ASSIGNMENT, SCOPE_REBUILT, temp_table
from tasks.settings import Settings

NO_PATTERN = -1  # stands for NULL in the numpy column of `ASSIGNMENT`


class ShapeAssignment(NamedTuple):
    pattern_id: int | None
    method: str  # clustered, noise, exact, nearest, unassigned


class CriticalTraffic(NamedTuple):
    patterns: int  # active critical patterns with traffic this hour
    share: float  # of the hour's calls


def hour_shapes(con: duckdb.DuckDBPyConnection, hour: datetime) -> Shapes:
    """The distinct shapes of the traces rooted in `hour`, with their traces and calls."""
    rows = con.execute(
        f"""
        SELECT s.shape_id, count(*), sum(r.n_calls), any_value(s.rpcs), any_value(s.edges)
        FROM {SCOPE_REBUILT} r JOIN shapes s USING (shape_id) WHERE r.hour = ?
        GROUP BY 1 ORDER BY 1""",
        [naive_utc(hour)],
    ).fetchall()
    return Shapes(
        np.array([r[0] for r in rows], dtype=np.uint64),
        np.array([r[1] for r in rows], dtype=np.int64),
        np.array([r[2] for r in rows], dtype=np.int64),
        [r[3] for r in rows],
        [r[4] for r in rows],
    )


def write_assignment(
    con: duckdb.DuckDBPyConnection, shape_id: np.ndarray, pattern_id: np.ndarray, method: np.ndarray
) -> None:
    """(Re)create the TEMP table `ASSIGNMENT` (shape_id UBIGINT, pattern_id BIGINT or NULL, method
    VARCHAR): the pattern of each shape; `NO_PATTERN` in `pattern_id` is stored as NULL."""
    temp_table(con, ASSIGNMENT, shape_id=shape_id, pattern_id=pattern_id, method=method)
    con.execute(f"UPDATE {ASSIGNMENT} SET pattern_id = NULL WHERE pattern_id < 0")


def _known_shapes(
    con: duckdb.DuckDBPyConnection, hour: datetime, include_this_hour: bool
) -> dict[int, ShapeAssignment]:
    """Shapes an earlier clustering assigned (this hour's clustering too, when included), of patterns
    still active: their pattern, `exact` (or `noise`); this hour's keep their own method."""
    start = naive_utc(hour)
    rows = con.execute(
        f"""
        SELECT sp.shape_id, sp.pattern_id, sp.method, sp.assigned_hour FROM shape_patterns sp
        LEFT JOIN patterns p USING (pattern_id)
        WHERE sp.assigned_hour {"<=" if include_this_hour else "<"} ?
          AND (sp.pattern_id IS NULL OR p.status = 'active')""",
        [start],
    ).fetchall()
    return {
        shape: ShapeAssignment(pid, method if hour_ == start else ("exact" if pid is not None else "noise"))
        for shape, pid, method, hour_ in rows
    }


def assign_by_shape(
    con: duckdb.DuckDBPyConnection, settings: Settings, hour: datetime, include_this_hour: bool = False
) -> None:
    """`ASSIGNMENT` for every rebuilt shape: the pattern an earlier clustering gave it (`exact`, or
    `noise`), else the active pattern whose graph contains its RPCs (`nearest`), else `unassigned`."""
    known = _known_shapes(con, hour, include_this_hour)
    graphs = active_graphs(con)
    rpcs = dict(
        con.execute(
            f"SELECT shape_id, rpcs FROM shapes WHERE shape_id IN (SELECT shape_id FROM {SCOPE_REBUILT})"
        ).fetchall()
    )
    shapes = sorted(rpcs)
    assigned = [
        known[shape] if shape in known else nearest(set(rpcs[shape]), graphs, settings.variant_containment)
        for shape in shapes
    ]
    write_assignment(
        con,
        np.array(shapes, dtype=np.uint64),
        np.array([NO_PATTERN if a.pattern_id is None else a.pattern_id for a in assigned], dtype=np.int64),
        np.array([a.method for a in assigned], dtype=object),
    )


def nearest(rpcs: set[str], graphs: dict[int, set[str]], min_containment: float) -> ShapeAssignment:
    """The pattern whose graph contains the most of `rpcs` (ties: Jaccard), if it contains enough."""
    best = max(graphs, key=lambda p: (containment(rpcs, graphs[p]), jaccard(rpcs, graphs[p])), default=None)
    if best is not None and containment(rpcs, graphs[best]) >= min_containment:
        return ShapeAssignment(best, "nearest")
    return ShapeAssignment(None, "unassigned")


def recluster(con: duckdb.DuckDBPyConnection, settings: Settings, hour: datetime, shapes: Shapes) -> Changes:
    """Cluster the hour's shapes into patterns (matched to existing ones, the rest retired); writes
    `ASSIGNMENT` from the clusters and records it in `shape_patterns`."""
    changes = Changes()
    if len(shapes) == 0:
        return changes
    labels = cluster_labels(
        shapes,
        shape_features(shapes),
        settings.hdbscan_min_cluster_size,
        settings.hdbscan_min_samples,
        settings.pattern_min_traces,
        settings.variant_containment,
    )
    total_calls = int(shapes.calls.sum())
    graphs = {
        int(c): build_graph(shapes, np.flatnonzero(labels == c), settings.graph_min_support) for c in set(labels) - {-1}
    }
    changes.clusters, changes.noise_shapes = len(graphs), int((labels < 0).sum())
    changes.noise_share = float(shapes.calls[labels < 0].sum()) / total_calls if total_calls else 0.0
    pattern_of = _store_clusters(con, settings, hour, graphs, labels, total_calls, changes)
    retire_unmatched(con, hour, set(pattern_of.values()), changes)
    write_assignment(
        con,
        shapes.shape_id,
        np.array([pattern_of.get(int(c), NO_PATTERN) for c in labels], dtype=np.int64),
        np.where(labels >= 0, "clustered", "noise").astype(object),
    )
    # replaced by delete then insert (in the stage's transaction), not INSERT OR REPLACE: a lake has no keys
    con.execute(f"DELETE FROM shape_patterns WHERE shape_id IN (SELECT shape_id FROM {ASSIGNMENT})")
    con.execute(
        f"""INSERT INTO shape_patterns (shape_id, pattern_id, method, assigned_hour)
        SELECT shape_id, pattern_id, method, ? FROM {ASSIGNMENT}""",
        [naive_utc(hour)],
    )
    return changes


def _store_clusters(
    con: duckdb.DuckDBPyConnection,
    settings: Settings,
    hour: datetime,
    graphs: dict[int, Graph],
    labels: np.ndarray,
    total_calls: int,
    changes: Changes,
) -> dict[int, int]:
    """Each cluster stored as the pattern it matches (or a new one), busiest first: cluster -> pattern id."""
    matched = match_clusters(
        {c: set(g.nodes) for c, g in graphs.items()},
        active_graphs(con, ("active", "retired")),
        settings.pattern_match_jaccard,
    )
    hot = critical(
        {c: g.calls for c, g in graphs.items()},
        total_calls,
        settings.critical_coverage,
        settings.critical_min_calls_per_hour,
    )
    pattern_of = {}
    for c in sorted(graphs, key=lambda c: -graphs[c].calls):
        cluster = ClusterSummary(graphs[c], c in hot, graphs[c].calls / total_calls, int((labels == c).sum()))
        pattern_of[c] = upsert_pattern(con, matched.get(c), cluster, hour, changes)
    return pattern_of


def unassigned_share(con: duckdb.DuckDBPyConnection, hour: datetime) -> float:
    """Share of the hour's calls in traces whose shape `ASSIGNMENT` gives no pattern."""
    [(total, part)] = con.execute(
        f"""
        SELECT sum(r.n_calls), sum(r.n_calls) FILTER (WHERE a.pattern_id IS NULL)
        FROM {SCOPE_REBUILT} r LEFT JOIN {ASSIGNMENT} a USING (shape_id) WHERE r.hour = ?""",
        [naive_utc(hour)],
    ).fetchall()
    return float(part or 0) / float(total) if total else 0.0


def critical_traffic(con: duckdb.DuckDBPyConnection, hour: datetime) -> CriticalTraffic:
    """The active critical patterns the hour's traces are assigned to, and their share of the calls."""
    [(n, share)] = con.execute(
        f"""
        SELECT count(DISTINCT p.pattern_id), sum(r.n_calls) FILTER (WHERE p.critical) / sum(r.n_calls)
        FROM {SCOPE_REBUILT} r LEFT JOIN {ASSIGNMENT} a USING (shape_id) LEFT JOIN patterns p
        ON p.pattern_id = a.pattern_id AND p.critical AND p.status = 'active'
        WHERE r.hour = ?""",
        [naive_utc(hour)],
    ).fetchall()
    return CriticalTraffic(int(n or 0), float(share or 0.0))
