"""Rebuild each trace's call tree from `calls` and give it a canonical, hashed shape.

A trace belongs to the hour of its root (its earliest call). Processing hour H rebuilds the
traces rooted in H and, again, the traces rooted in H-1 that have calls in H (their late tail),
so a straddling trace is counted once, with its whole tree.

Parents: a call's parent is the call with its `parent_call_id` in the same trace. Where that call
is missing, Alibaba-style dotted ids (`0.1.2` -> `0.1` -> `0`) attach the call to its nearest
present ancestor; otherwise it becomes an extra root. Where a call id occurs twice (async calls in
Alibaba data, repeated span ids), a child attaches to the instance whose callee is the child's
caller, else to the first instance (near-linear however often an id repeats).

Shape: the tree over RPC identities (caller, callee, interface, rpc_type), insensitive to sibling
order and timing: node hash = mix(rpc, sum of the children's mixed hashes) (a multiset hash),
computed bottom-up, level by level, vectorised in numpy.

Status per trace: `full` (one top-level root, every parent present), `partial` (rebuilt after
re-attaching orphans or with several roots), `failed` (no top-level root: the request's entry call
was never recorded, or the parent links loop).

Reads `calls`, `shapes`, `trace_patterns`; writes `shapes`, `trace_patterns`, `reconstruction`, and
the TEMP tables named in `temp_tables` (`SCOPE_TRACES`, `SCOPE_CALLS`, `SCOPE_REBUILT`) that the
patterns stage reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import duckdb
import numpy as np

from tasks.clock import HOUR, naive_utc
from tasks.keys import EDGE, node_key_sql
from tasks.patterns.temp_tables import (
    ASSIGNMENT,
    ORPHAN_ROWS,
    SCOPE_CALLS,
    SCOPE_REBUILT,
    SCOPE_TRACES,
    SHAPE_CALLS,
    TRACE_SHAPES,
    temp_table,
)

MASK = np.uint64(0xFFFFFFFFFFFFFFFF)
MAX_DEPTH = 256


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-spread 64-bit hash of each uint64."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


@dataclass
class TraceForest:
    """The calls of a set of traces as flat arrays, one entry per call (node)."""

    trace: np.ndarray  # uint64 hash of trace_id
    node: np.ndarray  # uint64 hash of (trace_id, call_id)
    parent: np.ndarray  # uint64 hash of (trace_id, parent_call_id); 0 when NULL
    rpc: np.ndarray  # uint64 hash of (caller, callee, interface, rpc_type)
    caller: np.ndarray  # uint64 hash of caller service
    callee: np.ndarray  # uint64 hash of callee service
    top: np.ndarray  # bool: a top-level call (no parent id, or a dotted id's first level)
    rowid: np.ndarray  # int64 rowid in `calls` (to fetch strings for a few rows)

    def __len__(self) -> int:
        return len(self.node)


@dataclass
class Rebuilt:
    """Per call: resolved parent index (-1 for roots), depth, subtree hash; per trace: status, shape."""

    parent_idx: np.ndarray
    depth: np.ndarray
    node_hash: np.ndarray
    traces: np.ndarray  # unique trace hashes
    trace_of_call: np.ndarray  # index into traces, per call
    shape: np.ndarray  # uint64 shape id per trace
    status: np.ndarray  # 0 full, 1 partial, 2 failed, per trace


def load_scope(con: duckdb.DuckDBPyConnection, hour: datetime) -> TraceForest:
    """TEMP table `SCOPE_TRACES` (trace_id, trace_hash, root_ts: the traces rooted in `hour`, plus
    those of the hour before with a late tail in it) and TEMP view `SCOPE_CALLS` (their calls: the
    `calls` rowid, then every column of `calls`); returns the forest."""
    prev, start, end = (f"TIMESTAMP '{naive_utc(t)}'" for t in (hour - HOUR, hour, hour + HOUR))
    con.execute(f"""CREATE OR REPLACE TEMP TABLE {SCOPE_TRACES} AS
        SELECT trace_id, hash(trace_id) AS trace_hash, min(ts) AS root_ts FROM calls
        WHERE ts >= {prev} AND ts < {end} GROUP BY trace_id HAVING min(ts) >= {start} OR max(ts) >= {start}""")
    con.execute(f"""CREATE OR REPLACE TEMP VIEW {SCOPE_CALLS} AS
        SELECT c.rowid AS rowid, c.* FROM calls c
        WHERE c.ts >= {prev} AND c.ts < {end} AND hash(c.trace_id) IN (SELECT trace_hash FROM {SCOPE_TRACES})""")
    cols = con.execute(f"""
        SELECT hash(trace_id) AS trace, hash(trace_id, call_id) AS node,
               CASE WHEN parent_call_id IS NULL THEN 0::UBIGINT ELSE hash(trace_id, parent_call_id) END AS parent,
               hash(caller, callee, interface, rpc_type) AS rpc, hash(caller) AS caller, hash(callee) AS callee,
               parent_call_id IS NULL OR (contains(call_id, '.') AND NOT contains(parent_call_id, '.')) AS top,
               rowid
        FROM {SCOPE_CALLS}""").fetchnumpy()
    return TraceForest(**{k: np.asarray(v) for k, v in cols.items()})


def _resolve_parents(f: TraceForest) -> np.ndarray:
    """Index of each call's parent call (-1 when absent); duplicate ids prefer callee == caller.

    Both sides are sorted before `searchsorted`: random probes into 10 M keys miss the cache."""
    n = len(f)
    order = np.argsort(f.node, kind="stable")
    keys = f.node[order]
    queries = np.argsort(f.parent, kind="stable")
    pos = np.empty(n, dtype=np.int64)
    pos[queries] = np.searchsorted(keys, f.parent[queries], side="left")
    pos = np.minimum(pos, n - 1)
    found = (keys[pos] == f.parent) & (f.parent != 0)
    idx = np.full(n, -1, dtype=np.int64)
    idx[found] = order[pos[found]]
    following = np.minimum(pos + 1, n - 1)
    dup = np.flatnonzero(found & (pos + 1 < n) & (keys[following] == f.parent))
    if len(dup):  # async duplicates (Alibaba), repeated span ids
        idx[dup] = _duplicate_parents(f, dup, idx[dup])
    return idx


def _duplicate_parents(f: TraceForest, children: np.ndarray, first: np.ndarray) -> np.ndarray:
    """For children whose parent id occurs several times (`first`: its first instance): the first
    instance whose callee is the child's caller, else `first`. One sort on (id, callee), one search
    per child: linear-logarithmic however often an id repeats."""
    _, node_rank = np.unique(f.node, return_inverse=True)
    callees, callee_rank = np.unique(f.callee, return_inverse=True)
    width = np.int64(len(callees))
    pair = node_rank.astype(np.int64) * width + callee_rank
    order = np.argsort(pair, kind="stable")  # ties in call order, as the first-instance search
    pairs = pair[order]
    at = np.minimum(np.searchsorted(callees, f.caller[children]), len(callees) - 1)
    query = node_rank[first].astype(np.int64) * width + at
    pos = np.minimum(np.searchsorted(pairs, query, side="left"), len(pairs) - 1)
    hit = (callees[at] == f.caller[children]) & (pairs[pos] == query)
    return np.where(hit, order[pos], first)


def _attach_orphans(con: duckdb.DuckDBPyConnection, f: TraceForest, parent_idx: np.ndarray) -> np.ndarray:
    """Orphans (parent id given but absent) with dotted ids go to their nearest present ancestor."""
    orphans = np.flatnonzero((parent_idx < 0) & ~f.top)
    if len(orphans) == 0:
        return parent_idx
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {ORPHAN_ROWS} AS SELECT unnest($rows::BIGINT[]) AS rowid",
        {"rows": f.rowid[orphans].tolist()},
    )
    rows = con.execute(f"""
        WITH o AS (SELECT s.rowid, s.trace_id, string_split(s.call_id, '.') AS parts
                   FROM {SCOPE_CALLS} s SEMI JOIN {ORPHAN_ROWS} USING (rowid) WHERE contains(s.call_id, '.')),
        prefixes AS (SELECT rowid, trace_id, generate_series AS k,
                            array_to_string(parts[1:generate_series], '.') AS prefix
                     FROM o, generate_series(1, len(parts) - 2))
        SELECT p.rowid, arg_max(s.rowid, p.k) FROM prefixes p
        JOIN {SCOPE_CALLS} s ON s.trace_id = p.trace_id AND s.call_id = p.prefix GROUP BY p.rowid""").fetchall()
    if rows:
        by_rowid = np.argsort(f.rowid)

        def index(rowids: tuple[int, ...]) -> np.ndarray:  # noqa: E306
            return by_rowid[np.searchsorted(f.rowid[by_rowid], np.array(rowids, dtype=f.rowid.dtype))]

        orphan_rows, ancestor_rows = zip(*rows)
        parent_idx[index(orphan_rows)] = index(ancestor_rows)
    return parent_idx


def _depths(parent_idx: np.ndarray) -> np.ndarray:
    """Depth of each call in its tree; -1 where the parent links loop."""
    depth = np.where(parent_idx < 0, 0, -1)
    has_parent = parent_idx >= 0
    for _ in range(MAX_DEPTH):
        parent_depth = depth[np.where(has_parent, parent_idx, 0)]
        update = has_parent & (depth < 0) & (parent_depth >= 0)
        if not update.any():
            break
        depth[update] = parent_depth[update] + 1
    return depth


def _subtree_hashes(f: TraceForest, parent_idx: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Bottom-up multiset hash of every call's subtree over RPC identities."""
    acc = np.zeros(len(f), dtype=np.uint64)
    node_hash = np.zeros(len(f), dtype=np.uint64)
    by_depth = np.argsort(depth, kind="stable")
    bounds = np.searchsorted(depth[by_depth], np.arange(depth.max() + 2))
    with np.errstate(over="ignore"):
        for d in range(int(depth.max()), -1, -1):
            level = by_depth[bounds[d] : bounds[d + 1]]
            node_hash[level] = mix(f.rpc[level] ^ mix(acc[level] + np.uint64(1)))
            children = level[parent_idx[level] >= 0]
            np.add.at(acc, parent_idx[children], mix(node_hash[children] ^ np.uint64(0x5DEECE66D)))
    return node_hash


