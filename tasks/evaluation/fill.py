"""A fault-free background between replayed captures, resampled from the day's own fault-free traces.

Fault-injection captures hold minutes of traffic, most of it inside fault windows: replayed back to
back, a model learns "normal" from fault windows and false alarms cannot be counted. `rpcwatch
replay --fill` lays the captures out as they were taken (gaps longer than `MAX_GAP_S` shortened to
it) after a clean prefix (`PREFIX_S`, where models train and calibrate) and fills every stretch
between them with traffic drawn from the **pool**: whole real traces of the day that no fault can
have touched.

- Pool: traces with a root span, ending inside their capture, that end before every injection
  (`PRE_MARGIN_S`) or start `POST_MARGIN_S` after its window (recovery takes a while). Captures
  begin one to two minutes before their injection, so these stretches and the normal captures are
  all the fault-free traffic a day holds; a margin before the injection would leave only the
  normal captures (one minute on some days) and a fill that repeats one minute's traces.
- Rate: root traces per second of each capture; a stretch between two captures ramps linearly from
  the one before to the one after (the prefix and the lead-ins use the next capture's rate). Per
  minute the count is Poisson, each trace starts uniformly inside its minute.
- Each drawn trace is copied whole with fresh trace and span ids (parent links kept), its times
  shifted so that it starts where drawn. Deterministic for a seed.

What the fill cannot show: it repeats a few minutes of real traces many times, so it is more
regular than real traffic (no daily cycle, no rare shapes beyond those in the pool, no slow drift).
False alarms over it are a lower bound of what real fault-free hours give; the real captures'
fault-free minutes are counted separately by the evaluation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.ingest.formats import UNITS_TO_MS, SpanMapping

NS = 1_000_000_000
PREFIX_S = 6 * 3600  # the clean prefix: where the first models train and calibrate
MAX_GAP_S = 30 * 60  # an untraced gap between captures longer than this becomes this much fill
DAY_GAP_S = 30 * 60  # fill between one day's last capture and the next day's first
TAIL_S = 15 * 60  # fill after the last capture, so that the last fault's hour is scored whole
PRE_MARGIN_S = 0  # pool traces end this long before any injection ...
POST_MARGIN_S = 300  # ... or start this long after its fault window
MINUTE_NS = 60 * NS


@dataclass
class Pool:
    """Fault-free traces of one day: `spans` grouped by trace (`first[i]` .. `first[i] + size[i]`),
    each trace's first start, and each span's parent as a row offset inside its trace (-1: root or
    a parent not captured)."""

    spans: pa.Table
    first: np.ndarray
    size: np.ndarray
    start_ns: np.ndarray
    parent_offset: np.ndarray

    @property
    def traces(self) -> int:
        return len(self.first)


def duration_ns(mapping: SpanMapping) -> int:
    """Nanoseconds per unit of the mapping's `duration` column (the units `formats` knows)."""
    return round(UNITS_TO_MS[mapping.duration_unit or "us"] * 1_000_000)


def _end_ns(spans: pa.Table, mapping: SpanMapping) -> np.ndarray:
    start = spans[mapping.start].to_numpy().astype(np.int64)
    if mapping.end:
        return spans[mapping.end].to_numpy().astype(np.int64)
    return start + spans[mapping.duration].to_numpy().astype(np.int64) * duration_ns(mapping)


def fault_free_traces(
    spans: pa.Table, mapping: SpanMapping, capture: tuple[int, int], faults: list[tuple[int, int]]
) -> pa.Table:
    """The spans of one capture's whole fault-free traces (see the module docstring); `faults` are
    (injection, window end) in ns, real time."""
    trace = spans[mapping.trace_id].to_numpy(zero_copy_only=False)
    codes, inverse = np.unique(trace, return_inverse=True)
    start, end = spans[mapping.start].to_numpy().astype(np.int64), _end_ns(spans, mapping)
    first = np.full(len(codes), np.iinfo(np.int64).max)
    last = np.full(len(codes), np.iinfo(np.int64).min)
    np.minimum.at(first, inverse, start)
    np.maximum.at(last, inverse, end)
    roots = np.zeros(len(codes), dtype=np.int64)
    parent = pc.cast(spans[mapping.parent_id], pa.string())
    is_root = pc.fill_null(pc.is_in(parent, pa.array(list(mapping.root_parent_values))), True).to_numpy(
        zero_copy_only=False
    )
    np.add.at(roots, inverse, is_root.astype(np.int64))
    keep = (roots == 1) & (last <= capture[1])
    for inject, window_end in faults:
        touched = (first < window_end + POST_MARGIN_S * NS) & (last > inject - PRE_MARGIN_S * NS)
        keep &= ~touched
    return spans.filter(pa.array(keep[inverse]))


