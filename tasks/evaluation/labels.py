"""Evaluate detection against injected-event labels, next to the naive per-RPC median/MAD rule.

An event counts as detected when an anomaly overlaps its window (one bucket of slack before, two
after) on one of its RPCs or on a pattern its request type's traces belong to. rpcwatch's incidents
are those its alarm policy decided (the `incidents` table, as the view and alerts show them); the
naive rule's points (`tasks.evaluation.naive`) are grouped by the product's fixed rule
(`tasks.scoring.incidents.incidents_of`, with the settings' gap and minimum length). Incidents that
overlap no event are false alarms; precision is event-wise (detected / (detected + false)).

Attack labels (`rpcwatch inject`, kinds `tasks.evaluation.attacks.ATTACK_KINDS`) need no truth
file: `evaluate_attacks` judges them on incident starts and the services they touch; an attack's
delay runs from the end of its first trace to the end of the first alarm's first bucket, and the
false incidents around it are those starting within `ROOM_S` of it that no event explains.

`labels_json` is what `rpcwatch evaluate --labels --json` prints.

Reads the warehouse's `anomalies`, `incidents`, `rpc_series` (naive rule), `trace_patterns`,
`score_runs` and `forecast_errors`, the labels Parquet and the synthetic truth next to it
(`truth/trace_templates.parquet`); for attacks `incidents`, `rpc_series` and `score_runs`, and
the `fault_list.json` next to the labels. Writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from tasks.evaluation.attacks import ATTACK_KINDS, ROOM_S, SLACK_S, fault_windows
from tasks.evaluation.naive import naive_points
from tasks.keys import node_label, split_node_key
from tasks.scoring.incidents import anomaly_points, incidents_of, stored_incidents
from tasks.settings import Settings
from tasks.warehouse import opened


@dataclass(frozen=True)
class Outcome:
    """One labelled event as a detector did on it: its delay (None: missed) and, for attacks, the
    false incidents starting within `ROOM_S` of it."""

    event: str
    kind: str
    delay_s: float | None
    false_around: int | None = None

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "event": self.event,
            "kind": self.kind,
            "detected": self.delay_s is not None,
            "delay_s": self.delay_s,
        }
        return out | ({"false_incidents_around": self.false_around} if self.false_around is not None else {})


@dataclass
class Scores:
    name: str
    events: int
    detected: int
    incidents: int
    true_incidents: int
    false_alarms_per_pattern_hour: float
    median_delay_s: float
    outcomes: list[Outcome] = field(default_factory=list)

    @property
    def per_event(self) -> dict[str, str]:
        """Each event as the report shows it: "detected after N s" or "missed"."""
        return {
            o.event: "missed" if o.delay_s is None else f"detected after {max(0.0, o.delay_s):.0f} s"
            for o in self.outcomes
        }

    def as_json(self) -> dict[str, object]:
        """The summary the report shows, with each event (`events`) and `false_incidents`."""
        return {
            "detector": self.name,
            "events": [o.as_json() for o in self.outcomes],
            "detected": self.detected,
            "recall": _number(self.recall),
            "incidents": self.incidents,
            "false_incidents": self.incidents - self.true_incidents,
            "precision": _number(self.precision),
            "f1": _number(self.f1),
            "median_delay_s": _number(self.median_delay_s),
            "false_alarms_per_pattern_hour": _number(self.false_alarms_per_pattern_hour),
        }

    @property
    def recall(self) -> float:
        return self.detected / self.events if self.events else float("nan")

    @property
    def precision(self) -> float:
        """Event-wise: detected events over detected events plus false incidents (a detector that
        splits one event into many incidents gains nothing)."""
        false = self.incidents - self.true_incidents
        return self.detected / (self.detected + false) if self.detected + false else 1.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def _number(value: float) -> float | None:
    """JSON has no NaN: None instead."""
    return None if value != value else float(value)


@dataclass(frozen=True)
class Alarm:
    """An incident as it is matched against the labels."""

    start: pd.Timestamp  # first bucket
    last: pd.Timestamp  # last bucket
    keys: frozenset[str]  # its RPCs, as the labels name them
    patterns: frozenset[int]


@dataclass(frozen=True)
class Detector:
    """One detector's flagged points over the scored range and the incidents the rule makes of them."""

    name: str
    points: pd.DataFrame  # bucket_ts, key (label RPC key), pattern_id
    alarms: list[Alarm]


