"""Fit one or many patterns' forecasters: train the model and its no-graph twin, evaluate both
against the naive baselines on the validation split, calibrate the alarm thresholds (`Fitted`).

A retrain starts from its champion's weights (`init`) and fine-tunes it; the no-graph twin, an
ablation that shows what the graph adds, is trained only with a model trained from scratch (its
metrics are NaN on a fine-tuned version): retraining hundreds of stale patterns an hour on a CPU
cannot afford a second model each (tests/benchmarks/bench_train.py --retrain).

Nothing here logs or registers (that is `tasks.models.training`). Many patterns train together
(`tasks.models.batched.train_batched`: stacked parameters, padded graphs) where it pays, on a GPU;
on a CPU one by one is faster (the work is arithmetic-bound and padding adds to it), with the same
models either way to float rounding (tests/models/test_batched.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tasks.models.baselines import metrics, moving_average, poisson_floor, ratio, season_period, seasonal_naive
from tasks.models.forecast import Prepared, TrainConfig, TrainResult, device, predict, prepare, train
from tasks.models.series import PatternData
from tasks.models.thresholds import Thresholds, calibrate
from tasks.settings import Settings


def _baselines(data: PatternData, prep: Prepared, cfg: TrainConfig) -> tuple[dict[str, np.ndarray], int]:
    """The naive forecasts of the validation targets, and the seasonal period (buckets) used."""
    targets = prep.targets[prep.split :]
    period = season_period(cfg, data.bucket_seconds, int(targets[0]))
    return {
        "seasonal_naive": seasonal_naive(data.values, targets, period),
        "moving_average": moving_average(data.values, targets, cfg.window, cfg.horizon),
    }, period


def evaluate(
    data: PatternData,
    prep: Prepared,
    cfg: TrainConfig,
    model: torch.nn.Module,
    no_graph: torch.nn.Module | None,
    dev: torch.device,
) -> tuple[dict[str, float], np.ndarray, int]:
    """Validation metrics of the model, the no-graph model (NaN without one) and the naive
    baselines, side by side."""
    obs = prep.y[prep.split :].numpy().astype(np.float64)
    pred = predict(model, prep, slice(prep.split, None), dev)
    out = {f"model_{k}": v for k, v in metrics(pred, obs).items()}
    if no_graph is None:
        out.update({f"no_graph_{k}": math.nan for k in metrics(pred, obs)})
    else:
        twin = metrics(predict(no_graph, prep, slice(prep.split, None), dev), obs)
        out.update({f"no_graph_{k}": v for k, v in twin.items()})
    baselines, period = _baselines(data, prep, cfg)
    for name, values in baselines.items():
        out.update({f"{name}_{k}": v for k, v in metrics(values, obs).items()})
    out["poisson_floor_calls"] = poisson_floor(obs)
    out["poisson_floor_asymptotic_calls"] = poisson_floor(obs, asymptotic=True)
    # NaN, never an exception, where a ratio is undefined (an exact baseline, no busy node)
    out["mape_calls_over_floor"] = ratio(out["model_mape_calls"], out["poisson_floor_calls"])
    out["mape_calls_vs_seasonal_naive"] = ratio(out["model_mape_calls"], out["seasonal_naive_mape_calls"])
    return out, pred, period


@dataclass(frozen=True)
class Fitted:
    """A pattern's model and no-graph model, trained, evaluated and calibrated (not yet logged)."""

    data: PatternData
    prep: Prepared
    cfg: TrainConfig
    dev: torch.device
    result: TrainResult
    no_graph: TrainResult | None  # None: fine-tuned from the champion, no twin
    scores: dict[str, float]
    pred: np.ndarray  # validation forecasts [S, N, F]
    period: int  # seasonal naive period, buckets
    thresholds: Thresholds


def fit(settings: Settings, data: PatternData, cfg: TrainConfig, init: dict[str, torch.Tensor] | None = None) -> Fitted:
    """Train the model (from `init`, or from scratch with its no-graph twin), evaluate against the
    baselines, calibrate."""
    return fit_many(settings, [(data, prepare(data, cfg))], cfg, [init])[0]


def _fitted(
    settings: Settings,
    data: PatternData,
    prep: Prepared,
    cfg: TrainConfig,
    dev: torch.device,
    result: TrainResult,
    no_graph: TrainResult | None,
) -> Fitted:
    """The trained pair evaluated against the baselines, and the thresholds calibrated."""
    scores, pred, period = evaluate(data, prep, cfg, result.model, no_graph.model if no_graph else None, dev)
    thresholds = calibrate(data, prep, pred, settings.alarm_p, settings.threshold_method)
    return Fitted(data, prep, cfg, dev, result, no_graph, scores, pred, period, thresholds)


def train_config(settings: Settings) -> TrainConfig:
    """The model and training settings of every pattern (the epoch budget from the settings)."""
    return TrainConfig(max_epochs=settings.train_max_epochs)


def batching(settings: Settings, dev: torch.device) -> bool:
    """Train a shard's patterns stacked? `RPCWATCH_BATCH_TRAINING`: on, off, or auto (on a GPU only)."""
    return settings.batch_training == "on" or (settings.batch_training == "auto" and dev.type == "cuda")


def fit_many(
    settings: Settings,
    ready: list[tuple[PatternData, Prepared]],
    cfg: TrainConfig,
    inits: list[dict[str, torch.Tensor] | None] | None = None,
) -> list[Fitted]:
    """`fit` for many prepared patterns (each from its `inits` weights where given), in their order:
    models and twins trained stacked when `batching` says so, one by one otherwise."""
    from tasks.models.batched import train_batched

    dev = device(settings.device)
    preps = [prep for _, prep in ready]
    inits = inits or [None] * len(preps)
    cold = [i for i, init in enumerate(inits) if init is None]  # only these get a twin
    twins: list[TrainResult | None] = [None] * len(preps)
    if batching(settings, dev) and len(preps) > 1:
        models = train_batched(preps, cfg, dev, inits=inits)
        trained = train_batched([preps[i] for i in cold], cfg, dev, use_graph=False) if cold else []
    else:
        models = [train(prep, cfg, dev, init=init) for prep, init in zip(preps, inits)]
        trained = [train(preps[i], cfg, dev, use_graph=False) for i in cold]
    for i, twin in zip(cold, trained, strict=True):
        twins[i] = twin
    return [
        _fitted(settings, data, prep, cfg, dev, model, twin)
        for (data, prep), model, twin in zip(ready, models, twins, strict=True)
    ]
