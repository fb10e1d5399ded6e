"""The patterns stage for one hour: rebuild traces, assign them to patterns (or re-cluster), keep
pattern identities stable, maintain each pattern's graph, and write per-pattern series and novel RPCs.

Re-clustering runs when settings say (every N hours, when too much traffic is unassigned, when
there are no patterns yet, or when forced); otherwise traces are assigned by shape: a shape seen
at the last clustering keeps its pattern (`exact`), a new shape joins the pattern whose graph
contains its RPCs (`nearest`), anything else stays `unassigned` until the next clustering.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import duckdb
import numpy as np

from tasks.clock import HOUR, hour_floor, naive_utc
from tasks.keys import node_key_sql, split_node_key
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
from tasks.patterns.traces import ReconstructionReport, rebuild_hour, store_traces, temp_table
from tasks.settings import Settings
from tasks.warehouse import opened

log = logging.getLogger(__name__)


@dataclass
class Changes:
    created: list[int] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)
    revived: list[int] = field(default_factory=list)
    retired: list[int] = field(default_factory=list)
    clusters: int = 0
    noise_shapes: int = 0
    noise_share: float = 0.0


@dataclass
class PatternReport:
    hour: datetime
    reconstruction: ReconstructionReport
    reclustered: bool
    reason: str
    shapes: int
    changes: Changes
    critical: int
    critical_share: float
    unassigned_share: float
    series_rows: int
    novel_rpcs: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)  # reconstruction, clustering, series

    def lines(self) -> list[str]:
        c = self.changes
        what = (
            f"re-clustered ({self.reason}): {c.clusters} clusters from {self.shapes} shapes, "
            f"{c.noise_shapes} noise shapes ({c.noise_share:.1%} of calls)"
            if self.reclustered
            else f"assigned by shape ({self.reason})"
        )
        return [
            self.reconstruction.line(),
            what,
            f"critical patterns: {self.critical} carrying {self.critical_share:.1%} of calls; "
            f"unassigned {self.unassigned_share:.1%}; created {c.created or '-'}, graph changed "
            f"{c.changed or '-'}, revived {c.revived or '-'}, retired {c.retired or '-'}",
            f"pattern_series rows {self.series_rows:,}; novel RPC rows {self.novel_rpcs:,}; {self.seconds:.1f} s",
        ]


def _hour_shapes(con: duckdb.DuckDBPyConnection, hour: datetime) -> Shapes:
    rows = con.execute(
        """
        SELECT s.shape_id, count(*), sum(r.n_calls), any_value(s.rpcs), any_value(s.edges)
        FROM scope_rebuilt r JOIN shapes s USING (shape_id) WHERE r.hour = ?
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


def _active_graphs(con: duckdb.DuckDBPyConnection, statuses: tuple[str, ...] = ("active",)) -> dict[int, set[str]]:
    rows = con.execute(f"""
        SELECT p.pattern_id, list(n.node) FROM patterns p
        JOIN pattern_nodes n ON n.pattern_id = p.pattern_id AND n.version = p.version
        WHERE p.status IN ({", ".join(repr(s) for s in statuses)}) GROUP BY 1""").fetchall()
    return {int(pid): set(nodes) for pid, nodes in rows}


def _assign_by_shape(
    con: duckdb.DuckDBPyConnection, settings: Settings, hour: datetime, include_this_hour: bool = False
) -> None:
    """TEMP `assignment` (shape_id, pattern_id, method) for every rebuilt shape: the pattern an
    earlier clustering gave it (`exact`, or `noise`), else the active pattern whose graph contains
    its RPCs (`nearest`), else `unassigned`."""
    start = naive_utc(hour)
    known = {
        shape: (pid, method if hour_ == start else ("exact" if pid is not None else "noise"))
        for shape, pid, method, hour_ in con.execute(
            f"""
        SELECT sp.shape_id, sp.pattern_id, sp.method, sp.assigned_hour FROM shape_patterns sp
        LEFT JOIN patterns p USING (pattern_id)
        WHERE sp.assigned_hour {"<=" if include_this_hour else "<"} ?
          AND (sp.pattern_id IS NULL OR p.status = 'active')""",
            [start],
        ).fetchall()
    }
    graphs = _active_graphs(con)
    rpcs = dict(
        con.execute(
            "SELECT shape_id, rpcs FROM shapes WHERE shape_id IN (SELECT shape_id FROM scope_rebuilt)"
        ).fetchall()
    )
    ids, pids, methods = [], [], []
    for shape in sorted(rpcs):
        if shape in known:
            pid, method = known[shape]
        else:
            pid, method = _nearest(set(rpcs[shape]), graphs, settings.variant_containment)
        ids.append(shape), pids.append(-1 if pid is None else pid), methods.append(method)
    temp_table(
        con,
        "assignment",
        shape_id=np.array(ids, dtype=np.uint64),
        pattern_id=np.array(pids, dtype=np.int64),
        method=np.array(methods, dtype=object),
    )
    con.execute("UPDATE assignment SET pattern_id = NULL WHERE pattern_id < 0")


