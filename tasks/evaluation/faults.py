"""Judge detections against injected faults (a Nezha-style `fault_list.json`), next to the naive rule.

Window: a fault's window is [inject_time, inject_time + `FAULT_WINDOW`], clipped to the end of
its capture (`capture_end` / `window_end`, written by `rpcwatch replay`). A bucket is in the window
when it overlaps it. Faults that `rpcwatch replay` marked `observable: false` (no capture overlaps
their window) are listed with their reason and not counted.

Detection, per unit: `points` — an irregular point on an RPC whose caller or callee is the injected
service falls in the window; `incidents` — an incident STARTS in the window on such an RPC (the
alert the persistence rule raises). Delay: end of the first such bucket minus the injection.

Chance: of the n fault-free buckets (outside every window, after the first model was trained) k_s
have an alarm touching service s; with add-one smoothing p_s = (k_s + 1) / (n + 2), and a window
of L buckets catches the fault by chance with probability 1 - (1 - p_s)^L. The expected number
of chance catches is the sum over faults (also per `inject_type`); detections above it are what
the detector really adds.

Culprit (incidents only): for each detected fault take the first incident (by start) in its
window touching the injected service. rpcwatch's incidents name their suspects themselves
(`incidents.culprits`, ranked by the product); services they do not name, and the naive rule's
incidents (which name none), are ranked after them by the sum of the scores of the incident's
points on RPCs where the service is the callee, ties broken by the same sum where it is the
caller, then by name. `culprit_top1` / `culprit_top3`: share of detected faults whose injected
service is first / among the first three. The naive rule's points score 0, so its ranking falls
to the name order.

The naive rule is `tasks.evaluation.naive`; its incidents come from the product's rule
(`tasks.scoring.incidents.incidents_of`). Reads the fault list and the warehouse's `models`,
`score_runs`, `rpc_series`, `anomalies` and `incidents`. Writes nothing.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from tasks.evaluation.naive import naive_points
from tasks.keys import split_node_key
from tasks.models.registry import first_champion_at
from tasks.scoring.incidents import INCIDENT_COLUMNS, Incident, incidents_of
from tasks.scoring.trace_scoring import KIND as TRACE_KIND
from tasks.settings import Settings
from tasks.warehouse import opened

FAULT_WINDOW = timedelta(seconds=180)
DEFAULT_WINDOW = FAULT_WINDOW  # the name earlier callers used
POD_SUFFIX = re.compile(r"^(.+)-[^-]+-[^-]+$")  # Kubernetes pod name -> its deployment (service)
DETECTORS = ("rpcwatch", "naive")
UNITS = ("points", "incidents")


@dataclass
class FaultScores:
    """One detector judged in one unit."""

    name: str
    faults: int
    detected: int
    chance: float  # expected detections by chance at this detector's fault-free alarm rate
    median_delay_s: float
    fault_free_minutes: int
    alarmed_fault_free_minutes: int  # fault-free minutes with at least one alarm
    points_per_free_minute: float
    by_type: dict[str, dict[str, float]] = field(default_factory=dict)
    per_fault: list[str] = field(default_factory=list)
    culprit_top1: float | None = None
    culprit_top3: float | None = None

    @property
    def free_minutes_alarmed(self) -> float:
        """Share of fault-free minutes with at least one alarm."""
        return self.alarmed_fault_free_minutes / max(self.fault_free_minutes, 1)

    def as_json(self, incidents: bool) -> dict[str, object]:
        out: dict[str, object] = {
            "faults": self.faults,
            "detected": self.detected,
            "expected_by_chance": self.chance,
            "fault_free_minutes": self.fault_free_minutes,
            "alarmed_fault_free_minutes": self.alarmed_fault_free_minutes,
            "median_delay_s": None if np.isnan(self.median_delay_s) else self.median_delay_s,
            "by_type": self.by_type,
        }
        if incidents:
            out |= {"culprit_top1": self.culprit_top1, "culprit_top3": self.culprit_top3}
        return out


def load_faults(path: Path) -> pd.DataFrame:
    """inject_time, window_end (naive UTC, clipped to the capture), service, inject_type,
    real_inject_time, observable and reason of each fault."""
    data = json.loads(Path(path).read_text())
    rows = [f for group in data.values() for f in group]
    if not rows:
        raise ValueError(f"{path}: no faults listed")
    frame = pd.DataFrame(rows)
    missing = {"inject_time", "inject_pod"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: fault entries lack {sorted(missing)}")
    frame["real_inject_time"] = frame.get("real_inject_time", frame.inject_time.astype(str))
    frame["inject_time"] = pd.to_datetime(frame.inject_time)
    if "service" not in frame:
        frame["service"] = [POD_SUFFIX.sub(r"\1", p) for p in frame.inject_pod]
    frame["inject_type"] = frame.get("inject_type", pd.Series("unknown", index=frame.index)).fillna("unknown")
    frame["observable"] = frame.get("observable", pd.Series(True, index=frame.index)).fillna(True).astype(bool)
    frame["reason"] = frame.get("reason", pd.Series("", index=frame.index)).fillna("")
    end = frame.inject_time + FAULT_WINDOW
    for column in ("window_end", "capture_end"):  # the capture's end, where replay wrote it
        if column in frame:
            end = end.where(pd.to_datetime(frame[column]).isna(), np.minimum(end, pd.to_datetime(frame[column])))
    frame["window_end"] = end
    return frame.sort_values("inject_time").reset_index(drop=True)


def _in_window(ts: pd.DatetimeIndex, fault: Any, seconds: int) -> Any:
    """Which buckets (by start) overlap the fault's window."""
    return (ts + pd.Timedelta(seconds=seconds) > fault.inject_time) & (ts <= fault.window_end)