def _event_patterns(con: duckdb.DuckDBPyConnection, truth: Path) -> dict[str, set[int]]:
    """Per request type, the patterns holding at least a fifth of its traces."""
    con.register("truth_table", pq.read_table(truth))
    rows = con.execute("""SELECT t.request_type, tp.pattern_id, count(*) AS n FROM trace_patterns tp
                          JOIN truth_table t ON t.traceid = tp.trace_id WHERE tp.pattern_id IS NOT NULL
                          GROUP BY ALL""").fetchall()
    totals: dict[str, int] = {}
    for rt, _, n in rows:
        totals[rt] = totals.get(rt, 0) + n
    out: dict[str, set[int]] = {}
    for rt, pid, n in rows:
        if n >= 0.2 * totals[rt]:
            out.setdefault(rt, set()).add(int(pid))
    return out


def _window(event, seconds: int) -> tuple[pd.Timestamp, pd.Timestamp]:
    """An event's window, naive UTC: one bucket of slack before, two after."""
    return (
        event.start.tz_convert(None) - timedelta(seconds=seconds),
        event.end.tz_convert(None) + timedelta(seconds=2 * seconds),
    )


def _match(points: pd.DataFrame, event, patterns: set[int], seconds: int) -> pd.DataFrame:
    lo, hi = _window(event, seconds)
    inside = (points.bucket_ts >= lo) & (points.bucket_ts <= hi)
    related = points.key.isin(set(event.rpcs)) | points.pattern_id.isin(patterns)
    return points[inside & related]


def _explains(event, alarm: Alarm, patterns: set[int], seconds: int) -> bool:
    """The alarm overlaps the event's window on one of its RPCs or patterns."""
    lo, hi = _window(event, seconds)
    return bool(alarm.start <= hi and alarm.last >= lo and (alarm.keys & set(event.rpcs) or alarm.patterns & patterns))


def _alarms(con: duckdb.DuckDBPyConnection, points: pd.DataFrame, settings: Settings, seconds: int) -> list[Alarm]:
    """The incident rule of the product, with its settings, over a detector's points."""
    incidents = incidents_of(con, points, settings.incident_gap_buckets, settings.incident_min_buckets, seconds)
    return [
        Alarm(
            pd.Timestamp(i.start_ts),
            pd.Timestamp(i.end_ts) - pd.Timedelta(seconds=seconds),
            frozenset(node_label(n) for n in i.nodes),
            frozenset(i.patterns),
        )
        for i in incidents
    ]


def _score(
    detector: Detector,
    labels: pd.DataFrame,
    event_patterns: dict[str, set[int]],
    seconds: int,
    pattern_hours: int,
) -> Scores:
    """Recall and delay over the non-drift events; true incidents: those explained by any event."""
    points, events = detector.points, labels[labels.kind != "drift"]
    outcomes, delays = [], []
    for event in events.itertuples():
        hit = _match(points, event, event_patterns.get(event.request_type, set()), seconds)
        if len(hit):
            delays.append((hit.bucket_ts.min() - event.start.tz_convert(None)).total_seconds())
        outcomes.append(Outcome(event.event_id, event.kind, delays[-1] if len(hit) else None))
    true = sum(
        any(_explains(e, a, event_patterns.get(e.request_type, set()), seconds) for e in labels.itertuples())
        for a in detector.alarms
    )
    false = len(detector.alarms) - true
    return Scores(
        detector.name,
        len(events),
        len(delays),
        len(detector.alarms),
        true,
        false / max(pattern_hours, 1),
        float(np.median(delays)) if delays else float("nan"),
        outcomes,
    )


def _scored_range(con: duckdb.DuckDBPyConnection) -> tuple[datetime, datetime, int]:
    """[first, last + 1 h) of the scored hours and the number of scored pattern-hours."""
    [(start, end, pattern_hours)] = con.execute(
        "SELECT min(hour), max(hour) + INTERVAL 1 HOUR, count(*) FROM score_runs WHERE status = 'scored'"
    ).fetchall()
    if start is None:
        raise ValueError("nothing scored yet: run `rpcwatch score` (or the DAG) over the labelled hours")
    return start, end, int(pattern_hours)


def _detectors(
    con: duckdb.DuckDBPyConnection, settings: Settings, start: datetime, end: datetime
) -> tuple[Detector, Detector]:
    """rpcwatch's anomalies and the naive rule's points over [start, end), with their incidents:
    rpcwatch's as its alarm policy decided them (the `incidents` table, what the view and alerts
    show), the naive rule's by the fixed rule."""
    seconds = settings.bucket_seconds
    ours = anomaly_points(con, start, end)
    naive = naive_points(con, seconds, start, end)
    return (
        Detector("rpcwatch", _label_points(ours), _stored_alarms(con, start, end, seconds)),
        Detector("naive median/MAD", _label_points(naive), _alarms(con, naive, settings, seconds)),
    )


