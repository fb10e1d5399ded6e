"""Stable pattern identities: a re-clustered group keeps the id of the pattern it matches, its
version moves only when its graph changes, and every change is an event in the history.

Reads and writes `patterns`, `pattern_nodes`, `pattern_edges`, `pattern_history`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

import duckdb

from tasks.clock import naive_utc
from tasks.keys import split_node_key
from tasks.patterns.clustering import Graph


@dataclass
class Changes:
    """What one re-clustering did to the patterns (ids per event) and how much it left as noise."""

    created: list[int] = field(default_factory=list)
    changed: list[int] = field(default_factory=list)
    revived: list[int] = field(default_factory=list)
    retired: list[int] = field(default_factory=list)
    clusters: int = 0
    noise_shapes: int = 0
    noise_share: float = 0.0


@dataclass(frozen=True)
class ClusterSummary:
    """One cluster of this hour's clustering, as it is stored in `patterns`."""

    graph: Graph
    critical: bool
    traffic_share: float
    n_shapes: int


class StoredPattern(NamedTuple):
    version: int
    graph_hash: str
    status: str
    first_seen: datetime
    last_changed: datetime


def active_graphs(con: duckdb.DuckDBPyConnection, statuses: tuple[str, ...] = ("active",)) -> dict[int, set[str]]:
    """The node set of the current graph version of every pattern with one of `statuses`."""
    rows = con.execute(
        """
        SELECT p.pattern_id, list(n.node) FROM patterns p
        JOIN pattern_nodes n ON n.pattern_id = p.pattern_id AND n.version = p.version
        WHERE list_contains($statuses, p.status) GROUP BY 1""",
        {"statuses": list(statuses)},
    ).fetchall()
    return {int(pid): set(nodes) for pid, nodes in rows}


def _stored(con: duckdb.DuckDBPyConnection, pid: int | None) -> StoredPattern | None:
    if pid is None:
        return None
    row = con.execute(
        "SELECT version, graph_hash, status, first_seen, last_changed FROM patterns WHERE pattern_id = ?", [pid]
    ).fetchone()
    return None if row is None else StoredPattern(*row)


def _new_pattern_id(con: duckdb.DuckDBPyConnection) -> int:
    [(pid,)] = con.execute("SELECT coalesce(max(pattern_id), 0) + 1 FROM patterns").fetchall()
    return int(pid)


def upsert_pattern(
    con: duckdb.DuckDBPyConnection, matched: int | None, cluster: ClusterSummary, hour: datetime, changes: Changes
) -> int:
    """Store `cluster` as the pattern it `matched` (or a new one) for `hour`; returns the pattern id.

    A new graph hash is a new version (`graph_changed`); a retired pattern matched again is
    `revived`; the graph's nodes and edges are stored on every event."""
    start = naive_utc(hour)
    old = _stored(con, matched)
    event: str | None
    if old is None or matched is None:
        pid, version, event = _new_pattern_id(con), 1, "created"
        first_seen = last_changed = start
        changes.created.append(pid)
    else:
        pid, version, event = matched, old.version, None
        first_seen, last_changed = old.first_seen, old.last_changed
        if old.graph_hash != cluster.graph.hash:
            version, event, last_changed = version + 1, "graph_changed", start
            changes.changed.append(pid)
        if old.status != "active":
            event = event or "revived"
            changes.revived.append(pid)
    _write_pattern(con, pid, version, cluster, first_seen, last_changed, start)
    if event:
        graph = cluster.graph
        store_graph(con, pid, version, graph)
        record_event(con, pid, version, hour, event, graph.hash, f"{len(graph.nodes)} nodes, {len(graph.edges)} edges")
    return pid


def _write_pattern(
    con: duckdb.DuckDBPyConnection,
    pid: int,
    version: int,
    cluster: ClusterSummary,
    first_seen: datetime,
    last_changed: datetime,
    updated_hour: datetime,
) -> None:
    graph = cluster.graph
    # delete then insert (in the stage's transaction), not INSERT OR REPLACE: a lake has no keys
    con.execute("DELETE FROM patterns WHERE pattern_id = ?", [pid])
    con.execute(
        """INSERT INTO patterns (pattern_id, version, graph_hash, status, critical, first_seen,
            last_changed, traffic_share, calls, traces, n_nodes, n_edges, n_shapes, updated_hour)
        VALUES (?, ?, ?, 'active', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        [
            pid,
            version,
            graph.hash,
            cluster.critical,
            first_seen,
            last_changed,
            cluster.traffic_share,
            graph.calls,
            graph.traces,
            len(graph.nodes),
            len(graph.edges),
            cluster.n_shapes,
            updated_hour,
        ],
    )


def retire_unmatched(con: duckdb.DuckDBPyConnection, hour: datetime, kept: set[int], changes: Changes) -> None:
    """Retire every active pattern not in `kept` (no cluster of this clustering matched it)."""
    for pid in sorted(set(active_graphs(con)) - kept):
        [(version, ghash)] = con.execute(
            "SELECT version, graph_hash FROM patterns WHERE pattern_id = ?", [pid]
        ).fetchall()
        con.execute(
            "UPDATE patterns SET status = 'retired', critical = false, traffic_share = 0, updated_hour = ? "
            "WHERE pattern_id = ?",
            [naive_utc(hour), pid],
        )
        record_event(con, pid, version, hour, "retired", ghash, "no cluster matched it")
        changes.retired.append(pid)


def store_graph(con: duckdb.DuckDBPyConnection, pid: int, version: int, graph: Graph) -> None:
    """Replace the nodes and edges of the pattern's graph `version`."""
    con.execute("DELETE FROM pattern_nodes WHERE pattern_id = ? AND version = ?", [pid, version])
    con.execute("DELETE FROM pattern_edges WHERE pattern_id = ? AND version = ?", [pid, version])
    con.executemany(
        "INSERT INTO pattern_nodes (pattern_id, version, node, caller, callee, interface, rpc_type, support, calls) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            [pid, version, node, *split_node_key(node), support, calls]
            for node, (support, calls) in sorted(graph.nodes.items())
        ],
    )
    if graph.edges:
        con.executemany(
            "INSERT INTO pattern_edges (pattern_id, version, parent_node, child_node, weight) VALUES (?, ?, ?, ?, ?)",
            [[pid, version, p, c, w] for (p, c), w in sorted(graph.edges.items())],
        )


def record_event(
    con: duckdb.DuckDBPyConnection, pid: int, version: int, hour: datetime, event: str, ghash: str, details: str
) -> None:
    """One `pattern_history` row per pattern, hour and event (a rerun of the hour replaces it)."""
    con.execute(
        "DELETE FROM pattern_history WHERE pattern_id = ? AND hour = ? AND event = ?", [pid, naive_utc(hour), event]
    )
    con.execute(
        "INSERT INTO pattern_history (pattern_id, version, hour, event, graph_hash, details) VALUES (?, ?, ?, ?, ?, ?)",
        [pid, version, naive_utc(hour), event, ghash, details],
    )
