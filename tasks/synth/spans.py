"""The vectorised core of the generator (no tables, no files): the traces of one chunk of an hour,
per unit (a request type's tree, or an event's variant of it), as numpy columns in the output order.

Per unit and chunk one rng, seeded by (seed, hour, chunk, template, variant), draws in a fixed
order: trace counts per second, start times, the presence of optional calls (phase A), then per
node self times, pods, child offsets and errors (phase C). Changing that order changes the data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.synth.events import Event
from tasks.synth.system import USER, Node
from tasks.synth.writer import COLUMNS, HOUR_MS


@dataclass
class Unit:
    """Traces of one request type drawn from one tree (the template or an event's variant)."""

    template: int
    variant: int  # 0 for the template, else 1 + index of the event
    nodes: tuple[Node, ...]
    gbase: int  # offset of its nodes in the global node table
    rate: np.ndarray = field(default_factory=lambda: np.zeros(0))  # traces per second over the hour
    slow: list[Event] = field(default_factory=list)  # latency events active in the hour


class SpanDictionaries:
    """String tables: node-level columns as dictionary indices, and pod names."""

    def __init__(self, units_nodes: list[tuple[str, tuple[Node, ...]]], pods: dict[str, int]) -> None:
        cols: dict[str, list[str]] = {c: [] for c in ("service", "rpc_id", "rpctype", "um", "interface", "dm")}
        callee: list[str] = []
        for entry, nodes in units_nodes:
            for nd in nodes:
                cols["service"].append(entry)
                cols["rpc_id"].append(nd.rpc_id)
                cols["rpctype"].append(nd.rpctype)
                cols["um"].append(nd.caller)
                cols["interface"].append(nd.interface)
                cols["dm"].append(nd.callee)
                callee.append(nd.callee)
        self.node_index: dict[str, np.ndarray] = {}
        self.dictionary: dict[str, pa.Array] = {}
        for c, values in cols.items():
            uniq = sorted(set(values))
            pos = {v: i for i, v in enumerate(uniq)}
            self.node_index[c] = np.array([pos[v] for v in values], dtype=np.int32)
            self.dictionary[c] = pa.array(uniq, pa.string())
        services = sorted(pods)
        names: list[str] = []
        offsets: dict[str, int] = {}
        for s in services:
            offsets[s] = len(names)
            names += [f"{s}_POD_{i}" for i in range(pods[s])]
        self.user_pod = len(names)
        names.append(USER)
        self.pods = pa.array(names, pa.string())
        self.pod_offset = np.array([offsets[s] for s in callee], dtype=np.int32)
        self.pod_count = np.array([pods[s] for s in callee], dtype=np.int32)


def _unit_rng(seed: int, epoch_hour: int, chunk: int, unit: Unit) -> np.random.Generator:
    """The one rng of a unit in a chunk of an hour: an hour depends on nothing but its own seeds."""
    return np.random.default_rng([seed, epoch_hour, chunk, unit.template, unit.variant])


class HourSpans(NamedTuple):
    """The spans of a chunk as numpy columns (node-level strings as indices into `SpanDictionaries`)."""

    ts: np.ndarray  # int64 ms, one per span (trace-major, traces by start time)
    rt: np.ndarray
    node: np.ndarray  # global node index
    um_pod: np.ndarray  # index into the pod table
    dm_pod: np.ndarray
    error: np.ndarray
    trace_template: np.ndarray  # template index, one per trace
    trace_spans: np.ndarray  # spans per trace


class _LiveUnit(NamedTuple):
    """Phase A's draw for one unit: its rng (phase C goes on with it), the second and start time of
    each trace, per node which traces have it (`idxs`) and where among the parent's (`pposs`, None
    when all), and the spans per trace."""

    unit: Unit
    rng: np.random.Generator
    sec: np.ndarray
    root_ts: np.ndarray
    idxs: list[np.ndarray]
    pposs: list[np.ndarray | None]
    spans: np.ndarray


def _draw_traces(seed: int, epoch_hour: int, chunk: int, u: Unit, lo: int, hi: int) -> _LiveUnit | None:
    """Phase A: trace counts, start times and which nodes each trace has; None without traces."""
    rng = _unit_rng(seed, epoch_hour, chunk, u)
    counts = rng.poisson(u.rate[lo:hi])
    n = int(counts.sum())
    if n == 0:
        return None
    sec = np.repeat(np.arange(lo, hi, dtype=np.int32), counts)
    root_ts = epoch_hour * HOUR_MS + sec.astype(np.int64) * 1000 + rng.integers(0, 1000, n)
    idxs: list[np.ndarray] = []
    pposs: list[np.ndarray | None] = []
    spans = np.zeros(n, dtype=np.int32)
    for j, nd in enumerate(u.nodes):
        ppos: np.ndarray | None
        if j == 0:
            idx, ppos = np.arange(n, dtype=np.int32), None
        else:
            pidx = idxs[nd.parent]
            if nd.optional:
                ppos = np.flatnonzero(rng.random(len(pidx), dtype=np.float32) < nd.p)
                idx = pidx[ppos]
            else:
                idx, ppos = pidx, None
        idxs.append(idx)
        pposs.append(ppos)
        spans[idx] += 1
    return _LiveUnit(u, rng, sec, root_ts, idxs, pposs, spans)


class _Latencies(NamedTuple):
    self_rt: list[np.ndarray]  # per node: own time of each of its spans
    rt: list[np.ndarray]  # per node: own time + the slowest child


def _latencies(live: _LiveUnit, secs: np.ndarray) -> _Latencies:
    """Self times per node, then rt bottom-up: children are called in parallel, so a call's rt is
    its own time plus its slowest child's rt. A latency event multiplies its call's rt."""
    u, rng, idxs, pposs = live.unit, live.rng, live.idxs, live.pposs
    m = len(u.nodes)
    self_rt: list[np.ndarray] = []
    for j, nd in enumerate(u.nodes):
        z = rng.standard_normal(len(idxs[j]), dtype=np.float32)
        self_rt.append(np.exp(z * np.float32(nd.sigma)) * np.float32(nd.median_ms))
    child_max: list[np.ndarray | None] = [None] * m
    rt: list[np.ndarray] = [np.empty(0, dtype=np.float32)] * m  # every entry is set below
    for j in range(m - 1, -1, -1):
        cmj = child_max[j]
        r = self_rt[j] if cmj is None else self_rt[j] + cmj
        for ev in u.slow:  # latency event: this call's rt x factor, its callers wait longer
            if u.nodes[j].origin == ev.node:
                hit = ev.active(secs[live.sec[idxs[j]]])
                extra = np.where(hit, r * np.float32(ev.factor - 1.0), np.float32(0.0))
                self_rt[j] = self_rt[j] + extra
                r = r + extra
        rt[j] = r
        p = u.nodes[j].parent
        if p >= 0:
            cm = child_max[p]
            if cm is None:
                cm = child_max[p] = np.zeros(len(idxs[p]), dtype=np.float32)
            ppos = pposs[j]
            if ppos is None:
                np.maximum(cm, r, out=cm)
            else:
                cm[ppos] = np.maximum(cm[ppos], r)
    return _Latencies(self_rt, rt)


def _scatter(live: _LiveUnit, lat: _Latencies, tables: SpanDictionaries, toff: np.ndarray, out: HourSpans) -> None:
    """Top-down: pods and start times per node (a child starts within its parent's own time), then
    each node's spans written at their trace's offset into `out` (preorder within each trace)."""
    u, rng, idxs, pposs = live.unit, live.rng, live.idxs, live.pposs
    ts: list[np.ndarray] = []
    dm: list[np.ndarray] = []
    run = np.zeros(len(live.root_ts), dtype=np.int32)
    for j, nd in enumerate(u.nodes):
        idx, ppos = idxs[j], pposs[j]
        k = len(idx)
        g = u.gbase + j
        dm_j = rng.integers(0, tables.pod_count[g], k, dtype=np.int32)
        dm_j += tables.pod_offset[g]
        if nd.parent < 0:
            ts_j = live.root_ts
            um_j = np.full(k, tables.user_pod, dtype=np.int32)
        else:
            p = nd.parent
            pts, pself, pdm = ts[p], lat.self_rt[p], dm[p]
            if ppos is not None:
                pts, pself, pdm = pts[ppos], pself[ppos], pdm[ppos]
            off = rng.random(k, dtype=np.float32) * np.float32(0.5) * pself
            ts_j = pts + off.astype(np.int64)
            um_j = pdm
        ts.append(ts_j)
        dm.append(dm_j)
        pos = toff[idx] + run[idx]
        run[idx] += 1
        out.ts[pos] = ts_j
        out.rt[pos] = lat.rt[j]
        out.node[pos] = g
        out.um_pod[pos] = um_j
        out.dm_pod[pos] = dm_j
        n_err = int(rng.binomial(k, nd.err))
        if n_err:
            out.error[pos[rng.integers(0, k, n_err)]] = 1


def _empty_spans(spans_sorted: np.ndarray) -> HourSpans:
    """Output columns for `spans_sorted` (spans per trace, in trace order), to be filled."""
    total = int(spans_sorted.sum())
    return HourSpans(
        ts=np.empty(total, dtype=np.int64),
        rt=np.empty(total, dtype=np.float64),
        node=np.empty(total, dtype=np.int32),
        um_pod=np.empty(total, dtype=np.int32),
        dm_pod=np.empty(total, dtype=np.int32),
        error=np.zeros(total, dtype=np.int8),
        trace_template=np.empty(len(spans_sorted), dtype=np.int32),
        trace_spans=spans_sorted,
    )


def hour_spans(
    seed: int, epoch_hour: int, units: list[Unit], tables: SpanDictionaries, chunk: int, lo: int, hi: int
) -> HourSpans | None:
    """Spans of the traces that start in seconds [lo, hi) of the hour: trace-major, traces
    ordered by start time, each trace's spans in preorder (the order of their rpc ids)."""
    secs = epoch_hour * 3600 + np.arange(3600)
    drawn = (_draw_traces(seed, epoch_hour, chunk, u, lo, hi) for u in units)
    live = [x for x in drawn if x is not None]
    if not live:
        return None
    # phase B: global order of traces by start time, offsets of each trace's spans
    order = np.argsort(np.concatenate([x.root_ts for x in live]), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    spans_sorted = np.concatenate([x.spans for x in live])[order]
    offsets_sorted = np.cumsum(spans_sorted, dtype=np.int64) - spans_sorted
    out = _empty_spans(spans_sorted)
    # phase C: per unit, latencies (bottom-up), start times and pods (top-down), scatter
    first = 0
    for x in live:
        n = len(x.root_ts)
        toff = offsets_sorted[rank[first : first + n]]
        out.trace_template[rank[first : first + n]] = x.unit.template
        first += n
        _scatter(x, _latencies(x, secs), tables, toff, out)
    return out


def trace_ids(
    prefix: str, n_traces: int, repeats: np.ndarray | None = None, first: int = 0
) -> pa.Array | pa.ChunkedArray:
    """`<prefix><8+ digit ordinal>` for traces first.. (each repeated `repeats[i]` times when
    given), built as fixed-width byte rows: no per-string Python work."""
    width = max(8, len(str(first + n_traces)))
    head = np.frombuffer(prefix.encode(), dtype=np.uint8)
    ordinal = np.arange(first, first + n_traces, dtype=np.int64)[:, None]
    digits = (ordinal // 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)) % 10 + ord("0")
    rows = np.empty((n_traces, len(head) + width), dtype=np.uint8)
    rows[:, : len(head)] = head
    rows[:, len(head) :] = digits
    if repeats is not None:
        rows = np.repeat(rows, repeats, axis=0)
    length = rows.shape[1]
    step = max(1, (2**31 - 1) // length - 1)  # int32 offsets per chunk
    chunks = []
    for lo in range(0, len(rows), step):
        part = rows[lo : lo + step]
        offsets = np.arange(0, (len(part) + 1) * length, length, dtype=np.int32)
        chunks.append(pa.StringArray.from_buffers(len(part), pa.py_buffer(offsets), pa.py_buffer(part)))
    if len(chunks) == 1:
        return chunks[0]
    return pa.chunked_array(chunks, pa.string()) if chunks else pa.array([], pa.string())


def span_table(cols: HourSpans, tables: SpanDictionaries, trace_ids: pa.Array | pa.ChunkedArray) -> pa.Table:
    """The spans as an Arrow table in `COLUMNS` order, string columns dictionary-encoded."""
    node = pa.array(cols.node, pa.int32())

    def dict_col(indices: np.ndarray | pa.Array, dictionary: pa.Array) -> pa.DictionaryArray:
        return pa.DictionaryArray.from_arrays(pa.array(indices, pa.int32()), dictionary)

    def node_col(name: str) -> pa.DictionaryArray:
        return dict_col(pc.take(pa.array(tables.node_index[name]), node), tables.dictionary[name])

    arrays = [
        pa.array(cols.ts, pa.int64()),
        trace_ids,
        node_col("service"),
        node_col("rpc_id"),
        node_col("rpctype"),
        node_col("um"),
        dict_col(cols.um_pod, tables.pods),
        node_col("interface"),
        node_col("dm"),
        dict_col(cols.dm_pod, tables.pods),
        pa.array(cols.rt, pa.float64()),
        pa.array(cols.error, pa.int8()),
    ]
    return pa.Table.from_arrays(arrays, names=list(COLUMNS))