def _nearest(rpcs: set[str], graphs: dict[int, set[str]], min_containment: float) -> tuple[int | None, str]:
    best = max(graphs, key=lambda p: (containment(rpcs, graphs[p]), jaccard(rpcs, graphs[p])), default=None)
    if best is not None and containment(rpcs, graphs[best]) >= min_containment:
        return best, "nearest"
    return None, "unassigned"


def _share(con: duckdb.DuckDBPyConnection, hour: datetime, where: str) -> float:
    total, part = con.execute(
        f"""
        SELECT sum(r.n_calls), sum(r.n_calls) FILTER (WHERE {where})
        FROM scope_rebuilt r LEFT JOIN assignment a USING (shape_id) WHERE r.hour = ?""",
        [naive_utc(hour)],
    ).fetchone()
    return float(part or 0) / float(total) if total else 0.0


def _decide(
    con: duckdb.DuckDBPyConnection, settings: Settings, hour: datetime, force: bool, unassigned: float
) -> tuple[bool, str]:
    """Whether to re-cluster this hour, and why (logged and kept in `clustering_runs`)."""
    start = naive_utc(hour)
    if force:
        return True, "forced"
    if not con.execute("SELECT count(*) FROM patterns WHERE first_seen < ?", [start]).fetchone()[0]:
        return True, "no patterns yet"
    last = con.execute("SELECT max(hour) FROM clustering_runs WHERE reclustered AND hour < ?", [start]).fetchone()[0]
    if last is None or start - last >= timedelta(hours=settings.recluster_every_hours):
        return True, f"last clustering {last or 'never'} is {settings.recluster_every_hours} h or more ago"
    if unassigned > settings.recluster_unclustered_share:
        return True, f"unassigned traffic {unassigned:.1%} > {settings.recluster_unclustered_share:.0%}"
    return False, f"patterns fresh (clustered {last:%Y-%m-%d %H:00}), unassigned {unassigned:.1%}"


def _store_graph(con: duckdb.DuckDBPyConnection, pid: int, version: int, graph: Graph) -> None:
    con.execute("DELETE FROM pattern_nodes WHERE pattern_id = ? AND version = ?", [pid, version])
    con.execute("DELETE FROM pattern_edges WHERE pattern_id = ? AND version = ?", [pid, version])
    con.executemany(
        "INSERT INTO pattern_nodes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            [pid, version, node, *split_node_key(node), support, calls]
            for node, (support, calls) in sorted(graph.nodes.items())
        ],
    )
    if graph.edges:
        con.executemany(
            "INSERT INTO pattern_edges VALUES (?, ?, ?, ?, ?)",
            [[pid, version, p, c, w] for (p, c), w in sorted(graph.edges.items())],
        )


def _history(
    con: duckdb.DuckDBPyConnection, pid: int, version: int, hour: datetime, event: str, ghash: str, details: str
) -> None:
    con.execute(
        "DELETE FROM pattern_history WHERE pattern_id = ? AND hour = ? AND event = ?", [pid, naive_utc(hour), event]
    )
    con.execute(
        "INSERT INTO pattern_history VALUES (?, ?, ?, ?, ?, ?)", [pid, version, naive_utc(hour), event, ghash, details]
    )


