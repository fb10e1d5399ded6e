"""Window evidence: does a window hold more surprising traces than the calibrated rate allows?

After MicroRank: a window is irregular when it holds more anomalous traces than normal traffic
explains. Per pattern, windows of `window_s` seconds end at every bucket boundary of the hour; a
window with n traces of which k are surprising has the binomial tail p = P(X >= k | n, rate).
Many windows and patterns are tested each hour, so the alarm level is Bonferroni-controlled:
p <= alpha / (patterns x windows of the hour), alpha being the wanted chance of one false alarm
per hour across all of them (overlapping windows make this conservative). A window also needs
`MIN_SURPRISING` surprising traces: a few odd traces are not an incident, however thin the traffic.

Pure numpy/scipy; no tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.stats import binom

MIN_SURPRISING = 3


@dataclass(frozen=True)
class WindowTest:
    """The hour's tests: windows end at `ends` (datetime64), each `window_s` long."""

    ends: np.ndarray
    window_s: float
    per_test_alpha: float

    @classmethod
    def for_hour(cls, hour: np.datetime64, step_s: int, window_s: float, alpha: float, patterns: int) -> WindowTest:
        n = 3600 // step_s
        ends = hour + np.arange(1, n + 1) * np.timedelta64(step_s, "s")
        return cls(ends, window_s, alpha / max(patterns * n, 1))


def window_counts(root_ts: np.ndarray, surprising: np.ndarray, test: WindowTest) -> tuple[np.ndarray, np.ndarray]:
    """(n, k) per window: traces rooted in (end - window_s, end], and the surprising ones among them."""
    order = np.argsort(root_ts)
    ts, hit = root_ts[order], surprising[order].astype(int)
    cum = np.concatenate([[0], np.cumsum(hit)])
    hi = np.searchsorted(ts, test.ends, side="right")
    lo = np.searchsorted(ts, test.ends - np.timedelta64(int(test.window_s * 1e3), "ms"), side="right")
    return hi - lo, cum[hi] - cum[lo]


def tail_p(n: np.ndarray, k: np.ndarray, rate: float) -> np.ndarray:
    """P(X >= k) for X ~ Binomial(n, rate); 1 where k = 0."""
    return np.where(k > 0, binom.sf(k - 1, n, rate), 1.0)


def irregular_windows(traces: pd.DataFrame, rate: float, test: WindowTest) -> pd.DataFrame:
    """The alarmed windows of one pattern: end, n, k, expected, p, score (orders of magnitude
    beyond the alarm level: log10(per_test_alpha / p), >= 0)."""
    columns = ["end", "n", "k", "expected", "p", "score"]
    if not len(traces):
        return pd.DataFrame(columns=columns)
    root_ts = pd.to_datetime(traces["root_ts"]).to_numpy().astype("datetime64[ms]")
    n, k = window_counts(root_ts, traces["surprising"].to_numpy(bool), test)
    p = tail_p(n, k, rate)
    alarm = (p <= test.per_test_alpha) & (k >= MIN_SURPRISING)
    return pd.DataFrame(
        {
            "end": test.ends[alarm],
            "n": n[alarm],
            "k": k[alarm],
            "expected": n[alarm] * rate,
            "p": p[alarm],
            "score": np.log10(test.per_test_alpha / np.maximum(p[alarm], 1e-300)),
        },
        columns=columns,
    )
