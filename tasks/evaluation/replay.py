"""Replay span captures that come in short runs with gaps (e.g. Nezha's TrainTicket minutes) as
one contiguous timeline the hourly pipeline can learn from.

Real captures around fault injections are minutes of traffic separated by gaps of minutes to
hours. Between runs the system was not traced, which is not the same as no traffic: fed as is,
every gap would read as an outage. `replay_days` shifts each run so that it starts where the
previous one ended (time inside a run is untouched), writes the spans hour-partitioned
(`dt=/hour=` Parquet, original columns), and rewrites the fault list in replay time with the
end of each fault's run, so that `rpcwatch evaluate --faults` can judge detections.

Reads each day folder's span CSVs and `fault_list.json`; no warehouse tables. Outputs under
`out`: the span partitions, `runs.parquet` (day, run, real and replay start/end, offset) and
`fault_list.json` (the Nezha layout, times in replay time, real time kept).
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
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.ingest.formats import SpanMapping, quote_identifier

RUN_GAP_S = 30  # files further apart than this belong to different runs
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
    scale = {"us": 1000, "ms": 1_000_000, "ns": 1}[mapping.duration_unit or "us"]
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


def _write_run(con: duckdb.DuckDBPyConnection, run: Run, mapping: SpanMapping, out: Path) -> int:
    # paths and the offset are bound; mapping columns pass through the one quoting helper
    start = quote_identifier(mapping.start)
    end_col = f", {quote_identifier(mapping.end)} + $offset AS {quote_identifier(mapping.end)}" if mapping.end else ""
    table = con.sql(
        f"""SELECT * REPLACE ({start} + $offset AS {start}{end_col})
                            FROM read_csv($files, header = true, union_by_name = true)
                            ORDER BY {start}""",
        params={"offset": run.offset_ns, "files": [str(f) for f in run.files]},
    ).to_arrow_table()  # a relation: Arrow without the extra copy of a DB-API result
    hours = pc.divide(table[mapping.start], pa.scalar(3600 * NS, pa.int64()))
    for hour in sorted(set(hours.to_pylist())):
        ts = datetime.fromtimestamp(hour * 3600, UTC)
        folder = out / f"dt={ts:%Y-%m-%d}" / f"hour={ts:%H}"
        folder.mkdir(parents=True, exist_ok=True)
        part = table.filter(pc.equal(hours, hour))
        pq.write_table(part, folder / f"part-{run.day}-run{run.run:02d}.parquet")
    return table.num_rows


def _service(pod: str, mapping: SpanMapping) -> str:
    match = re.match(mapping.service_regex, pod) if mapping.service_regex else None
    return match.group(1) if match else pod


def _replay_faults(day: Path, runs: list[Run], mapping: SpanMapping) -> list[dict]:
    """The day's faults in replay time, each with the end of the run that captured it."""
    faults = [f for hour in json.loads((day / "fault_list.json").read_text()).values() for f in hour]
    out = []
    for f in faults:
        real = datetime.fromisoformat(f["inject_time"]).replace(tzinfo=UTC)
        real_ns = int(real.timestamp()) * NS
        run = next((r for r in runs if r.real_start_ns <= real_ns <= r.real_end_ns), None)
        if run is None:
            raise ValueError(f"{day / 'fault_list.json'}: fault at {f['inject_time']} lies in no captured run")
        replay = datetime.fromtimestamp((real_ns + run.offset_ns) / NS, UTC)
        window_end = datetime.fromtimestamp(run.replay_end_ns / NS, UTC)
        out.append(
            {
                **f,
                "inject_time": f"{replay:%Y-%m-%d %H:%M:%S}",
                "real_inject_time": f["inject_time"],
                "service": _service(f["inject_pod"], mapping),
                "window_end": f"{window_end:%Y-%m-%d %H:%M:%S}",
                "day": day.name,
                "run": run.run,
            }
        )
    return out


def replay_days(
    days: list[Path],
    out: Path,
    start: datetime,
    mapping_name: str = "nezha-trainticket",
    progress: Callable[[str], None] = print,
) -> dict[str, int]:
    """Write the days' runs back to back from `start` into `out`; returns counts."""
    mapping = SpanMapping.load(mapping_name)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cursor, rows, all_runs, faults = start, 0, [], []
    with duckdb.connect() as con:
        for day in days:
            runs = find_runs(day, mapping)
            place(runs, cursor)
            for run in runs:
                rows += _write_run(con, run, mapping, out)
            faults += _replay_faults(day, runs, mapping)
            all_runs += runs
            cursor = datetime.fromtimestamp(runs[-1].replay_end_ns // NS + 1, UTC)
            progress(
                f"{day.name}: {len(runs)} runs, {sum(len(r.files) for r in runs)} files, "
                f"{(runs[-1].replay_end_ns - runs[0].replay_start_ns) / NS / 60:.0f} min of traffic"
            )
    _write_runs(all_runs, out / "runs.parquet")
    (out / "fault_list.json").write_text(json.dumps({"faults": faults}, indent=1))
    return {"runs": len(all_runs), "rows": rows, "faults": len(faults)}


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
    runs = pq.read_table(out / "runs.parquet").to_pandas()
    first, last = runs.replay_start.min(), runs.replay_end.max()
    hour = first.floor("h").to_pydatetime()
    return [hour + timedelta(hours=i) for i in range(int((last - first.floor("h")) / timedelta(hours=1)) + 1)]
