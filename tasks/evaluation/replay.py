"""Replay span captures that come in short runs with gaps (e.g. Nezha's TrainTicket minutes) as
one contiguous timeline the hourly pipeline can learn from.

Real captures around fault injections are minutes of traffic separated by gaps of minutes to
hours. Between runs the system was not traced, which is not the same as no traffic: fed as is,
every gap would read as an outage. `replay_days` shifts each run so that it starts where the
previous one ended (time inside a run is untouched), writes the spans hour-partitioned
(`dt=/hour=` Parquet, original columns), and rewrites the fault list in replay time with the
end of each fault's capture, so that `rpcwatch evaluate --faults` can judge detections.

Neighbouring minute files overlap a little, so a span can appear in two of them: each run keeps
one span per (trace id, span id) and the number dropped is counted. A fault's window is its
injection plus `FAULT_WINDOW_S`. A fault injected in a gap shortly before a capture whose window
overlaps that capture is moved to the capture's start, with a `note`; one whose window overlaps
no capture is kept with `observable: false` and the `reason` (never an abort): the evaluation
lists it and does not count it.

Reads each day folder's span CSVs and `fault_list.json`; no warehouse tables. Outputs under
`out`: the span partitions, `runs.parquet` (day, run, real and replay start/end, offset) and
`fault_list.json` (the Nezha layout, times in replay time, real time kept).

With a `Layout(fill=True)` (`rpcwatch replay --fill`) the runs are placed as they were taken
(gaps over `fill.MAX_GAP_S` shortened) after a clean prefix, and `tasks.evaluation.fill` fills the
stretches between them with fault-free traffic; `replay.json` says where the prefix ends.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.evaluation import fill as fill_
from tasks.ingest.formats import SpanMapping, quote_identifier
from tasks.progress import progress as progress_bar

RUN_GAP_S = 30  # files further apart than this belong to different runs
FAULT_WINDOW_S = 180  # a fault's window: its injection plus this (clipped to its capture)
NS = 1_000_000_000


@dataclass
class Run:
    day: str
    run: int
    files: list[Path]
    real_start_ns: int
    real_end_ns: int
    offset_ns: int = 0

    @property
    def replay_start_ns(self) -> int:
        return self.real_start_ns + self.offset_ns

    @property
    def replay_end_ns(self) -> int:
        return self.real_end_ns + self.offset_ns


def _span_files(day: Path) -> list[Path]:
    files = sorted(p for sub in ("trace", "normal") for p in (day / sub).glob("*.csv*"))
    if not files:
        raise FileNotFoundError(f"{day}: no span files under trace/ or normal/")
    return files


def _file_ranges(
    con: duckdb.DuckDBPyConnection, files: list[Path], mapping: SpanMapping
) -> list[tuple[Path, int, int]]:
    """(file, first span start, last span end) in ns, ordered by start."""
    if mapping.duration is None:
        raise ValueError("replay needs a span mapping with a `duration` column")
    start, duration = quote_identifier(mapping.start), quote_identifier(mapping.duration)
    scale = fill_.duration_ns(mapping)
    out = []
    for f in files:
        [(lo, hi)] = con.execute(
            f"""SELECT min({start}), max({start} + {duration} * {int(scale)})
                                 FROM read_csv(?, header = true)""",
            [str(f)],
        ).fetchall()
        if lo is None:
            raise ValueError(f"{f}: no spans")
        out.append((f, int(lo), int(hi)))
    return sorted(out, key=lambda r: r[1])


def find_runs(day: Path, mapping: SpanMapping) -> list[Run]:
    """Group a day's minute files into runs of overlapping or adjacent captures."""
    runs: list[Run] = []
    with duckdb.connect() as con:
        for f, lo, hi in _file_ranges(con, _span_files(day), mapping):
            if runs and lo <= runs[-1].real_end_ns + RUN_GAP_S * NS:
                runs[-1].files.append(f)
                runs[-1].real_end_ns = max(runs[-1].real_end_ns, hi)
            else:
                runs.append(Run(day.name, len(runs), [f], lo, hi))
    return runs


def place(runs: list[Run], start: datetime) -> None:
    """Back-to-back: each run starts where the previous one ended (the first at `start`)."""
    cursor = int(start.timestamp()) * NS
    for run in runs:
        run.offset_ns = cursor - run.real_start_ns
        cursor = run.replay_end_ns + 1