def _stored_alarms(con: duckdb.DuckDBPyConnection, start: datetime, end: datetime, seconds: int) -> list[Alarm]:
    """rpcwatch's incidents starting in [start, end), as stored."""
    return [
        Alarm(
            pd.Timestamp(i.start_ts),
            pd.Timestamp(i.end_ts) - pd.Timedelta(seconds=seconds),
            frozenset(node_label(n) for n in i.nodes),
            frozenset(i.patterns),
        )
        for i in stored_incidents(con, start, end)
        if i.start_ts < end
    ]


def _label_points(points: pd.DataFrame) -> pd.DataFrame:
    """bucket_ts, key (the labels' RPC name), pattern_id of a detector's points."""
    keys = pd.Series([node_label(n) for n in points.node], index=points.index, dtype=object)
    return pd.DataFrame({"bucket_ts": points.bucket_ts, "key": keys, "pattern_id": points.pattern_id})


def evaluate_labels(settings: Settings, labels_path: Path) -> tuple[Scores, Scores, dict[str, float]]:
    """rpcwatch vs the naive rule on the scored hours; plus forecast MAPE and drift behaviour."""
    labels = pq.read_table(labels_path).to_pandas()
    if len(labels) and labels.kind.isin(ATTACK_KINDS).all():
        return evaluate_attacks(settings, labels, Path(labels_path).parent / "fault_list.json")
    truth = Path(labels_path).parent / "truth" / "trace_templates.parquet"
    seconds = settings.bucket_seconds
    with opened(settings.warehouse, read_only=True) as con:
        event_patterns = _event_patterns(con, truth)
        start, end, pattern_hours = _scored_range(con)
        ours, naive = _detectors(con, settings, start, end)
        [(mape,)] = con.execute("SELECT avg(mape_calls) FROM forecast_errors WHERE hour >= ?", [start]).fetchall()
    labels = labels[(labels.end.dt.tz_convert(None) >= start) & (labels.start.dt.tz_convert(None) < end)]
    extra = {
        "forecast_mape_calls": float(mape or float("nan")),
        **_drift_hours(ours.alarms, labels, event_patterns, seconds),
    }
    return (
        _score(ours, labels, event_patterns, seconds, pattern_hours),
        _score(naive, labels, event_patterns, seconds, pattern_hours),
        extra,
    )


def _drift_hours(
    alarms: list[Alarm], labels: pd.DataFrame, event_patterns: dict[str, set[int]], seconds: int
) -> dict[str, float]:
    """Hours in which a drift's patterns raised an incident from the drift's start on, not explained
    by another labelled event. Retraining should keep this <= 1."""
    out = {}
    others = labels[labels.kind != "drift"]
    for event in labels[labels.kind == "drift"].itertuples():
        patterns = event_patterns.get(event.request_type, set())
        hours: set[pd.Timestamp] = set()
        for alarm in alarms:
            if not alarm.patterns & patterns or alarm.last < event.start.tz_convert(None):
                continue
            if any(
                alarm.start <= _window(o, seconds)[1] and alarm.last >= _window(o, seconds)[0]
                for o in others.itertuples()
            ):
                continue
            hours |= set(pd.date_range(alarm.start.floor("h"), alarm.last.floor("h"), freq="h"))
        out[f"{event.event_id}_alarm_hours"] = float(len(hours))
    return out


Touching = tuple[pd.Timestamp, frozenset[str]]  # an incident's start, the services of its nodes


def _touching(start: datetime, nodes: list[str]) -> Touching:
    return pd.Timestamp(start), frozenset(s for n in nodes for s in split_node_key(n)[:2])


Window = tuple[pd.Timestamp, pd.Timestamp]


def _widened(windows: list[Window], seconds: int) -> list[Window]:
    """[start - 1 bucket, end + SLACK_S]: where an incident starting counts as caused by the window."""
    return [(lo - pd.Timedelta(seconds=seconds), hi + pd.Timedelta(seconds=SLACK_S)) for lo, hi in windows]


def _first_trace_end(attack) -> pd.Timestamp:
    """When the attack's first trace ended (labels written before that column: its start)."""
    end = getattr(attack, "first_trace_end", None)
    return (attack.start if end is None or pd.isna(end) else end).tz_convert(None)


