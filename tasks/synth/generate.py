"""Synthetic microservice call traces with ground truth, in the Alibaba v2022 CallGraph layout.

`generate(start, hours, out, ...)` simulates a ~40-service shop (plus cache/db/mq leaf services)
that serves 12-24 request types ("templates", how many is drawn from the seed). Each template
is a fixed call tree; every trace of a type is that tree minus the optional subtrees it skipped.
Traffic per type follows a Zipf-like base rate x a daily curve x Poisson noise per second,
scaled so that an hour holds about `spans_per_hour` spans on average over the day.

Everything is deterministic for a seed. An hour's normal traffic depends only on (seed,
spans_per_hour, absolute hour), not on `start`/`hours` or on whether anomalies are on.

Output under `out`:

- `dt=YYYY-MM-DD/hour=HH/part-<YYYYMMDDHH of the generated hour>.parquet` — spans, partitioned
  by the hour of each span's own timestamp. A trace that starts just before an hour boundary
  can have spans after it: these go into the next hour's folder, in a file named after the
  generated hour (the "spill"). The spill after the last generated hour has its own small
  partition, one hour past the generated range.
- `truth/trace_templates.parquet` — `traceid`, `request_type` for every generated trace.
- `labels.parquet` — one row per injected event (empty when anomalies are off).
- `manifest.json` — parameters, rows per partition hour, the templates and the file list.

Columns of the span files (in this order): timestamp (int64 ms since the epoch), traceid,
service (the trace's entry service), rpc_id, rpctype, um, uminstanceid, interface, dm,
dminstanceid, rt (float64 ms), error (int8 0/1, an extension to the Alibaba layout).

Rows are trace-major: traces ordered by start time, each trace's spans in preorder (parent
before children). A child starts at its parent's start plus part of the parent's own time and
ends before the parent ends (rt = own time + slowest child); its `uminstanceid` is the parent's
`dminstanceid`. The root call is `USER -> entry service`, rpc_id `0.1`, uminstanceid `USER`.

Injected events (anomalies=True), after a warm-up of half the hours (at least 2 h), in
non-overlapping windows on minute boundaries: `drift` first (a request type's rate ramps up by
50-100% over >= 3 h and stays; needs >= 8 h), then `traffic_spike`, `traffic_drop`, `latency`,
`novel_rpc` and `amplification` (5-20 min each), about one event per 1.5 h. Every trace,
anomalous or not, keeps a valid tree (each rpc_id's parent is in the trace).

The generation is vectorised: per chunk of an hour and per template, numpy draws per-second
Poisson counts, the presence of optional subtrees and the per-span values; loops run over
template nodes only. A writer thread writes Parquet while the next chunk is generated.

Modules: `system` (the services and templates), `events` (injected events, labels.parquet),
`spans` (one chunk's spans as numpy columns), `writer` (layout, Parquet files, manifest.json);
this one runs them hour by hour. No table is read or written: only the files above.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.progress import progress as progress_bar
from tasks.synth.events import EVENT_KINDS, LABEL_SCHEMA, Event, plan_events, write_labels
from tasks.synth.spans import SpanDictionaries, Unit, hour_spans, span_table, trace_ids
from tasks.synth.system import Template, build_fleet, day_factor, expected_spans
from tasks.synth.writer import (
    COLUMNS,
    SPAN_SCHEMA,
    TRUTH_SCHEMA,
    SpanFiles,
    SynthParameters,
    clean_output,
    hour_key,
    hour_path,
    partitions,
    write_manifest,
)

__all__ = [
    "COLUMNS",
    "EVENT_KINDS",
    "LABEL_SCHEMA",
    "SPAN_SCHEMA",
    "TRUTH_SCHEMA",
    "SynthSummary",
    "day_factor",
    "generate",
]

CHUNK_SPANS = 1_500_000  # about this many spans are generated (and written) at a time
_CHUNKS = (1, 2, 3, 4, 5, 6, 8, 9, 10, 12, 15, 16, 18, 20, 24, 30, 36, 40, 45, 48, 50, 60)


@dataclass(frozen=True)
class SynthSummary:
    """What `generate` wrote, for the caller to report."""

    out: Path
    hours: int
    rows_per_hour: dict[str, int]  # "2026-01-01T03:00" -> rows written into that partition
    templates: int  # number of request types
    services: int  # distinct services in the templates (apps and cache/db/mq), USER excluded
    events: int  # injected anomaly events
    seconds: float

    @property
    def rows(self) -> int:
        return sum(self.rows_per_hour.values())

    def spans_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class _Plan:
    """What a run generates: the templates scaled to the volume, the events, the units (trees
    traces are drawn from) with their string tables."""

    params: SynthParameters
    start_hour: int  # epoch hours
    templates: list[Template]
    events: list[Event]
    units: list[Unit]
    tables: SpanDictionaries


def generate(
    start: datetime,
    hours: int,
    out: Path,
    seed: int = 0,
    spans_per_hour: int = 200_000,
    anomalies: bool = False,
    progress: Callable[[str], None] | None = None,
    systems: int = 1,
) -> SynthSummary:
    """Write `hours` hours of synthetic traces starting at `start` into `out` (replacing the
    output of a previous run there). See the module docstring for the layout. `systems` > 1
    generates a fleet of that many independent shops (many more patterns; scale tests)."""
    t0 = time.perf_counter()
    start = _check_start(start)
    _check_arguments(hours, seed, spans_per_hour)
    if int(systems) != systems or systems < 1:
        raise ValueError(f"systems must be a positive integer, got {systems!r}")
    params = SynthParameters(start, int(hours), int(seed), spans_per_hour, anomalies, int(systems))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean_output(out)
    plan = _plan(params)
    rows, files = _write_spans(plan, out, progress)
    last_hour = max([plan.start_hour + params.hours - 1, *rows])
    rows_per_hour = {hour_key(h): rows.get(h, 0) for h in range(plan.start_hour, last_hour + 1)}
    write_labels(out / "labels.parquet", plan.events, plan.templates)
    write_manifest(out, params, rows_per_hour, plan.templates, plan.events, files)
    return SynthSummary(
        out=out,
        hours=params.hours,
        rows_per_hour=rows_per_hour,
        templates=len(plan.templates),
        services=len({n.callee for t in plan.templates for n in t.nodes}),
        events=len(plan.events),
        seconds=time.perf_counter() - t0,
    )


def _check_start(start: datetime) -> datetime:
    if not isinstance(start, datetime):
        raise ValueError(f"start must be a datetime, got {type(start).__name__}")
    if start.tzinfo is None or start.utcoffset() is None:
        raise ValueError(f"start must be timezone-aware UTC, got naive {start.isoformat()}")
    if start.utcoffset() != timedelta(0):
        raise ValueError(f"start must be in UTC, got offset {start.utcoffset()}")
    if (start.minute, start.second, start.microsecond) != (0, 0, 0):
        raise ValueError(f"start must be on an hour boundary, got {start.isoformat()}")
    return start.astimezone(UTC)


def _check_arguments(hours: int, seed: int, spans_per_hour: int) -> None:
    if int(hours) != hours or hours < 1:
        raise ValueError(f"hours must be a positive integer, got {hours!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not spans_per_hour > 0:
        raise ValueError(f"spans_per_hour must be positive, got {spans_per_hour!r}")


def _plan(params: SynthParameters) -> _Plan:
    """Templates with base rates scaled to `spans_per_hour`, the events, and one unit per template
    plus one per event variant, each with its offset in the global node table."""
    sysm, templates = build_fleet(params.seed, params.systems)
    scale = params.spans_per_hour / 3600.0 / sum(t.base_rate * t.expected_spans() for t in templates)
    templates = [replace(t, base_rate=t.base_rate * scale) for t in templates]
    start_hour = int(params.start.timestamp()) // 3600
    events = plan_events(params.seed, start_hour * 3600, params.hours, sysm, templates) if params.anomalies else []
    units = [Unit(k, 0, t.nodes, 0) for k, t in enumerate(templates)]
    units += [Unit(ev.template, 1 + i, ev.variant, 0) for i, ev in enumerate(events) if ev.variant]
    gbase = 0
    for u in units:
        u.gbase = gbase
        gbase += len(u.nodes)
    tables = SpanDictionaries([(templates[u.template].entry, u.nodes) for u in units], sysm.pods)
    return _Plan(params, start_hour, templates, events, units, tables)


class _Output:
    """A run's output under way: span writes go to one writer thread (at most 2 queued, so the
    next chunk is generated meanwhile), trace truth is written here; rows per partition hour and
    the span files (relative paths, in order) are counted as they are queued."""

    def __init__(self, out: Path, pool: ThreadPoolExecutor, truth: pq.ParquetWriter) -> None:
        self.out, self.pool, self.truth = out, pool, truth
        self.pending: deque[Future[None]] = deque()
        self.rows: dict[int, int] = {}
        self.files: dict[str, None] = {}

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        while len(self.pending) >= 2:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(fn, *args))

    def add_spans(self, span_files: SpanFiles, table: pa.Table, ts: np.ndarray, epoch_hour: int) -> None:
        """Queue a chunk's spans into the partition of each span's own hour."""
        for p, sub in partitions(table, ts, epoch_hour):
            rel = hour_path(p, epoch_hour)
            if rel not in self.files:
                self.files[rel] = None
            self.rows[p] = self.rows.get(p, 0) + sub.num_rows
            self.submit(span_files.write, self.out / rel, sub)

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()


def _write_spans(plan: _Plan, out: Path, progress: Callable[[str], None] | None) -> tuple[dict[int, int], list[str]]:
    """Every hour's spans and the trace truth; returns rows per partition (epoch) hour and the span files."""
    truth_path = out / "truth" / "trace_templates.parquet"
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    with (
        ThreadPoolExecutor(max_workers=1) as pool,
        pq.ParquetWriter(truth_path, TRUTH_SCHEMA, compression="zstd") as truth,
    ):
        output = _Output(out, pool, truth)
        for h in progress_bar(range(plan.params.hours), "synthetic hours", unit="h"):
            epoch_hour = plan.start_hour + h
            n_spans = _write_hour(plan, epoch_hour, output)
            if progress is not None:
                progress(f"hour {hour_key(epoch_hour)}: {n_spans:,} spans")
        output.drain()
    return output.rows, list(output.files)