def _upsert_pattern(
    con, pid: int | None, graph: Graph, hour: datetime, is_critical: bool, share: float, n_shapes: int, changes: Changes
) -> int:
    start = naive_utc(hour)
    old = (
        con.execute("SELECT version, graph_hash, status FROM patterns WHERE pattern_id = ?", [pid]).fetchone()
        if pid
        else None
    )
    if old is None:
        pid = con.execute("SELECT coalesce(max(pattern_id), 0) + 1 FROM patterns").fetchone()[0]
        version, event = 1, "created"
        changes.created.append(pid)
    else:
        version, event = old[0], None
        if old[1] != graph.hash:
            version, event = version + 1, "graph_changed"
            changes.changed.append(pid)
        if old[2] != "active":
            event = event or "revived"
            changes.revived.append(pid)
    last_changed = (
        start
        if event in ("created", "graph_changed")
        else con.execute("SELECT last_changed FROM patterns WHERE pattern_id = ?", [pid]).fetchone()[0]
    )
    first_seen = (
        start
        if old is None
        else con.execute("SELECT first_seen FROM patterns WHERE pattern_id = ?", [pid]).fetchone()[0]
    )
    con.execute(
        "INSERT OR REPLACE INTO patterns VALUES (?, ?, ?, 'active', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            pid,
            version,
            graph.hash,
            is_critical,
            first_seen,
            last_changed,
            share,
            graph.calls,
            graph.traces,
            len(graph.nodes),
            len(graph.edges),
            n_shapes,
            start,
        ],
    )
    if event:
        _store_graph(con, pid, version, graph)
        _history(con, pid, version, hour, event, graph.hash, f"{len(graph.nodes)} nodes, {len(graph.edges)} edges")
    return pid


