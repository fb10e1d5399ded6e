"""Evaluate detection against injected-event labels, next to a naive per-RPC median/MAD rule.

An event counts as detected when an anomaly overlaps its window (one bucket of slack before, two
after) on one of its RPCs or on a pattern its request type's traces belong to. Incidents that
overlap no event are false alarms; precision is event-wise (detected / (detected + false)). The
naive reference is what a team writes in an afternoon: per RPC, flag calls or p95 latency more
than 5 MADs from the median of the previous hour (once 15 minutes of it exist), grouped into
incidents the same way (same persistence rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from tasks.settings import Settings
from tasks.warehouse import opened

MIN_PEAK = 3.0  # an incident: flagged in `incident_min_buckets` buckets, or fewer but far out (as `incidents`)


@dataclass
class Scores:
    name: str
    events: int
    detected: int
    incidents: int
    true_incidents: int
    false_alarms_per_pattern_hour: float
    median_delay_s: float
    per_event: dict[str, str] = field(default_factory=dict)

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


def _key(caller, callee, interface) -> str:
    return f"{caller}:{callee}:{interface or ''}"


def _event_patterns(con, truth: Path) -> dict[str, set[int]]:
    con.register("truth_table", pq.read_table(truth))
    rows = con.execute("""SELECT t.request_type, tp.pattern_id, count(*) AS n FROM trace_patterns tp
                          JOIN truth_table t ON t.traceid = tp.trace_id WHERE tp.pattern_id IS NOT NULL GROUP BY ALL""").fetchall()
    totals: dict[str, int] = {}
    for rt, _, n in rows:
        totals[rt] = totals.get(rt, 0) + n
    out: dict[str, set[int]] = {}
    for rt, pid, n in rows:
        if n >= 0.2 * totals[rt]:
            out.setdefault(rt, set()).add(int(pid))
    return out


def _match(points: pd.DataFrame, event, patterns: set[int], seconds: int) -> pd.DataFrame:
    lo = event.start.tz_convert(None) - timedelta(seconds=seconds)
    hi = event.end.tz_convert(None) + timedelta(seconds=2 * seconds)
    rpcs = set(event.rpcs)
    inside = (points.bucket_ts >= lo) & (points.bucket_ts <= hi)
    related = points.key.isin(rpcs) | points.pattern_id.isin(patterns)
    return points[inside & related]


def _incidents(points: pd.DataFrame, group: str, gap: timedelta, min_buckets: int) -> pd.DataFrame:
    points = points.sort_values([group, "bucket_ts"])
    new = points.groupby(group).bucket_ts.diff().fillna(gap * 10) > gap
    points = points.assign(run=new.groupby(points[group]).cumsum())
    runs = (
        points.groupby([group, "run"])
        .agg(
            start=("bucket_ts", "min"),
            end=("bucket_ts", "max"),
            keys=("key", set),
            patterns=("pattern_id", set),
            buckets=("bucket_ts", "nunique"),
            peak=("score", "max"),
        )
        .reset_index()
    )
    return runs[(runs.buckets >= min_buckets) | (runs.peak >= MIN_PEAK)]


def _score(
    name: str,
    points: pd.DataFrame,
    labels: pd.DataFrame,
    event_patterns: dict[str, set[int]],
    seconds: int,
    group: str,
    pattern_hours: int,
    min_buckets: int,
) -> Scores:
    events = labels[labels.kind != "drift"]
    per_event, delays = {}, []
    for event in events.itertuples():
        hit = _match(points, event, event_patterns.get(event.request_type, set()), seconds)
        if len(hit):
            delays.append((hit.bucket_ts.min() - event.start.tz_convert(None)).total_seconds())
            per_event[event.event_id] = f"detected after {max(0, delays[-1]):.0f} s"
        else:
            per_event[event.event_id] = "missed"
    incidents = (
        _incidents(points, group, timedelta(seconds=3 * seconds), min_buckets) if len(points) else pd.DataFrame()
    )
    true = 0
    for inc in incidents.itertuples():
        for event in labels.itertuples():
            patterns = event_patterns.get(event.request_type, set())
            lo = event.start.tz_convert(None) - timedelta(seconds=seconds)
            hi = event.end.tz_convert(None) + timedelta(seconds=2 * seconds)
            if inc.start <= hi and inc.end >= lo and (inc.keys & set(event.rpcs) or inc.patterns & patterns):
                true += 1
                break
    detected = sum(v != "missed" for v in per_event.values())
    false = len(incidents) - true
    return Scores(
        name,
        len(events),
        detected,
        len(incidents),
        true,
        false / max(pattern_hours, 1),
        float(np.median(delays)) if delays else float("nan"),
        per_event,
    )


def _naive_points(con, seconds: int, start, end) -> pd.DataFrame:
    """Per-RPC median/MAD rule on calls and p95 latency over the previous hour of buckets."""
    frame = con.execute(
        """SELECT bucket_ts, caller, callee, interface, calls, rt_p95 FROM rpc_series
                           WHERE bucket_ts < ? ORDER BY bucket_ts""",
        [end],
    ).df()
    frame["key"] = [_key(*r) for r in frame[["caller", "callee", "interface"]].itertuples(index=False)]
    wide = {f: frame.pivot_table(index="bucket_ts", columns="key", values=f) for f in ("calls", "rt_p95")}
    wide["calls"] = wide["calls"].asfreq(f"{seconds}s").fillna(0)
    window = 3600 // seconds
    flagged = []
    for feature, table in wide.items():
        table = table.asfreq(f"{seconds}s")
        med = table.rolling(window, min_periods=window // 4).median().shift(1)
        mad = (table - med).abs().rolling(window, min_periods=window // 4).median().shift(1)
        out = ((table - med).abs() > 5 * (1.4826 * mad + 1e-9)) & (mad.notna())
        stacked = out.stack()
        flagged.append(stacked[stacked].reset_index()[["bucket_ts", "key"]])
    points = pd.concat(flagged).drop_duplicates()
    points = points[points.bucket_ts >= start]
    return points.assign(pattern_id=-1, score=0.0)  # no score: the same persistence rule applies


def evaluate_labels(settings: Settings, labels_path: Path) -> tuple[Scores, Scores, dict[str, float]]:
    """rpcwatch vs the naive rule on the scored hours; plus forecast MAPE and drift behaviour."""
    labels = pq.read_table(labels_path).to_pandas()
    truth = Path(labels_path).parent / "truth" / "trace_templates.parquet"
    seconds = settings.bucket_seconds
    with opened(settings.warehouse, read_only=True) as con:
        event_patterns = _event_patterns(con, truth)
        start, end, pattern_hours = con.execute(
            "SELECT min(hour), max(hour) + INTERVAL 1 HOUR, count(*) FROM score_runs WHERE status = 'scored'"
        ).fetchone()
        if start is None:
            raise ValueError("nothing scored yet: run `rpcwatch score` (or the DAG) over the labelled hours")
        points = con.execute(
            """SELECT bucket_ts, coalesce(pattern_id, -1) AS pattern_id, caller, callee, interface, score,
                                       coalesce(CAST(pattern_id AS VARCHAR), 'novel:' || caller) AS grp
                                FROM anomalies WHERE bucket_ts >= ? AND bucket_ts < ?""",
            [start, end],
        ).df()
        points["key"] = [_key(*r) for r in points[["caller", "callee", "interface"]].itertuples(index=False)]
        naive = _naive_points(con, seconds, start, end)
        mape = con.execute("SELECT avg(mape_calls) FROM forecast_errors WHERE hour >= ?", [start]).fetchone()[0]
    labels = labels[(labels.end.dt.tz_convert(None) >= start) & (labels.start.dt.tz_convert(None) < end)]
    n = settings.incident_min_buckets
    ours = _score("rpcwatch", points, labels, event_patterns, seconds, "grp", pattern_hours, n)
    reference = _score(
        "naive median/MAD", naive.assign(grp=naive.key), labels, event_patterns, seconds, "grp", pattern_hours, n
    )
    extra = {
        "forecast_mape_calls": float(mape or float("nan")),
        **_drift_hours(points, labels, event_patterns, seconds, n),
    }
    return ours, reference, extra


def _drift_hours(
    points: pd.DataFrame, labels: pd.DataFrame, event_patterns: dict[str, set[int]], seconds: int, min_buckets: int
) -> dict[str, float]:
    """Hours in which a drift's patterns raised an incident (same rule as `incidents`) from the drift's
    start on, not explained by another labelled event. Retraining should keep this <= 1."""
    out = {}
    incidents = (
        _incidents(points, "grp", timedelta(seconds=3 * seconds), min_buckets) if len(points) else pd.DataFrame()
    )
    others = labels[labels.kind != "drift"]
    for event in labels[labels.kind == "drift"].itertuples():
        patterns = event_patterns.get(event.request_type, set())
        hours = set()
        for inc in incidents.itertuples():
            if not inc.patterns & patterns or inc.end < event.start.tz_convert(None):
                continue
            if any(
                inc.start <= o.end.tz_convert(None) + timedelta(seconds=2 * seconds)
                and inc.end >= o.start.tz_convert(None) - timedelta(seconds=seconds)
                for o in others.itertuples()
            ):
                continue
            hours |= set(pd.date_range(inc.start.floor("h"), inc.end.floor("h"), freq="h"))
        out[f"{event.event_id}_alarm_hours"] = float(len(hours))
    return out


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
