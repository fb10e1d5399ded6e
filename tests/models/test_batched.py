"""Batched training of many patterns (`tasks.models.batched`) against one-by-one `forecast.train`."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from helpers import synthetic_pattern
from tasks.models.batched import BatchOptions, train_batched
from tasks.models.forecast import Prepared, TrainConfig, TrainResult, loss_fn, predict, prepare, train

CPU = torch.device("cpu")
# small and quick; patience 3 so that some patterns stop early, others run to max_epochs
CFG = TrainConfig(hidden=8, max_epochs=12, patience=3, batch_size=64)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def preps() -> list[Prepared]:
    """Four patterns of 3, 6, 11 and 17 nodes (three size buckets), two with a shorter history."""
    rng = np.random.default_rng(0)
    shapes = [(3, 160), (6, 200), (11, 160), (17, 200)]
    return [prepare(synthetic_pattern(i, rng, steps=s, nodes=n), CFG) for i, (n, s) in enumerate(shapes)]


@pytest.fixture(scope="module")
def alone(preps: list[Prepared]) -> list[TrainResult]:
    return [train(p, CFG, CPU) for p in preps]


def val_loss(result: TrainResult, prep: Prepared) -> float:
    """The validation loss of the returned model, recomputed the way `train` computes it."""
    v = slice(prep.split, None)
    with torch.no_grad():
        return float(loss_fn(result.model(prep.x[v], prep.edge_index), prep.y[v], prep.offsets[v], prep.norm, CFG))


def calls_mae(result: TrainResult, prep: Prepared) -> float:
    pred = predict(result.model, prep, slice(prep.split, None), CPU)
    return float(np.abs(pred[..., 0] - prep.y[prep.split :, :, 0].numpy()).mean())


def assert_same(batched: list[TrainResult], alone: list[TrainResult], preps: list[Prepared], rel: float) -> None:
    for b, a, p in zip(batched, alone, preps):
        assert b.epochs == a.epochs and len(b.history) == len(a.history)
        assert b.best_val_loss == pytest.approx(a.best_val_loss, rel=rel)
        assert val_loss(b, p) == pytest.approx(a.best_val_loss, rel=rel)  # the returned model is the best one
        assert calls_mae(b, p) == pytest.approx(calls_mae(a, p), rel=rel)
        assert np.allclose(b.history, a.history, rtol=rel)


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "vmap"])
def test_batched_matches_one_by_one(preps: list[Prepared], alone: list[TrainResult], dense: bool) -> None:
    """Same seed, same batches, same epochs: float32 on CPU agrees to rounding. Not bit for bit (the
    stacked matmuls and masked sums add in another order), but the rounding differences stay ~1e-7
    relative over these epochs, so 1e-4 is asserted instead of the 2 % quality bound."""
    batched = train_batched(preps, CFG, CPU, opts=BatchOptions(dense=dense))
    assert_same(batched, alone, preps, rel=1e-4)
    assert any(a.epochs < CFG.max_epochs for a in alone) and any(a.epochs == CFG.max_epochs for a in alone)
    for b, a in zip(batched, alone):
        assert b.model.state_dict().keys() == a.model.state_dict().keys()
        for k, v in a.model.state_dict().items():
            assert torch.allclose(b.model.state_dict()[k], v, rtol=1e-3, atol=1e-4), k


def test_more_padding_changes_nothing(preps: list[Prepared], alone: list[TrainResult]) -> None:
    """All four in one bucket of 32 nodes (up to 29 padded nodes each), stragglers kept in the stack."""
    opts = BatchOptions(node_multiple=32, compact_fraction=0.0)
    assert_same(train_batched(preps, CFG, CPU, opts=opts), alone, preps, rel=1e-4)


def test_early_stopped_patterns_keep_their_best_state(preps: list[Prepared], alone: list[TrainResult]) -> None:
    batched = train_batched(preps, CFG, CPU)
    for b, p in zip(batched, preps):
        best = b.history.index(b.best_val_loss)  # `train`'s rule: later epochs improve by less than 1e-5
        assert all(h > b.best_val_loss - 1e-5 for h in b.history[best + 1 :])
        assert val_loss(b, p) == pytest.approx(b.best_val_loss, rel=1e-5)
        if b.epochs < CFG.max_epochs:
            assert best == b.epochs - CFG.patience - 1
    assert any(b.epochs < CFG.max_epochs for b in batched)


def test_batched_matches_one_by_one_when_the_epoch_budget_cuts(preps: list[Prepared]) -> None:
    """The epoch budget (111-141 training windows cut to 80, early stopping on the newest 30): the
    stack draws each pattern's epoch as `train` does and watches the same validation windows."""
    cut = replace(CFG, epoch_windows=80, stop_windows=30)
    alone = [train(p, cut, CPU) for p in preps]
    for b, a, p in zip(train_batched(preps, cut, CPU), alone, preps):
        assert b.epochs == a.epochs
        assert np.allclose(b.history, a.history, rtol=1e-4)
        assert calls_mae(b, p) == pytest.approx(calls_mae(a, p), rel=1e-4)
