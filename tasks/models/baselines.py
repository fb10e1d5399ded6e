"""How good a forecast is, and what it is compared with: error metrics on the points where they
mean something, the Poisson floor (the error of knowing the true rate), and the naive baselines
(seasonal naive, moving average) every model must beat. Arrays in, numbers out: no tables."""

from __future__ import annotations

import math
import warnings

import numpy as np

from tasks.models.features import CALLS, FEATURES
from tasks.models.forecast import TrainConfig


def _errors(pred: np.ndarray, obs: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    p, o = pred[valid], obs[valid]
    if len(o) == 0:
        return {"mae": float("nan"), "rmse": float("nan"), "mape": float("nan")}
    nz = o > 0
    return {
        "mae": float(np.abs(p - o).mean()),
        "rmse": float(np.sqrt(((p - o) ** 2).mean())),
        "mape": float((np.abs(p - o)[nz] / o[nz]).mean()) if nz.any() else float("nan"),
    }


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN where that is undefined: a denominator of 0 (a baseline that is
    exact, e.g. the seasonal naive forecast of a perfectly regular RPC) or a NaN on either side."""
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator == 0:
        return math.nan
    return numerator / denominator


def busy_mask(obs: np.ndarray, min_rate: float = 1.0) -> np.ndarray:
    """Points of nodes averaging at least `min_rate` calls per bucket (MAPE is meaningless below)."""
    return np.broadcast_to(obs[:, :, CALLS].mean(axis=0) >= min_rate, obs.shape[:2])


def metrics(pred: np.ndarray, obs: np.ndarray) -> dict[str, float]:
    """MAE/RMSE/MAPE per feature; latency only where the bucket had calls; calls on busy nodes."""
    busy = busy_mask(obs)
    has_calls = obs[:, :, CALLS] > 0
    out = {}
    for f, name in enumerate(FEATURES):
        valid = (busy if f == CALLS else has_calls & busy) & np.isfinite(obs[:, :, f]) & np.isfinite(pred[:, :, f])
        for key, value in _errors(pred[:, :, f], obs[:, :, f], valid).items():
            out[f"{key}_{name}"] = value
    return out


def perfect_forecast_mape(lam: float) -> float:
    """E[|X - lam| / X | X > 0] for X ~ Poisson(lam): the MAPE of knowing the true rate.
    For large lam it is sqrt(2 / (pi * lam)); at lam = 10 it is 1.23x that, at 50 1.03x."""
    from scipy.stats import poisson

    x = np.arange(1, int(lam + 12 * np.sqrt(lam) + 30))
    p = poisson.pmf(x, lam)
    return float((np.abs(x - lam) / x * p).sum() / p.sum())


def poisson_floor(obs: np.ndarray, asymptotic: bool = False) -> float:
    """The calls MAPE a perfect rate forecast still has, over the same points as `metrics`:
    sqrt(2/(pi*lambda)) (asymptotic) or its exact value at each node's traffic level lambda."""
    busy = busy_mask(obs)
    lam = obs[:, :, CALLS].mean(axis=0)
    valid = busy & (obs[:, :, CALLS] > 0)
    if not valid.any():
        return float("nan")
    per_node = np.array(
        [
            np.sqrt(2 / (math.pi * max(x, 1e-9))) if asymptotic else perfect_forecast_mape(x) if x >= 1 else np.nan
            for x in lam
        ]
    )
    return float(np.broadcast_to(per_node, obs.shape[:2])[valid].mean())


def seasonal_naive(values: np.ndarray, targets: np.ndarray, period: int) -> np.ndarray:
    return values[targets - period]


def moving_average(values: np.ndarray, targets: np.ndarray, window: int, horizon: int) -> np.ndarray:
    out = np.empty((len(targets),) + values.shape[1:])
    for i, t in enumerate(targets):  # validation windows only: a few hundred
        past = values[t - horizon - window + 1 : t - horizon + 1]
        with np.errstate(all="ignore"), warnings.catch_warnings():  # no call in the window: NaN latency
            warnings.simplefilter("ignore", RuntimeWarning)
            out[i] = np.nanmean(past, axis=0)
    return out


def season_period(cfg: TrainConfig, bucket_seconds: int, first_target: int) -> int:
    """The configured season in buckets if the history holds it before the first validation
    target, else an hour (the synthetic and most real traffic repeat hourly patterns too)."""
    season = cfg.season_seconds // bucket_seconds
    if first_target - season >= 0:
        return season
    return min(max(1, 3600 // bucket_seconds), first_target)


# --- is a new model better, beyond validation noise? ----------------------------------------------

PROMOTION_ALPHA = 0.05  # a challenger replaces the champion only at this significance, one-sided
MIN_COMPARED_BUCKETS = 10  # fewer validation buckets than this cannot show a difference


def bucket_calls_ape(pred: np.ndarray, obs: np.ndarray) -> np.ndarray:
    """Per validation bucket, the mean absolute percentage error of calls over the points `metrics`
    counts (busy nodes, calls > 0); NaN for a bucket without such a point. Shape [S]."""
    valid = busy_mask(obs) & (obs[:, :, CALLS] > 0) & np.isfinite(pred[:, :, CALLS])
    ape = np.where(valid, np.abs(pred[:, :, CALLS] - obs[:, :, CALLS]) / np.where(valid, obs[:, :, CALLS], 1), 0.0)
    counted = valid.sum(axis=1)
    with np.errstate(invalid="ignore"):
        return np.where(counted > 0, ape.sum(axis=1) / np.maximum(counted, 1), np.nan)


def diebold_mariano(new_loss: np.ndarray, old_loss: np.ndarray) -> float:
    """One-sided p-value that the new forecasts' loss is lower than the old ones' on the same
    buckets (Diebold & Mariano 1995): the mean loss difference over its Newey-West standard error
    (lags up to T^(1/3): forecast errors of neighbouring buckets are correlated), normal
    approximation. NaN with fewer than MIN_COMPARED_BUCKETS buckets where both have a loss."""
    d = (new_loss - old_loss)[np.isfinite(new_loss) & np.isfinite(old_loss)]
    n = len(d)
    if n < MIN_COMPARED_BUCKETS:
        return math.nan
    centred = d - d.mean()
    variance = float(centred @ centred) / n
    for lag in range(1, int(n ** (1 / 3)) + 1):
        variance += 2 * (1 - lag / (int(n ** (1 / 3)) + 1)) * float(centred[lag:] @ centred[:-lag]) / n
    if variance <= 0:
        return 0.0 if d.mean() < 0 else 1.0
    from scipy.stats import norm

    return float(norm.cdf(d.mean() / math.sqrt(variance / n)))
