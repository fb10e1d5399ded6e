"""Calibrated thresholds: how far from its forecast a normal point may fall, learnt from
validation residuals only (no labels). Counts: negative-binomial dispersion and a burst factor;
latency: a robust scale and a tail multiplier (quantile or peaks-over-threshold). The band
statistics (`count_band`, `count_bands`, `latency_band`) live here too. Reads and writes no table:
a model's thresholds travel as its `thresholds.json` artifact (`Thresholds.to_json`/`from_json`).

Residuals of zero variance (a perfectly regular RPC, forecast exactly) never make a band of width 0:
a count band is never narrower than Poisson's (the dispersion is clipped at 0: independent requests
at the forecast rate vary that much), a latency band never narrower than a normal's of scale
`SIGMA_FLOOR` at the alarm probability (`normal_multiplier`). Floors from the models, not from data.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tasks.models.baselines import metrics
from tasks.models.features import CALLS, ERRORS, FEATURES, LATENCIES, RT_MEAN, RT_P95
from tasks.models.forecast import Prepared
from tasks.models.series import PatternData

# the smallest per-request spread of latency a band assumes (log scale, ~5 %): a latency that was the
# same in every bucket still varies by its timer's resolution; a zero spread would alarm at any change
SIGMA_FLOOR = 0.05


@dataclass(frozen=True)
class CountBand:
    """Calls or errors of one node: negative-binomial dispersion `alpha` (0: Poisson) of bursts of
    `phi` calls (1 in models calibrated before bursts existed); `mean` of the validation split;
    `ceiling`: the count normal traffic reached under a forecast at most so high (`count_ceiling`;
    empty in models calibrated before it existed)."""

    alpha: float
    phi: float = 1.0
    mean: float | None = None
    ceiling: tuple[tuple[float, float], ...] = ()

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {k: v for k, v in asdict(self).items() if v is not None and k != "ceiling"}
        if self.ceiling:
            doc["ceiling"] = [list(step) for step in self.ceiling]
        return doc

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> CountBand:
        ceiling = tuple((float(e), float(c)) for e, c in entry.get("ceiling", []))
        return cls(float(entry["alpha"]), float(entry.get("phi", 1.0)), entry.get("mean"), ceiling)


@dataclass(frozen=True)
class LatencyBand:
    """Mean or p95 latency of one node: robust scale `sigma` of the call-scaled log ratio, tail
    multiplier `k`, and the node's burst factor `phi` (1 before bursts existed)."""

    sigma: float
    k: float
    phi: float = 1.0

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_json(cls, entry: dict[str, float]) -> LatencyBand:
        return cls(float(entry["sigma"]), float(entry["k"]), float(entry.get("phi", 1.0)))


@dataclass(frozen=True)
class NodeBands:
    """The calibrated bands of one node, one per feature (keyed by feature name in JSON)."""

    calls: CountBand
    errors: CountBand
    rt_mean: LatencyBand
    rt_p95: LatencyBand

    def count(self, feature: int) -> CountBand:
        """The band of a count feature (CALLS or ERRORS)."""
        return {CALLS: self.calls, ERRORS: self.errors}[feature]

    def latency(self, feature: int) -> LatencyBand:
        """The band of a latency feature (RT_MEAN or RT_P95)."""
        return {RT_MEAN: self.rt_mean, RT_P95: self.rt_p95}[feature]

    def to_json(self) -> dict[str, dict[str, float]]:
        """By feature name, in the order calibration always wrote them."""
        return {
            FEATURES[CALLS]: self.calls.to_json(),
            FEATURES[ERRORS]: self.errors.to_json(),
            FEATURES[RT_MEAN]: self.rt_mean.to_json(),
            FEATURES[RT_P95]: self.rt_p95.to_json(),
        }

    @classmethod
    def from_json(cls, entry: dict[str, dict[str, float]]) -> NodeBands:
        return cls(
            CountBand.from_json(entry[FEATURES[CALLS]]),
            CountBand.from_json(entry[FEATURES[ERRORS]]),
            LatencyBand.from_json(entry[FEATURES[RT_MEAN]]),
            LatencyBand.from_json(entry[FEATURES[RT_P95]]),
        )


