"""Scoring an hour against champion models: anomalies, incidents, idempotency, skips, novel RPCs."""

from __future__ import annotations

from datetime import timedelta

import duckdb

from conftest import START, copy_home
from tasks.scoring import score_hour

H3 = START + timedelta(hours=3)


def _q(settings, sql, params=()):
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def test_normal_hour_scores_every_critical_pattern_quietly_and_rescoring_replaces(trained, tmp_path):
    settings = copy_home(trained[0], tmp_path)
    report = score_hour(settings, H3)
    critical = {r[0] for r in _q(settings, "SELECT pattern_id FROM patterns WHERE critical AND status = 'active'")}
    assert set(report.scored) == critical and not report.skipped
    points = _q(settings, "SELECT sum(calls) FROM pattern_series WHERE bucket_ts >= ? AND pattern_id IN (SELECT unnest(?))",
                [H3.replace(tzinfo=None), sorted(critical)])[0][0]
    traffic = _q(settings, "SELECT count(*) FROM anomalies WHERE kind IN ('traffic_spike', 'traffic_drop')")[0][0]
    assert traffic <= 3, f"{traffic} traffic alarms in a normal hour"
    assert report.anomalies <= 0.002 * points, "normal traffic stays mostly inside its bands"
    snapshot = _q(settings, "SELECT count(*), sum(hash(bucket_ts, node, feature, observed)) FROM anomalies")
    score_hour(settings, H3)
    assert _q(settings, "SELECT count(*), sum(hash(bucket_ts, node, feature, observed)) FROM anomalies") == snapshot
    assert _q(settings, "SELECT count(*) FROM forecast_errors")[0][0] == len(critical)
    assert _q(settings, "SELECT count(*), min(status) FROM score_runs")[0] == (len(critical), "scored")


def test_a_flood_on_one_rpc_is_flagged_there_and_grouped_into_one_incident(trained, tmp_path):
    settings = copy_home(trained[0], tmp_path)
    pid = trained[2][0]["pattern_id"]
    node = _q(settings, "SELECT node FROM pattern_nodes WHERE pattern_id = ? AND caller = 'USER' LIMIT 1", [pid])[0][0]
    start, end = (H3 + timedelta(minutes=20)).replace(tzinfo=None), (H3 + timedelta(minutes=30)).replace(tzinfo=None)
    with duckdb.connect(str(settings.warehouse)) as con:
        con.execute("UPDATE pattern_series SET calls = calls * 6 WHERE pattern_id = ? AND node = ? AND bucket_ts >= ? "
                    "AND bucket_ts < ?", [pid, node, start, end])
    score_hour(settings, H3)
    spikes = _q(settings, "SELECT bucket_ts, node FROM anomalies WHERE kind = 'traffic_spike' AND pattern_id = ?", [pid])
    inside = [ts for ts, n in spikes if n == node and start <= ts < end]
    assert len(inside) >= 8, spikes
    assert len(spikes) - len(inside) <= 2, "the spike stays on the flooded RPC"
    incidents = _q(settings, "SELECT start_ts, end_ts, kinds FROM incidents WHERE list_contains(patterns, ?) "
                             "AND list_contains(kinds, 'traffic_spike')", [pid])
    assert len(incidents) == 1 and incidents[0][0] <= start + timedelta(minutes=2) and incidents[0][1] >= end - timedelta(minutes=2)


def test_patterns_without_a_matching_champion_are_skipped_with_a_reason(trained, tmp_path):
    settings = copy_home(trained[0], tmp_path)
    pid = trained[2][0]["pattern_id"]
    with duckdb.connect(str(settings.warehouse)) as con:
        con.execute("UPDATE patterns SET graph_hash = 'changed' WHERE pattern_id = ?", [pid])
        con.execute("INSERT INTO novel_rpcs VALUES (?, 'svc-cart', 'svc-secrets', 'dump', 'rpc', 40, ?)",
                    [(H3 + timedelta(minutes=5)).replace(tzinfo=None), (H3 + timedelta(minutes=5)).replace(tzinfo=None)])
    report = score_hour(settings, H3)
    assert report.skipped == {pid: "graph changed since training"} and report.novel == 1
    assert _q(settings, "SELECT reason FROM score_runs WHERE pattern_id = ?", [pid]) == [("graph changed since training",)]
    assert _q(settings, "SELECT kind, callee FROM anomalies WHERE kind = 'novel_rpc'") == [("novel_rpc", "svc-secrets")]


def test_plot_marks_the_flood_and_names_a_wrong_node(trained, tmp_path):
    import pytest

    from tasks.plots import plot_node

    settings = copy_home(trained[0], tmp_path)
    pid = trained[2][0]["pattern_id"]
    node = _q(settings, "SELECT caller || ':' || callee || ':' || coalesce(interface, '') FROM pattern_nodes "
                        "WHERE pattern_id = ? AND caller = 'USER' LIMIT 1", [pid])[0][0]
    score_hour(settings, H3)
    png = plot_node(settings, pid, node, 2, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with pytest.raises(ValueError, match="not in pattern"):
        plot_node(settings, pid, "nobody:nothing:never", 2, tmp_path / "q.png")