def _trace_shapes(
    f: TraceForest, parent_idx: np.ndarray, depth: np.ndarray, node_hash: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per trace: the unique trace hashes, each call's trace index, the shape id and the status."""
    traces, trace_of_call = np.unique(f.trace, return_inverse=True)
    roots = parent_idx < 0
    n = len(traces)
    with np.errstate(over="ignore"):
        root_sum = np.zeros(n, dtype=np.uint64)
        np.add.at(root_sum, trace_of_call[roots], mix(node_hash[roots]))
        root_count = np.bincount(trace_of_call[roots], minlength=n)
        shape = mix(root_sum ^ mix(root_count.astype(np.uint64)))
    top_roots = np.bincount(trace_of_call[roots & f.top], minlength=n)
    looped = np.bincount(trace_of_call[depth < 0], minlength=n) > 0
    orphaned = np.bincount(trace_of_call[roots & ~f.top], minlength=n) > 0
    status = np.where(top_roots == 0, 2, np.where((top_roots > 1) | orphaned, 1, 0))
    status[looped] = 2
    reattached = np.bincount(trace_of_call[(parent_idx >= 0) & ~f.top & _orphan_mask(f, parent_idx)], minlength=n) > 0
    status[(status == 0) & reattached] = 1
    return traces, trace_of_call, shape, status


def _orphan_mask(f: TraceForest, parent_idx: np.ndarray) -> np.ndarray:
    """Calls attached to an ancestor other than their stated parent."""
    resolved = np.zeros(len(f), dtype=bool)
    has = parent_idx >= 0
    resolved[has] = f.node[parent_idx[has]] != f.parent[has]
    return resolved


def rebuild(con: duckdb.DuckDBPyConnection, forest: TraceForest) -> Rebuilt:
    parent_idx = _attach_orphans(con, forest, _resolve_parents(forest))
    depth = _depths(parent_idx)
    parent_idx = np.where(depth < 0, -1, parent_idx)  # break loops: those traces are failed
    node_hash = _subtree_hashes(forest, parent_idx, np.maximum(depth, 0))
    traces, trace_of_call, shape, status = _trace_shapes(forest, parent_idx, depth, node_hash)
    return Rebuilt(parent_idx, depth, node_hash, traces, trace_of_call, shape, status)


@dataclass(frozen=True)
class ReconstructionReport:
    hour: datetime
    traces: int
    full: int
    partial: int
    failed: int
    calls: int
    late_tails: int  # traces of the previous hour rebuilt with their tail in this hour
    new_shapes: int

    def line(self) -> str:
        share = lambda n: f"{n / self.traces:.1%}" if self.traces else "-"  # noqa: E731
        return (
            f"{self.hour:%Y-%m-%d %H:00}: {self.traces:,} traces rebuilt from {self.calls:,} calls: "
            f"full {share(self.full)}, partial {share(self.partial)}, failed {share(self.failed)}; "
            f"{self.late_tails:,} late tails merged; {self.new_shapes:,} new shapes"
        )


STATUS = np.array(["full", "partial", "failed"])


def _shape_rows(con: duckdb.DuckDBPyConnection, f: TraceForest, r: Rebuilt, hour: datetime) -> None:
    """Register shapes never seen before: their RPC multiset and edges, from one member trace."""
    shapes, first = np.unique(r.shape, return_index=True)
    known = np.array([x[0] for x in con.execute("SELECT shape_id FROM shapes").fetchall()], dtype=np.uint64)
    first = first[~np.isin(shapes, known)]
    if len(first) == 0:
        return
    rows = np.flatnonzero(np.isin(r.trace_of_call, first))
    parents = r.parent_idx[rows]
    temp_table(
        con,
        SHAPE_CALLS,
        rowid=f.rowid[rows],
        parent_rowid=np.where(parents >= 0, f.rowid[np.maximum(parents, 0)], -1),
        shape_id=r.shape[r.trace_of_call[rows]],
        depth=r.depth[rows].astype(np.int32),
    )
    con.execute(
        f"""INSERT INTO shapes (shape_id, n_calls, depth, rpcs, edges, first_seen)
        WITH k AS (SELECT rowid, {node_key_sql()} AS node FROM {SCOPE_CALLS}
                   WHERE rowid IN (SELECT rowid FROM {SHAPE_CALLS} UNION ALL SELECT parent_rowid FROM {SHAPE_CALLS}))
        SELECT sc.shape_id, count(*), max(sc.depth), list_sort(list(k.node)),
               coalesce(list_sort(list(p.node || '{EDGE}' || k.node) FILTER (WHERE p.node IS NOT NULL)), []::VARCHAR[]),
               $hour
        FROM {SHAPE_CALLS} sc JOIN k USING (rowid) LEFT JOIN k p ON p.rowid = sc.parent_rowid
        GROUP BY sc.shape_id""",
        {"hour": naive_utc(hour)},
    )


def rebuild_hour(con: duckdb.DuckDBPyConnection, hour: datetime) -> ReconstructionReport:
    """Rebuild the traces of `hour` (and late tails of the hour before) and register shapes never
    seen before. Leaves, for the rest of the stage, the TEMP tables `SCOPE_TRACES` and `SCOPE_CALLS`
    (see `load_scope`) and `SCOPE_REBUILT` (trace_id, root_ts, hour, shape_id, status, n_calls: one
    row per scope trace). `store_traces` writes them once patterns are assigned."""
    forest = load_scope(con, hour)
    rebuilt = rebuild(con, forest)
    n_calls = np.bincount(rebuilt.trace_of_call, minlength=len(rebuilt.traces))
    temp_table(
        con,
        TRACE_SHAPES,
        trace_hash=rebuilt.traces,
        shape_id=rebuilt.shape,
        status=STATUS[rebuilt.status],
        n_calls=n_calls.astype(np.int32),
    )
    con.execute(f"""CREATE OR REPLACE TEMP TABLE {SCOPE_REBUILT} AS
        SELECT s.trace_id, s.root_ts, date_trunc('hour', s.root_ts) AS hour, r.shape_id, r.status, r.n_calls
        FROM {SCOPE_TRACES} s JOIN {TRACE_SHAPES} r USING (trace_hash)""")
    before = _count_shapes(con)
    _shape_rows(con, forest, rebuilt, hour)
    new_shapes = _count_shapes(con) - before
    [row] = con.execute(
        f"""SELECT count(*) FILTER (WHERE hour = $h), count(*) FILTER (WHERE hour = $h AND status = 'full'),
                   count(*) FILTER (WHERE hour = $h AND status = 'partial'),
                   count(*) FILTER (WHERE hour = $h AND status = 'failed'),
                   coalesce(sum(n_calls) FILTER (WHERE hour = $h), 0), count(*) FILTER (WHERE hour < $h)
            FROM {SCOPE_REBUILT}""",
        {"h": naive_utc(hour)},
    ).fetchall()
    traces, full, partial, failed, calls, tails = (int(x) for x in row)
    return ReconstructionReport(hour, traces, full, partial, failed, calls, tails, new_shapes)


def _count_shapes(con: duckdb.DuckDBPyConnection) -> int:
    [(n,)] = con.execute("SELECT count(*) FROM shapes").fetchall()
    return int(n)


def store_traces(con: duckdb.DuckDBPyConnection, hour: datetime) -> None:
    """Replace the rebuilt traces' rows in `trace_patterns` (patterns from TEMP table `ASSIGNMENT`:
    shape_id, pattern_id, method) and recount `reconstruction` for this hour and the one before."""
    con.execute(f"DELETE FROM trace_patterns WHERE trace_id IN (SELECT trace_id FROM {SCOPE_TRACES})")
    con.execute(f"""INSERT INTO trace_patterns (trace_id, hour, root_ts, shape_id, status, n_calls, pattern_id, method)
        SELECT s.trace_id, s.hour, s.root_ts, s.shape_id, s.status, s.n_calls, a.pattern_id,
               coalesce(a.method, 'unassigned')
        FROM {SCOPE_REBUILT} s LEFT JOIN {ASSIGNMENT} a USING (shape_id)""")
    start, prev = naive_utc(hour), naive_utc(hour - HOUR)
    con.execute("DELETE FROM reconstruction WHERE hour IN (?, ?)", [prev, start])
    con.execute(
        f"""INSERT INTO reconstruction (hour, traces, full_traces, partial_traces, failed_traces, calls,
                                       late_tail_traces, rebuilt_at)
        SELECT hour, count(*), count(*) FILTER (WHERE status = 'full'), count(*) FILTER (WHERE status = 'partial'),
               count(*) FILTER (WHERE status = 'failed'), sum(n_calls),
               count(*) FILTER (WHERE hour < ? AND trace_id IN (SELECT trace_id FROM {SCOPE_TRACES})),
               now()::TIMESTAMP
        FROM trace_patterns WHERE hour IN (?, ?) GROUP BY hour""",
        [start, prev, start],
    )
