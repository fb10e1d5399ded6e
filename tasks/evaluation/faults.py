"""Judge detections against injected faults (a Nezha-style `fault_list.json`), next to the naive rule.

Window: a fault's window is [inject_time - `PRE_EFFECT`, inject_time + `FAULT_WINDOW`], clipped to
the end of its capture (`capture_end` / `window_end`, written by `rpcwatch replay`). A bucket is in
the window when it overlaps it. The lead-in: code faults' effects can start 60-90 s before the
recorded time (the data set's own notes), and the same stretch is already no fault-free time for the
false alarms; an alarm there used to be neither a detection nor a false alarm. Added after seeing a
TrainTicket 01-29 incident start 60 s before its fault's recorded injection; an alarm there counts
with delay 0. Faults that `rpcwatch replay` marked `observable: false` (no capture overlaps
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
caller, then by name. `culprit_top1` / `culprit_top3`: share of detected faults (`_visible`: of
the detected visible ones) whose injected service is first / among the first three. The naive
rule's points score 0, so its ranking falls to the name order.

The naive rule is `tasks.evaluation.naive`; its incidents come from the product's rule
(`tasks.scoring.incidents.incidents_of`). Reads the fault list and the warehouse's `models`,
`score_runs`, `rpc_series`, `anomalies` and `incidents`. Writes nothing.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from tasks.evaluation.naive import naive_points
from tasks.keys import split_node_key
from tasks.models.registry import first_champion_at
from tasks.scoring.incidents import Incident, anomaly_points, calibration_history, incidents_of, stored_incidents
from tasks.scoring.policy import CURVE, threshold
from tasks.scoring.trace_scoring import KIND as TRACE_KIND
from tasks.settings import Settings
from tasks.warehouse import opened

FAULT_WINDOW = timedelta(seconds=180)
DEFAULT_WINDOW = FAULT_WINDOW  # the name earlier callers used
POD_SUFFIX = re.compile(r"^(.+)-[^-]+-[^-]+$")  # Kubernetes pod name -> its deployment (service)
DETECTORS = ("rpcwatch", "naive")
UNITS = ("points", "incidents")
PRE_EFFECT = timedelta(seconds=90)  # code faults' effects can start this long before the recorded injection
SETTLE = timedelta(seconds=60)  # after a fault's window its service may still settle


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
    hits: list[bool] = field(default_factory=list)  # per fault: detected
    culprit_ranks: list[int | None] = field(default_factory=list)  # per fault: its service's rank (None: missed)
    culprit_top1_visible: float | None = None  # ... among the detected visible faults only
    culprit_top3_visible: float | None = None
    visible: int | None = None  # faults the ceiling calls visible (None: not judged)
    detected_visible: int | None = None
    background: FalseAlarms | None = None  # false alarms over the fill and the real captures

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
            out |= {
                "culprit_top1_visible": self.culprit_top1_visible,
                "culprit_top3_visible": self.culprit_top3_visible,
            }
        out |= {"visible": self.visible, "detected_visible": self.detected_visible}
        out |= self.background.as_json() if self.background else {"false_incidents_per_day": None}
        return out

    def judge_visibility(self, visible: list[bool]) -> None:
        """Count the detected faults among those the ceiling calls visible (one flag per fault)."""
        self.visible = sum(visible)
        self.detected_visible = sum(h and v for h, v in zip(self.hits, visible))
        if self.culprit_ranks:
            ranks = [r for r, v in zip(self.culprit_ranks, visible) if v]
            self.culprit_top1_visible, self.culprit_top3_visible = top_shares(ranks)


@dataclass(frozen=True)
class FalseAlarms:
    """False alarms of one detector and unit: alarms starting in fault-free fill (per day of fill)
    and the share of the real captures' fault-free minutes inside an alarm. Points: each fault-free
    minute with an irregular point is one alarm."""

    fill_hours: float
    false_fill: int
    real_free_minutes: int
    real_free_minutes_alarmed: int

    @property
    def per_day(self) -> float | None:
        return self.false_fill / (self.fill_hours / 24) if self.fill_hours > 0 else None

    @property
    def real_share(self) -> float | None:
        return self.real_free_minutes_alarmed / self.real_free_minutes if self.real_free_minutes else None

    def as_json(self) -> dict[str, object]:
        return {
            "false_incidents_per_day": self.per_day,
            "fill_hours": round(self.fill_hours, 2),
            "false_in_fill": self.false_fill,
            "real_fault_free_minutes": self.real_free_minutes,
            "real_fault_free_minutes_alarmed": self.real_free_minutes_alarmed,
        }


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


def opens(fault: Any) -> pd.Timestamp:
    """Where a fault's window opens: `PRE_EFFECT` before its recorded injection (code faults act
    that early; the same lead-in is no fault-free time for the false alarms, `Background`)."""
    return fault.inject_time - PRE_EFFECT


def _in_window(ts: pd.DatetimeIndex, fault: Any, seconds: int) -> Any:
    """Which buckets (by start) overlap the fault's window."""
    return (ts + pd.Timedelta(seconds=seconds) > opens(fault)) & (ts <= fault.window_end)


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
        hits=hits,
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
    in_window = start + pd.Timedelta(seconds=seconds) > opens(fault) and start <= fault.window_end
    return bool(in_window) and any(fault.service in split_node_key(n)[:2] for n in incident.nodes)


