"""Latency of one call position, on a log scale, judged against its own history (the trace
model's latency half, `tasks.models.trace_model`).

The body (10th to 90th percentile) is normal; beyond it a generalised Pareto tail per side (peaks
over threshold: latency tails are heavy), its scale raised to an upper confidence bound where few
calls were seen. History windows whose median is shifted far from the others' (an unlabelled
incident) are left out of the fit. Pure numpy/pandas; no tables.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import chi2

LAT_FEATURES = ("rt", "server", "gap", "self")
TAIL_FLOOR = 0.05  # log1p(ms): the smallest scale of a tail (timer noise is not a signal)
SHIFT_SPREADS = 3.0  # a window whose median lies this many spreads off is left out of the fit
SHIFT_FLOOR = 0.1  # ... with at least this spread (log1p(ms), about 10 %)
# per key and feature: q10, median, q90, shape and scale of the tail below q10, of the one above q90
PARAMS = 7
MAX_SHAPE = 0.5  # the heaviest tail the moments can tell (finite variance)


def latency_features(calls: pd.DataFrame) -> np.ndarray:
    """[calls, LAT_FEATURES] on a log1p(ms) scale; NaN where a feature does not exist (no server
    span paired with the client span)."""
    rt = calls["rt_ms"].to_numpy(float)
    server = calls["server_rt_ms"].to_numpy(float)
    self_ms = calls["self_ms"].to_numpy(float)
    gap = np.where(np.isnan(server), np.nan, np.maximum(rt - server, 0.0))
    out = np.stack([rt, server, gap, self_ms], axis=1)
    return np.log1p(np.clip(out, 0.0, None))


def unshifted(values: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Mask of the values outside windows whose median is shifted far from the others' (an
    unlabelled incident in the history moves a whole window; a heavy tail moves single calls)."""
    frame = pd.DataFrame({"w": windows, "x": values})
    med = frame.groupby("w")["x"].median()
    if len(med) < 4:
        return np.ones(len(values), dtype=bool)
    centre = med.median()
    spread = max(1.4826 * float((med - centre).abs().median()), SHIFT_FLOOR)
    shifted = set(med.index[(med - centre).abs() > SHIFT_SPREADS * spread])
    return ~frame["w"].isin(shifted).to_numpy()


def tails(values: np.ndarray) -> list[float]:
    """[q10, median, q90, (shape, scale) below q10, (shape, scale) above q90] of log latencies: the
    body is normal, beyond it a generalised Pareto tail (POT): latency tails are heavy."""
    q10, q50, q90 = (float(q) for q in np.quantile(values, [0.1, 0.5, 0.9]))
    below, above = q10 - values[values < q10], values[values > q90] - q90
    return [q10, q50, q90, *_gpd(below), *_gpd(above)]


def _gpd(excess: np.ndarray) -> tuple[float, float]:
    """Shape and scale of a generalised Pareto tail by the method of moments (shape clipped to
    [0, MAX_SHAPE]); the scale raised to its upper 95 % confidence bound as an exponential's (2k x
    scale / chi2(5 %, 2k) for k exceedances), so a tail seen in a few calls is not taken to be
    lighter than it may be; at least TAIL_FLOOR."""
    k = len(excess)
    if k < 2:
        return 0.0, TAIL_FLOOR
    mean, var = float(excess.mean()), float(excess.var())
    shape = float(np.clip(0.5 * (1 - mean**2 / var), 0.0, MAX_SHAPE)) if var > 0 else 0.0
    scale = mean * (1 - shape) * 2 * k / float(chi2.ppf(0.05, 2 * k))
    return shape, max(scale, TAIL_FLOOR)


def _survival(y: np.ndarray, shape: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """P(excess > y) of a generalised Pareto tail (exponential where the shape is 0)."""
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        heavy = np.power(1 + shape * y / scale, -1 / np.where(shape > 0, shape, 1.0))
        return np.where(shape > 0, heavy, np.exp(-y / scale))


def tail_p(x: np.ndarray, params: np.ndarray) -> np.ndarray:
    """Two-sided tail probability of each x under its (q10, median, q90, lower and upper tail shape
    and scale); 1 inside the body, NaN where x or the parameters are missing."""
    q10, _, q90, shape_lo, scale_lo, shape_hi, scale_hi = (params[..., i] for i in range(PARAMS))
    with np.errstate(invalid="ignore"):
        lo = 0.1 * _survival(np.maximum(q10 - x, 0), shape_lo, scale_lo)
        hi = 0.1 * _survival(np.maximum(x - q90, 0), shape_hi, scale_hi)
        p = np.where(x < q10, lo, np.where(x > q90, hi, 0.5))
    return np.where(np.isnan(x) | np.isnan(q10), np.nan, np.minimum(2 * p, 1.0))
