"""Train one pattern's forecaster (metrics and baselines: `baselines`; thresholds: `thresholds`).

Inputs per node and bucket: log1p(calls), log(rt_mean), log(rt_p95), log1p(errors), standardised
per node with statistics of the training split (stored with the model). Outputs per node: the
log-rate of calls and errors (Poisson likelihood: counts are counts, thin nodes stay calm) and
the standardised log latency (squared error weighted by the bucket's call count: a p95 of three
calls says little). Windows of W buckets predict the bucket `horizon` steps after the window.
Arrays and tensors in and out: no tables.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from tasks.models.features import CALLS, COUNTS, ERRORS, FEATURES, LATENCIES
from tasks.models.series import PatternData


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
    # a retrain starts from the champion's weights (`train(init=...)`): it is near its optimum, so it
    # stops after this many epochs without improvement (chosen for cost: on synthetic patterns the
    # validation loss matched training from scratch within 0.05 %, bench_train.py --retrain)
    warm_patience: int = 5
    batch_size: int = 256
    val_fraction: float = 0.25
    # A fixed budget per epoch, so that a retrain costs the same at 6 h or 48 h of history: an epoch
    # draws at most `epoch_windows` training windows afresh (`epoch_batches`), and early stopping
    # watches the newest `stop_windows` validation windows (`stopping_start`). 6 h of 60 s buckets
    # give 261 training and 87 validation windows, so up to 6 h nothing changes; at 48 h a fine-tune
    # costs 1.3x what it does at 6 h (18x without the budget) and forecasts as well (bench_retrain.py).
    # The model is still evaluated and calibrated on the whole validation split. None: every window.
    epoch_windows: int | None = 288
    stop_windows: int | None = 96
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
        with warnings.catch_warnings():  # a node without a call has no latency: NaN, replaced below
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nan_to_num(np.nanmean(logs, axis=0))
            std = np.nan_to_num(np.nanstd(logs, axis=0), nan=1.0)
        std = np.where(std < 1e-3, 1.0, std)
        return cls(
            mean.tolist(),
            std.tolist(),
            np.maximum(values[:, :, CALLS].mean(axis=0), 1e-3).tolist(),
            np.maximum(values[:, :, ERRORS].mean(axis=0), 1e-3).tolist(),
        )

    def inputs(self, values: np.ndarray) -> np.ndarray:
        """[T, N, F]: standardised log features (missing latency at the node's mean)."""
        z = (_log_features(values) - np.array(self.mean)) / np.array(self.std)
        return np.nan_to_num(z, nan=0.0).astype(np.float32)


def _log_features(values: np.ndarray) -> np.ndarray:
    """log1p of the counts, log of the latencies (NaN where a bucket had no calls)."""
    out = np.empty_like(values, dtype=np.float64)
    for f in COUNTS:
        out[..., f] = np.log1p(values[..., f])
    with np.errstate(divide="ignore", invalid="ignore"):
        for f in LATENCIES:
            out[..., f] = np.log(np.maximum(values[..., f], 1e-3))
    return out


def device(setting: str = "auto") -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def windows(n_steps: int, window: int, horizon: int) -> np.ndarray:
    """Indices of the target bucket for every full window (vectorised later with unfold)."""
    return np.arange(window + horizon - 1, n_steps)


def clean_windows(t_idx: np.ndarray, excluded: np.ndarray | None, cfg: TrainConfig) -> np.ndarray:
    """The target buckets whose whole sample (input window, horizon, target) lies outside the
    excluded buckets: incidents are neither learnt, validated on nor calibrated against."""
    if excluded is None or not excluded.any():
        return t_idx
    seen = np.concatenate([[0], np.cumsum(excluded)])  # excluded buckets before each index
    first = t_idx - cfg.horizon - cfg.window + 1
    return t_idx[seen[t_idx + 1] - seen[first] == 0]


def epoch_batches(n_train: int, cfg: TrainConfig, gen: torch.Generator) -> list[torch.Tensor]:
    """One epoch's batches of training-sample indices: a fresh shuffle, cut to the epoch's budget.
    The same draw from `gen` with or without a cut, so a history within the budget trains as before."""
    order = torch.randperm(n_train, generator=gen)
    if cfg.epoch_windows is not None:
        order = order[: cfg.epoch_windows]
    return list(order.split(cfg.batch_size))


def stopping_start(n_samples: int, split: int, cfg: TrainConfig) -> int:
    """The first validation sample early stopping watches: the newest `cfg.stop_windows` of them."""
    return split if cfg.stop_windows is None else max(split, n_samples - cfg.stop_windows)


def make_model(cfg: TrainConfig, use_graph: bool = True) -> torch.nn.Module:
    from tasks.models.nn import STGCN

    width = len(FEATURES)  # every feature in, every feature forecast
    return STGCN(width, width, cfg.hidden, cfg.window, cfg.kernel_size, cfg.blocks, use_graph=use_graph)


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
        if self.values is None or self.starts is None:
            raise ValueError("prepared without its raw values: cannot re-window")
        x, offsets = input_windows(norm, self.values, self.starts, window)
        return Prepared(x, self.y, self.targets, self.split, self.edge_index, offsets, norm, self.values, self.starts)


def input_windows(
    norm: Normaliser, values: np.ndarray, starts: np.ndarray, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
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
    from tasks.models.nn import graph_edge_index

    t_idx = clean_windows(windows(len(data.buckets), cfg.window, cfg.horizon), data.excluded, cfg)
    if len(t_idx) < 20:
        left_out = "" if data.excluded is None else f" ({int(data.excluded.sum())} buckets inside incidents left out)"
        raise NotEnoughHistory(
            f"pattern {data.pattern_id}: {len(data.buckets)} buckets give {len(t_idx)} windows "
            f"of {cfg.window}{left_out}; need at least 20"
        )
    split = int(len(t_idx) * (1 - cfg.val_fraction))
    train_end = t_idx[split] - cfg.horizon + 1  # no validation bucket leaks into the statistics
    normal = data.values[:train_end] if data.excluded is None else data.values[:train_end][~data.excluded[:train_end]]
    norm = Normaliser.fit(normal if len(normal) else data.values[:train_end])
    starts = t_idx - cfg.horizon - cfg.window + 1
    x, offsets = input_windows(norm, data.values, starts, cfg.window)
    y = torch.from_numpy(data.values[t_idx].astype(np.float32))
    return Prepared(
        x, y, t_idx, split, graph_edge_index(len(data.nodes), data.edges), offsets, norm, data.values, starts
    )


def _rt_target(norm: Normaliser, y: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(norm.mean, dtype=torch.float32), torch.tensor(norm.std, dtype=torch.float32)
    logs = torch.log(torch.clamp(y[..., list(LATENCIES)], min=1e-3))
    return (logs - mean[:, list(LATENCIES)].to(y.device)) / std[:, list(LATENCIES)].to(y.device)


def loss_fn(
    out: torch.Tensor, y: torch.Tensor, offsets: torch.Tensor, norm: Normaliser, cfg: TrainConfig
) -> torch.Tensor:
    """Poisson NLL on calls and errors, call-weighted squared error on standardised log latency."""
    log_rate = out[..., list(COUNTS)] + offsets
    counts = y[..., list(COUNTS)]
    poisson = (torch.exp(log_rate) - counts * log_rate).mean()
    calls = y[..., CALLS : CALLS + 1]
    weight = calls / (calls + cfg.rt_weight_calls)
    rt_obs = torch.nan_to_num(_rt_target(norm, y), nan=0.0)
    rt = (weight * (out[..., list(LATENCIES)] - rt_obs) ** 2).sum() / weight.sum().clamp(min=1.0) / len(LATENCIES)
    return poisson + rt


def predict(model: torch.nn.Module, prep: Prepared, idx: slice | np.ndarray, dev: torch.device) -> np.ndarray:
    """Forecasts in original units [S, N, F]: expected calls/errors, rt_mean/rt_p95 in ms."""
    model.eval()
    with torch.no_grad():
        out = model(prep.x[idx].to(dev), prep.edge_index.to(dev)).cpu()
    pred = torch.empty_like(out)
    pred[..., list(COUNTS)] = torch.exp(out[..., list(COUNTS)] + prep.offsets[idx])
    mean, std = torch.tensor(prep.norm.mean, dtype=torch.float32), torch.tensor(prep.norm.std, dtype=torch.float32)
    pred[..., list(LATENCIES)] = torch.exp(
        out[..., list(LATENCIES)] * std[:, list(LATENCIES)] + mean[:, list(LATENCIES)]
    )
    return pred.numpy().astype(np.float64)


@dataclass
class TrainResult:
    model: torch.nn.Module
    epochs: int
    best_val_loss: float
    seconds: float
    parameters: int
    history: list[float] = field(default_factory=list)


def train(
    prep: Prepared,
    cfg: TrainConfig,
    dev: torch.device,
    use_graph: bool = True,
    init: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Adam on chronological training windows (at most `cfg.epoch_windows` an epoch), early stopping
    on the newest validation windows' loss, fixed seed; from the weights `init` (a champion's:
    `cfg.warm_patience`) or from scratch (`cfg.patience`)."""
    from tasks.models.nn.dense_gcn import use_dense_propagation

    if dev.type == "cpu":
        torch.set_num_threads(1)  # tensors this small run slower across threads (10x on a busy host)
    torch.manual_seed(cfg.seed)
    model = use_dense_propagation(make_model(cfg, use_graph))
    if init is not None:
        model.load_state_dict(init)
    model = model.to(dev)
    patience = cfg.patience if init is None else cfg.warm_patience
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x, y, e, off = prep.x.to(dev), prep.y.to(dev), prep.edge_index.to(dev), prep.offsets.to(dev)
    stop = stopping_start(len(x), prep.split, cfg)
    xt, yt, xv, yv = x[: prep.split], y[: prep.split], x[stop:], y[stop:]
    gen = torch.Generator().manual_seed(cfg.seed)
    best, waited, history = math.inf, 0, []
    best_state: dict[str, torch.Tensor] | None = None
    started = time.perf_counter()
    ot, ov = off[: prep.split], off[stop:]
    for _ in range(cfg.max_epochs):
        model.train()
        for batch in epoch_batches(len(xt), cfg, gen):
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
            if waited >= patience:
                break
    if best_state is None:
        raise RuntimeError(f"the validation loss never improved on {best} (not finite?)")
    model.load_state_dict(best_state)
    params = sum(p.numel() for p in model.parameters())
    return TrainResult(model, len(history), best, time.perf_counter() - started, params, history)  # one loss an epoch
