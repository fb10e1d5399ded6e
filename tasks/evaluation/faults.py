"""Judge detections against injected faults (a Nezha-style `fault_list.json`), next to the naive rule.

A fault counts as detected when an irregular point on an RPC touching the injected service (as
caller or callee) falls in its window: from the bucket holding the injection to the end of the
fault's capture (`window_end`, written by `rpcwatch replay`; otherwise `inject_time` + 3 min).
Delay: end of the first such bucket minus the injection.

Chance: in fault-free buckets (outside every window, after the first model was trained) the
detector touches service s in a share p_s of buckets, so a window of L buckets catches the fault
by chance with probability 1 - (1 - p_s)^L. The expected number of chance catches is the sum
over faults; detections above it are what the detector really adds.

The naive rule is `tasks.evaluation.naive`; its incidents come from the product's rule
(`tasks.scoring.incidents.incidents_of`). Reads the fault list and the warehouse's `models`,
`score_runs`, `rpc_series`, `anomalies` and `incidents`. Writes nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from tasks.evaluation.naive import naive_points
from tasks.keys import split_node_key
from tasks.models.registry import first_champion_at
from tasks.scoring.incidents import INCIDENT_COLUMNS, Incident, incidents_of
from tasks.settings import Settings
from tasks.warehouse import opened

DEFAULT_WINDOW = timedelta(minutes=3)
POD_SUFFIX = re.compile(r"^(.+)-[^-]+-[^-]+$")  # Kubernetes pod name -> its deployment (service)


@dataclass
class FaultScores:
    name: str
    faults: int
    detected: int
    chance: float  # expected detections by chance at this detector's normal alarm rate
    median_delay_s: float
    points_per_free_minute: float
    free_minutes_alarmed: float  # share of fault-free minutes with at least one irregular point
    per_fault: list[str] = field(default_factory=list)


def load_faults(path: Path) -> pd.DataFrame:
    """inject_time, window_end (naive UTC), service, inject_type, real_inject_time of each fault."""
    data = json.loads(Path(path).read_text())
    rows = [f for group in data.values() for f in group]
    if not rows:
        raise ValueError(f"{path}: no faults listed")
    frame = pd.DataFrame(rows)
    missing = {"inject_time", "inject_pod"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: fault entries lack {sorted(missing)}")
    frame["inject_time"] = pd.to_datetime(frame.inject_time)
    if "service" not in frame:
        frame["service"] = [POD_SUFFIX.sub(r"\1", p) for p in frame.inject_pod]
    end = pd.to_datetime(frame["window_end"]) if "window_end" in frame else frame.inject_time + DEFAULT_WINDOW
    frame["window_end"] = end.fillna(frame.inject_time + DEFAULT_WINDOW)
    frame["real_inject_time"] = frame.get("real_inject_time", frame.inject_time.astype(str))
    return frame.sort_values("inject_time").reset_index(drop=True)


def _free_buckets(buckets: pd.DatetimeIndex, faults: pd.DataFrame, seconds: int) -> np.ndarray:
    """True for buckets that overlap no fault window."""
    free = np.ones(len(buckets), dtype=bool)
    for f in faults.itertuples():
        free &= ~((buckets + pd.Timedelta(seconds=seconds) > f.inject_time) & (buckets <= f.window_end))
    return free


def _touching(points: pd.DataFrame, service: str) -> pd.DataFrame:
    return points[(points.caller == service) | (points.callee == service)]


def score_faults(
    name: str, points: pd.DataFrame, faults: pd.DataFrame, buckets: pd.DatetimeIndex, seconds: int
) -> FaultScores:
    """Detections, delays, chance level and the fault-free alarm rate of one detector's points."""
    points = points.assign(bucket_ts=pd.to_datetime(points.bucket_ts))  # typed even when empty
    free = _free_buckets(buckets, faults, seconds)
    free_set = set(buckets[free])
    free_points = points[points.bucket_ts.isin(free_set)]
    per_fault, delays, chance = [], [], 0.0
    for f in faults.itertuples():
        window = (buckets + pd.Timedelta(seconds=seconds) > f.inject_time) & (buckets <= f.window_end)
        touched = _touching(points, f.service)
        hit = touched[touched.bucket_ts.isin(set(buckets[window]))]
        p = _touching(free_points, f.service).bucket_ts.nunique() / max(free.sum(), 1)
        chance += 1 - (1 - p) ** int(window.sum())
        if len(hit):
            delays.append(
                max(0.0, (hit.bucket_ts.min() + pd.Timedelta(seconds=seconds) - f.inject_time).total_seconds())
            )
            per_fault.append(f"after {delays[-1]:.0f} s")
        else:
            per_fault.append("missed")
    minutes = pd.Series(buckets[free]).dt.floor("min")
    alarmed = set(free_points.bucket_ts.dt.floor("min"))
    return FaultScores(
        name,
        len(faults),
        len(delays),
        chance,
        float(np.median(delays)) if delays else float("nan"),
        len(free_points) / max(minutes.nunique(), 1),
        len(alarmed) / max(minutes.nunique(), 1),
        per_fault,
    )