@dataclass
class Thresholds:
    """Per node: negative-binomial dispersion for counts; robust scale and multiplier for latency."""

    alarm_p: float
    method: str
    nodes: dict[str, NodeBands]
    calibrated_mape_calls: float

    def to_json(self) -> dict[str, Any]:
        """The `thresholds.json` layout (keys unchanged since the first trained models)."""
        return {
            "alarm_p": self.alarm_p,
            "method": self.method,
            "nodes": {node: bands.to_json() for node, bands in self.nodes.items()},
            "calibrated_mape_calls": self.calibrated_mape_calls,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Thresholds:
        """Thresholds as `to_json` wrote them, or as older models did (without burst factors)."""
        nodes = {node: NodeBands.from_json(entry) for node, entry in doc["nodes"].items()}
        return cls(float(doc["alarm_p"]), doc.get("method", "quantile"), nodes, doc["calibrated_mape_calls"])


def burst_factor(pred: np.ndarray, obs: np.ndarray) -> float:
    """phi >= 1: calls come in bursts (one request calls a node several times: loops, retries), so
    in thin traffic Var ~ phi * lambda. Estimated where lambda < 1, where bursts dominate the variance."""
    thin = pred < 1.0
    if thin.sum() < 20 or pred[thin].sum() < 1.0:
        return 1.0
    lam = np.maximum(pred[thin], 1e-6)
    return float(max(1.0, ((obs[thin] - lam) ** 2).sum() / lam.sum()))


def _nb_dispersion(pred: np.ndarray, obs: np.ndarray, phi: float = 1.0) -> float:
    """Method of moments: Var = phi * lambda + alpha * lambda^2 (alpha 0: (quasi-)Poisson)."""
    lam = np.maximum(pred, 1e-6)
    excess = ((obs - lam) ** 2 - phi * lam).sum() / (lam**2).sum()
    return float(max(0.0, excess))


def normal_multiplier(alarm_p: float) -> float:
    """The two-sided multiplier of a normal distribution at `alarm_p`: the narrowest latency band.

    With zero-variance residuals (a constant latency forecast to float rounding) the robust scale is
    its floor `SIGMA_FLOOR` and every z is ~0: the residuals tell nothing about the noise that floor
    stands for, and a tail fitted to rounding errors gave a multiplier of ~1e-5 (a band nothing stays
    inside). So the band is never narrower than a normal's of that scale at the alarm probability;
    an empirical or heavy tail only widens it."""
    from scipy.stats import norm

    return float(norm.isf(alarm_p / 2))


def _latency_multiplier(z: np.ndarray, alarm_p: float, method: str) -> float:
    """|z| beyond which a point is irregular: empirical quantile, or peaks-over-threshold (GPD);
    at least `normal_multiplier`."""
    z = np.abs(z[np.isfinite(z)])
    if len(z) < 20:
        return 6.0  # too few points to calibrate: a wide band
    floor = normal_multiplier(alarm_p)
    if method == "pot":
        from scipy.stats import genpareto

        u = np.quantile(z, 0.9)
        excess = z[z > u] - u
        if len(excess) >= 10:
            shape, _, scale = genpareto.fit(excess, floc=0)
            tail = alarm_p / 0.1
            k = float(u + genpareto.ppf(1 - tail, shape, loc=0, scale=scale))
            if math.isfinite(k):
                return max(k, floor)
    return float(max(np.quantile(z, 1 - min(0.5, alarm_p * 10)) * 1.5, 5.0, floor))


def _count_band(pred: np.ndarray, obs: np.ndarray) -> CountBand:
    phi = burst_factor(pred, obs)
    return CountBand(_nb_dispersion(pred, obs, phi), phi, float(obs.mean()), ceiling_steps(pred, obs))


def ceiling_steps(pred: np.ndarray, obs: np.ndarray) -> tuple[tuple[float, float], ...]:
    """The steps (forecast, count) of the highest count validation saw under a forecast at most so
    high: a running maximum of the counts in order of their forecasts, kept where it rises."""
    ok = np.isfinite(pred) & np.isfinite(obs)
    order = np.argsort(pred[ok], kind="stable")
    forecasts, highest = pred[ok][order], np.maximum.accumulate(obs[ok][order])
    last = np.flatnonzero(np.append(np.diff(forecasts) > 0, True))  # one step per forecast: its tie's highest
    forecasts, highest = forecasts[last], highest[last]
    rises = np.flatnonzero(np.diff(highest, prepend=-np.inf) > 0)
    return tuple((float(forecasts[i]), float(highest[i])) for i in rises)


def normal_ceiling(mean: float | None, alpha: float, alarm_p: float, phi: float = 1.0) -> float:
    """The upper band at the node's normal level (its calibration mean): no count within it is a
    spike, however low the forecast. After a lull or an outage that was not flagged (a drop on a thin
    series rarely reaches the hour's alarm level) the forecast sits at the low level, and the
    recovery, traffic back at its usual level, was a new "spike" incident. The price: while the
    forecast is below the node's mean (the quiet part of a daily curve) a spike must rise above the
    band of the mean to count; where the forecast is at or above it nothing changes. Models
    calibrated before the mean was kept (None) have none."""
    if mean is None:
        return 0.0
    lam = np.array([max(mean / phi, 1e-9)])
    return float(phi * count_quantile("isf", alarm_p / 2, lam, np.array([alpha]))[0])


def count_ceiling(expected: np.ndarray, steps: tuple[tuple[float, float], ...]) -> np.ndarray:
    """The highest count normal traffic reached in validation under a forecast at most `expected`
    (elementwise; below the lowest forecast validation made, the count under that one; no steps: 0).

    Why: a count band is a distribution around the forecast, right only where the forecast is. On
    sparse, bursty RPCs (a trace calls one 5-20 times, in some minutes none) a forecaster may
    predict ~0.1 after a quiet minute where the next minute brings 6-9 calls, as it did in
    validation: the band at 0.1 is [0, 5], and every normal burst would be a spike. A count no
    higher than normal traffic reached under such forecasts is no spike; a flood is far above it."""
    if not steps:
        return np.zeros(np.shape(expected))
    forecasts = np.array([e for e, _ in steps])
    counts = np.array([c for _, c in steps])
    at = np.searchsorted(forecasts, np.asarray(expected, dtype=float), side="right") - 1
    return counts[np.maximum(at, 0)]


def _latency_band(
    pred: np.ndarray, obs: np.ndarray, calls: np.ndarray, phi: float, alarm_p: float, method: str
) -> LatencyBand:
    ok = (calls > 0) & np.isfinite(obs)
    # log-ratio scaled by sqrt(independent requests): a mean over few requests spreads widely
    z = np.log(np.maximum(obs[ok], 1e-3) / np.maximum(pred[ok], 1e-3)) * np.sqrt(np.maximum(calls[ok] / phi, 1.0))
    sigma = float(1.4826 * np.median(np.abs(z - np.median(z)))) if ok.sum() >= 5 else 1.0
    sigma = max(sigma, SIGMA_FLOOR)
    return LatencyBand(sigma, _latency_multiplier(z / sigma, alarm_p, method), phi)


def calibrate(
    data: PatternData, prep: Prepared, pred: np.ndarray, alarm_p: float = 1e-3, method: str = "quantile"
) -> Thresholds:
    """Thresholds from validation residuals, no labels: the band a normal point stays inside."""
    obs = prep.y[prep.split :].numpy().astype(np.float64)
    nodes: dict[str, NodeBands] = {}
    for n, node in enumerate(data.nodes):
        calls = _count_band(pred[:, n, CALLS], obs[:, n, CALLS])
        errors = _count_band(pred[:, n, ERRORS], obs[:, n, ERRORS])
        rt_mean, rt_p95 = (
            _latency_band(pred[:, n, f], obs[:, n, f], obs[:, n, CALLS], calls.phi, alarm_p, method) for f in LATENCIES
        )
        nodes[node] = NodeBands(calls, errors, rt_mean, rt_p95)
    return Thresholds(alarm_p, method, nodes, metrics(pred, obs)["mape_calls"])


def count_quantile(which: str, q: float, lam: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Elementwise `ppf` or `isf` of the count distribution (lam, alpha of one shape): Poisson where
    alpha < 1e-6, else negative binomial with r = 1 / alpha; one scipy call per family."""
    from scipy.stats import nbinom, poisson

    lam, alpha = np.asarray(lam, dtype=float), np.asarray(alpha, dtype=float)
    out = np.empty_like(lam)
    plain = alpha < 1e-6
    if plain.any():
        out[plain] = getattr(poisson, which)(q, lam[plain])
    if (~plain).any():
        r = 1.0 / alpha[~plain]
        out[~plain] = getattr(nbinom, which)(q, r, r / (r + lam[~plain]))
    return out


def count_band(expected: np.ndarray, alpha: float, alarm_p: float, phi: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided band around `expected` of phi x a negative-binomial (Poisson when alpha = 0) count
    of mean expected / phi: bursts of phi calls, Var = phi * lambda + alpha * lambda^2 (the
    negative binomial of the bursts has Var = mu + alpha mu^2 with mu = lambda / phi)."""
    lam = np.maximum(np.asarray(expected, dtype=float), 1e-9) / phi
    alphas = np.broadcast_to(np.asarray(alpha, dtype=float), lam.shape)
    return phi * count_quantile("ppf", alarm_p / 2, lam, alphas), phi * count_quantile("isf", alarm_p / 2, lam, alphas)


def latency_band(
    expected: np.ndarray,
    calls: np.ndarray,
    sigma: float | np.ndarray,
    k: float | np.ndarray,
    phi: float | np.ndarray = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Multiplicative band around expected latency, narrower with more independent requests (calls / phi);
    sigma, k and phi one node's, or arrays of the last axis' nodes (elementwise: the same values)."""
    width = k * sigma / np.sqrt(np.maximum(calls / phi, 1))
    return expected * np.exp(-width), expected * np.exp(width)


def count_bands(
    expected: np.ndarray, alpha: np.ndarray, alarm_p: float, observed: np.ndarray, lower: np.ndarray, phi: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`count_band` of K series at once (expected, observed [S, K]; alpha, phi, lower [K]: whether
    the series has a lower bound), exact wherever `observed` may lie outside, else -inf/inf:
    bursts of phi calls, so the band is phi x the band of expected / phi."""
    lo, hi = _burst_bands(expected / phi, alpha, alarm_p, observed / phi, lower)
    return lo * phi, hi * phi


def _burst_bands(
    expected: np.ndarray, alpha: np.ndarray, alarm_p: float, observed: np.ndarray, lower: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The bands in bursts, exact wherever `observed` may lie outside, else -inf/inf. Both
    quantiles grow with the expected count, so a point inside the band at its series' largest
    (lower bound) or smallest (upper bound) expected count, with a count to spare, is inside its
    own: the costly quantiles are computed for the few other points only."""
    q, lam = alarm_p / 2, np.maximum(expected, 1e-9)
    lo, hi = np.full_like(lam, -np.inf), np.full_like(lam, np.inf)
    if not lam.size:
        return lo, hi
    per_point = np.broadcast_to(alpha, lam.shape)
    up = observed > count_quantile("isf", q, lam.min(axis=0), alpha) - 1
    down = lower & (observed < count_quantile("ppf", q, lam.max(axis=0), alpha) + 1)
    hi[up] = count_quantile("isf", q, lam[up], per_point[up])
    lo[down] = count_quantile("ppf", q, lam[down], per_point[down])
    return lo, hi
