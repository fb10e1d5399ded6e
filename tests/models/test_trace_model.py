"""The per-pattern trace model on tiny hand-built traces: a root A->B that calls B->C and B->D."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest

from helpers import AB, BC, BD
from helpers import TRACES_START as START
from helpers import tiny_traces as traces
from tasks.keys import edge_key, node_key
from tasks.models.latency_tails import LAT_FEATURES, PARAMS, latency_features, tail_p
from tasks.models.trace_model import TraceModel, TraceScores, _blame


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


def test_a_delayed_link_blames_the_pod_whose_packets_wait() -> None:
    """A network delay on B's pod holds B's replies to A and B's requests to C and D: the slow calls
    with nothing slow below them are B->C and B->D, but the link into B is slow too, so B is the
    culprit (naming the callee, as before, blamed C and D). A delay on C's pod slows only B->C's
    link: C is the culprit."""
    history = traces(1800, seed=11)
    model = TraceModel(trace_p=0.01).fit(history).calibrate(history, window_s=30)
    on_b = model.score(traces(40, seed=12, delay_b_ms=20.0))
    assert on_b.traces["surprising"].all()
    assert set(on_b.blame["culprit"]) == {"B"}
    assert set(on_b.blame["kind"]) == {"link"}
    on_c = model.score(traces(40, seed=13, delay_c_ms=20.0))
    assert on_c.traces["surprising"].all()
    assert on_c.blame.groupby("culprit")["weight"].sum().idxmax() == "C"
    assert "link" not in set(on_c.blame["kind"])
    busy_b = model.score(traces(40, seed=14, busy_b_ms=20.0))  # A->B's link is as ever: B's other link tells
    assert busy_b.traces["surprising"].all()
    assert set(busy_b.blame["culprit"]) == {"B"}


def with_a_handler_span(calls: pd.DataFrame) -> pd.DataFrame:
    """B's work inside an internal span B->B (no server side, so no link of its own), as real
    tracers record a controller: B's calls to C and D hang under it."""
    handler = node_key("B", "B", "handle", "span")
    entry = calls[calls["node"] == AB].assign(call_id="1h", parent_call_id="1", node=handler, parent_node=AB)
    entry = entry.assign(rt_ms=entry["server_rt_ms"] - 0.1, server_rt_ms=np.nan)
    below = calls["parent_call_id"] == "1"
    moved = calls.assign(
        parent_call_id=np.where(below, "1h", calls["parent_call_id"]),
        parent_node=np.where(below, handler, calls["parent_node"]),
    )
    return pd.concat([moved, entry], ignore_index=True)


def test_the_link_into_the_caller_is_read_above_its_internal_spans() -> None:
    """B calls only C (no other link to compare): the delay on B's pod shows on A->B, two spans up."""
    history = with_a_handler_span(traces(1800, seed=15, drop_d=True))
    model = TraceModel(trace_p=0.01).fit(history).calibrate(history, window_s=30)
    on_b = model.score(with_a_handler_span(traces(40, seed=16, drop_d=True, delay_b_ms=20.0)))
    assert on_b.traces["surprising"].all()
    assert set(on_b.blame["culprit"]) == {"B"}


def test_a_call_repeated_more_than_ever_is_an_amplification(model: TraceModel) -> None:
    batch = traces(5, seed=9)
    extra = batch[batch["node"] == BC].copy()
    extra = pd.concat([extra.assign(call_id=f"2-{i}") for i in range(6)])  # B calls C 7 times
    scored = model.score(pd.concat([batch, extra], ignore_index=True)).traces
    assert scored["surprising"].all()
    assert (scored["structure_s"] > np.log(1800)).all()