def culprit_ranks(
    incidents: list[Incident], points: pd.DataFrame, faults: pd.DataFrame, seconds: int, step: int | None = None
) -> list[int | None]:
    """Per fault, where its injected service ranks among the suspects of the first incident starting
    in its window (0: first; None: no such incident)."""
    points = points.assign(bucket_ts=pd.to_datetime(points.bucket_ts))
    ordered = sorted(incidents, key=lambda i: (pd.Timestamp(i.start_ts), i.incident_id))
    ranks: list[int | None] = []
    for f in faults.itertuples():
        first = next((i for i in ordered if _starts_in(i, f, _start_duration(i, seconds, step or seconds))), None)
        if first is None:
            ranks.append(None)
            continue
        ranking = list(dict.fromkeys([*first.culprits, *rank_services(first, points)]))
        ranks.append(ranking.index(f.service) if f.service in ranking else len(ranking))
    return ranks


def top_shares(ranks: list[int | None]) -> tuple[float | None, float | None]:
    """Share of the detected faults (rank not None) whose service ranks first / in the first three
    (None when none was detected)."""
    found = [r for r in ranks if r is not None]
    if not found:
        return None, None
    return sum(r == 0 for r in found) / len(found), sum(r < 3 for r in found) / len(found)


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
    background: Background | None = None,
) -> dict[str, FaultScores]:
    """One detector in both units: its points, and its incidents' starts (with the culprit shares);
    with a `background`, the false alarms over its fill and real captures."""
    step = int(buckets.freq.n) if buckets.freq is not None else seconds  # the grid's cell, seconds
    alarms = points.assign(duration_s=np.where(points.get("kind", "") == TRACE_KIND, step, seconds))
    by_points = score_faults(
        f"{name} points", alarms[["bucket_ts", "caller", "callee", "duration_s"]], faults, buckets, step
    )
    by_incidents = score_faults(f"{name} incident starts", _starts(incidents, seconds, step), faults, buckets, step)
    by_incidents.culprit_ranks = culprit_ranks(incidents, points, faults, step)
    by_incidents.culprit_top1, by_incidents.culprit_top3 = top_shares(by_incidents.culprit_ranks)
    for i, rank in enumerate(by_incidents.culprit_ranks):
        if rank is not None:
            by_incidents.per_fault[i] += f", culprit #{rank + 1}"
    if background is not None:
        cells = background.cells(buckets, step)
        by_points.background = cells.point_alarms(_cells(alarms, step).bucket_ts)
        by_incidents.background = cells.incident_alarms(incidents)
    return {"points": by_points, "incidents": by_incidents}