def build_pool(parts: list[pa.Table], mapping: SpanMapping) -> Pool:
    """One pool from the fault-free spans of a day's captures."""
    spans = pa.concat_tables(parts, promote_options="default") if parts else None
    if spans is None or spans.num_rows == 0:
        raise ValueError("no fault-free traces to fill with: every capture lies within a fault's window")
    # a total order (span id last): spans starting together come from DuckDB in any order, and the
    # pool's order decides which trace a draw copies
    spans = spans.sort_by(
        [(mapping.trace_id, "ascending"), (mapping.start, "ascending"), (mapping.span_id, "ascending")]
    )
    trace = spans[mapping.trace_id].to_numpy(zero_copy_only=False)
    boundaries = np.flatnonzero(np.r_[True, trace[1:] != trace[:-1]])
    size = np.diff(np.r_[boundaries, len(trace)])
    start = spans[mapping.start].to_numpy().astype(np.int64)
    return Pool(spans, boundaries, size, start[boundaries], _parent_offsets(spans, mapping, boundaries, size))


def _parent_offsets(spans: pa.Table, mapping: SpanMapping, first: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Each span's parent as a row offset inside its trace, -1 where the parent is not in the trace."""
    trace_of = np.repeat(np.arange(len(first)), size)
    span_ids = pc.cast(spans[mapping.span_id], pa.string()).to_numpy(zero_copy_only=False)
    parents = pc.cast(spans[mapping.parent_id], pa.string()).to_numpy(zero_copy_only=False)
    row_of = {(t, s): i for i, (t, s) in enumerate(zip(trace_of, span_ids))}
    rows = np.array([row_of.get((t, p), -1) for t, p in zip(trace_of, parents)], dtype=np.int64)
    return np.where(rows >= 0, rows - first[trace_of], -1)


def trace_rate(spans: pa.Table, mapping: SpanMapping, capture: tuple[int, int]) -> float:
    """Root traces per second in a capture."""
    parent = pc.cast(spans[mapping.parent_id], pa.string())
    roots = pc.sum(pc.fill_null(pc.is_in(parent, pa.array(list(mapping.root_parent_values))), True)).as_py() or 0
    return roots / max((capture[1] - capture[0]) / NS, 1.0)


def draw_starts(rng: np.random.Generator, start_ns: int, end_ns: int, rate_from: float, rate_to: float) -> np.ndarray:
    """Trace start times in [start_ns, end_ns): Poisson per minute at a rate ramping linearly."""
    out = []
    length = max(end_ns - start_ns, 1)
    for lo in range(start_ns, end_ns, MINUTE_NS):
        hi = min(lo + MINUTE_NS, end_ns)
        middle = ((lo + hi) / 2 - start_ns) / length
        rate = rate_from + (rate_to - rate_from) * middle
        n = rng.poisson(rate * (hi - lo) / NS)
        out.append(np.sort(rng.integers(lo, hi, size=n)))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _hex(values: np.ndarray, width: int) -> np.ndarray:
    return np.array([f"{v:0{width}x}" for v in values.tolist()], dtype=object)


def fill_spans(
    pool: Pool, mapping: SpanMapping, starts: np.ndarray, picks: np.ndarray, serial0: int, tag: str
) -> pa.Table:
    """Copies of the pool's traces `picks`, the k-th starting at `starts[k]`, with fresh ids: trace
    `<tag><serial>`, span `<serial><offset in trace>` (16 hex digits each half)."""
    sizes = pool.size[picks]
    trace_of = np.repeat(np.arange(len(picks)), sizes)
    offset = np.arange(len(trace_of)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    rows = pool.first[picks][trace_of] + offset
    spans = pool.spans.take(pa.array(rows))
    shift = (starts - pool.start_ns[picks])[trace_of]
    serial = _hex(serial0 + trace_of, 8)
    span_id = serial + _hex(offset, 8)
    parent_offset = pool.parent_offset[rows]
    parent = np.where(
        parent_offset >= 0,
        serial + _hex(np.maximum(parent_offset, 0), 8),
        pc.cast(spans[mapping.parent_id], pa.string()).to_numpy(zero_copy_only=False),
    )
    columns = {
        mapping.trace_id: pa.array(tag + _hex(serial0 + trace_of, 16)),
        mapping.span_id: pa.array(span_id),
        mapping.parent_id: pa.array(parent),
        mapping.start: pc.add(spans[mapping.start], pa.array(shift)),
    }
    if mapping.end:
        columns[mapping.end] = pc.add(spans[mapping.end], pa.array(shift))
    for name, values in columns.items():
        i = spans.schema.get_field_index(name)
        spans = spans.set_column(i, name, values.cast(spans.schema.field(name).type))
    return spans.sort_by(mapping.start)


def id_tag(day: str, seed: int) -> str:
    """16 hex digits that set one day's fill trace ids apart from another's."""
    return hashlib.sha256(f"{day}:{seed}".encode()).hexdigest()[:16]
