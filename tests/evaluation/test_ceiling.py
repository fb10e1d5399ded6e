"""The label-using ceiling on hand-built traffic: a slowed callee and a vanished call are visible, a
fault that changes nothing is not, and the report says how often 'visible' happens by chance."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.evaluation.ceiling import Segment, ceiling_report, fault_visibility, segment_strength

T0 = pd.Timestamp("2026-01-01 00:00:00")
WINDOW = pd.Timedelta(seconds=180)


def _traffic(seconds: int = 3600, seed: int = 0) -> pd.DataFrame:
    """One request a second: gw -> svc-a (root), svc-a -> db (child), log-normal latencies."""
    rng = np.random.default_rng(seed)
    ts = T0 + pd.to_timedelta(np.arange(seconds), unit="s")
    child_rt = rng.lognormal(np.log(5.0), 0.3, seconds)
    root_rt = child_rt + rng.lognormal(np.log(10.0), 0.3, seconds)
    root = pd.DataFrame({"ts": ts, "caller": "gw", "callee": "svc-a", "rt_ms": root_rt, "root": True})
    child = pd.DataFrame({"ts": ts, "caller": "svc-a", "callee": "db", "rt_ms": child_rt, "root": False})
    calls = pd.concat([root, child], ignore_index=True).assign(interface="op")
    return calls.assign(server_rt_ms=calls.rt_ms * 0.9, self_ms=calls.rt_ms * 0.5)


def _faults(*rows: tuple[str, str, str]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["inject_time", "service", "inject_type"])
    frame["inject_time"] = pd.to_datetime(frame.inject_time)
    return frame.assign(window_end=frame.inject_time + WINDOW)


@pytest.fixture
def visibility() -> pd.DataFrame:
    calls = _traffic()
    slowed = (calls.callee == "db") & calls.ts.between(T0 + pd.Timedelta(minutes=10), T0 + pd.Timedelta(minutes=13))
    calls.loc[slowed, ["rt_ms", "server_rt_ms", "self_ms"]] *= 10
    vanished = (calls.callee == "db") & calls.ts.between(T0 + pd.Timedelta(minutes=50), T0 + pd.Timedelta(minutes=53))
    calls = calls[~vanished]
    faults = _faults(
        ("2026-01-01 00:10:00", "db", "cpu_contention"),
        ("2026-01-01 00:30:00", "svc-a", "exception"),  # changes nothing
        ("2026-01-01 00:50:00", "db", "return"),
    )
    return fault_visibility(calls, faults)


def test_slowed_and_vanished_calls_are_visible_an_unchanged_fault_is_not(visibility) -> None:
    assert visibility.visible.tolist() == [True, False, True]
    assert visibility.strength[0] > 10 and visibility.strength[2] > 10
    assert visibility.strength[1] <= visibility.null_max[1]
    assert (visibility.nulls == 3).all()  # each fault's pre-injection stretch is a null segment


def test_same_traffic_is_not_strong_and_shifted_traffic_is() -> None:
    calls = _traffic(600)
    first, rest = calls[calls.ts < T0 + pd.Timedelta(minutes=3)], calls[calls.ts >= T0 + pd.Timedelta(minutes=3)]
    baseline = Segment(rest, int(rest.root.sum()))
    assert segment_strength(Segment(first, int(first.root.sum())), baseline, "db") < 2
    slow = first.assign(rt_ms=np.where(first.callee == "db", first.rt_ms * 3, first.rt_ms))
    assert segment_strength(Segment(slow, int(slow.root.sum())), baseline, "db") > 10
    assert segment_strength(Segment(slow, int(slow.root.sum())), baseline, "nobody") == 0.0


def test_report_counts_by_type_and_states_chance(visibility) -> None:
    report = ceiling_report(visibility)
    assert "visible: 2 / 3 faults (by chance ~0.8)" in report
    assert "cpu_contention 1 / 1" in report and "exception 0 / 1" in report