def _write_hour(plan: _Plan, epoch_hour: int, output: _Output) -> int:
    """One generated hour, chunk by chunk; returns its number of spans."""
    seed = plan.params.seed
    secs = epoch_hour * 3600 + np.arange(3600)
    day = day_factor(secs + 0.5)
    active = [u for u in plan.units if _unit_active(u, plan.events, secs)]
    for u in active:
        u.rate = _unit_rate(u, plan.templates, plan.events, secs, day)
        u.slow = [ev for ev in plan.events if ev.kind == "latency" and ev.template == u.template
                  and ev.active(secs).any()]  # fmt: skip
    gen = datetime.fromtimestamp(epoch_hour * 3600, UTC).strftime("%Y%m%d%H")
    prefix = f"T{seed}_{gen}_"
    names = pa.array([t.request_type for t in plan.templates], pa.string())
    n_chunks = _n_chunks(active)
    span_files = SpanFiles()
    n_spans = n_traces = 0
    for c in range(n_chunks):
        lo, hi = c * 3600 // n_chunks, (c + 1) * 3600 // n_chunks
        cols = hour_spans(seed, epoch_hour, active, plan.tables, c, lo, hi)
        if cols is None:
            continue
        trace_unit = cols.trace_template
        ids = trace_ids(prefix, len(trace_unit), first=n_traces)
        output.truth.write_table(pa.table([ids, pc.take(names, pa.array(trace_unit))], schema=TRUTH_SCHEMA))
        ids = trace_ids(prefix, len(trace_unit), cols.trace_spans, first=n_traces)
        table = span_table(cols, plan.tables, ids)
        n_traces += len(trace_unit)
        n_spans += table.num_rows
        output.add_spans(span_files, table, cols.ts, epoch_hour)
        del cols, table, ids
    output.submit(span_files.close)
    return n_spans


def _n_chunks(units: list[Unit]) -> int:
    expected = sum(float(u.rate.sum()) * expected_spans(u.nodes) for u in units)
    return next((c for c in _CHUNKS if expected / c <= CHUNK_SPANS), _CHUNKS[-1])


def _unit_active(u: Unit, events: list[Event], secs: np.ndarray) -> bool:
    return u.variant == 0 or bool(events[u.variant - 1].active(secs).any())


def _unit_rate(
    u: Unit, templates: list[Template], events: list[Event], secs: np.ndarray, day: np.ndarray
) -> np.ndarray:
    """Expected traces per second of one unit: base rate x day curve x events; an event's
    variant tree takes a share of its type's traces inside the window (Poisson thinning)."""
    rate = templates[u.template].base_rate * day
    for i, ev in enumerate(events):
        if ev.template != u.template:
            continue
        mult = ev.rate_multiplier(secs)
        if mult is not None:
            rate = rate * mult
        elif ev.variant is not None:
            share = ev.fraction * ev.active(secs)
            rate = rate * (share if u.variant == i + 1 else 1.0 - share)
    return rate