def _recluster(con: duckdb.DuckDBPyConnection, settings: Settings, hour: datetime, shapes: Shapes) -> Changes:
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
        c: build_graph(shapes, np.flatnonzero(labels == c), settings.graph_min_support) for c in set(labels) - {-1}
    }
    changes.clusters, changes.noise_shapes = len(graphs), int((labels < 0).sum())
    changes.noise_share = float(shapes.calls[labels < 0].sum()) / total_calls if total_calls else 0.0
    matched = match_clusters(
        {c: set(g.nodes) for c, g in graphs.items()},
        _active_graphs(con, ("active", "retired")),
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
        pattern_of[c] = _upsert_pattern(
            con,
            matched.get(c),
            graphs[c],
            hour,
            c in hot,
            graphs[c].calls / total_calls,
            int((labels == c).sum()),
            changes,
        )
    for pid in sorted(set(_active_graphs(con)) - set(pattern_of.values())):
        version, ghash = con.execute("SELECT version, graph_hash FROM patterns WHERE pattern_id = ?", [pid]).fetchone()
        con.execute(
            "UPDATE patterns SET status = 'retired', critical = false, traffic_share = 0, updated_hour = ? "
            "WHERE pattern_id = ?",
            [naive_utc(hour), pid],
        )
        _history(con, pid, version, hour, "retired", ghash, "no cluster matched it")
        changes.retired.append(pid)
    temp_table(
        con,
        "assignment",
        shape_id=shapes.shape_id,
        pattern_id=np.array([pattern_of.get(int(c), -1) for c in labels], dtype=np.int64),
        method=np.where(labels >= 0, "clustered", "noise").astype(object),
    )
    con.execute("UPDATE assignment SET pattern_id = NULL WHERE pattern_id < 0")
    con.execute(
        "INSERT OR REPLACE INTO shape_patterns SELECT shape_id, pattern_id, method, ? FROM assignment",
        [naive_utc(hour)],
    )
    return changes


def _pattern_series(con: duckdb.DuckDBPyConnection, settings: Settings, hour: datetime) -> int:
    start, end = naive_utc(hour), naive_utc(hour + HOUR)
    seconds = settings.bucket_seconds
    con.execute("DELETE FROM pattern_series WHERE bucket_ts >= ? AND bucket_ts < ?", [start, end])
    return con.execute(
        f"""INSERT INTO pattern_series
        SELECT t.pattern_id, time_bucket(INTERVAL '{seconds} seconds', c.ts) AS bucket_ts,
               {node_key_sql("c")} AS node,
               c.caller, c.callee, c.interface, c.rpc_type, count(*), count(*) FILTER (WHERE c.is_error),
               avg(c.rt_ms), quantile_cont(c.rt_ms, 0.95), {seconds}
        FROM calls c JOIN trace_patterns t USING (trace_id)
        WHERE c.ts >= ? AND c.ts < ? AND t.hour >= ? AND t.pattern_id IS NOT NULL
        GROUP BY ALL""",
        [start, end, naive_utc(hour - HOUR)],
    ).fetchone()[0]


def _novel_rpcs(con: duckdb.DuckDBPyConnection, hour: datetime) -> int:
    """RPCs of this hour (from `rpc_series`) that are in no active pattern's graph."""
    start, end = naive_utc(hour), naive_utc(hour + HOUR)
    con.execute("DELETE FROM novel_rpcs WHERE bucket_ts >= ? AND bucket_ts < ?", [start, end])
    n = con.execute(
        f"""INSERT INTO novel_rpcs
        SELECT r.bucket_ts, r.caller, r.callee, r.interface, r.rpc_type, r.calls, NULL FROM rpc_series r
        WHERE r.bucket_ts >= ? AND r.bucket_ts < ?
          AND {node_key_sql("r")} NOT IN (
              SELECT n.node FROM pattern_nodes n JOIN patterns p
              ON p.pattern_id = n.pattern_id AND p.version = n.version AND p.status = 'active')""",
        [start, end],
    ).fetchone()[0]
    con.execute("""UPDATE novel_rpcs SET first_seen = f.first FROM (
        SELECT caller, callee, interface, rpc_type, min(bucket_ts) AS first FROM novel_rpcs GROUP BY ALL) f
        WHERE novel_rpcs.caller = f.caller AND novel_rpcs.callee = f.callee AND novel_rpcs.rpc_type = f.rpc_type
          AND novel_rpcs.interface IS NOT DISTINCT FROM f.interface""")
    return int(n)


def _critical_share(con: duckdb.DuckDBPyConnection, hour: datetime) -> tuple[int, float]:
    n, share = con.execute(
        """
        SELECT count(DISTINCT p.pattern_id), sum(r.n_calls) FILTER (WHERE p.critical) / sum(r.n_calls)
        FROM scope_rebuilt r LEFT JOIN assignment a USING (shape_id) LEFT JOIN patterns p
        ON p.pattern_id = a.pattern_id AND p.critical AND p.status = 'active'
        WHERE r.hour = ?""",
        [naive_utc(hour)],
    ).fetchone()
    return int(n or 0), float(share or 0.0)


def patterns_hour(settings: Settings, hour: datetime, force: bool = False) -> PatternReport:
    """The patterns stage for `hour` (idempotent: rerunning the hour gives the same tables)."""
    hour = hour_floor(hour)
    started = time.perf_counter()
    with opened(settings.warehouse) as con:
        con.execute("BEGIN")
        reconstruction = rebuild_hour(con, hour)
        timings = {"reconstruction": time.perf_counter() - started}
        shapes = _hour_shapes(con, hour)
        _assign_by_shape(con, settings, hour)
        unassigned = _share(con, hour, "a.pattern_id IS NULL")
        recluster, reason = _decide(con, settings, hour, force, unassigned)
        changes = _recluster(con, settings, hour, shapes) if recluster else Changes()
        if recluster:
            _assign_by_shape(con, settings, hour, include_this_hour=True)
            unassigned = _share(con, hour, "a.pattern_id IS NULL")
        n_critical, critical_share = _critical_share(con, hour)
        timings["clustering"] = time.perf_counter() - started - timings["reconstruction"]
        store_traces(con, hour, "assignment")
        series_rows = _pattern_series(con, settings, hour)
        novel = _novel_rpcs(con, hour)
        seconds = time.perf_counter() - started
        timings["store_and_series"] = seconds - timings["reconstruction"] - timings["clustering"]
        con.execute(
            "INSERT OR REPLACE INTO clustering_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                naive_utc(hour),
                recluster,
                reason,
                len(shapes),
                changes.clusters,
                changes.noise_shapes,
                changes.noise_share,
                n_critical,
                critical_share,
                unassigned,
                seconds,
            ],
        )
        con.execute("COMMIT")
    report = PatternReport(
        hour,
        reconstruction,
        recluster,
        reason,
        len(shapes),
        changes,
        n_critical,
        critical_share,
        unassigned,
        series_rows,
        novel,
        seconds,
        timings,
    )
    for line in report.lines():
        log.info(line)
    return report


PATTERNS_SQL = """
SELECT p.pattern_id AS id, p.status, CASE WHEN p.critical THEN 'yes' ELSE '' END AS critical, p.version,
       p.n_nodes AS nodes, p.n_edges AS edges, p.n_shapes AS shapes, round(100 * p.traffic_share, 1) AS "share %",
       p.calls, strftime(p.first_seen, '%Y-%m-%d %H:00') AS first_seen,
       strftime(p.last_changed, '%Y-%m-%d %H:00') AS last_change,
       (SELECT string_agg(DISTINCT n.callee, ', ') FROM pattern_nodes n
        WHERE n.pattern_id = p.pattern_id AND n.version = p.version AND n.caller = 'USER') AS entry
FROM patterns p ORDER BY p.status, p.calls DESC
"""


def pattern_table(settings: Settings) -> tuple[list[str], list[tuple]]:
    with opened(settings.warehouse, read_only=True) as con:
        cursor = con.execute(PATTERNS_SQL)
        return [d[0] for d in cursor.description], cursor.fetchall()
