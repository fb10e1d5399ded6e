"""Window evidence: counts per window, the binomial tail and the Bonferroni alarm level."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import binom

from tasks.scoring.evidence import MIN_SURPRISING, WindowTest, irregular_windows, tail_p, window_counts

HOUR = np.datetime64("2026-01-01T00:00:00", "ms")


def test_the_level_is_shared_by_every_window_and_pattern() -> None:
    test = WindowTest.for_hour(HOUR, step_s=5, window_s=30, alpha=0.01, patterns=4)
    assert len(test.ends) == 720
    assert test.ends[0] == HOUR + np.timedelta64(5, "s") and test.ends[-1] == HOUR + np.timedelta64(3600, "s")
    assert np.isclose(test.per_test_alpha, 0.01 / (4 * 720))


def test_counts_take_traces_rooted_inside_each_window() -> None:
    test = WindowTest.for_hour(HOUR, step_s=10, window_s=20, alpha=0.01, patterns=1)
    roots = HOUR + np.array([1_000, 9_000, 10_000, 15_000, 25_000], dtype="timedelta64[ms]")
    n, k = window_counts(roots, np.array([True, False, True, True, False]), test)
    assert list(n[:3]) == [3, 4, 2]  # (-10, 10], (0, 20], (10, 30]
    assert list(k[:3]) == [2, 3, 1]


def test_tail_is_the_binomial_upper_tail() -> None:
    assert np.isclose(tail_p(np.array([10]), np.array([3]), 0.1)[0], binom.sf(2, 10, 0.1))
    assert tail_p(np.array([10]), np.array([0]), 0.1)[0] == 1.0


def _traces(times_s: list[float], surprising: list[bool]) -> pd.DataFrame:
    roots = [pd.Timestamp("2026-01-01") + pd.Timedelta(seconds=t) for t in times_s]
    return pd.DataFrame({"root_ts": roots, "surprising": surprising})


def test_a_burst_of_surprising_traces_alarms_and_normal_traffic_does_not() -> None:
    test = WindowTest.for_hour(HOUR, step_s=5, window_s=30, alpha=0.01, patterns=10)
    rng = np.random.default_rng(0)
    times = list(np.arange(0, 3600, 1.0))  # a trace a second
    normal = list(rng.random(len(times)) < 0.02)
    assert irregular_windows(_traces(times, normal), 0.02, test).empty
    burst = [s or 1800 <= t < 1815 for t, s in zip(times, normal)]
    alarms = irregular_windows(_traces(times, burst), 0.02, test)
    assert not alarms.empty
    assert (alarms["k"] >= MIN_SURPRISING).all() and (alarms["p"] <= test.per_test_alpha).all()
    first = pd.Timestamp(alarms["end"].min())
    assert pd.Timestamp("2026-01-01 00:30:00") < first <= pd.Timestamp("2026-01-01 00:30:15")


def test_two_odd_traces_are_not_an_incident_however_thin_the_traffic() -> None:
    test = WindowTest.for_hour(HOUR, step_s=5, window_s=30, alpha=0.01, patterns=1)
    assert irregular_windows(_traces([100.0, 101.0], [True, True]), 1e-6, test).empty