@dataclass(frozen=True)
class Background:
    """Where a replay's time is real capture (the rest is fill), and the listed faults' zones: from
    `[inject_time - PRE_EFFECT, window_end + SETTLE]` nothing counts as a false alarm (code faults
    can act before the recorded time; a service takes a while to settle)."""

    captures: list[tuple[pd.Timestamp, pd.Timestamp]]
    zones: list[tuple[pd.Timestamp, pd.Timestamp]]
    end: pd.Timestamp | None = None  # where the replay's traffic ends (its last hour is partial)

    def clip(self, end: pd.Timestamp) -> pd.Timestamp:
        """The evaluated range's end, no later than the replay's traffic: the empty rest of its
        last hour is the replay's end, not an outage."""
        return end if self.end is None else min(end, self.end)

    @classmethod
    def of(cls, faults_path: Path, faults: pd.DataFrame) -> Background | None:
        """The background of a replay's fault list (None for a fault list that is not a replay's)."""
        folder = Path(faults_path).parent
        if not (folder / "runs.parquet").is_file():
            return None
        from tasks.evaluation.replay import capture_spans, replay_meta

        captures = [(_naive(a), _naive(b)) for a, b in capture_spans(folder)]
        listed = faults[faults.inject_time.notna()]
        zones = list(zip(listed.inject_time - PRE_EFFECT, listed.window_end + SETTLE))
        return cls(captures, zones, pd.Timestamp(replay_meta(folder)["end"]))

    def cells(self, buckets: pd.DatetimeIndex, step: int) -> BackgroundCells:
        ends = buckets + pd.Timedelta(seconds=step)
        in_capture = _overlaps(buckets, ends, self.captures)
        in_zone = _overlaps(buckets, ends, self.zones)
        return BackgroundCells(buckets, step, ~in_capture & ~in_zone, in_capture & ~in_zone)


@dataclass(frozen=True)
class BackgroundCells:
    """The evaluated grid's cells that are fault-free fill and fault-free real capture."""

    buckets: pd.DatetimeIndex
    step: int
    fill: np.ndarray
    real: np.ndarray

    def _minutes(self, mask: np.ndarray) -> set[pd.Timestamp]:
        return set(self.buckets[mask].floor("min"))

    def point_alarms(self, alarmed: pd.Series) -> FalseAlarms:
        """Each fault-free minute holding an alarmed cell is one alarm."""
        alarmed_minutes = set(pd.to_datetime(alarmed).dt.floor("min"))
        fill_minutes = self._minutes(self.fill) - self._minutes(~self.fill)  # whole fill minutes only
        real_minutes = self._minutes(self.real)
        return FalseAlarms(
            float(self.fill.sum()) * self.step / 3600,
            len(fill_minutes & alarmed_minutes),
            len(real_minutes),
            len(real_minutes & alarmed_minutes),
        )

    def incident_alarms(self, incidents: list[Incident]) -> FalseAlarms:
        """Incidents starting in a fill cell, and real fault-free minutes inside an incident."""
        fill_starts = set(self.buckets[self.fill])
        starts = [pd.Timestamp(i.start_ts).floor(f"{self.step}s") for i in incidents]
        covered = np.zeros(len(self.buckets), dtype=bool)
        for i in incidents:
            covered |= np.asarray(
                (self.buckets + pd.Timedelta(seconds=self.step) > pd.Timestamp(i.start_ts))
                & (self.buckets < pd.Timestamp(i.end_ts))
            )
        real_minutes = self._minutes(self.real)
        return FalseAlarms(
            float(self.fill.sum()) * self.step / 3600,
            sum(s in fill_starts for s in starts),
            len(real_minutes),
            len(real_minutes & self._minutes(self.real & covered)),
        )


def _naive(ts: pd.Timestamp) -> pd.Timestamp:
    return ts.tz_convert(None) if ts.tzinfo is not None else ts


def _overlaps(
    starts: pd.DatetimeIndex, ends: pd.DatetimeIndex, spans: list[tuple[pd.Timestamp, pd.Timestamp]]
) -> np.ndarray:
    """Which cells [start, end) overlap any of the spans."""
    out = np.zeros(len(starts), dtype=bool)
    for lo, hi in spans:
        out |= np.asarray((ends > lo) & (starts <= hi))
    return out


