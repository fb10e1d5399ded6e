"""The forecaster's verdict on every point it scores, not only the flagged ones: per bucket, node and
feature the forecast and the band of observed values that would NOT alarm (`forecasts` rows, written
by `tasks.scoring.store`). Reads and writes no table.

The band is the detector's own (`tasks.models.detector.flag_points`), at the alarm level scoring
uses (`Detector.alarm_p`, lowered per hour by Bonferroni):

- calls: a point alarms when observed > upper (traffic_spike) or observed < lower (traffic_drop),
  with lower / upper the alarm_p / 2 lower and upper quantiles of phi x a negative-binomial
  (Poisson) count of mean expected / phi (`tasks.models.thresholds.count_bands`, computed here at
  every point rather than only where a point may lie outside), upper at least the count normal
  traffic reached under such a forecast (`count_ceiling`): the band is [lower, upper];
- rt_mean, rt_p95 (only where the version judges latency by its bands, i.e. without a trace
  model): one-sided, observed > upper = expected x exp(k sigma / sqrt(max(calls / phi, 1))) alarms
  where the node had calls; lower is NULL, and upper is NULL where the node had no calls (nothing
  alarms there).

Errors (one-sided, rarely drawn) are not kept: rows stay compact.
"""

from __future__ import annotations

import numpy as np

from tasks.models.detector import Detector, count_ceilings
from tasks.models.features import CALLS, LATENCIES
from tasks.models.thresholds import count_quantile, latency_band
from tasks.scoring.store import ForecastRows


def scored_features(detector: Detector) -> list[int]:
    """The features whose band the detector judges: calls, and latency unless a trace model does."""
    return [CALLS] if detector.trace_model is not None else [CALLS, *LATENCIES]


def bands(detector: Detector, observed: np.ndarray, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper non-alarm values [S, N, F] of observed vs expected [S, N, F] (NaN: no bound;
    features not in `scored_features` NaN). All nodes at once: every operation is elementwise, so
    each value is the one a node-by-node loop gives."""
    lower, upper = np.full(expected.shape, np.nan), np.full(expected.shape, np.nan)
    q = detector.alarm_p / 2
    phi = np.array([node.calls.phi for node in detector.bands])  # [N]
    lam = np.maximum(expected[:, :, CALLS] / phi, 1e-9)
    alpha = np.broadcast_to(np.array([node.calls.alpha for node in detector.bands]), lam.shape)
    lower[:, :, CALLS] = phi * count_quantile("ppf", q, lam, alpha)
    upper[:, :, CALLS] = np.maximum(
        phi * count_quantile("isf", q, lam, alpha), count_ceilings(expected, detector.bands, detector.alarm_p)[:, :, 0]
    )
    if detector.trace_model is None:
        calls = observed[:, :, CALLS]
        for f in LATENCIES:
            lat = [node.latency(f) for node in detector.bands]
            sigma, k = np.array([band.sigma for band in lat]), np.array([band.k for band in lat])
            _, high = latency_band(expected[:, :, f], calls, sigma, k, np.array([band.phi for band in lat]))
            upper[:, :, f] = np.where(calls > 0, high, np.nan)
    return lower, upper


def forecast_columns(
    detector: Detector, buckets: np.ndarray, observed: np.ndarray, expected: np.ndarray, version: int
) -> ForecastRows:
    """The `forecasts` rows of one pattern's scored buckets (`buckets` [S], observed and expected
    [S, N, F]): a row per bucket, node and scored feature."""
    lower, upper = bands(detector, observed, expected)
    features = scored_features(detector)
    values = np.stack([expected[:, :, features], lower[:, :, features], upper[:, :, features]])
    times = np.asarray(buckets).astype("datetime64[us]")
    return ForecastRows(detector.pattern_id, version, times, list(detector.nodes), features, values)