def _score_attacks(
    name: str, alarms: list[Touching], labels: pd.DataFrame, faults: list[Window], seconds: int, pattern_hours: int
) -> Scores:
    """Detected: an incident starts in an attack's widened window touching one of its services.
    Delay: from the end of the attack's first trace to the end of the first such incident's first
    bucket (0 if that bucket ends earlier). False: incidents starting in no widened attack or fault
    window; around an attack: the false ones starting within `ROOM_S` of it."""
    bucket, slack, room = (pd.Timedelta(seconds=s) for s in (seconds, SLACK_S, ROOM_S))
    windows, hits = _widened(faults, seconds), []
    for attack in labels.itertuples():
        lo, hi = attack.start.tz_convert(None) - bucket, attack.end.tz_convert(None) + slack
        windows.append((lo, hi))
        hits.append([s for s, services in alarms if lo <= s <= hi and services & set(attack.services)])
    false = [s for s, _ in alarms if not any(lo <= s <= hi for lo, hi in windows)]
    outcomes = []
    for attack, hit in zip(labels.itertuples(), hits):
        delay = max(0.0, (min(hit) + bucket - _first_trace_end(attack)).total_seconds()) if hit else None
        near = (attack.start.tz_convert(None) - room, attack.end.tz_convert(None) + room)
        around = sum(near[0] <= s <= near[1] for s in false)
        outcomes.append(Outcome(attack.event_id, attack.kind, delay, around))
    delays = [o.delay_s for o in outcomes if o.delay_s is not None]
    return Scores(
        name,
        len(labels),
        len(delays),
        len(alarms),
        len(alarms) - len(false),
        len(false) / max(pattern_hours, 1),
        float(np.median(delays)) if delays else float("nan"),
        outcomes,
    )


def evaluate_attacks(
    settings: Settings, labels: pd.DataFrame, faults_path: Path
) -> tuple[Scores, Scores, dict[str, float]]:
    """Injected attacks against rpcwatch's stored incidents and the naive rule's (the product's rule
    over its points) on the scored hours, judged by `_score_attacks`; fault windows come from
    `faults_path` (none if it is absent). Extra: how many fault windows, and how many of rpcwatch's
    incidents start in one."""
    faults = fault_windows(faults_path)
    with opened(settings.warehouse, read_only=True) as con:
        start, end, pattern_hours = _scored_range(con)
        [(seconds,)] = con.execute("SELECT max(bucket_seconds) FROM rpc_series").fetchall()
        seconds = int(seconds or settings.bucket_seconds)
        rows = con.execute(
            "SELECT start_ts, nodes FROM incidents WHERE start_ts >= ? AND start_ts < ? ORDER BY start_ts", [start, end]
        ).fetchall()
        naive = incidents_of(
            con,
            naive_points(con, seconds, start, end),
            settings.incident_gap_buckets,
            settings.incident_min_buckets,
            seconds,
        )
    labels = labels[(labels.end.dt.tz_convert(None) >= start) & (labels.start.dt.tz_convert(None) < end)]
    ours, theirs = [_touching(s, n) for s, n in rows], [_touching(i.start_ts, i.nodes) for i in naive]
    in_faults = sum(any(lo <= s <= hi for lo, hi in _widened(faults, seconds)) for s, _ in ours)
    return (
        _score_attacks("rpcwatch", ours, labels, faults, seconds, pattern_hours),
        _score_attacks("naive median/MAD", theirs, labels, faults, seconds, pattern_hours),
        {"fault_windows": float(len(faults)), "rpcwatch_incidents_in_fault_windows": float(in_faults)},
    )


def labels_json(ours: Scores, naive: Scores, extra: dict[str, float]) -> dict[str, object]:
    """`rpcwatch evaluate --labels --json`: each detector's summary with its `events` and
    `false_incidents` (under `rpcwatch` and `naive`), and the extra figures."""
    return {"rpcwatch": ours.as_json(), "naive": naive.as_json(), "extra": {k: _number(v) for k, v in extra.items()}}


def label_report(ours: Scores, naive: Scores, extra: dict[str, float]) -> str:
    """The evaluation as people read it: both detectors side by side, then per event."""
    from tasks.app.report import table

    rows = [
        [
            s.name,
            s.events,
            s.detected,
            f"{s.recall:.2f}",
            s.incidents,
            s.incidents - s.true_incidents,
            f"{s.precision:.2f}",
            f"{s.f1:.2f}",
            f"{s.median_delay_s:.0f}",
            f"{s.false_alarms_per_pattern_hour:.3f}",
        ]
        for s in (ours, naive)
    ]
    lines = [
        table(
            [
                "detector",
                "events",
                "detected",
                "recall",
                "incidents",
                "false",
                "precision",
                "F1",
                "median delay s",
                "false alarms / pattern-hour",
            ],
            rows,
        ),
        "",
        table(["event", "rpcwatch", "naive"], [[e, ours.per_event[e], naive.per_event[e]] for e in ours.per_event]),
        "",
        ", ".join(f"{k} {v:.3f}" for k, v in extra.items()),
    ]
    return "\n".join(lines)
