"""Train and evaluate one pattern's forecaster; compare with baselines; calibrate thresholds.

Inputs per node and bucket: log1p(calls), log(rt_mean), log(rt_p95), log1p(errors), standardised
per node with statistics of the training split (stored with the model). Outputs per node: the
log-rate of calls and errors (Poisson likelihood: counts are counts, thin nodes stay calm) and
the standardised log latency (squared error weighted by the bucket's call count: a p95 of three
calls says little). Windows of W buckets predict the bucket `horizon` steps after the window.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from tasks.series import FEATURES, PatternData

RT = (1, 2)  # feature indices of latency


@dataclass
class TrainConfig:
    window: int = 12
    horizon: int = 1
    hidden: int = 32
    kernel_size: int = 3
    blocks: int = 2
    lr: float = 1e-2
    weight_decay: float = 1e-4
    max_epochs: int = 200
    patience: int = 20
    batch_size: int = 256
    val_fraction: float = 0.25
    seed: int = 0
    season_seconds: int = 86_400  # seasonal naive looks a day back; an hour when history is shorter
    rt_weight_calls: float = 5.0  # latency loss weight = calls / (calls + this)


@dataclass
class Normaliser:
    """Per-node mean/std of the log features, and per-node mean counts of the training split."""

    mean: list[list[float]]
    std: list[list[float]]
    calls_mean: list[float]
    errors_mean: list[float]

    @classmethod
    def fit(cls, values: np.ndarray) -> Normaliser:
        logs = _log_features(values)
        mean = np.nan_to_num(np.nanmean(logs, axis=0))
        std = np.nan_to_num(np.nanstd(logs, axis=0), nan=1.0)
        std = np.where(std < 1e-3, 1.0, std)
        return cls(mean.tolist(), std.tolist(), np.maximum(values[:, :, 0].mean(axis=0), 1e-3).tolist(),
                   np.maximum(values[:, :, 3].mean(axis=0), 1e-3).tolist())

    def inputs(self, values: np.ndarray) -> np.ndarray:
        """[T, N, F]: standardised log features (missing latency at the node's mean)."""
        z = (_log_features(values) - np.array(self.mean)) / np.array(self.std)
        return np.nan_to_num(z, nan=0.0).astype(np.float32)


def _log_features(values: np.ndarray) -> np.ndarray:
    out = np.empty_like(values, dtype=np.float64)
    out[..., 0] = np.log1p(values[..., 0])
    with np.errstate(divide="ignore", invalid="ignore"):
        out[..., 1] = np.log(np.maximum(values[..., 1], 1e-3))
        out[..., 2] = np.log(np.maximum(values[..., 2], 1e-3))
    out[..., 3] = np.log1p(values[..., 3])
    return out


def device(setting: str = "auto") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def windows(n_steps: int, window: int, horizon: int) -> np.ndarray:
    """Indices of the target bucket for every full window (vectorised later with unfold)."""
    return np.arange(window + horizon - 1, n_steps)


def make_model(cfg: TrainConfig, use_graph: bool = True):
    from tasks.nn import STGCN

    return STGCN(num_features=len(FEATURES), num_outputs=len(FEATURES),
                 hidden_channels=cfg.hidden,
                 window=cfg.window, kernel_size=cfg.kernel_size, num_blocks=cfg.blocks, use_graph=use_graph)


class NotEnoughHistory(ValueError):
    """Too few buckets to train on; the pattern is tried again in a later hour."""


@dataclass
class Prepared:
    x: torch.Tensor  # [S, W, N, F] inputs
    y: torch.Tensor  # [S, N, F] raw targets (counts, rt in ms)
    targets: np.ndarray  # bucket index of each sample
    split: int  # samples before `split` train, the rest validate
    edge_index: torch.Tensor
    offsets: torch.Tensor  # [S, N, 2] log of each window's mean calls and errors
    norm: Normaliser
    values: np.ndarray | None = None  # raw [T, N, F], to re-window with another normaliser
    starts: np.ndarray | None = None  # first bucket of each sample's window

    def with_normaliser(self, norm: Normaliser, window: int) -> Prepared:
        """The same samples, inputs scaled by another model's normaliser (champion comparison)."""
        x, offsets = _windows(norm, self.values, self.starts, window)
        return Prepared(x, self.y, self.targets, self.split, self.edge_index, offsets, norm, self.values, self.starts)


COUNTS = (0, 3)  # calls, errors


def _windows(norm: Normaliser, values: np.ndarray, starts: np.ndarray, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input windows [S, W, N, F] and log-level offsets [S, N, 2].

    Counts are forecast relative to the level of their own window (reversible instance
    normalisation): traffic follows a daily curve, so the validation hours often run above any
    level seen in training, and a model anchored to training means cannot extrapolate there."""
    idx = torch.from_numpy(starts)
    z = torch.from_numpy(norm.inputs(values)).unfold(0, window, 1)[idx].permute(0, 3, 1, 2).contiguous()
    raw = torch.from_numpy(values[:, :, list(COUNTS)].astype(np.float32)).unfold(0, window, 1)[idx]
    offsets = torch.log(raw.median(dim=-1).values + 0.05)  # the median: a burst does not echo afterwards
    z[..., list(COUNTS)] -= z[..., list(COUNTS)].mean(dim=1, keepdim=True)
    return z, offsets


def prepare(data: PatternData, cfg: TrainConfig) -> Prepared:
    from tasks.nn import graph_edge_index

    t_idx = windows(len(data.buckets), cfg.window, cfg.horizon)
    if len(t_idx) < 20:
        raise NotEnoughHistory(f"pattern {data.pattern_id}: {len(data.buckets)} buckets give {len(t_idx)} windows "
                         f"of {cfg.window}; need at least 20")
    split = int(len(t_idx) * (1 - cfg.val_fraction))
    train_end = t_idx[split] - cfg.horizon + 1  # no validation bucket leaks into the statistics
    norm = Normaliser.fit(data.values[:train_end])
    starts = t_idx - cfg.horizon - cfg.window + 1
    x, offsets = _windows(norm, data.values, starts, cfg.window)
    y = torch.from_numpy(data.values[t_idx].astype(np.float32))
    return Prepared(x, y, t_idx, split, graph_edge_index(len(data.nodes), data.edges), offsets, norm,
                    data.values, starts)


def _rt_target(norm: Normaliser, y: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(norm.mean, dtype=torch.float32), torch.tensor(norm.std, dtype=torch.float32)
    logs = torch.log(torch.clamp(y[..., list(RT)], min=1e-3))
    return (logs - mean[:, list(RT)].to(y.device)) / std[:, list(RT)].to(y.device)


def loss_fn(out: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor, norm: Normaliser, cfg: TrainConfig) -> torch.Tensor:
    """Poisson NLL on calls and errors, call-weighted squared error on standardised log latency."""
    log_rate = out[..., [0, 3]] + offsets
    counts = y[..., [0, 3]]
    poisson = (torch.exp(log_rate) - counts * log_rate).mean()
    calls = y[..., 0:1]
    weight = calls / (calls + cfg.rt_weight_calls)
    rt_obs = torch.nan_to_num(_rt_target(norm, y), nan=0.0)
    rt = (weight * (out[..., list(RT)] - rt_obs) ** 2).sum() / weight.sum().clamp(min=1.0) / len(RT)
    return poisson + rt


def predict(model, prep: Prepared, idx: slice | np.ndarray, dev: torch.device) -> np.ndarray:
    """Forecasts in original units [S, N, F]: expected calls/errors, rt_mean/rt_p95 in ms."""
    model.eval()
    with torch.no_grad():
        out = model(prep.x[idx].to(dev), prep.edge_index.to(dev)).cpu()
    pred = torch.empty_like(out)
    pred[..., [0, 3]] = torch.exp(out[..., [0, 3]] + prep.offsets[idx])
    mean, std = torch.tensor(prep.norm.mean, dtype=torch.float32), torch.tensor(prep.norm.std, dtype=torch.float32)
    pred[..., list(RT)] = torch.exp(out[..., list(RT)] * std[:, list(RT)] + mean[:, list(RT)])
    return pred.numpy().astype(np.float64)


@dataclass
class TrainResult:
    model: object
    epochs: int
    best_val_loss: float
    seconds: float
    parameters: int
    history: list[float] = field(default_factory=list)


def train(prep: Prepared, cfg: TrainConfig, dev: torch.device, use_graph: bool = True) -> TrainResult:
    """Adam on chronological training windows, early stopping on the validation loss, fixed seed."""
    if dev.type == "cpu":
        torch.set_num_threads(1)  # tensors this small run slower across threads (10x on a busy host)
    torch.manual_seed(cfg.seed)
    model = make_model(cfg, use_graph).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x, y, e, off = prep.x.to(dev), prep.y.to(dev), prep.edge_index.to(dev), prep.offsets.to(dev)
    xt, yt, xv, yv = x[:prep.split], y[:prep.split], x[prep.split:], y[prep.split:]
    gen = torch.Generator().manual_seed(cfg.seed)
    best, best_state, waited, history = math.inf, None, 0, []
    started = time.perf_counter()
    epoch = 0
    ot, ov = off[:prep.split], off[prep.split:]
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        for batch in torch.randperm(len(xt), generator=gen).split(cfg.batch_size):
            opt.zero_grad()
            loss_fn(model(xt[batch], e), yt[batch], ot[batch], prep.norm, cfg).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val = float(loss_fn(model(xv, e), yv, ov, prep.norm, cfg))
        history.append(val)
        if val < best - 1e-5:
            best, waited = val, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            waited += 1
            if waited >= cfg.patience:
                break
    model.load_state_dict(best_state)
    params = sum(p.numel() for p in model.parameters())
    return TrainResult(model, epoch, best, time.perf_counter() - started, params, history)


# --- evaluation -------------------------------------------------------------------------------

def _errors(pred: np.ndarray, obs: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    p, o = pred[valid], obs[valid]
    if len(o) == 0:
        return {"mae": float("nan"), "rmse": float("nan"), "mape": float("nan")}
    nz = o > 0
    return {"mae": float(np.abs(p - o).mean()), "rmse": float(np.sqrt(((p - o) ** 2).mean())),
            "mape": float((np.abs(p - o)[nz] / o[nz]).mean()) if nz.any() else float("nan")}


def busy_mask(obs: np.ndarray, min_rate: float = 1.0) -> np.ndarray:
    """Points of nodes averaging at least `min_rate` calls per bucket (MAPE is meaningless below)."""
    return np.broadcast_to(obs[:, :, 0].mean(axis=0) >= min_rate, obs.shape[:2])


def metrics(pred: np.ndarray, obs: np.ndarray) -> dict[str, float]:
    """MAE/RMSE/MAPE per feature; latency only where the bucket had calls; calls on busy nodes."""
    busy = busy_mask(obs)
    has_calls = obs[:, :, 0] > 0
    out = {}
    for f, name in enumerate(FEATURES):
        valid = (busy if f == 0 else has_calls & busy) & np.isfinite(obs[:, :, f]) & np.isfinite(pred[:, :, f])
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
    lam = obs[:, :, 0].mean(axis=0)
    valid = busy & (obs[:, :, 0] > 0)
    if not valid.any():
        return float("nan")
    per_node = np.array([np.sqrt(2 / (math.pi * max(x, 1e-9))) if asymptotic else perfect_forecast_mape(x)
                         if x >= 1 else np.nan for x in lam])
    return float(np.broadcast_to(per_node, obs.shape[:2])[valid].mean())


def seasonal_naive(values: np.ndarray, targets: np.ndarray, period: int) -> np.ndarray:
    return values[targets - period]


def moving_average(values: np.ndarray, targets: np.ndarray, window: int, horizon: int) -> np.ndarray:
    out = np.empty((len(targets),) + values.shape[1:])
    for i, t in enumerate(targets):  # validation windows only: a few hundred
        past = values[t - horizon - window + 1:t - horizon + 1]
        with np.errstate(all="ignore"):
            out[i] = np.nanmean(past, axis=0)
    return out


def season_period(cfg: TrainConfig, bucket_seconds: int, first_target: int) -> int:
    """The configured season in buckets if the history holds it before the first validation
    target, else an hour (the synthetic and most real traffic repeat hourly patterns too)."""
    season = cfg.season_seconds // bucket_seconds
    if first_target - season >= 0:
        return season
    return min(max(1, 3600 // bucket_seconds), first_target)


# --- thresholds -------------------------------------------------------------------------------

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
    excess = ((obs - lam) ** 2 - phi * lam).sum() / (lam ** 2).sum()
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


def calibrate(data: PatternData, prep: Prepared, pred: np.ndarray, alarm_p: float = 1e-3,
              method: str = "quantile") -> Thresholds:
    """Thresholds from validation residuals, no labels: the band a normal point stays inside."""
    obs = prep.y[prep.split:].numpy().astype(np.float64)
    nodes: dict[str, dict[str, dict[str, float]]] = {}
    for n, node in enumerate(data.nodes):
        calls = obs[:, n, 0]
        phi = _burst_factor(pred[:, n, 0], calls)
        phi_errors = _burst_factor(pred[:, n, 3], obs[:, n, 3])
        entry: dict[str, dict[str, float]] = {
            "calls": {"alpha": _nb_dispersion(pred[:, n, 0], calls, phi), "phi": phi, "mean": float(calls.mean())},
            "errors": {"alpha": _nb_dispersion(pred[:, n, 3], obs[:, n, 3], phi_errors), "phi": phi_errors,
                       "mean": float(obs[:, n, 3].mean())},
        }
        for f in RT:
            ok = (calls > 0) & np.isfinite(obs[:, n, f])
            # log-ratio scaled by sqrt(independent requests): a mean over few requests spreads widely
            z = np.log(np.maximum(obs[ok, n, f], 1e-3) / np.maximum(pred[ok, n, f], 1e-3)) * np.sqrt(
                np.maximum(calls[ok] / phi, 1.0))
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


def latency_band(expected: np.ndarray, calls: np.ndarray, sigma: float, k: float, phi: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Multiplicative band around expected latency, narrower with more independent requests (calls / phi)."""
    width = k * sigma / np.sqrt(np.maximum(calls / phi, 1))
    return expected * np.exp(-width), expected * np.exp(width)