def _free_buckets(buckets: pd.DatetimeIndex, faults: pd.DataFrame, seconds: int) -> np.ndarray:
    """True for buckets that overlap no fault window."""
    free = np.ones(len(buckets), dtype=bool)
    for f in faults.itertuples():
        free &= ~np.asarray(_in_window(buckets, f, seconds))
    return free


def _touching(points: pd.DataFrame, service: str) -> pd.DataFrame:
    return points[(points.caller == service) | (points.callee == service)]


def _by_type(faults: pd.DataFrame, hits: list[bool], chances: list[float]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    kinds = faults["inject_type"] if "inject_type" in faults else ["unknown"] * len(faults)
    for kind, hit, chance in zip(kinds, hits, chances):
        row = out.setdefault(str(kind), {"faults": 0, "detected": 0, "expected_by_chance": 0.0})
        row["faults"] += 1
        row["detected"] += int(hit)
        row["expected_by_chance"] += chance
    return out


def _cells(points: pd.DataFrame, step: int) -> pd.DataFrame:
    """Each alarm as the grid cells (of `step` seconds) its interval [bucket_ts, bucket_ts +
    duration_s) covers, with `raised`: when it was known (the interval's end)."""
    points = points.assign(bucket_ts=pd.to_datetime(points.bucket_ts)).reset_index(drop=True)
    if not len(points):
        return points.assign(raised=points.bucket_ts)
    duration = points["duration_s"].astype(int) if "duration_s" in points else pd.Series(step, index=points.index)
    reps = np.maximum(duration.to_numpy() // step, 1)
    out = points.loc[points.index.repeat(reps)].copy()
    offset = np.concatenate([np.arange(r) for r in reps]) * step
    out["raised"] = out.bucket_ts + pd.to_timedelta(duration.loc[out.index].to_numpy(), unit="s")
    out["bucket_ts"] = out.bucket_ts + pd.to_timedelta(offset, unit="s")
    return out.reset_index(drop=True)


def score_faults(
    name: str, points: pd.DataFrame, faults: pd.DataFrame, buckets: pd.DatetimeIndex, seconds: int
) -> FaultScores:
    """Detections, delays, chance level (add-one smoothed) and the fault-free alarm rate of one
    detector's alarms (bucket_ts, caller, callee, optionally duration_s: points, or incident starts
    x RPCs) on a grid of `seconds`-long cells (`buckets`: their starts). An alarm covers the cells
    of its interval; its delay runs from the injection to the interval's end (when it was known)."""
    points = _cells(points, seconds)
    free = _free_buckets(buckets, faults, seconds)
    free_points = points[points.bucket_ts.isin(set(buckets[free]))]
    n = int(free.sum())
    per_fault, delays, hits, chances = [], [], [], []
    for f in faults.itertuples():
        window = np.asarray(_in_window(buckets, f, seconds))
        touched = _touching(points, f.service)
        hit = touched[touched.bucket_ts.isin(set(buckets[window]))]
        p = (_touching(free_points, f.service).bucket_ts.nunique() + 1) / (n + 2)
        chances.append(1 - (1 - p) ** int(window.sum()))
        hits.append(bool(len(hit)))
        if len(hit):
            delay = (hit.raised.min() - f.inject_time).total_seconds()
            delays.append(max(0.0, delay))
            per_fault.append(f"after {delays[-1]:.0f} s")
        else:
            per_fault.append("missed")
    minutes = pd.Series(buckets[free]).dt.floor("min").nunique()
    alarmed = free_points.bucket_ts.dt.floor("min").nunique()
    return FaultScores(
        name,
        len(faults),
        len(delays),
        float(sum(chances)),
        float(np.median(delays)) if delays else float("nan"),
        int(minutes),
        int(alarmed),
        free_points.drop_duplicates(["raised", "caller", "callee"]).shape[0] / max(minutes, 1),
        _by_type(faults, hits, chances),
        per_fault,
    )


def rank_services(incident: Incident, points: pd.DataFrame) -> list[str]:
    """The services of an incident's nodes, most suspect first: by the summed score of its points
    where the service is the callee, then where it is the caller, then by name."""
    mine = points[
        points.node.isin(set(incident.nodes))
        & (points.bucket_ts >= pd.Timestamp(incident.start_ts))
        & (points.bucket_ts < pd.Timestamp(incident.end_ts))
    ]
    as_callee: dict[str, float] = defaultdict(float)
    as_caller: dict[str, float] = defaultdict(float)
    for node in incident.nodes:
        caller, callee = split_node_key(node)[:2]
        as_callee[callee] += 0.0
        as_caller[caller] += 0.0
    for node, score in zip(mine.node, mine.score.fillna(0.0)):
        caller, callee = split_node_key(node)[:2]
        as_callee[callee] += float(score)
        as_caller[caller] += float(score)
    services = set(as_callee) | set(as_caller)
    return sorted(services, key=lambda s: (-as_callee.get(s, 0.0), -as_caller.get(s, 0.0), s))


def _starts_in(incident: Incident, fault: Any, seconds: int) -> bool:
    """The incident starts in the fault's window on an RPC touching the injected service."""
    start = pd.Timestamp(incident.start_ts)
    in_window = start + pd.Timedelta(seconds=seconds) > fault.inject_time and start <= fault.window_end
    return bool(in_window) and any(fault.service in split_node_key(n)[:2] for n in incident.nodes)


def culprit_shares(
    incidents: list[Incident], points: pd.DataFrame, faults: pd.DataFrame, seconds: int, step: int | None = None
) -> tuple[float | None, float | None]:
    """Share of detected faults whose injected service ranks first / in the first three (None
    when no fault was detected)."""
    points = points.assign(bucket_ts=pd.to_datetime(points.bucket_ts))
    ordered = sorted(incidents, key=lambda i: (pd.Timestamp(i.start_ts), i.incident_id))
    ranks = []
    for f in faults.itertuples():
        first = next((i for i in ordered if _starts_in(i, f, _start_duration(i, seconds, step or seconds))), None)
        if first is not None:
            ranking = list(dict.fromkeys([*first.culprits, *rank_services(first, points)]))
            ranks.append(ranking.index(f.service) if f.service in ranking else len(ranking))
    if not ranks:
        return None, None
    return sum(r == 0 for r in ranks) / len(ranks), sum(r < 3 for r in ranks) / len(ranks)


def evaluated_range(con: duckdb.DuckDBPyConnection) -> tuple[pd.Timestamp, pd.Timestamp]:
    """From the end of the first training range to the end of the scored data."""
    first_champion = first_champion_at(con)
    [(scored_end,)] = con.execute(
        "SELECT max(hour) + INTERVAL 1 HOUR FROM score_runs WHERE status = 'scored'"
    ).fetchall()
    if first_champion is None or scored_end is None:
        raise ValueError("no champion has scored anything yet: run the pipeline (`rpcwatch run`) over the traces first")
    [(data_end,)] = con.execute("SELECT max(bucket_ts) FROM rpc_series").fetchall()
    return pd.Timestamp(first_champion) + pd.Timedelta(hours=1), min(pd.Timestamp(scored_end), pd.Timestamp(data_end))


def _starts(incidents: list[Incident], seconds: int, step: int) -> pd.DataFrame:
    """Incidents as the alert they raise: a row (bucket_ts, caller, callee, duration_s) per RPC at
    their first point. A start off the bucket grid is a trace window's (`step` long); one on it is
    taken as a bucket's, unless the incident holds trace windows only."""
    rows = {(i.start_ts, *split_node_key(n)[:2], _start_duration(i, seconds, step)) for i in incidents for n in i.nodes}
    return pd.DataFrame(sorted(rows), columns=["bucket_ts", "caller", "callee", "duration_s"])


def _start_duration(incident: Incident, seconds: int, step: int) -> int:
    on_grid = pd.Timestamp(incident.start_ts).value % (seconds * 10**9) == 0
    return step if incident.kinds == [TRACE_KIND] or not on_grid else seconds


def _our_incidents(con: duckdb.DuckDBPyConnection, start: pd.Timestamp, end: pd.Timestamp) -> list[Incident]:
    """The stored incidents starting in [start, end]."""
    rows = con.execute(
        f"SELECT {INCIDENT_COLUMNS} FROM incidents WHERE start_ts >= ? AND start_ts <= ?",
        [start, end],
    ).fetchall()
    return [Incident.from_row(row) for row in rows]


@dataclass
class FaultEvaluation:
    """Each detector in each unit, the judged faults, and the unobservable ones (listed only)."""

    scores: dict[str, dict[str, FaultScores]]
    faults: pd.DataFrame
    unobservable: pd.DataFrame

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            d: {u: s.as_json(u == "incidents") for u, s in units.items()} for d, units in self.scores.items()
        }
        cols = ["real_inject_time", "inject_pod", "service", "inject_type", "reason"]
        out["unobservable"] = self.unobservable[cols].to_dict("records")
        return out


def _judge(
    name: str,
    points: pd.DataFrame,
    incidents: list[Incident],
    faults: pd.DataFrame,
    buckets: pd.DatetimeIndex,
    seconds: int,
) -> dict[str, FaultScores]:
    """One detector in both units: its points, and its incidents' starts (with the culprit shares)."""
    step = int(buckets.freq.n) if buckets.freq is not None else seconds  # the grid's cell, seconds
    alarms = points.assign(duration_s=np.where(points.get("kind", "") == TRACE_KIND, step, seconds))
    by_points = score_faults(
        f"{name} points", alarms[["bucket_ts", "caller", "callee", "duration_s"]], faults, buckets, step
    )
    by_incidents = score_faults(f"{name} incident starts", _starts(incidents, seconds, step), faults, buckets, step)
    by_incidents.culprit_top1, by_incidents.culprit_top3 = culprit_shares(incidents, points, faults, step)
    return {"points": by_points, "incidents": by_incidents}


def evaluate_faults(settings: Settings, faults_path: Path) -> FaultEvaluation:
    """rpcwatch and the naive rule on the observable faults injected after the first model was
    trained, judged on irregular points and on incident starts."""
    listed = load_faults(faults_path)
    unobservable = listed[~listed.observable].reset_index(drop=True)
    with opened(settings.warehouse, read_only=True) as con:
        start, end = evaluated_range(con)
        [(seconds,)] = con.execute("SELECT max(bucket_seconds) FROM rpc_series").fetchall()  # as the run bucketed
        ours = con.execute(
            "SELECT bucket_ts, caller, callee, node, score, kind FROM anomalies "
            "WHERE bucket_ts >= ? AND bucket_ts <= ?",
            [start, end],
        ).df()
        our_incidents = _our_incidents(con, start, end)
        naive = naive_points(con, seconds, start, end + pd.Timedelta(seconds=seconds))
        naive_incidents = incidents_of(
            con, naive, settings.incident_gap_buckets, settings.incident_min_buckets, seconds
        )
    judged = listed.observable & (listed.inject_time >= start) & (listed.inject_time < end)
    faults = listed[judged].reset_index(drop=True)
    if faults.empty:
        raise ValueError(
            f"{faults_path}: no observable fault between {start} and {end}, the scored range after the first training"
        )
    # the grid: trace windows step faster than buckets (and the steps divide the buckets)
    step = min(seconds, settings.trace_step_s) if seconds % settings.trace_step_s == 0 else seconds
    buckets = pd.date_range(start, end, freq=f"{step}s")
    scores = {
        "rpcwatch": _judge("rpcwatch", ours, our_incidents, faults, buckets, seconds),
        "naive": _judge("naive", naive, naive_incidents, faults, buckets, seconds),
    }
    return FaultEvaluation(scores, faults, unobservable)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def fault_report(evaluation: FaultEvaluation) -> str:
    """Every detector side by side, then each fault with each detector's verdict, then the
    unobservable faults."""
    from tasks.app.report import table

    scores = [s for units in evaluation.scores.values() for s in units.values()]
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
            _share(s.culprit_top1),
            _share(s.culprit_top3),
        ]
        for s in scores
    ]
    headers = ["detector", "faults", "detected", "by chance", "above chance", "median delay s"]
    headers += ["alarms / fault-free min", "fault-free min alarmed", "culprit top-1", "culprit top-3"]
    per = [
        [f.real_inject_time, f.service, f.inject_type, *(s.per_fault[i] for s in scores)]
        for i, f in enumerate(evaluation.faults.itertuples())
    ]
    lines = [table(headers, rows), "", table(["injected at", "service", "type", *(s.name for s in scores)], per)]
    if len(evaluation.unobservable):
        gone = [[f.real_inject_time, f.service, f.inject_type, f.reason] for f in evaluation.unobservable.itertuples()]
        lines += ["", "unobservable (listed, not counted):", table(["injected at", "service", "type", "reason"], gone)]
    lines += [
        "",
        "by chance: the detector's add-one smoothed alarm rate on the injected service in fault-free buckets, "
        "over each fault's window (buckets taken as independent); alarms: irregular points, or incident "
        "starts x RPCs; culprit: the incident's own suspects first (see tasks.evaluation.faults)",
    ]
    return "\n".join(lines)
