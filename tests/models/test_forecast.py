"""Forecaster pieces on hand-built Poisson traffic: windows, training, baselines, thresholds."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from tasks.models.baselines import metrics, moving_average, perfect_forecast_mape, poisson_floor, seasonal_naive
from tasks.models.forecast import (
    NotEnoughHistory,
    TrainConfig,
    device,
    epoch_batches,
    predict,
    prepare,
    stopping_start,
    train,
)
from tasks.models.series import PatternData
from tasks.models.thresholds import calibrate, count_band, latency_band

FAST = TrainConfig(max_epochs=60, patience=10)


def _pattern(rates=(40.0, 40.0, 0.3), steps=360, seed=0) -> PatternData:
    """A 3-node chain with constant Poisson call rates and log-normal latency."""
    rng = np.random.default_rng(seed)
    values = np.zeros((steps, len(rates), 4))
    values[:, :, 0] = rng.poisson(rates, size=(steps, len(rates)))
    values[:, :, 3] = rng.poisson(np.array(rates) * 0.01, size=(steps, len(rates)))
    rt = np.exp(rng.normal(np.log(20), 0.3 / np.sqrt(np.maximum(values[:, :, 0], 1))))
    values[:, :, 1] = np.where(values[:, :, 0] > 0, rt, np.nan)
    values[:, :, 2] = np.where(values[:, :, 0] > 0, rt * 2, np.nan)
    buckets = np.arange(np.datetime64("2026-01-01T00:00"), steps, dtype="datetime64[m]").astype("datetime64[s]")
    return PatternData(1, 1, "h", ["USER|a|x|http", "a|b|y|rpc", "b|c|z|rpc"], [(0, 1), (1, 2)], buckets, values, 60)


def test_windows_are_chronological_and_short_history_is_refused():
    data = _pattern()
    prep = prepare(data, FAST)
    assert prep.x.shape == (360 - 12, 12, 3, 4) and prep.y.shape == (360 - 12, 3, 4)
    assert prep.targets[0] == 12 and np.all(np.diff(prep.targets) == 1)
    assert prep.split == int(len(prep.targets) * 0.75)
    with pytest.raises(NotEnoughHistory, match="windows"):
        prepare(_pattern(steps=25), FAST)


def test_training_reaches_the_poisson_floor_on_constant_rates():
    data = _pattern()
    prep = prepare(data, FAST)
    dev = device("cpu")
    result = train(prep, FAST, dev)
    obs = prep.y[prep.split :].numpy().astype(float)
    pred = predict(result.model, prep, slice(prep.split, None), dev)
    mape = metrics(pred, obs)["mape_calls"]
    assert mape <= 1.15 * poisson_floor(obs)
    assert result.history[0] > min(result.history), "validation loss improved while training"
    assert np.allclose(pred[:, :2, 0].mean(), 40, rtol=0.1)


def test_baselines_look_back_correctly():
    values = np.arange(20, dtype=float).reshape(20, 1, 1) * np.ones((1, 2, 4))
    targets = np.array([15, 16])
    assert seasonal_naive(values, targets, 10)[:, 0, 0].tolist() == [5.0, 6.0]
    assert moving_average(values, targets, window=3, horizon=1)[:, 0, 0].tolist() == [13.0, 14.0]


def test_perfect_forecast_floor_matches_the_asymptotic_formula_when_busy():
    assert perfect_forecast_mape(400) == pytest.approx(math.sqrt(2 / (math.pi * 400)), rel=0.02)
    assert perfect_forecast_mape(10) > 1.15 * math.sqrt(2 / (math.pi * 10))


def test_count_bands_keep_false_alarms_near_their_rate_even_on_thin_nodes():
    rng = np.random.default_rng(3)
    for lam in (0.3, 5.0, 80.0):
        expected = np.full(20_000, lam)
        lo, hi = count_band(expected, alpha=0.0, alarm_p=1e-3)
        seen = rng.poisson(lam, size=expected.shape)
        outside = np.mean((seen < lo) | (seen > hi))
        assert outside <= 3e-3, f"lambda={lam}: {outside:.4f} of normal buckets flagged"


def test_calibration_learns_overdispersion_and_latency_scale():
    data = _pattern(rates=(40.0, 40.0, 40.0))
    rng = np.random.default_rng(5)
    data.values[:, 2, 0] = rng.negative_binomial(5, 5 / (5 + 40.0), size=len(data.values))  # var = 40 + 40^2/5
    prep = prepare(data, FAST)
    pred = np.broadcast_to(np.nanmean(data.values, axis=0), prep.y[prep.split :].shape).copy()
    th = calibrate(data, prep, pred, alarm_p=1e-3)
    poisson_node, nb_node = th.nodes["USER|a|x|http"], th.nodes["b|c|z|rpc"]
    assert poisson_node.calls.alpha < 0.02 < nb_node.calls.alpha
    assert 0.1 < nb_node.calls.alpha < 0.4
    assert 0.1 < poisson_node.rt_mean.sigma < 0.6
    lo1, hi1 = latency_band(np.array([20.0]), np.array([1]), 0.3, 4.0)
    lo9, hi9 = latency_band(np.array([20.0]), np.array([100]), 0.3, 4.0)
    assert hi9 - lo9 < (hi1 - lo1) / 5, "a bucket of 100 calls has a much narrower latency band"


def test_bursty_thin_nodes_get_a_burst_factor_and_keep_their_alarm_rate():
    """One request calling a node 8 times (a loop): in thin traffic Var ~ 8 lambda, not lambda."""
    from tasks.models.thresholds import burst_factor

    rng = np.random.default_rng(7)
    lam = np.full(5_000, 0.2)
    bursty = 8 * rng.poisson(lam / 8)
    plain = rng.poisson(lam)
    assert burst_factor(lam, bursty) == pytest.approx(8.0, rel=0.2)
    assert burst_factor(lam, plain) == pytest.approx(1.0, abs=0.1)
    test = np.full(200_000, 0.2)
    seen = 8 * rng.poisson(test / 8)
    _, hi_poisson = count_band(test, alpha=0.0, alarm_p=1e-3)
    _, hi_burst = count_band(test, alpha=0.0, alarm_p=1e-3, phi=8.0)
    assert np.mean(seen > hi_poisson) > 0.01, "a plain Poisson band flags most bursts"
    assert np.mean(seen > hi_burst) <= 1e-3


def test_samples_touching_an_excluded_stretch_are_left_out():
    """History hygiene: no sample reads or forecasts a bucket inside an incident, and the scale is
    learnt from the normal buckets (a 20x flood would otherwise widen every band after it)."""
    data = _pattern()
    data.values[100:130, :2, 0] *= 20  # a flood on the two busy nodes
    data.excluded = np.zeros(len(data.buckets), dtype=bool)
    data.excluded[100:130] = True
    prep = prepare(data, FAST)
    first = prep.targets - FAST.horizon - FAST.window + 1
    assert not any(data.excluded[a : t + 1].any() for a, t in zip(first, prep.targets))
    assert len(prep.targets) == 360 - 12 - (30 + 12)  # the flood and the windows reading it
    assert float(prep.y[..., :2, 0].max()) < 100  # no flood bucket among the targets
    data.excluded[:] = True
    with pytest.raises(NotEnoughHistory, match="360 buckets inside incidents left out"):
        prepare(data, FAST)


def _samples_per_epoch(monkeypatch: pytest.MonkeyPatch, prep, cfg: TrainConfig) -> list[int]:
    """Trains `prep` and returns how many training windows each epoch stepped through."""
    import tasks.models.forecast as forecast

    seen: list[int] = []
    real = forecast.epoch_batches

    def counting(n_train, cfg, gen):
        batches = real(n_train, cfg, gen)
        seen.append(sum(len(b) for b in batches))
        return batches

    monkeypatch.setattr(forecast, "epoch_batches", counting)
    train(prep, cfg, device("cpu"))
    return seen


def test_an_epoch_costs_the_same_at_8x_the_history(monkeypatch: pytest.MonkeyPatch):
    """The epoch budget: 6 h of history trains on every window, 48 h on as many windows as the
    budget allows and no more, and early stopping watches the same number of newest windows."""
    cfg = replace(FAST, max_epochs=3, epoch_windows=300, stop_windows=100)
    short, long = prepare(_pattern(steps=360), cfg), prepare(_pattern(steps=2880), cfg)
    assert _samples_per_epoch(monkeypatch, short, cfg) == [short.split] * 3  # 261 windows: all of them
    assert _samples_per_epoch(monkeypatch, long, cfg) == [300] * 3  # of 2151
    assert len(short.x) - stopping_start(len(short.x), short.split, cfg) == 87  # all of the validation
    assert len(long.x) - stopping_start(len(long.x), long.split, cfg) == 100


def test_a_history_within_the_budget_trains_exactly_as_without_one():
    """The same draws from the same generator: a budget that holds every window changes no weight."""
    prep = prepare(_pattern(), FAST)
    cfg = replace(FAST, max_epochs=4)
    budgeted = train(prep, cfg, device("cpu"))
    unbudgeted = train(prep, replace(cfg, epoch_windows=None, stop_windows=None), device("cpu"))
    assert budgeted.history == unbudgeted.history
    for key, value in unbudgeted.model.state_dict().items():
        assert torch.equal(budgeted.model.state_dict()[key], value), key


def test_each_epoch_draws_afresh_within_its_budget():
    cfg = replace(FAST, epoch_windows=100, batch_size=32)
    gen = torch.Generator().manual_seed(0)
    first, second = (torch.cat(epoch_batches(1000, cfg, gen)) for _ in range(2))
    assert len(first) == len(second) == 100 and len(set(first.tolist())) == 100
    assert set(first.tolist()) != set(second.tolist())  # another sample of the history each epoch
    assert [len(b) for b in epoch_batches(1000, cfg, gen)] == [32, 32, 32, 4]