def reference_score(model: TraceModel, calls: pd.DataFrame) -> TraceScores:
    """`TraceModel.score` written the straightforward way, call by call (dict lookups per row): what
    the vectorised one must reproduce exactly."""
    calls = calls.reset_index(drop=True)
    n = len(calls)
    parent_node = calls["parent_node"].fillna("").astype(str)
    pos = [edge_key(p, c) for p, c in zip(parent_node, calls["node"].astype(str))]
    row_of = {(t, c): i for i, (t, c) in enumerate(zip(calls["trace_id"], calls["call_id"]))}
    pairs = zip(calls["trace_id"], calls["parent_call_id"])
    parent_row = np.asarray([row_of.get((t, p), -1) if isinstance(p, str) else -1 for t, p in pairs], dtype=int)
    params = np.full((n, len(LAT_FEATURES), PARAMS), np.nan)
    for row, (shape, p) in enumerate(zip(calls["shape_id"].astype(str), pos)):
        key = f"{shape}#{p}" if f"{shape}#{p}" in model.stats else p
        for f, values in enumerate(model.stats.get(key) or []):
            if values is not None:
                params[row, f] = values
    p_all = tail_p(latency_features(calls), params)
    tested = ~np.isnan(p_all)
    p_all = np.where(tested, p_all, 1.0)
    p_call, feature, tests = p_all.min(axis=1), p_all.argmin(axis=1), tested.sum(axis=1)
    structure = np.zeros(n)
    kids = [(row, pos[row], int(parent_row[row])) for row in range(n) if parent_row[row] >= 0]
    present = {(parent, child) for _, child, parent in kids}
    for row, child, parent in kids:
        seen = model.n_pos.get(pos[parent])
        if seen is not None:
            q = model.children.get(pos[parent], {}).get(child, model.novel.get(pos[parent], 0.5 / (seen + 1)))
            structure[row] = max(structure[row], -math.log(q))
    for (parent, child), count in Counter((parent, child) for _, child, parent in kids).items():
        most = model.most.get(pos[parent], {}).get(child)
        if most is not None and count > most:
            s = math.log(model.n_pos[pos[parent]] + 1) + math.log(count / most)
            structure[parent] = max(structure[parent], s)
    missing = []
    for row, p in enumerate(pos):
        for child, q in model.children.get(p, {}).items():
            if q > 1 - model.trace_p and (row, child) not in present:
                structure[row] = max(structure[row], -math.log(1 - q))
                missing.append((row, child, -math.log(1 - q)))
    rt, server = calls["rt_ms"].to_numpy(float), calls["server_rt_ms"].to_numpy(float)
    observed = np.stack([rt, server, np.maximum(rt - server, 0.0)], axis=1)
    extra = np.nan_to_num(observed - np.expm1(params[:, :3, 1]))
    frame = pd.DataFrame(
        {"trace_id": calls["trace_id"], "root_ts": calls["root_ts"], "p": p_call, "t": tests, "s": structure}
    )
    traces = frame.groupby("trace_id", sort=False).agg(
        root_ts=("root_ts", "first"), p_min=("p", "min"), tests=("t", "sum"), structure_s=("s", "max")
    )
    traces["latency_p"] = np.minimum(traces["p_min"] * np.maximum(traces["tests"], 1), 1.0)
    traces["surprising"] = (traces["latency_p"] < model.trace_p) | (traces["structure_s"] >= model.structure_cut)
    lat_p = p_call * np.maximum(frame["trace_id"].map(traces["tests"]).to_numpy(), 1)
    lat_hit = lat_p < model.trace_p
    struct_hit = structure >= model.structure_cut
    surprise = [
        max(-math.log10(max(p, 1e-300)) if lh else 0.0, s / math.log(10) if sh else 0.0)
        for p, lh, s, sh in zip(lat_p, lat_hit, structure, struct_hit)
    ]
    missing_frame = pd.DataFrame(missing, columns=["row", "child_pos", "surprise"])
    hit = lat_hit | struct_hit
    blame = _blame(calls, hit, lat_hit, feature, missing_frame, extra, parent_row, np.asarray(surprise))
    return TraceScores(traces.reset_index()[["trace_id", "root_ts", "latency_p", "structure_s", "surprising"]], blame)


