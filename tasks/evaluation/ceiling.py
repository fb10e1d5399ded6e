"""What the traces hold: a label-using ceiling for fault detection.

No detector, however good, can tell a fault from normal traffic when the traces do not change. This
oracle knows each fault's service and time (labels: for evaluation only, never for training or
thresholds) and asks whether the service's calls in the fault window differ from the rest of the
fault-free traffic more than fault-free stretches of the same day differ from each other.

Per fault and per RPC whose caller or callee is the injected service, it tests
- the RPC's rate per root trace (binomial: the segment's share of the RPC's calls against its share of
  the root traces; a vanished or novel RPC shows here),
- client latency, server latency and self time (Mann-Whitney against the fault-free calls),
and takes the fault's strength D = -log10(smallest p x number of tests) (Bonferroni, floored at 0).
The null: every fault's pre-injection segment (fault-free by the list) tested the same way for the
same service against the other fault-free calls. A fault is *visible* when its D exceeds every null
segment's D for its service (by chance about 1 / (m + 1) with m exchangeable null segments), and
*above_p95* when it exceeds their 95th percentile: what a detector may reach if it alarms on 5 % of
fault-free stretches (by chance 5 %).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import binomtest, mannwhitneyu

from tasks.evaluation.faults import evaluated_range, load_faults
from tasks.settings import Settings
from tasks.warehouse import opened

PRE_S = 180  # the stretch before an injection used as that fault's own null segment
MIN_RATE_CALLS = 5  # fewer calls in segment + baseline: no rate test
MIN_SEGMENT_CALLS = 3  # latency tests need this many calls in the segment ...
MIN_BASE_CALLS = 5  # ... and this many fault-free calls
LATENCIES = ("rt_ms", "server_rt_ms", "self_ms")
ALARM_SHARE = 0.05  # the acceptance's alarm budget: an incident start in at most 5 % of fault-free minutes


@dataclass(frozen=True)
class Segment:
    """A stretch of calls to test for one service."""

    calls: pd.DataFrame
    roots: int


def segment_strength(segment: Segment, baseline: Segment, service: str) -> float:
    """D = -log10(Bonferroni-corrected smallest p) over the service's RPCs; 0 when nothing is tested."""
    seg, base = _with_rpc(_touching(segment.calls, service)), _with_rpc(_touching(baseline.calls, service))
    share = segment.roots / max(segment.roots + baseline.roots, 1)
    p_values = []
    for rpc in set(seg.rpc) | set(base.rpc):
        s, b = seg[seg.rpc == rpc], base[base.rpc == rpc]
        if len(s) + len(b) >= MIN_RATE_CALLS:
            p_values.append(binomtest(len(s), len(s) + len(b), share).pvalue)
        if len(s) >= MIN_SEGMENT_CALLS and len(b) >= MIN_BASE_CALLS:
            p_values += _latency_p_values(s, b)
    if not p_values:
        return 0.0
    return float(max(0.0, -np.log10(max(min(p_values) * len(p_values), 1e-300))))


def _latency_p_values(segment: pd.DataFrame, baseline: pd.DataFrame) -> list[float]:
    out = []
    for column in LATENCIES:
        x, y = segment[column].dropna(), baseline[column].dropna()
        if len(x) >= MIN_SEGMENT_CALLS and len(y) >= MIN_BASE_CALLS:
            out.append(float(mannwhitneyu(x, y).pvalue))
    return out


def _with_rpc(calls: pd.DataFrame) -> pd.DataFrame:
    return calls.assign(rpc=calls.caller + ">" + calls.callee + ":" + calls.interface.fillna(""))


def _touching(calls: pd.DataFrame, service: str) -> pd.DataFrame:
    return calls[(calls.caller == service) | (calls.callee == service)]


def _between(calls: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp) -> pd.DataFrame:
    return calls[(calls.ts >= start) & (calls.ts < end)]


def _segment(calls: pd.DataFrame) -> Segment:
    return Segment(calls, int(calls.root.sum()))