def evaluate_faults(settings: Settings, faults_path: Path, visible: pd.DataFrame | None = None) -> FaultEvaluation:
    """rpcwatch and the naive rule on the observable faults injected after the first model was
    trained, judged on irregular points and on incident starts; with the ceiling's verdicts
    (`visible`: inject_time, service, visible), also on the visible faults alone. On a replay, the
    false alarms over its fill and its real captures' fault-free minutes (`Background`)."""
    listed = load_faults(faults_path)
    unobservable = listed[~listed.observable].reset_index(drop=True)
    background = Background.of(faults_path, listed)
    with opened(settings.warehouse, read_only=True) as con:
        start, end = evaluated_range(con)
        end = background.clip(end) if background else end
        [(seconds,)] = con.execute("SELECT max(bucket_seconds) FROM rpc_series").fetchall()  # as the run bucketed
        ours = con.execute(
            "SELECT bucket_ts, caller, callee, node, score, kind FROM anomalies "
            "WHERE bucket_ts >= ? AND bucket_ts <= ?",
            [start, end],
        ).df()
        our_incidents = stored_incidents(con, start, end)
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
        "rpcwatch": _judge("rpcwatch", ours, our_incidents, faults, buckets, seconds, background),
        "naive": _judge("naive", naive, naive_incidents, faults, buckets, seconds, background),
    }
    if visible is not None:
        flags = _visible_flags(faults, visible)
        faults = faults.assign(visible=flags)
        for units in scores.values():
            for unit in units.values():
                unit.judge_visibility(flags)
    return FaultEvaluation(scores, faults, unobservable)


def _visible_flags(faults: pd.DataFrame, verdicts: pd.DataFrame) -> list[bool]:
    """The ceiling's verdict for each judged fault (matched on injection time and service)."""
    by_fault = {
        (pd.Timestamp(t), s): bool(v) for t, s, v in zip(verdicts.inject_time, verdicts.service, verdicts.visible)
    }
    return [by_fault.get((pd.Timestamp(t), s), False) for t, s in zip(faults.inject_time, faults.service)]


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _culprit(share: float | None, visible_share: float | None, visible: int | None) -> str:
    return _share(share) if visible is None or share is None else f"{_share(share)} ({_share(visible_share)})"


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
            _culprit(s.culprit_top1, s.culprit_top1_visible, s.visible),
            _culprit(s.culprit_top3, s.culprit_top3_visible, s.visible),
            "-" if s.visible is None else f"{s.detected_visible} / {s.visible}",
            "-" if s.background is None or s.background.per_day is None else f"{s.background.per_day:.1f}",
            "-" if s.background is None else _share(s.background.real_share),
        ]
        for s in scores
    ]
    headers = ["detector", "faults", "detected", "by chance", "above chance", "median delay s"]
    headers += ["alarms / fault-free min", "fault-free min alarmed"]
    headers += ["culprit top-1 (visible)", "culprit top-3 (visible)"]
    headers += ["visible detected", "false / day (fill)", "real fault-free min alarmed"]
    visible = "visible" in evaluation.faults
    per = [
        [
            f.real_inject_time,
            f.service,
            f.inject_type,
            *(["yes" if f.visible else "no"] if visible else []),
            *(s.per_fault[i] for s in scores),
        ]
        for i, f in enumerate(evaluation.faults.itertuples())
    ]
    per_headers = ["injected at", "service", "type", *(["visible"] if visible else []), *(s.name for s in scores)]
    lines = [table(headers, rows), "", table(per_headers, per)]
    if len(evaluation.unobservable):
        gone = [[f.real_inject_time, f.service, f.inject_type, f.reason] for f in evaluation.unobservable.itertuples()]
        lines += ["", "unobservable (listed, not counted):", table(["injected at", "service", "type", "reason"], gone)]
    lines += [
        "",
        "by chance: the detector's add-one smoothed alarm rate on the injected service in fault-free buckets, "
        "over each fault's window (buckets taken as independent); alarms: irregular points, or incident "
        "starts x RPCs; culprit: the incident's own suspects first (see tasks.evaluation.faults); visible: by the "
        "ceiling (`--ceiling`); false / day: alarms starting in fault-free fill, per day of fill (points: alarmed "
        "fill minutes); real fault-free min alarmed: the real captures' fault-free minutes inside an alarm",
    ]
    return "\n".join(lines)


