"""The per-pattern trace model on tiny hand-built traces: a root A->B that calls B->C and B->D."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers import BC
from helpers import TRACES_START as START
from helpers import tiny_traces as traces
from tasks.models.trace_model import TraceModel


@pytest.fixture(scope="module")
def model() -> TraceModel:
    history = traces(1800, seed=1)  # one hour
    return TraceModel(trace_p=0.01).fit(history).calibrate(history, window_s=30)


def test_normal_traces_are_rarely_surprising(model: TraceModel) -> None:
    scored = model.score(traces(600, seed=2)).traces
    assert len(scored) == 600
    assert scored["surprising"].mean() < 0.03
    assert model.rate < 0.03


def test_a_slow_callee_is_surprising_and_blamed(model: TraceModel) -> None:
    scored = model.score(traces(20, seed=3, slow_c=8.0))
    assert scored.traces["surprising"].all()
    top = scored.blame.groupby("culprit")["weight"].sum().idxmax()
    assert top == "C"


def test_a_missing_child_is_a_structural_surprise(model: TraceModel) -> None:
    scored = model.score(traces(20, seed=4, drop_d=True))
    assert scored.traces["surprising"].all()
    assert (scored.traces["structure_s"] > -np.log(0.01)).all()
    assert {"B", "D"} <= set(scored.blame["culprit"])  # the call that stopped calling, the call gone


def test_fail_fast_calls_count_too(model: TraceModel) -> None:
    scored = model.score(traces(20, seed=5, fast_b=0.02)).traces
    assert scored["surprising"].all()


def test_incidents_in_the_history_do_not_widen_the_model() -> None:
    """A fifth of the history (2 minutes in every 10) under a slow C: C x8 still surprises, the rate
    stays low."""
    parts = [
        traces(15, seed=10 + w, start=START + pd.Timedelta(seconds=30 * w), slow_c=8.0 if w % 20 < 4 else 1.0)
        for w in range(120)
    ]
    history = pd.concat(parts, ignore_index=True)
    dirty = TraceModel(trace_p=0.01).fit(history).calibrate(history, window_s=30)
    assert dirty.rate < 0.05
    assert dirty.score(traces(20, seed=99, slow_c=8.0)).traces["surprising"].mean() > 0.9


def test_round_trip_scores_the_same(model: TraceModel, tmp_path) -> None:
    again = TraceModel.load(model.save(tmp_path / "trace_model.json"))
    batch = traces(50, seed=6, slow_c=3.0)
    pd.testing.assert_frame_equal(model.score(batch).traces, again.score(batch).traces)
    assert again.rate == model.rate


def test_blame_follows_the_time_into_a_child_that_looks_normal_on_its_own() -> None:
    """C's latency is wide (sigma 0.5), B's own work tight: C x6 makes B surprising, C alone less so;
    the blame follows B's extra time down to C."""
    history = traces(1800, seed=7, c_sigma=0.5)
    model = TraceModel(trace_p=0.01).fit(history).calibrate(history, window_s=30)
    scored = model.score(traces(40, seed=8, slow_c=6.0, c_sigma=0.5))
    assert scored.traces["surprising"].mean() >= 0.4
    top = scored.blame.groupby("culprit")["weight"].sum().idxmax()
    assert top == "C"
    assert "time" in set(scored.blame["kind"]) or "rt" in set(scored.blame["kind"])


def test_a_call_repeated_more_than_ever_is_an_amplification(model: TraceModel) -> None:
    batch = traces(5, seed=9)
    extra = batch[batch["node"] == BC].copy()
    extra = pd.concat([extra.assign(call_id=f"2-{i}") for i in range(6)])  # B calls C 7 times
    scored = model.score(pd.concat([batch, extra], ignore_index=True)).traces
    assert scored["surprising"].all()
    assert (scored["structure_s"] > np.log(1800)).all()