def _run_table(con: duckdb.DuckDBPyConnection, run: Run, mapping: SpanMapping) -> tuple[pa.Table, int]:
    """The run's spans in replay time, one per (trace id, span id), ordered by start; and how many
    duplicates (spans repeated in neighbouring files) were dropped."""
    # paths and the offset are bound; mapping columns pass through the one quoting helper
    start = quote_identifier(mapping.start)
    end_col = f", {quote_identifier(mapping.end)} + $offset AS {quote_identifier(mapping.end)}" if mapping.end else ""
    key = f"{quote_identifier(mapping.trace_id)}, {quote_identifier(mapping.span_id)}"
    params = {"files": [str(f) for f in run.files]}
    source = "read_csv($files, header = true, union_by_name = true, filename = '__replay_file')"
    [(read,)] = con.execute(f"SELECT count(*) FROM {source}", params).fetchall()
    table = con.sql(
        f"""SELECT * EXCLUDE (__replay_file) REPLACE ({start} + $offset AS {start}{end_col})
            FROM {source}
            QUALIFY row_number() OVER (PARTITION BY {key} ORDER BY __replay_file) = 1
            ORDER BY {start}""",
        params={**params, "offset": run.offset_ns},
    ).to_arrow_table()  # a relation: Arrow without the extra copy of a DB-API result
    return table, int(read) - table.num_rows


def _write_run(con: duckdb.DuckDBPyConnection, run: Run, mapping: SpanMapping, out: Path) -> tuple[pa.Table, int]:
    """Write one run hour-partitioned; returns (its spans in replay time, duplicates dropped)."""
    table, dropped = _run_table(con, run, mapping)
    write_partitioned(table, mapping, out, f"part-{run.day}-run{run.run:02d}.parquet")
    return table, dropped


def write_partitioned(table: pa.Table, mapping: SpanMapping, out: Path, name: str) -> None:
    """Spans into `dt=/hour=` folders of `out` by start time, one file `name` per hour."""
    hours = pc.divide(table[mapping.start], pa.scalar(3600 * NS, pa.int64()))
    for hour in sorted(set(hours.to_pylist())):
        ts = datetime.fromtimestamp(hour * 3600, UTC)
        folder = out / f"dt={ts:%Y-%m-%d}" / f"hour={ts:%H}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.filter(pc.equal(hours, hour)), folder / name)


def _service(pod: str, mapping: SpanMapping) -> str:
    match = re.match(mapping.service_regex, pod) if mapping.service_regex else None
    return match.group(1) if match else pod


def _stamp(ns: int) -> str:
    return f"{datetime.fromtimestamp(ns / NS, UTC):%Y-%m-%d %H:%M:%S}"


def _capture_of(real_ns: int, runs: list[Run]) -> tuple[Run | None, str]:
    """The run that captures a fault injected at `real_ns` and a note, or None and the reason."""
    window_ns = FAULT_WINDOW_S * NS
    run = next((r for r in runs if r.real_start_ns <= real_ns <= r.real_end_ns), None)
    if run is not None:
        return run, ""
    run = next((r for r in runs if real_ns < r.real_start_ns <= real_ns + window_ns), None)
    if run is not None:
        early = (run.real_start_ns - real_ns) / NS
        return run, f"injected {early:.0f} s before its capture; window clipped to the capture"
    before = [real_ns - r.real_end_ns for r in runs if r.real_end_ns < real_ns]
    after = [r.real_start_ns - real_ns for r in runs if r.real_start_ns > real_ns]
    where = [f"the previous capture ends {min(before) / NS:.0f} s before"] if before else []
    where += [f"the next starts {min(after) / NS:.0f} s after"] if after else []
    return None, f"no capture overlaps its {FAULT_WINDOW_S} s window ({', '.join(where) or 'no capture'})"


def _replay_fault(fault: dict, real_ns: int, runs: list[Run], day: str, service: str) -> dict:
    """One fault in replay time: `inject_time` (clipped to its capture's start), `window_end` (its
    window clipped to the capture), `capture_end`, `observable`, and a `note` or `reason`."""
    run, why = _capture_of(real_ns, runs)
    out = {**fault, "real_inject_time": fault["inject_time"], "service": service, "day": day}
    if run is None:
        return {**out, "inject_time": None, "window_end": None, "run": None, "observable": False, "reason": why}
    inject_ns = max(real_ns, run.real_start_ns) + run.offset_ns
    window_end_ns = min(real_ns + run.offset_ns + FAULT_WINDOW_S * NS, run.replay_end_ns)
    out |= {
        "inject_time": _stamp(inject_ns),
        "window_end": _stamp(window_end_ns),
        "capture_end": _stamp(run.replay_end_ns),
        "run": run.run,
        "observable": True,
    }
    return out | ({"note": why} if why else {})