@dataclass(frozen=True)
class CurvePoint:
    """rpcwatch's incidents re-decided by the alarm policy at one setting (false incidents a day;
    None: the fixed rule alone, as before the policy)."""

    setting: float | None
    visible: int | None
    detected_visible: int | None
    detected: int
    faults: int
    median_delay_s: float
    false_per_day: float | None
    real_share: float | None

    def as_json(self) -> dict[str, object]:
        return asdict(self) | {"median_delay_s": None if np.isnan(self.median_delay_s) else self.median_delay_s}


def operating_curve(
    settings: Settings, faults_path: Path, visible: pd.DataFrame | None = None, values: tuple[float, ...] = CURVE
) -> list[CurvePoint]:
    """Detection of (visible) faults and false incidents per day of fill at each setting of the alarm
    policy, from the stored points: the models are trained once, only the decision changes."""
    listed = load_faults(faults_path)
    background = Background.of(faults_path, listed)
    with opened(settings.warehouse, read_only=True) as con:
        start, end = evaluated_range(con)
        end = background.clip(end) if background else end
        [(seconds,)] = con.execute("SELECT max(bucket_seconds) FROM rpc_series").fetchall()
        gap = settings.incident_gap_buckets
        points = anomaly_points(con, start - pd.Timedelta(hours=1), end + pd.Timedelta(seconds=seconds))
        hours = list(pd.date_range(start.floor("h"), end, freq="h").to_pydatetime())
        history = {h: calibration_history(con, h, gap, seconds, settings.incident_min_buckets) for h in hours}
        decided = {
            x: incidents_of(
                con,
                points,
                gap,
                settings.incident_min_buckets,
                seconds,
                {} if x is None else {h: t for h, hist in history.items() if (t := threshold(hist, x)) is not None},
            )
            for x in (*values, None)  # None: the fixed rule alone, for comparison
        }
    judged = listed.observable & (listed.inject_time >= start) & (listed.inject_time < end)
    faults = listed[judged].reset_index(drop=True)
    step = min(seconds, settings.trace_step_s) if seconds % settings.trace_step_s == 0 else seconds
    buckets = pd.date_range(start, end, freq=f"{step}s")
    flags = _visible_flags(faults, visible) if visible is not None else None
    curve = []
    for x, incidents in decided.items():
        mine = [i for i in incidents if start <= pd.Timestamp(i.start_ts) <= end]
        scores = score_faults("rpcwatch", _starts(mine, seconds, step), faults, buckets, step)
        if flags is not None:
            scores.judge_visibility(flags)
        alarms = background.cells(buckets, step).incident_alarms(mine) if background else None
        curve.append(
            CurvePoint(
                x,
                scores.visible,
                scores.detected_visible,
                scores.detected,
                scores.faults,
                scores.median_delay_s,
                alarms.per_day if alarms else None,
                alarms.real_share if alarms else None,
            )
        )
    return curve


def curve_report(curve: list[CurvePoint], default: float) -> str:
    """The operating curve as a table, the default setting marked."""
    from tasks.app.report import table

    rows = [
        [
            "fixed rule" if c.setting is None else f"{c.setting:g}" + (" (default)" if c.setting == default else ""),
            f"{c.detected} / {c.faults}",
            "-" if c.visible is None else f"{c.detected_visible} / {c.visible}",
            "-" if np.isnan(c.median_delay_s) else f"{c.median_delay_s:.0f}",
            "-" if c.false_per_day is None else f"{c.false_per_day:.1f}",
            _share(c.real_share),
        ]
        for c in curve
    ]
    headers = ["setting (false incidents / day)", "detected", "visible detected", "median delay s"]
    headers += ["false incidents / day (fill)", "real fault-free min in incident"]
    return "\n".join(
        [
            "Operating curve: rpcwatch's incident starts re-decided by the alarm policy at each setting "
            "(RPCWATCH_ALARM_FALSE_PER_DAY), models trained once:",
            table(headers, rows),
        ]
    )
