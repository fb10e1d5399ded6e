"""The forecaster's verdict on every point it scores, not only the flagged ones: per bucket, node and
feature the forecast and the band of observed values that would NOT alarm (`forecasts` rows, written
by `tasks.scoring.store`). Reads and writes no table.

The band is the detector's own (`tasks.models.detector.flag_points`), at the alarm level scoring
uses (`Detector.alarm_p`, lowered per hour by Bonferroni):

- calls: a point alarms when observed > upper (traffic_spike) or observed < lower (traffic_drop),
  with lower / upper the alarm_p / 2 lower and upper quantiles of phi x a negative-binomial
  (Poisson) count of mean expected / phi (`tasks.models.thresholds.count_bands`, computed here at
  every point rather than only where a point may lie outside): the band is [lower, upper];
- rt_mean, rt_p95 (only where the version judges latency by its bands, i.e. without a trace
  model): one-sided, observed > upper = expected x exp(k sigma / sqrt(max(calls / phi, 1))) alarms
  where the node had calls; lower is NULL, and upper is NULL where the node had no calls (nothing
  alarms there).

Errors (one-sided, rarely drawn) are not kept: rows stay compact.
"""

from __future__ import annotations

import numpy as np

from tasks.models.detector import Detector
from tasks.models.features import CALLS, FEATURES, LATENCIES
from tasks.models.thresholds import count_quantile, latency_band


def scored_features(detector: Detector) -> list[int]:
    """The features whose band the detector judges: calls, and latency unless a trace model does."""
    return [CALLS] if detector.trace_model is not None else [CALLS, *LATENCIES]


def bands(detector: Detector, observed: np.ndarray, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper non-alarm values [S, N, F] of observed vs expected [S, N, F] (NaN: no bound;
    features not in `scored_features` NaN)."""
    lower, upper = np.full(expected.shape, np.nan), np.full(expected.shape, np.nan)
    q = detector.alarm_p / 2
    for n, node in enumerate(detector.bands):
        band = node.calls
        lam = np.maximum(expected[:, n, CALLS] / band.phi, 1e-9)
        alpha = np.full(lam.shape, band.alpha)
        lower[:, n, CALLS] = band.phi * count_quantile("ppf", q, lam, alpha)
        upper[:, n, CALLS] = band.phi * count_quantile("isf", q, lam, alpha)
        if detector.trace_model is None:
            calls = observed[:, n, CALLS]
            for f in LATENCIES:
                lat = node.latency(f)
                _, high = latency_band(expected[:, n, f], calls, lat.sigma, lat.k, lat.phi)
                upper[:, n, f] = np.where(calls > 0, high, np.nan)
    return lower, upper


def _nullable(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in values]


def forecast_columns(
    detector: Detector, buckets: np.ndarray, observed: np.ndarray, expected: np.ndarray, version: int
) -> dict[str, list]:
    """The `forecasts` columns of one pattern's scored buckets (`buckets` [S], observed and expected
    [S, N, F]): a row per bucket, node and scored feature."""
    lower, upper = bands(detector, observed, expected)
    features = scored_features(detector)
    s, n = expected.shape[:2]
    times = np.asarray(buckets).astype("datetime64[us]").astype(object)
    pick = (slice(None), slice(None), features)  # [S, N, F'] in row order bucket, node, feature
    return {
        "pattern_id": [detector.pattern_id] * (s * n * len(features)),
        "bucket_ts": list(np.repeat(times, n * len(features))),
        "node": list(np.tile(np.repeat(np.asarray(detector.nodes, dtype=object), len(features)), s)),
        "feature": [FEATURES[f] for f in features] * (s * n),
        "expected": _nullable(expected[pick].reshape(-1)),
        "lower": _nullable(lower[pick].reshape(-1)),
        "upper": _nullable(upper[pick].reshape(-1)),
        "model_version": [version] * (s * n * len(features)),
    }
