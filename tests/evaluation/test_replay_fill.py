"""`rpcwatch replay --fill`: a clean prefix, captures as taken, fault-free resampled traffic between."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import shared_file
from tasks.evaluation.fill import PRE_MARGIN_S, fault_free_traces
from tasks.evaluation.replay import Layout, capture_spans, replay_days, replay_hours, replay_meta
from tasks.ingest.formats import SpanMapping

NS = 1_000_000_000
START = datetime(2023, 1, 29, 7, tzinfo=UTC)


@pytest.fixture
def day(tmp_path):
    """Two captures of a real TrainTicket day: 08_43+08_44 (fault at 08:43:04) and the normal
    08_50 minute, with 08_52 (fault at 08:52:06)."""
    folder = tmp_path / "2023-01-29"
    (folder / "trace").mkdir(parents=True)
    (folder / "normal").mkdir()
    for name in ("08_43", "08_44", "08_52"):
        shutil.copy(shared_file("nezha-trainticket", "2023-01-29", "trace", f"{name}_trace.csv.gz"), folder / "trace")
    shutil.copy(shared_file("nezha-trainticket", "2023-01-29", "normal", "08_50_trace.csv.gz"), folder / "normal")
    faults = json.loads(shared_file("nezha-trainticket", "2023-01-29", "fault_list.json").read_text())
    (folder / "fault_list.json").write_text(json.dumps({"08": faults["08"][:2]}))
    return folder


@pytest.fixture
def filled(day, tmp_path):
    out = tmp_path / "replay"
    counts = replay_days([day], out, START, progress=lambda _: None, layout=Layout(fill=True, prefix_s=1800, seed=3))
    spans = pd.concat(pq.read_table(p).to_pandas().assign(file=p.name) for p in sorted(out.rglob("part-*.parquet")))
    return out, counts, spans


def test_prefix_then_captures_as_taken_with_fill_only_between(filled):
    out, counts, spans = filled
    meta = replay_meta(out)
    assert (
        meta["fill"] is True and meta["start"] == "2023-01-29 07:00:00" and meta["prefix_end"] == "2023-01-29 07:30:00"
    )
    captures = capture_spans(out)
    assert len(captures) == 2 and captures[0][0] == pd.Timestamp("2023-01-29 07:30:00", tz="UTC")
    # the real gap between the captures is kept (no fill lies inside a capture)
    runs = pq.read_table(out / "runs.parquet").to_pandas()
    real_gap = runs.real_start.iloc[1] - runs.real_end.iloc[0]
    assert abs((runs.replay_start.iloc[1] - runs.replay_end.iloc[0]) - real_gap) < pd.Timedelta(seconds=1)
    fill = spans[spans.file.str.startswith("part-fill-")]
    roots = fill[fill.ParentID == "root"]
    starts = pd.to_datetime(roots.StartTimeUnixNano, utc=True)
    for lo, hi in captures:
        assert not ((starts >= lo) & (starts <= hi)).any()
    assert counts["fill_traces"] == fill.TraceID.nunique() == len(roots) > 0
    # the prefix holds traffic from its first minute on, at about the captures' rate
    prefix = starts[starts < pd.Timestamp(meta["prefix_end"], tz="UTC")]
    real_rate = (spans[~spans.file.str.startswith("part-fill-")].ParentID == "root").sum() / sum(
        (hi - lo).total_seconds() for lo, hi in captures
    )
    assert prefix.min() < pd.Timestamp("2023-01-29 07:01:00", tz="UTC")
    assert 0.7 < len(prefix) / 1800 / real_rate < 1.3
    assert replay_hours(out)[0] == START and replay_hours(out)[-1] >= captures[-1][1].floor("h")


def test_fill_traces_are_whole_fault_free_copies_with_fresh_ids(filled, day):
    out, _, spans = filled
    fill = spans[spans.file.str.startswith("part-fill-")]
    real = spans[~spans.file.str.startswith("part-fill-")]
    assert not set(fill.TraceID) & set(real.TraceID) and not fill.duplicated(["TraceID", "SpanID"]).any()
    # every non-root parent is a span of the same trace (links rewritten, none dangling)
    keyed = set(zip(fill.TraceID, fill.SpanID))
    children = fill[fill.ParentID != "root"]
    assert all((t, p) in keyed for t, p in zip(children.TraceID, children.ParentID))
    # a fill trace is a real trace shifted: same operations and the same relative timing
    shapes = {}
    for _, trace in real.groupby("TraceID"):
        shapes.setdefault(_shape(trace), True)
    sample = fill.TraceID.drop_duplicates().iloc[:50]
    assert all(_shape(fill[fill.TraceID == t]) in shapes for t in sample)


def test_the_fill_is_deterministic_for_a_seed_and_differs_between_seeds(day, tmp_path):
    def fill_of(seed: int, name: str) -> pd.DataFrame:
        out = tmp_path / name
        replay_days([day], out, START, progress=lambda _: None, layout=Layout(fill=True, prefix_s=600, seed=seed))
        return pd.concat(pq.read_table(p).to_pandas() for p in sorted(out.rglob("part-fill-*.parquet")))

    a, b, c = fill_of(1, "a"), fill_of(1, "b"), fill_of(2, "c")
    assert a.equals(b) and not a.StartTimeUnixNano.equals(c.StartTimeUnixNano)


def test_the_pool_leaves_out_traces_near_an_injection():
    mapping = SpanMapping.load("nezha-trainticket")
    t0 = 1_000 * NS

    def trace(tid: str, start_s: float) -> list[dict]:
        s = t0 + int(start_s * NS)
        root = {"TraceID": tid, "SpanID": tid + "r", "ParentID": "root", "StartTimeUnixNano": s, "Duration": 1000}
        child = {
            "TraceID": tid,
            "SpanID": tid + "c",
            "ParentID": tid + "r",
            "StartTimeUnixNano": s + 10,
            "Duration": 10,
        }
        return [root, child]

    rows = (
        trace("early", 0)
        + trace("near", 200 - PRE_MARGIN_S - 0.0005)
        + trace("inside", 250)
        + [{"TraceID": "orphan", "SpanID": "o", "ParentID": "x", "StartTimeUnixNano": t0, "Duration": 5}]
    )
    table = pa.Table.from_pylist(rows)
    kept = fault_free_traces(table, mapping, (t0, t0 + 600 * NS), [(t0 + 200 * NS, t0 + 380 * NS)])
    assert sorted(set(kept["TraceID"].to_pylist())) == ["early"]


def _shape(trace: pd.DataFrame) -> tuple:
    first = trace.StartTimeUnixNano.min()
    return tuple(sorted(zip(trace.PodName, trace.OperationName, trace.StartTimeUnixNano - first, trace.Duration)))


def test_without_fill_the_layout_is_back_to_back(day, tmp_path):
    out = tmp_path / "plain"
    counts = replay_days([day], out, START, progress=lambda _: None)
    meta = replay_meta(out)
    assert meta["fill"] is False and meta["prefix_end"] == meta["start"] and counts["fill_traces"] == 0
    assert not list(out.rglob("part-fill-*")) and np.isclose(
        (capture_spans(out)[1][0] - capture_spans(out)[0][1]).total_seconds(), 0, atol=1
    )