def mixed_batch() -> pd.DataFrame:
    """A few hundred traces with every kind of event: normal, slow C, fast B, missing D, fan-out
    repeats of C, a never-seen child (and a grandchild under it, whose parent position is unknown),
    a rare shape, a call whose parent is not in its trace, a duplicated call id."""
    parts = [
        traces(150, seed=31),
        traces(30, seed=32, slow_c=8.0),
        traces(20, seed=33, slow_c=3.0, c_sigma=0.5),
        traces(20, seed=34, fast_b=0.02),
        traces(20, seed=35, drop_d=True),
        traces(20, seed=36).assign(shape_id=8),
    ]
    fan = traces(15, seed=37)
    repeats = fan[fan["node"] == BC]
    parts += [fan] + [repeats.assign(call_id=f"2-{i}", rt_ms=repeats["rt_ms"] * (1 + i)) for i in range(1 + 15 % 4)]
    novel = traces(15, seed=38)
    roots = novel[novel["parent_call_id"].isna()]
    be, ef = node_key("B", "E", "op", "http"), node_key("E", "F", "op", "http")
    parts += [novel, roots.assign(call_id="4", parent_call_id="1", node=be, parent_node=AB, callee="E")]
    parts += [roots.assign(call_id="5", parent_call_id="4", node=ef, parent_node=be, callee="F")]
    odd = traces(10, seed=39)
    parts += [odd.assign(parent_call_id=odd["parent_call_id"].where(odd["call_id"] != "3", "9"))]  # D's parent gone
    dup = traces(10, seed=40)
    parts += [dup, dup[dup["call_id"] == "1"]]  # the root twice: children belong to the last one
    return pd.concat(parts, ignore_index=True).sort_values(["root_ts", "trace_id"], kind="stable")


def test_score_matches_the_call_by_call_reference() -> None:
    history = pd.concat([traces(1800, seed=30), traces(30, seed=41).assign(shape_id=8)], ignore_index=True)
    model = TraceModel(trace_p=0.01).fit(history).calibrate(history, window_s=30)
    batch = mixed_batch()
    got, want = model.score(batch), reference_score(model, batch)
    pd.testing.assert_frame_equal(got.traces, want.traces)
    pd.testing.assert_frame_equal(got.blame, want.blame)
    order = ["trace_id", "node", "culprit", "kind"]
    pd.testing.assert_frame_equal(
        got.blame.sort_values(order).reset_index(drop=True), want.blame.sort_values(order).reset_index(drop=True)
    )
    assert batch["trace_id"].nunique() == len(got.traces) >= 300
    assert 0.1 < got.traces["surprising"].mean() < 0.9
    assert {"missing", "structure", "rt"} <= set(got.blame["kind"])
    assert (got.traces["structure_s"] > np.log(1800)).any()  # the fan-out
    assert {"C", "D", "E"} <= set(got.blame["culprit"])


def test_a_trace_weighs_its_surprise_shared_by_its_blamed_calls() -> None:
    """B->C at -log10 p = 6 and B->D at 2 in one trace: the trace weighs 6 (its most surprising
    call), C takes 6 * 6/8, D 6 * 2/8; far outside normal outweighs barely surprising."""
    calls = traces(1, seed=17)
    hit = calls["node"].isin([BC, BD]).to_numpy()
    no_extra = np.zeros((len(calls), 3))
    missing = pd.DataFrame([], columns=["row", "child_pos", "surprise"])
    surprise = np.where(calls["node"] == BC, 6.0, np.where(calls["node"] == BD, 2.0, 0.0))
    blame = _blame(calls, hit, hit, np.zeros(len(calls), dtype=int), missing, no_extra, np.array([-1, 0, 0]), surprise)
    assert blame.set_index("culprit")["weight"].to_dict() == {"C": pytest.approx(4.5), "D": pytest.approx(1.5)}