def fault_visibility(calls: pd.DataFrame, faults: pd.DataFrame, judged: pd.Series | None = None) -> pd.DataFrame:
    """One row per fault (all of `faults` define the fault-free time; `judged` picks the rows
    reported): service, inject_type, strength, null_max, nulls, visible.

    calls: ts, caller, callee, interface, rt_ms, server_rt_ms, self_ms, root (bool).
    faults: inject_time, window_end, service, inject_type (as `load_faults` returns them)."""
    in_fault = np.zeros(len(calls), dtype=bool)
    for f in faults.itertuples():
        in_fault |= ((calls.ts >= f.inject_time) & (calls.ts <= f.window_end)).to_numpy()
    free = calls[~in_fault]
    pre = {i: _between(free, f.inject_time - pd.Timedelta(seconds=PRE_S), f.inject_time) for i, f in faults.iterrows()}
    nulls = {s: _nulls(free, pre.values(), s) for s in set(faults.service)}
    rows = []
    chosen = faults if judged is None else faults[judged]
    for i, f in chosen.iterrows():
        window = calls[(calls.ts >= f.inject_time) & (calls.ts <= f.window_end)]
        strength = segment_strength(_segment(window), _segment(free.drop(pre[i].index)), f.service)
        null = nulls[f.service]
        null_max = float(null.max()) if len(null) else np.inf
        null_p95 = float(np.quantile(null, 1 - ALARM_SHARE)) if len(null) else np.inf
        rows.append(
            {
                "inject_time": f.inject_time,
                "service": f.service,
                "inject_type": f.inject_type,
                "strength": round(strength, 2),
                "null_p95": round(null_p95, 2),
                "null_max": round(null_max, 2),
                "nulls": len(null),
                "above_p95": bool(strength > null_p95),
                "visible": bool(strength > null_max),
            }
        )
    return pd.DataFrame(rows)


def _nulls(free: pd.DataFrame, pre: Iterable[pd.DataFrame], service: str) -> np.ndarray:
    """The strengths of the fault-free segments that hold the service's calls."""
    strengths = [
        segment_strength(_segment(p), _segment(free.drop(p.index)), service) for p in pre if len(_touching(p, service))
    ]
    return np.asarray(strengths, dtype=float)


def ceiling_report(visibility: pd.DataFrame) -> str:
    """A table per fault, the count per type, and the chance level of 'visible'."""
    if visibility.empty:
        return "ceiling: no fault to judge"
    chance = float((1 / (visibility.nulls + 1)).sum())
    by_type = visibility.groupby("inject_type").visible.agg(["sum", "count"])
    above = int(visibility.above_p95.sum())
    lines = [
        "What the traces hold (label-using ceiling; D = -log10 Bonferroni p of the injected service's "
        "calls against fault-free calls, null = the same test on fault-free stretches):",
        visibility.to_string(index=False),
        "",
        f"visible: {int(visibility.visible.sum())} / {len(visibility)} faults (by chance ~{chance:.1f}); "
        + ", ".join(f"{t} {int(r['sum'])} / {int(r['count'])}" for t, r in by_type.iterrows()),
        f"above the fault-free 95th percentile: {above} / {len(visibility)} "
        f"(by chance ~{ALARM_SHARE * len(visibility):.1f})",
        "A fault that is not visible here changes its service's calls no more than normal traffic does: "
        "no trace-based detector can catch it without alarming as often in fault-free time.",
    ]
    return "\n".join(lines)


def evaluate_ceiling(settings: Settings, faults_path: Path) -> pd.DataFrame:
    """The ceiling for the faults `rpcwatch evaluate --faults` judges, from the warehouse's calls."""
    listed = load_faults(faults_path)
    faults = listed[listed.observable & listed.inject_time.notna()].reset_index(drop=True)
    with opened(settings.warehouse, read_only=True) as con:
        start, end = evaluated_range(con)
        calls = con.execute(
            "SELECT ts, caller, callee, interface, rt_ms, server_rt_ms, self_ms, parent_call_id IS NULL AS root "
            "FROM calls"
        ).df()
    return fault_visibility(calls, faults, (faults.inject_time >= start) & (faults.inject_time < end))
