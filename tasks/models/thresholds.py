"""Calibrated thresholds: how far from its forecast a normal point may fall, learnt from
validation residuals only (no labels). Counts: negative-binomial dispersion and a burst factor;
latency: a robust scale and a tail multiplier (quantile or peaks-over-threshold)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tasks.models.baselines import metrics
from tasks.models.features import FEATURES, LATENCIES
from tasks.models.forecast import Prepared
from tasks.models.series import PatternData


@dataclass
class Thresholds:
    """Per node: negative-binomial dispersion for counts; robust scale and multiplier for latency."""

    alarm_p: float
    method: str
    nodes: dict[str, dict[str, dict[str, float]]]
    calibrated_mape_calls: float

    def to_json(self) -> dict:
        return asdict(self)


def _burst_factor(pred: np.ndarray, obs: np.ndarray) -> float:
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


def _latency_multiplier(z: np.ndarray, alarm_p: float, method: str) -> float:
    """|z| beyond which a point is irregular: empirical quantile, or peaks-over-threshold (GPD)."""
    z = np.abs(z[np.isfinite(z)])
    if len(z) < 20:
        return 6.0  # too few points to calibrate: a wide band
    if method == "pot":
        from scipy.stats import genpareto

        u = np.quantile(z, 0.9)
        excess = z[z > u] - u
        if len(excess) >= 10:
            shape, _, scale = genpareto.fit(excess, floc=0)
            tail = alarm_p / 0.1
            return float(u + genpareto.ppf(1 - tail, shape, loc=0, scale=scale))
    return float(max(np.quantile(z, 1 - min(0.5, alarm_p * 10)) * 1.5, 5.0))


def calibrate(
    data: PatternData, prep: Prepared, pred: np.ndarray, alarm_p: float = 1e-3, method: str = "quantile"
) -> Thresholds:
    """Thresholds from validation residuals, no labels: the band a normal point stays inside."""
    obs = prep.y[prep.split :].numpy().astype(np.float64)
    nodes: dict[str, dict[str, dict[str, float]]] = {}
    for n, node in enumerate(data.nodes):
        calls = obs[:, n, 0]
        phi = _burst_factor(pred[:, n, 0], calls)
        phi_errors = _burst_factor(pred[:, n, 3], obs[:, n, 3])
        entry: dict[str, dict[str, float]] = {
            "calls": {"alpha": _nb_dispersion(pred[:, n, 0], calls, phi), "phi": phi, "mean": float(calls.mean())},
            "errors": {
                "alpha": _nb_dispersion(pred[:, n, 3], obs[:, n, 3], phi_errors),
                "phi": phi_errors,
                "mean": float(obs[:, n, 3].mean()),
            },
        }
        for f in LATENCIES:
            ok = (calls > 0) & np.isfinite(obs[:, n, f])
            # log-ratio scaled by sqrt(independent requests): a mean over few requests spreads widely
            z = np.log(np.maximum(obs[ok, n, f], 1e-3) / np.maximum(pred[ok, n, f], 1e-3)) * np.sqrt(
                np.maximum(calls[ok] / phi, 1.0)
            )
            sigma = float(1.4826 * np.median(np.abs(z - np.median(z)))) if ok.sum() >= 5 else 1.0
            sigma = max(sigma, 0.05)
            entry[FEATURES[f]] = {"sigma": sigma, "k": _latency_multiplier(z / sigma, alarm_p, method), "phi": phi}
        nodes[node] = entry
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
    expected: np.ndarray, calls: np.ndarray, sigma: float, k: float, phi: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Multiplicative band around expected latency, narrower with more independent requests (calls / phi)."""
    width = k * sigma / np.sqrt(np.maximum(calls / phi, 1))
    return expected * np.exp(-width), expected * np.exp(width)
