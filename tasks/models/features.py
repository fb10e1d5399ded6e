"""What a model sees of each RPC per bucket: the feature axis of every [T, N, F] array.

Counts (calls, errors) are modelled as counts (Poisson / negative binomial); latencies (mean and
p95 response time) on a log scale. Every index into the feature axis comes from here. No tables.
"""

from __future__ import annotations

FEATURES: tuple[str, ...] = ("calls", "rt_mean", "rt_p95", "errors")
CALLS, RT_MEAN, RT_P95, ERRORS = range(len(FEATURES))
COUNTS: tuple[int, ...] = (CALLS, ERRORS)
LATENCIES: tuple[int, ...] = (RT_MEAN, RT_P95)
