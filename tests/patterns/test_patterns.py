"""Patterns on synthetic traffic with ground truth and on the shared real samples."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import adjusted_rand_score

from helpers import START, add_downstream_call, shared_file
from tasks.ingest.aggregate import aggregate_hour
from tasks.ingest.stage import hours_in_sources, ingest_hour
from tasks.patterns.stage import pattern_table, patterns_hour
from tasks.settings import parse_utc
from tasks.synth.generate import generate

H1 = START + timedelta(hours=1)


@pytest.fixture(scope="module")
def traffic(tmp_path_factory) -> Path:
    """Two synthetic hours at a realistic volume (~100 k spans per hour)."""
    out = tmp_path_factory.mktemp("patterns-synth")
    generate(START, 2, out, seed=5, spans_per_hour=100_000)
    return out


def _hour(settings, source: Path, hour, force: bool = False):
    ingest_hour(settings, hour, [source])
    aggregate_hour(settings, hour)
    return patterns_hour(settings, hour, force=force)


def _q(settings, sql: str, params=()):
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def _patterns(settings) -> dict[int, tuple]:
    return {r[0]: r[1:] for r in _q(settings, "SELECT pattern_id, version, graph_hash, status FROM patterns")}


def test_patterns_recover_request_types_and_critical_ones_carry_the_traffic(settings, traffic):
    report = _hour(settings, traffic, START)
    assert report.reclustered and report.reason == "no patterns yet"
    truth = pq.read_table(traffic / "truth" / "trace_templates.parquet").to_pandas()
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        assigned = con.execute("SELECT trace_id, pattern_id FROM trace_patterns WHERE pattern_id IS NOT NULL").df()
    joined = assigned.merge(truth, left_on="trace_id", right_on="traceid")
    assert len(joined) == len(assigned) > 5_000
    assert adjusted_rand_score(joined["request_type"], joined["pattern_id"]) >= 0.9
    assert report.critical_share >= 0.95
    assert report.reconstruction.full == report.reconstruction.traces, "synthetic traces are complete"
    headers, rows = pattern_table(settings)
    assert "share %" in headers and len(rows) == report.changes.clusters


def test_unchanged_traffic_keeps_every_pattern_id_and_graph_hash(settings, traffic):
    _hour(settings, traffic, START)
    before = _patterns(settings)
    report = _hour(settings, traffic, H1, force=True)
    assert report.reclustered and report.reason == "forced"
    assert _patterns(settings) == before
    assert not (report.changes.created or report.changes.changed or report.changes.retired)
    series = _q(settings, "SELECT sum(calls) FROM pattern_series WHERE bucket_ts >= ?", [H1.replace(tzinfo=None)])[0][0]
    assigned = _q(settings, "SELECT sum(calls) FROM rpc_series WHERE bucket_ts >= ?", [H1.replace(tzinfo=None)])[0][0]
    assert series >= 0.99 * assigned, "per-pattern series cover the hour's traffic"


# test_training imports this name until it switches to `from helpers import add_downstream_call`
_add_downstream_call = add_downstream_call


def test_a_new_downstream_call_changes_only_that_patterns_graph(settings, traffic, tmp_path):
    source = tmp_path / "traces"
    shutil.copytree(traffic, source)
    _hour(settings, source, START)
    before = _patterns(settings)
    truth = pq.read_table(source / "truth" / "trace_templates.parquet").to_pandas()
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        owner = (
            con.execute("SELECT trace_id, pattern_id FROM trace_patterns")
            .df()
            .merge(truth, left_on="trace_id", right_on="traceid")
        )
    busiest = owner.groupby("request_type").size().idxmax()
    target = int(owner[owner.request_type == busiest].pattern_id.mode()[0])
    assert add_downstream_call(source, busiest) > 100
    report = _hour(settings, source, H1, force=True)
    after = _patterns(settings)
    assert report.changes.changed == [target] and not report.changes.created
    assert after[target][0] == before[target][0] + 1 and after[target][1] != before[target][1]
    assert {k: v for k, v in after.items() if k != target} == {k: v for k, v in before.items() if k != target}
    events = _q(settings, "SELECT pattern_id, version, event FROM pattern_history WHERE event = 'graph_changed'")
    assert events == [(target, before[target][0] + 1, "graph_changed")]


def test_without_reclustering_new_traffic_is_novel_and_can_trigger_a_reclustering(settings, traffic, tmp_path):
    source = tmp_path / "traces"
    shutil.copytree(traffic, source)
    _hour(settings, source, START)
    truth = pq.read_table(source / "truth" / "trace_templates.parquet").to_pandas()
    add_downstream_call(source, truth.request_type.value_counts().index[0])
    report = _hour(settings, source, H1)
    assert not report.reclustered and report.reason.startswith("patterns fresh")
    novel = _q(settings, "SELECT DISTINCT caller, callee, interface, first_seen FROM novel_rpcs")
    assert [(r[1], r[2]) for r in novel] == [("svc-newfeature", "newCall")]
    assert novel[0][3] >= H1.replace(tzinfo=None)
    methods = dict(
        _q(settings, "SELECT method, count(*) FROM trace_patterns WHERE hour = ? GROUP BY 1", [H1.replace(tzinfo=None)])
    )
    assert set(methods) <= {"exact", "nearest", "unassigned", "noise"} and methods.get("exact", 0) > 0
    strict = settings.with_(recluster_unclustered_share=0.0)
    if report.unassigned_share > 0:
        again = patterns_hour(strict, H1)
        assert again.reclustered and again.reason.startswith("unassigned traffic")
    hourly = patterns_hour(settings.with_(recluster_every_hours=1), H1)
    assert hourly.reclustered and "1 h or more ago" in hourly.reason


def test_rerunning_an_hour_gives_identical_tables(settings, traffic):
    _hour(settings, traffic, START)
    _hour(settings, traffic, H1)
    tables = {
        "trace_patterns": "count(*), sum(hash(trace_id, hour, shape_id, pattern_id, method, status))",
        "patterns": "count(*), sum(hash(pattern_id, version, graph_hash, status, critical))",
        "pattern_nodes": "count(*), sum(hash(pattern_id, version, node))",
        "pattern_series": "count(*), sum(hash(pattern_id, bucket_ts, node, calls))",
        "reconstruction": "count(*), sum(hash(hour, traces, full_traces))",
        "novel_rpcs": "count(*)",
    }
    snap = {t: _q(settings, f"SELECT {sql} FROM {t}") for t, sql in tables.items()}
    patterns_hour(settings, H1)
    assert {t: _q(settings, f"SELECT {sql} FROM {t}") for t, sql in tables.items()} == snap


@pytest.mark.parametrize(
    "name, fmt, extra, expected, min_patterns",
    [
        # the Alibaba samples are random traces spread over hours: too few alike for any pattern (all noise),
        # but they must reconstruct and run through clustering cleanly
        ("v2022", "alibaba-v2022", {}, (196, 164, 24, 8), 0),
        ("v2021", "alibaba-v2021", {"trace_epoch": parse_utc("2021-06-01T00:00")}, (19, 4, 10, 5), 0),
        ("trainticket", "spans", {"span_mapping": "nezha-trainticket"}, (53, 53, 0, 0), 1),
    ],
)
def test_real_samples_reconstruct_and_cluster(settings, name, fmt, extra, expected, min_patterns):
    files = {
        "v2022": ("alibaba", "v2022-callgraph-sample.csv.gz"),
        "v2021": ("alibaba", "v2021-callgraph-sample.csv.gz"),
        "trainticket": ("nezha-trainticket", "2023-01-29", "trace", "08_43_trace.csv.gz"),
    }
    source = shared_file(*files[name])
    settings = settings.with_(format=fmt, **extra)
    hours = hours_in_sources(settings, [source])
    for hour in hours:
        ingest_hour(settings, hour, [source])
        aggregate_hour(settings, hour)
        patterns_hour(settings, hour)
    # traces, rebuilt fully, partially, not at all (a v2021 trace spanning 6 h counts in each hour it has calls)
    assert (
        _q(
            settings,
            "SELECT sum(traces), sum(full_traces), sum(partial_traces), sum(failed_traces) FROM reconstruction",
        )[0]
        == expected
    )
    assert _q(settings, "SELECT count(*) FROM clustering_runs")[0][0] == len(hours)
    assert _q(settings, "SELECT count(*) FROM patterns WHERE status = 'active'")[0][0] >= min_patterns