def _replay_faults(day: Path, runs: list[Run], mapping: SpanMapping) -> list[dict]:
    """The day's faults in replay time, each with the end of the run that captured it (if any)."""
    faults = [f for hour in json.loads((day / "fault_list.json").read_text()).values() for f in hour]
    out = []
    for f in faults:
        real = datetime.fromisoformat(f["inject_time"]).replace(tzinfo=UTC)
        real_ns = int(real.timestamp()) * NS
        out.append(_replay_fault(f, real_ns, runs, day.name, _service(f["inject_pod"], mapping)))
    return out


@dataclass
class Layout:
    """Where a replay puts things: back to back, or (`fill`) a clean prefix then the captures as
    taken with fault-free fill between (`tasks.evaluation.fill`)."""

    fill: bool = False
    prefix_s: int = fill_.PREFIX_S
    max_gap_s: int = fill_.MAX_GAP_S
    seed: int = 0


def place_as_taken(runs: list[Run], start: datetime, max_gap_s: int) -> None:
    """The first run at `start`, each next one after the real gap before it (at most `max_gap_s`)."""
    cursor = int(start.timestamp()) * NS
    for i, run in enumerate(runs):
        if i:
            cursor = runs[i - 1].replay_end_ns + min(run.real_start_ns - runs[i - 1].real_end_ns, max_gap_s * NS)
        run.offset_ns = cursor - run.real_start_ns


def _fault_times(day: Path) -> list[tuple[int, int]]:
    """Each fault of the day as (injection, window end) in ns, real time."""
    faults = [f for hour in json.loads((day / "fault_list.json").read_text()).values() for f in hour]
    out = []
    for f in faults:
        ns = int(datetime.fromisoformat(f["inject_time"]).replace(tzinfo=UTC).timestamp()) * NS
        out.append((ns, ns + FAULT_WINDOW_S * NS))
    return out


def _fill_day(
    day: str,
    runs: list[Run],
    tables: list[pa.Table],
    faults: list[tuple[int, int]],
    lead: tuple[int, int],
    tail_ns: int,
    mapping: SpanMapping,
    layout: Layout,
    out: Path,
) -> tuple[int, int]:
    """Fill before, between and after the day's placed captures; returns (traces, spans) written."""
    parts, rates = [], []
    for run, table in zip(runs, tables):
        capture = (run.replay_start_ns, run.replay_end_ns)
        shifted = [(i + run.offset_ns, e + run.offset_ns) for i, e in faults]
        parts.append(fill_.fault_free_traces(table, mapping, capture, shifted))
        rates.append(fill_.trace_rate(table, mapping, capture))
    pool = fill_.build_pool(parts, mapping)
    stretches = [(lead[0], lead[1], rates[0], rates[0])]
    stretches += [
        (a.replay_end_ns + 1, b.replay_start_ns, ra, rb) for a, b, ra, rb in zip(runs, runs[1:], rates, rates[1:])
    ]
    stretches += (
        [(runs[-1].replay_end_ns + 1, runs[-1].replay_end_ns + tail_ns, rates[-1], rates[-1])] if tail_ns else []
    )
    rng = np.random.default_rng([layout.seed, int(day.replace("-", ""))])
    starts = np.concatenate([fill_.draw_starts(rng, *s) for s in stretches if s[1] > s[0]])
    picks = rng.integers(0, pool.traces, size=len(starts))
    spans = fill_.fill_spans(pool, mapping, starts, picks, 0, fill_.id_tag(day, layout.seed))
    write_partitioned(spans, mapping, out, f"part-fill-{day}.parquet")
    return len(starts), spans.num_rows