def _evaluated_range(con: duckdb.DuckDBPyConnection) -> tuple[pd.Timestamp, pd.Timestamp]:
    """From the end of the first training range to the end of the scored data."""
    first_champion = first_champion_at(con)
    [(scored_end,)] = con.execute(
        "SELECT max(hour) + INTERVAL 1 HOUR FROM score_runs WHERE status = 'scored'"
    ).fetchall()
    if first_champion is None or scored_end is None:
        raise ValueError("no champion has scored anything yet: run the pipeline (`rpcwatch run`) over the traces first")
    [(data_end,)] = con.execute("SELECT max(bucket_ts) FROM rpc_series").fetchall()
    return pd.Timestamp(first_champion) + pd.Timedelta(hours=1), min(pd.Timestamp(scored_end), pd.Timestamp(data_end))


def _starts(incidents: list[Incident]) -> pd.DataFrame:
    """Incidents as the alert they raise: a row (bucket_ts, caller, callee) per RPC at their first bucket."""
    rows = {(i.start_ts, *split_node_key(n)[:2]) for i in incidents for n in i.nodes}
    return pd.DataFrame(sorted(rows), columns=["bucket_ts", "caller", "callee"])


def _our_incidents(con: duckdb.DuckDBPyConnection, start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
    """The stored incidents starting in [start, end], as alerts."""
    rows = con.execute(
        f"SELECT {INCIDENT_COLUMNS} FROM incidents WHERE start_ts >= ? AND start_ts <= ?",
        [start, end],
    ).fetchall()
    return _starts([Incident.from_row(row) for row in rows])


def evaluate_faults(settings: Settings, faults_path: Path) -> tuple[list[FaultScores], pd.DataFrame]:
    """rpcwatch and the naive rule on the faults injected after the first model was trained, judged
    on irregular points and on incident starts (the alerts the persistence rule of `incidents` raises)."""
    faults = load_faults(faults_path)
    with opened(settings.warehouse, read_only=True) as con:
        start, end = _evaluated_range(con)
        [(seconds,)] = con.execute("SELECT max(bucket_seconds) FROM rpc_series").fetchall()  # as the run bucketed
        ours = con.execute(
            "SELECT bucket_ts, caller, callee FROM anomalies WHERE bucket_ts >= ? AND bucket_ts <= ?", [start, end]
        ).df()
        our_incidents = _our_incidents(con, start, end)
        naive = naive_points(con, seconds, start, end + pd.Timedelta(seconds=seconds))
        naive_incidents = _starts(
            incidents_of(con, naive, settings.incident_gap_buckets, settings.incident_min_buckets, seconds)
        )
    faults = faults[(faults.inject_time >= start) & (faults.inject_time < end)].reset_index(drop=True)
    if faults.empty:
        raise ValueError(
            f"{faults_path}: no fault between {start} and {end}, the scored range after the first training"
        )
    buckets = pd.date_range(start, end, freq=f"{seconds}s")
    detectors = (
        ("rpcwatch points", ours),
        ("naive points", naive),
        ("rpcwatch incident starts", our_incidents),
        ("naive incident starts", naive_incidents),
    )
    return [score_faults(name, pts, faults, buckets, seconds) for name, pts in detectors], faults


def fault_report(scores: list[FaultScores], faults: pd.DataFrame) -> str:
    """Every detector side by side, then each fault with rpcwatch's and the naive rule's points."""
    from tasks.app.report import table

    rows = [
        [
            s.name,
            s.faults,
            s.detected,
            f"{s.chance:.1f}",
            f"{s.detected - s.chance:+.1f}",
            f"{s.median_delay_s:.0f}",
            f"{s.points_per_free_minute:.2f}",
            f"{s.free_minutes_alarmed:.0%}",
        ]
        for s in scores
    ]
    per = [
        [f.real_inject_time, f.service, f.inject_type, *(s.per_fault[i] for s in scores)]
        for i, f in enumerate(faults.itertuples())
    ]
    return "\n".join(
        [
            table(
                [
                    "detector",
                    "faults",
                    "detected",
                    "by chance",
                    "above chance",
                    "median delay s",
                    "alarms / fault-free min",
                    "fault-free min alarmed",
                ],
                rows,
            ),
            "",
            table(["injected at", "service", "type", *(s.name for s in scores)], per),
            "",
            "by chance: what the detector's alarm rate on the injected service in fault-free buckets would catch "
            "in each fault's window (buckets taken as independent); "
            "alarms: irregular points, or incident starts x RPCs",
        ]
    )
