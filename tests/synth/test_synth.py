"""Tests of the synthetic trace generator (tasks/synth/), at small scale."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta, timezone
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from helpers import START
from tasks.synth import system
from tasks.synth.events import EVENT_KINDS, LABEL_SCHEMA
from tasks.synth.generate import generate
from tasks.synth.system import day_factor
from tasks.synth.writer import COLUMNS, HOUR_MS, SPAN_SCHEMA


def _files(out: Path) -> dict[str, str]:
    """relative path -> sha256 of everything under out."""
    return {
        p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file()
    }


def _spans(out: Path) -> pd.DataFrame:
    frames = []
    for rel in json.loads((out / "manifest.json").read_text())["files"]:
        df = pq.read_table(out / rel).to_pandas()
        df["file"] = rel
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def _key(df: pd.DataFrame) -> pd.Series:
    return df["um"] + ":" + df["dm"] + ":" + df["interface"]


def _template_keys(manifest: dict) -> set[str]:
    return {f"{n['caller']}:{n['callee']}:{n['interface']}" for t in manifest["templates"] for n in t["nodes"]}


@pytest.fixture(scope="module")
def normal(tmp_path_factory):
    out = tmp_path_factory.mktemp("normal")
    lines: list[str] = []
    summary = generate(START, 3, out, seed=5, spans_per_hour=60_000, progress=lines.append)
    manifest = json.loads((out / "manifest.json").read_text())
    return out, summary, manifest, lines, _spans(out)


@pytest.fixture(scope="module")
def anomalous(tmp_path_factory):
    out = tmp_path_factory.mktemp("anomalous")
    summary = generate(START, 8, out, seed=3, spans_per_hour=150_000, anomalies=True)
    manifest = json.loads((out / "manifest.json").read_text())
    labels = pq.read_table(out / "labels.parquet").to_pandas()
    truth = pq.read_table(out / "truth" / "trace_templates.parquet").to_pandas()
    return out, summary, manifest, labels, _spans(out), truth


# ---------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "start",
    [
        datetime(2026, 1, 1),  # naive
        datetime(2026, 1, 1, 3, 30, tzinfo=UTC),  # not on the hour
        datetime(2026, 1, 1, 3, 0, 1, tzinfo=UTC),
        datetime(2026, 1, 1, 3, tzinfo=timezone(timedelta(hours=2))),  # not UTC
    ],
)
def test_start_must_be_utc_on_the_hour(tmp_path, start):
    with pytest.raises(ValueError):
        generate(start, 1, tmp_path, spans_per_hour=1000)
    assert not list(tmp_path.glob("dt=*"))


def test_bad_hours_and_volume(tmp_path):
    with pytest.raises(ValueError):
        generate(START, 0, tmp_path)
    with pytest.raises(ValueError):
        generate(START, 1, tmp_path, spans_per_hour=0)


# ---------------------------------------------------------------- layout and schema


def test_schema_and_column_order(normal):
    out, _, manifest, _, _ = normal
    assert manifest["files"]
    for rel in manifest["files"]:
        schema = pq.read_schema(out / rel)
        assert schema.names == list(COLUMNS)
        assert [f.type for f in schema] == [f.type for f in SPAN_SCHEMA]


def test_manifest_lists_exactly_the_span_files(normal):
    out, summary, manifest, _, _ = normal
    on_disk = sorted(p.relative_to(out).as_posix() for p in out.glob("dt=*/hour=*/*.parquet"))
    assert manifest["files"] == on_disk
    assert manifest["hours"] == 3 and manifest["seed"] == 5 and manifest["anomalies"] is False
    assert datetime.fromisoformat(manifest["start"]) == START


def test_rows_per_hour_match_partitions(normal):
    out, summary, manifest, _, _ = normal
    counted: dict[str, int] = {}
    for rel in manifest["files"]:
        dt, hour = rel.split("/")[:2]
        key = f"{dt[3:]}T{hour[5:]}:00"
        counted[key] = counted.get(key, 0) + pq.ParquetFile(out / rel).metadata.num_rows
    nonzero = {k: v for k, v in manifest["rows_per_hour"].items() if v}
    assert nonzero == counted
    assert summary.rows_per_hour == manifest["rows_per_hour"]
    assert list(manifest["rows_per_hour"])[:3] == [
        "2026-01-01T00:00",
        "2026-01-01T01:00",
        "2026-01-01T02:00",
    ]


def test_every_span_lies_in_its_partition_hour(normal):
    *_, spans = normal
    for rel, part in spans.groupby("file"):
        dt, hour, name = rel.split("/")
        lo = int(datetime.fromisoformat(f"{dt[3:]}T{hour[5:]}:00+00:00").timestamp()) * 1000
        assert part["timestamp"].min() >= lo
        assert part["timestamp"].max() < lo + HOUR_MS
        gen = datetime.strptime(name, "part-%Y%m%d%H.parquet").replace(tzinfo=UTC)
        gen_ms = int(gen.timestamp()) * 1000
        assert gen_ms <= lo  # spans of an hour's traces land in that hour or later ones
        # every trace in a file started in the generated hour its name gives
        roots = part[part["rpc_id"] == "0.1"]["timestamp"]
        assert ((roots >= gen_ms) & (roots < gen_ms + HOUR_MS)).all()


def test_spans_after_the_hour_spill_into_the_next_partition(tmp_path, monkeypatch):
    # slow calls (seconds each) so that many traces cross the hour boundaries
    monkeypatch.setattr(system, "latency", lambda rng, rpctype: (rng.uniform(3000, 6000), 0.3))
    summary = generate(START, 2, tmp_path, seed=1, spans_per_hour=60_000)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["files"] == [
        "dt=2026-01-01/hour=00/part-2026010100.parquet",
        "dt=2026-01-01/hour=01/part-2026010100.parquet",  # spill of hour 00's traces
        "dt=2026-01-01/hour=01/part-2026010101.parquet",
        "dt=2026-01-01/hour=02/part-2026010101.parquet",  # spill past the generated range
    ]
    assert list(summary.rows_per_hour) == [
        "2026-01-01T00:00",
        "2026-01-01T01:00",
        "2026-01-01T02:00",
    ]
    for gen, spill_hour in ((0, 1), (1, 2)):
        own = pq.read_table(tmp_path / manifest["files"][2 * gen])
        spill = pq.read_table(tmp_path / manifest["files"][2 * gen + 1])
        assert spill.num_rows > 0
        boundary = int((START + timedelta(hours=spill_hour)).timestamp()) * 1000
        assert pc_min(spill["timestamp"]) >= boundary
        # the spilled spans belong to traces whose roots are in the generated hour's own file
        ids = set(spill["traceid"].to_pylist())
        roots = own.filter(pc.equal(own["rpc_id"], "0.1"))
        assert ids <= set(roots["traceid"].to_pylist())
        assert "0.1" not in set(spill["rpc_id"].to_pylist())
    assert summary.rows_per_hour["2026-01-01T02:00"] == pq.read_table(tmp_path / manifest["files"][3]).num_rows


def pc_min(column) -> int:
    return int(np.min(column.to_numpy()))


def test_trace_structure(normal):
    *_, spans = normal
    spans = spans.copy()
    # one root per trace, called by USER, the trace's service is the root's callee
    roots = spans[spans["rpc_id"] == "0.1"]
    assert roots["traceid"].is_unique
    assert roots["traceid"].nunique() == spans["traceid"].nunique()
    assert (roots["um"] == "USER").all() and (roots["uminstanceid"] == "USER").all()
    assert (roots["service"] == roots["dm"]).all()
    assert (spans["um"] == "USER").sum() == len(roots)
    # every non-root rpc id has its parent in the same trace
    child = spans[spans["rpc_id"] != "0.1"].copy()
    child["parent_id"] = child["rpc_id"].str.rsplit(".", n=1).str[0]
    joined = child.merge(
        spans[["traceid", "rpc_id", "timestamp", "rt", "dm", "dminstanceid"]],
        left_on=["traceid", "parent_id"],
        right_on=["traceid", "rpc_id"],
        how="left",
        suffixes=("", "_p"),
        validate="many_to_one",
    )
    assert joined["rpc_id_p"].notna().all()
    # a child starts after its parent, ends before it, and is called by the parent's callee pod
    assert (joined["timestamp"] >= joined["timestamp_p"]).all()
    assert (joined["timestamp"] + joined["rt"] <= joined["timestamp_p"] + joined["rt_p"] + 1).all()
    assert (joined["um"] == joined["dm_p"]).all()
    assert (joined["uminstanceid"] == joined["dminstanceid_p"]).all()
    assert not spans.duplicated(["traceid", "rpc_id"]).any()
    assert set(spans["rpctype"]) <= {"rpc", "http", "mc", "db", "mq"}
    assert {"mc", "db"} <= set(spans["rpctype"])
    assert (spans["dminstanceid"].str.rsplit("_POD_", n=1).str[0] == spans["dm"]).all()
    assert (spans["rt"] > 0).all()
    assert set(spans["error"].unique()) <= {0, 1}
    assert 0 < spans["error"].mean() < 0.02


def test_truth_covers_exactly_the_traces(normal):
    out, _, manifest, _, spans = normal
    truth = pq.read_table(out / "truth" / "trace_templates.parquet")
    assert truth.schema.names == ["traceid", "request_type"]
    truth = truth.to_pandas()
    assert truth["traceid"].is_unique
    assert set(truth["traceid"]) == set(spans["traceid"])
    assert set(truth["request_type"]) <= {t["request_type"] for t in manifest["templates"]}
    # a trace's spans are a subset of its template's RPCs
    allowed = {
        (t["request_type"], f"{n['caller']}:{n['callee']}:{n['interface']}", n["rpc_id"])
        for t in manifest["templates"]
        for n in t["nodes"]
    }
    merged = spans.merge(truth, on="traceid")
    seen = set(zip(merged["request_type"], _key(merged), merged["rpc_id"], strict=True))
    assert seen <= allowed


def test_templates_are_distinguishable(normal):
    *_, manifest, _, _ = normal
    templates = manifest["templates"]
    assert 10 <= len(templates) <= 30
    keys = {t["request_type"]: {f"{n['caller']}:{n['callee']}:{n['interface']}" for n in t["nodes"]} for t in templates}
    for t in templates:
        mandatory = set()
        for n in t["nodes"]:
            if not n["optional"] and all(
                not m["optional"] for m in t["nodes"] if n["rpc_id"].startswith(m["rpc_id"] + ".")
            ):
                mandatory.add(f"{n['caller']}:{n['callee']}:{n['interface']}")
        others = set().union(*(v for k, v in keys.items() if k != t["request_type"]))
        assert len(mandatory - others) >= 2, t["request_type"]
        depth = max(n["rpc_id"].count(".") for n in t["nodes"])
        assert depth <= 6
    for a, b in combinations(keys.values(), 2):
        assert len(a & b) / len(a | b) < 0.5
    rates = [t["base_rate"] for t in templates]
    assert max(rates) / min(rates) >= 10
    services = {n["callee"] for t in templates for n in t["nodes"]}
    assert len(services) >= 25


def test_progress_once_per_hour(normal):
    _, summary, _, lines, _ = normal
    assert len(lines) == 3
    assert lines[0].startswith("hour 2026-01-01T00:00: ")
    assert lines[0].endswith(f"{summary.rows_per_hour['2026-01-01T00:00']:,} spans") or ("spans" in lines[0])
    assert summary.spans_per_second() > 0 and summary.events == 0


def test_labels_empty_with_schema_when_anomalies_off(normal):
    out, *_ = normal
    labels = pq.read_table(out / "labels.parquet")
    assert labels.num_rows == 0
    assert labels.schema.equals(LABEL_SCHEMA)


def test_volume_follows_spans_per_hour_and_day_curve(tmp_path):
    spans_per_hour = 20_000
    summary = generate(START, 24, tmp_path, seed=2, spans_per_hour=spans_per_hour)
    counts = list(summary.rows_per_hour.values())[:24]
    assert abs(np.mean(counts) / spans_per_hour - 1) < 0.1
    for h, n in enumerate(counts):
        expected = spans_per_hour * float(np.mean(day_factor(START.timestamp() + h * 3600 + np.arange(3600))))
        assert abs(n / expected - 1) < 0.15, (h, n, expected)
    assert min(counts) < 0.75 * max(counts)  # quiet at night, busy in the afternoon


# ---------------------------------------------------------------- determinism and re-runs


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = generate(START, 2, tmp_path / "a", seed=11, spans_per_hour=30_000, anomalies=True)
    b = generate(START, 2, tmp_path / "b", seed=11, spans_per_hour=30_000, anomalies=True)
    c = generate(START, 2, tmp_path / "c", seed=12, spans_per_hour=30_000, anomalies=True)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    assert a.rows_per_hour == b.rows_per_hour
    fa, fc = _files(tmp_path / "a"), _files(tmp_path / "c")
    assert fa["manifest.json"] != fc["manifest.json"]
    shared = set(fa) & set(fc) - {"manifest.json"}
    assert all(fa[k] != fc[k] for k in shared if k.startswith("dt="))
    assert c.rows_per_hour != a.rows_per_hour


def test_rerun_into_same_folder_replaces_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("not ours")
    generate(START + timedelta(hours=5), 3, out, seed=9, spans_per_hour=20_000, anomalies=True)
    generate(START, 2, out, seed=4, spans_per_hour=20_000)
    generate(START, 2, tmp_path / "fresh", seed=4, spans_per_hour=20_000)
    mine = _files(out)
    assert mine.pop("notes.txt")
    assert mine == _files(tmp_path / "fresh")
    generate(START, 2, out, seed=4, spans_per_hour=20_000)
    assert {k: v for k, v in _files(out).items() if k != "notes.txt"} == mine


def test_trace_ids_unique_across_hours(anomalous):
    *_, truth = anomalous
    assert truth["traceid"].is_unique
    assert len(truth) > 10_000


# ---------------------------------------------------------------- injected events


def _rate(spans, truth, request_type, lo_ms, hi_ms) -> float:
    roots = spans[spans["rpc_id"] == "0.1"].merge(truth, on="traceid")
    sel = roots[(roots["request_type"] == request_type)]
    sel = sel[(sel["timestamp"] >= lo_ms) & (sel["timestamp"] < hi_ms)]
    return len(sel) / ((hi_ms - lo_ms) / 1000)


def _ms(ts) -> int:
    return int(pd.Timestamp(ts).timestamp() * 1000)


def test_labels_cover_every_kind_after_warm_up(anomalous):
    out, summary, manifest, labels, _, _ = anomalous
    assert pq.read_schema(out / "labels.parquet").equals(LABEL_SCHEMA)
    assert set(labels["kind"]) == set(EVENT_KINDS)
    assert summary.events == len(labels) and labels["event_id"].is_unique
    start, end = pd.Timestamp(START), pd.Timestamp(START + timedelta(hours=8))
    warm = start + pd.Timedelta(hours=4)
    assert (labels["start"] >= warm).all() and (labels["end"] <= end).all()
    spans = sorted(zip(labels["start"], labels["end"], strict=True))
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))
    for row in labels.itertuples():
        minutes = (row.end - row.start) / pd.Timedelta(minutes=1)
        if row.kind == "drift":
            assert minutes >= 180
            assert "retraining" in row.note
        else:
            assert 5 <= minutes <= 20
        assert row.request_type in {t["request_type"] for t in manifest["templates"]}
        assert len(row.rpcs) >= 1 and all(r.count(":") >= 2 for r in row.rpcs)


def test_spike_and_drop_change_the_rate(anomalous):
    *_, labels, spans, truth = anomalous
    for kind, check in (
        ("traffic_spike", lambda r, b: r > 2.5 * b),
        ("traffic_drop", lambda r, b: r < 0.5 * b),
    ):
        row = labels[labels["kind"] == kind].iloc[0]
        lo, hi = _ms(row["start"]), _ms(row["end"])
        during = _rate(spans, truth, row["request_type"], lo, hi)
        before = _rate(spans, truth, row["request_type"], lo - (hi - lo), lo)
        assert before > 0
        assert check(during, before), (kind, during, before)


def test_novel_rpc_appears_in_no_template(anomalous):
    _, _, manifest, labels, spans, truth = anomalous
    row = labels[labels["kind"] == "novel_rpc"].iloc[0]
    known = _template_keys(manifest)
    keys = _key(spans)
    novel = spans[~keys.isin(known)]
    assert len(novel) > 0
    assert set(_key(novel)) == set(row["rpcs"])
    lo, hi = _ms(row["start"]), _ms(row["end"])
    assert novel["timestamp"].between(lo, hi + 60_000).all()
    kinds = novel[["traceid"]].merge(truth, on="traceid")["request_type"]
    assert set(kinds) == {row["request_type"]}
    # in at least ~20% of the type's traces within the window
    n_type = _rate(spans, truth, row["request_type"], lo, hi) * (hi - lo) / 1000
    assert novel["traceid"].nunique() >= 0.1 * n_type


def test_amplification_repeats_a_subtree(anomalous):
    _, _, manifest, labels, spans, truth = anomalous
    row = labels[labels["kind"] == "amplification"].iloc[0]
    lo, hi = _ms(row["start"]), _ms(row["end"])
    child_key = row["rpcs"][1]
    typed = spans.merge(truth, on="traceid")
    typed = typed[(typed["request_type"] == row["request_type"]) & (_key(typed) == child_key)]
    start_of = spans[spans["rpc_id"] == "0.1"].set_index("traceid")["timestamp"]
    per_trace = typed.groupby("traceid").size()
    t0 = start_of.reindex(per_trace.index)
    inside = per_trace[(t0 >= lo) & (t0 < hi)]
    outside = per_trace[(t0 < lo) | (t0 >= hi)]
    # the subtree is repeated 5-10 times: at least 4 extra copies of the child call
    assert inside.max() >= outside.max() + 4


def test_latency_event_slows_its_rpc(anomalous):
    _, _, _, labels, spans, _ = anomalous
    row = labels[labels["kind"] == "latency"].iloc[0]
    lo, hi = _ms(row["start"]), _ms(row["end"])
    target = spans[_key(spans) == row["rpcs"][0]]
    during = target[target["timestamp"].between(lo + 1000, hi - 1000)]["rt"].median()
    before = target[target["timestamp"].between(lo - 3_600_000, lo - 1000)]["rt"].median()
    assert during > 2 * before


def test_anomalous_traces_keep_a_valid_tree(anomalous):
    *_, spans, truth = anomalous
    assert set(truth["traceid"]) == set(spans["traceid"])
    child = spans.loc[spans["rpc_id"] != "0.1", ["traceid", "rpc_id"]]
    child = child.assign(parent=child["rpc_id"].str.rsplit(".", n=1).str[0])
    found = child.merge(
        spans[["traceid", "rpc_id"]].rename(columns={"rpc_id": "parent"}),
        on=["traceid", "parent"],
        how="left",
        indicator=True,
    )
    assert len(found) == len(child)
    assert (found["_merge"] == "both").all()


def test_an_hour_does_not_depend_on_the_run_it_is_part_of(tmp_path):
    generate(START, 3, tmp_path / "long", seed=8, spans_per_hour=30_000)
    generate(START + timedelta(hours=2), 1, tmp_path / "short", seed=8, spans_per_hour=30_000)
    rel = "dt=2026-01-01/hour=02/part-2026010102.parquet"
    long_, short = pq.read_table(tmp_path / "long" / rel), pq.read_table(tmp_path / "short" / rel)
    assert long_.num_rows > 0 and long_.equals(short)
    # warm-up hours carry the same traffic with or without injected events
    generate(START, 8, tmp_path / "events", seed=8, spans_per_hour=30_000, anomalies=True)
    generate(START, 8, tmp_path / "plain", seed=8, spans_per_hour=30_000)
    rel = "dt=2026-01-01/hour=03/part-2026010103.parquet"
    assert pq.read_table(tmp_path / "events" / rel).equals(pq.read_table(tmp_path / "plain" / rel))


def test_a_fleet_adds_shops_with_their_own_names_and_keeps_the_first_one_as_it_was():
    """`systems`: more request types for scale tests; one shop is exactly `build_templates`."""
    alone = system.build_templates(3)[1]
    assert system.build_fleet(3, 1)[1] == alone
    sysm, fleet = system.build_fleet(3, 3)
    assert fleet[: len(alone)] == alone
    assert len(fleet) == len(alone) + len(system.build_templates(4)[1]) + len(system.build_templates(5)[1])
    services = [{n.callee for n in t.nodes} for t in fleet]
    first = set().union(*services[: len(alone)])
    others = set().union(*services[len(alone) :])
    assert not first & others, "no service is shared between shops"
    assert others <= set(sysm.pods), "every shop's services have pods"
    assert len({t.request_type for t in fleet}) == len(fleet)