def replay_days(
    days: list[Path],
    out: Path,
    start: datetime,
    mapping_name: str = "nezha-trainticket",
    progress: Callable[[str], None] = print,
    layout: Layout | None = None,
) -> dict[str, int]:
    """Write the days' runs from `start` into `out`, back to back or (layout.fill) as taken after a
    clean prefix with fill between; returns counts (runs, rows, duplicates dropped, faults, of which
    moved to their capture's start and unobservable; fill traces and spans)."""
    layout = layout or Layout()
    mapping = SpanMapping.load(mapping_name)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cursor, rows, dropped, filled = int(start.timestamp()) * NS, 0, 0, [0, 0]
    all_runs: list[Run] = []
    faults: list[dict] = []
    with duckdb.connect() as con:
        for i, day in enumerate(days):
            runs = find_runs(day, mapping)
            lead_s = (layout.prefix_s if i == 0 else fill_.DAY_GAP_S) if layout.fill else 0
            if layout.fill:
                place_as_taken(runs, datetime.fromtimestamp(cursor // NS + lead_s, UTC), layout.max_gap_s)
            else:
                place(runs, datetime.fromtimestamp(cursor // NS, UTC))
            day_dropped, tables = 0, []
            for run in progress_bar(runs, f"{day.name} captures", unit="capture"):
                table, gone = _write_run(con, run, mapping, out)
                rows, day_dropped = rows + table.num_rows, day_dropped + gone
                tables.append(table if layout.fill else None)
            if layout.fill:
                tail = fill_.TAIL_S * NS if i == len(days) - 1 else 0
                traces, spans = _fill_day(
                    day.name,
                    runs,
                    tables,
                    _fault_times(day),
                    (cursor, runs[0].replay_start_ns),
                    tail,
                    mapping,
                    layout,
                    out,
                )
                filled = [filled[0] + traces, filled[1] + spans]
                progress(f"{day.name}: {traces:,} fault-free traces ({spans:,} spans) filled around the captures")
            day_faults = _replay_faults(day, runs, mapping)
            faults, all_runs, dropped = faults + day_faults, all_runs + runs, dropped + day_dropped
            cursor = (runs[-1].replay_end_ns // NS + 1) * NS + (tail if layout.fill else 0)
            progress(
                f"{day.name}: {len(runs)} runs, {sum(len(r.files) for r in runs)} files, "
                f"{(runs[-1].replay_end_ns - runs[0].replay_start_ns) / NS / 60:.0f} min from first to last capture, "
                f"{day_dropped:,} duplicate spans dropped, {_fault_counts(day_faults)}"
            )
    _write_runs(all_runs, out / "runs.parquet")
    (out / "fault_list.json").write_text(json.dumps({"faults": faults}, indent=1))
    prefix_end = int(start.timestamp()) * NS + (layout.prefix_s * NS if layout.fill else 0)
    _write_meta(out, layout.fill, int(start.timestamp()) * NS, prefix_end, cursor)
    return {
        "runs": len(all_runs),
        "rows": rows,
        "duplicates": dropped,
        "faults": len(faults),
        "moved": sum("note" in f for f in faults),
        "unobservable": sum(not f["observable"] for f in faults),
        "fill_traces": filled[0],
        "fill_spans": filled[1],
    }


META = "replay.json"


def _write_meta(out: Path, fill: bool, start_ns: int, prefix_end_ns: int, end_ns: int) -> None:
    meta = {"fill": fill, "start": _stamp(start_ns), "prefix_end": _stamp(prefix_end_ns), "end": _stamp(end_ns)}
    (out / META).write_text(json.dumps(meta, indent=1))


def replay_meta(folder: Path) -> dict:
    """`replay.json`: fill (bool), start, prefix_end (end of the clean prefix; = start without fill)
    and end, as "YYYY-MM-DD HH:MM:SS" UTC. Replays written before it existed: derived from runs."""
    path = folder / META
    if path.is_file():
        return json.loads(path.read_text())
    runs = pq.read_table(folder / "runs.parquet").to_pandas()
    first, last = runs.replay_start.min(), runs.replay_end.max()
    return {
        "fill": False,
        "start": f"{first:%Y-%m-%d %H:%M:%S}",
        "prefix_end": f"{first:%Y-%m-%d %H:%M:%S}",
        "end": f"{last:%Y-%m-%d %H:%M:%S}",
    }


def capture_spans(folder: Path) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    """Where each real capture sits in replay time (start, end), in order."""
    runs = pq.read_table(folder / "runs.parquet").to_pandas().sort_values("replay_start")
    return list(zip(runs.replay_start, runs.replay_end))


def _fault_counts(faults: list[dict]) -> str:
    moved = sum("note" in f for f in faults)
    unobservable = sum(not f["observable"] for f in faults)
    return f"{len(faults)} faults ({moved} moved to their capture's start, {unobservable} unobservable)"


def _write_runs(runs: list[Run], path: Path) -> None:
    def ts(ns: int) -> datetime:
        return datetime.fromtimestamp(ns / NS, UTC)

    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "day": r.day,
                    "run": r.run,
                    "files": len(r.files),
                    "real_start": ts(r.real_start_ns),
                    "real_end": ts(r.real_end_ns),
                    "replay_start": ts(r.replay_start_ns),
                    "replay_end": ts(r.replay_end_ns),
                    "offset_s": r.offset_ns / NS,
                }
                for r in runs
            ]
        ),
        path,
    )


def replay_hours(out: Path) -> list[datetime]:
    """The replay's hours, in order (for `rpcwatch run`)."""
    meta = replay_meta(out)
    first = pd.Timestamp(meta["start"], tz="UTC").floor("h")
    last = pd.Timestamp(meta["end"], tz="UTC")
    hour = first.to_pydatetime()
    return [hour + timedelta(hours=i) for i in range(int((last - first) / timedelta(hours=1)) + 1)]
