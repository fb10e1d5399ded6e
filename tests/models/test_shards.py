"""Stale patterns split into training shards (`tasks.models.shards`) and fitted per shard
(`tasks.models.fitting.fit_many`): balanced, complete, JSON-safe, and the same models stacked."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from helpers import synthetic_pattern
from tasks.models.fitting import fit_many
from tasks.models.forecast import TrainConfig, prepare
from tasks.models.jobs import TrainJob, TrainShard
from tasks.models.shards import export_cost, shard_jobs
from tasks.settings import load_settings

HOUR = datetime(2026, 1, 1, 3, tzinfo=UTC)


def _jobs(n: int) -> list[TrainJob]:
    return [TrainJob(pid, ["no_champion"], HOUR, Path(f"/tmp/exports/pattern-{pid}.json")) for pid in range(n)]


def test_shards_hold_every_job_once_with_similar_costs():
    costs = [100, 90, 80, 70, 60, 50, 40, 30, 20, 10, 5, 5]
    shards = shard_jobs(_jobs(len(costs)), 3, costs)
    assert [s.index for s in shards] == [0, 1, 2]
    ids = [j.pattern_id for s in shards for j in s.jobs]
    assert sorted(ids) == list(range(len(costs))), "every stale pattern in exactly one shard"
    loads = [sum(costs[j.pattern_id] for j in s.jobs) for s in shards]
    assert max(loads) - min(loads) <= max(costs) / 2, loads
    assert all([j.pattern_id for j in s.jobs] == sorted(j.pattern_id for j in s.jobs) for s in shards)


def test_fewer_jobs_than_shards_gives_one_shard_each_and_none_gives_none():
    assert [len(s.jobs) for s in shard_jobs(_jobs(2), 4, [1, 1])] == [1, 1]
    assert shard_jobs([], 4, []) == []


def test_a_shard_round_trips_through_json_and_shows_its_patterns():
    shard = TrainShard(1, _jobs(3))
    d = json.loads(json.dumps(shard.to_dict()))
    assert d["patterns"] == [0, 1, 2]
    assert TrainShard.from_dict(d) == shard


def test_the_cost_is_the_rows_of_the_exported_series(tmp_path):
    pq.write_table(pa.table({"node": ["a"] * 7}), tmp_path / "pattern-3.parquet")
    assert export_cost(TrainJob(3, [], HOUR, tmp_path / "pattern-3.json")) == 7


@pytest.mark.parametrize("batch_training", ["on", "off"])
def test_fit_many_stacked_or_not_fits_the_same_models_as_one_by_one(tmp_path, batch_training):
    """`fit_many` gives each pattern the metrics `fit` gives it alone (the issue allows 2 %; float32
    rounding is what differs)."""
    from tasks.models.fitting import fit

    torch.set_num_threads(1)
    settings = load_settings(env={"RPCWATCH_DEVICE": "cpu", "RPCWATCH_BATCH_TRAINING": batch_training}, home=tmp_path)
    cfg = TrainConfig(hidden=8, max_epochs=6, patience=3, batch_size=64)
    rng = np.random.default_rng(1)
    datas = [synthetic_pattern(i, rng, steps=160, nodes=n) for i, n in enumerate([3, 9, 14])]
    together = fit_many(settings, [(d, prepare(d, cfg)) for d in datas], cfg)
    for data, fitted in zip(datas, together, strict=True):
        alone = fit(settings, data, cfg)
        assert fitted.data.pattern_id == data.pattern_id
        for name in ("model_mape_calls", "no_graph_mape_calls"):
            assert fitted.scores[name] == pytest.approx(alone.scores[name], rel=1e-3), name


def test_fit_many_fine_tunes_given_weights_stacked_or_not_alike(tmp_path):
    """Patterns with initial weights (a champion's) are fine-tuned without a twin (NaN metrics), the
    others trained from scratch with one; stacked and one by one give the same metrics."""
    import math

    torch.set_num_threads(1)
    cfg = TrainConfig(hidden=8, max_epochs=6, patience=3, warm_patience=2, batch_size=64)
    rng = np.random.default_rng(2)
    datas = [synthetic_pattern(i, rng, steps=160, nodes=n) for i, n in enumerate([4, 11, 7])]
    ready = [(d, prepare(d, cfg)) for d in datas]
    off = load_settings(env={"RPCWATCH_DEVICE": "cpu", "RPCWATCH_BATCH_TRAINING": "off"}, home=tmp_path)
    champion = fit_many(off, ready[:1], cfg)[0].result.model.state_dict()
    inits = [champion, None, champion]  # a champion's weights fit any pattern's graph
    fitted = {}
    for mode in ("on", "off"):
        settings = load_settings(env={"RPCWATCH_DEVICE": "cpu", "RPCWATCH_BATCH_TRAINING": mode}, home=tmp_path)
        fitted[mode] = fit_many(settings, ready, cfg, inits)
    for stacked, alone, init in zip(fitted["on"], fitted["off"], inits, strict=True):
        assert (alone.no_graph is None) == (init is not None)
        assert math.isnan(alone.scores["no_graph_mape_calls"]) == (init is not None)
        assert stacked.scores["model_mape_calls"] == pytest.approx(alone.scores["model_mape_calls"], rel=1e-3)
        assert stacked.result.epochs == alone.result.epochs
