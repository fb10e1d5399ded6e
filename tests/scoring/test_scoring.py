"""Scoring an hour against champion models: anomalies, incidents, idempotency, skips, novel RPCs, the
same rows from worker processes; the batched sequential forecast loop against the per-bucket
reference (`scoring_reference`)."""

from __future__ import annotations

from datetime import timedelta

import duckdb
import pytest

from helpers import START, copy_home
from scoring_reference import per_bucket_forecast
from tasks.models.features import CALLS
from tasks.scoring.score import score_hour

H3 = START + timedelta(hours=3)


def _q(settings, sql, params=()):
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def test_normal_hour_scores_every_critical_pattern_quietly_and_rescoring_replaces(trained, tmp_path):
    settings = copy_home(trained[0], tmp_path)
    report = score_hour(settings, H3)
    critical = {r[0] for r in _q(settings, "SELECT pattern_id FROM patterns WHERE critical AND status = 'active'")}
    assert set(report.scored) == critical and not report.skipped
    points = _q(
        settings,
        "SELECT sum(calls) FROM pattern_series WHERE bucket_ts >= ? AND pattern_id IN (SELECT unnest(?))",
        [H3.replace(tzinfo=None), sorted(critical)],
    )[0][0]
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
        con.execute(
            "UPDATE pattern_series SET calls = calls * 6 WHERE pattern_id = ? AND node = ? AND bucket_ts >= ? "
            "AND bucket_ts < ?",
            [pid, node, start, end],
        )
    score_hour(settings, H3)
    spikes = _q(
        settings, "SELECT bucket_ts, node FROM anomalies WHERE kind = 'traffic_spike' AND pattern_id = ?", [pid]
    )
    inside = [ts for ts, n in spikes if n == node and start <= ts < end]
    assert len(inside) >= 8, spikes
    assert len(spikes) - len(inside) <= 2, "the spike stays on the flooded RPC"
    incidents = _q(
        settings,
        "SELECT start_ts, end_ts, kinds FROM incidents WHERE list_contains(patterns, ?) "
        "AND list_contains(kinds, 'traffic_spike')",
        [pid],
    )
    assert (
        len(incidents) == 1
        and incidents[0][0] <= start + timedelta(minutes=2)
        and incidents[0][1] >= end - timedelta(minutes=2)
    )


def test_patterns_without_a_matching_champion_are_skipped_with_a_reason(trained, tmp_path):
    settings = copy_home(trained[0], tmp_path)
    pid = trained[2][0]["pattern_id"]
    with duckdb.connect(str(settings.warehouse)) as con:
        con.execute("UPDATE patterns SET graph_hash = 'changed' WHERE pattern_id = ?", [pid])
        con.execute(
            "INSERT INTO novel_rpcs VALUES (?, 'svc-cart', 'svc-secrets', 'dump', 'rpc', 40, ?)",
            [(H3 + timedelta(minutes=5)).replace(tzinfo=None), (H3 + timedelta(minutes=5)).replace(tzinfo=None)],
        )
    report = score_hour(settings, H3)
    assert report.skipped == {pid: "graph changed since training"} and report.novel == 1
    assert _q(settings, "SELECT reason FROM score_runs WHERE pattern_id = ?", [pid]) == [
        ("graph changed since training",)
    ]
    assert _q(settings, "SELECT kind, callee FROM anomalies WHERE kind = 'novel_rpc'") == [("novel_rpc", "svc-secrets")]


def test_plot_marks_the_flood_and_names_a_wrong_node(trained, tmp_path):
    import pytest

    from tasks.app.plots import plot_node

    settings = copy_home(trained[0], tmp_path)
    pid = trained[2][0]["pattern_id"]
    node = _q(
        settings,
        "SELECT caller || ':' || callee || ':' || coalesce(interface, '') FROM pattern_nodes "
        "WHERE pattern_id = ? AND caller = 'USER' LIMIT 1",
        [pid],
    )[0][0]
    score_hour(settings, H3)
    png = plot_node(settings, pid, node, 2, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with pytest.raises(ValueError, match="not in pattern"):
        plot_node(settings, pid, "nobody:nothing:never", 2, tmp_path / "q.png")


# --- the batched forecast loop against the bucket-by-bucket loop it replaced -------------------


def _champion_inputs(trained, tmp_path):
    """A real champion of the `trained` fixture and its pattern's hour H3 with the lead-in."""
    import numpy as np

    from tasks.models.detector import Detector
    from tasks.models.registry import champions
    from tasks.scoring.grid import cleaned, fetch_flagged, fetch_series
    from tasks.scoring.sequential import span_grid

    settings = copy_home(trained[0], tmp_path)
    pid = trained[2][0]["pattern_id"]
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        detector = Detector.load(settings, pid, champions(con)[pid].model_version)
        grid = span_grid(detector, H3, H3 + timedelta(hours=1))
        values, _ = grid.dense(fetch_series(con, [grid]).get(pid))
        clean = cleaned(values, fetch_flagged(con, [grid], H3).get(pid))
    busiest = int(np.argmax(values[:, :, CALLS].mean(axis=0)))
    return detector, values, clean, np.arange(detector.lead, grid.size), busiest


def test_batched_forecast_loop_gives_the_per_bucket_results_with_floods_cleaned(trained, tmp_path, monkeypatch):
    import numpy as np

    from tasks.models.detector import Detector
    from tasks.scoring.sequential import MAX_CLEANED_RUN, forecast_sequentially

    detector, values, clean, targets, busiest = _champion_inputs(trained, tmp_path)
    floods = {"normal": [], "8-bucket flood": [(10, 18)], "40-bucket flood and a short one": [(5, 45), (50, 54)]}
    passes = []
    forecast = Detector.forecast
    monkeypatch.setattr(Detector, "forecast", lambda self, c, t: passes.append(len(t)) or forecast(self, c, t))
    for case, runs in floods.items():
        observed = values.copy()
        for a, b in runs:
            observed[targets[a:b], busiest, CALLS] *= 10
        passes.clear()
        ref_clean, new_clean = clean.copy(), clean.copy()
        ref_clean[targets] = observed[targets]
        new_clean[targets] = observed[targets]
        ref = per_bucket_forecast(detector, observed, targets, ref_clean)
        new = forecast_sequentially(detector, observed, targets, new_clean)
        assert np.allclose(new.expected, ref.expected, rtol=1e-5, atol=1e-6), case
        assert np.array_equal(new.observed, ref.observed, equal_nan=True)
        assert [f[:3] + f[5:] for f in new.flags] == [f[:3] + f[5:] for f in ref.flags], case
        assert np.allclose([f[3:5] for f in new.flags], [f[3:5] for f in ref.flags], rtol=1e-5), case
        assert np.allclose(new_clean, ref_clean, rtol=1e-5, atol=1e-6, equal_nan=True), "the same points cleaned"
        spikes = [f.sample for f in new.flags if (f.node, f.feature) == (busiest, CALLS)]
        assert passes[0] == len(targets), "one pass forecasts the whole hour"
        assert len(passes) <= 1 + len({f.sample for f in new.flags}), "then one small pass per cleaned bucket at most"
        assert max(passes[1:], default=0) <= detector.cfg.window, "a cleaned bucket re-forecasts only its windows"
        if case != "normal":
            assert len(spikes) >= 8 and len(passes) > 1, (case, spikes, passes)
        if case.startswith("40"):
            assert set(range(5, 5 + MAX_CLEANED_RUN)) <= set(spikes), "the long flood is cleaned 30 buckets"
            t = targets[5 + MAX_CLEANED_RUN]
            assert ref_clean[t, busiest, CALLS] == observed[t, busiest, CALLS], "then accepted as the new level"


def test_a_pattern_without_lead_in_history_is_skipped_as_too_little_history(trained, tmp_path):
    settings = copy_home(trained[0], tmp_path)
    pid = trained[2][0]["pattern_id"]
    with duckdb.connect(str(settings.warehouse)) as con:
        con.execute(
            "DELETE FROM pattern_series WHERE pattern_id = ? AND bucket_ts >= ? AND bucket_ts < ?",
            [pid, (H3 - timedelta(minutes=30)).replace(tzinfo=None), H3.replace(tzinfo=None)],
        )
    report = score_hour(settings, H3)
    assert report.skipped == {pid: "too little history"} and pid not in report.scored and report.scored
    assert _q(settings, "SELECT status, reason, flagged FROM score_runs WHERE pattern_id = ?", [pid]) == [
        ("skipped", "too little history", 0)
    ]
    assert _q(settings, "SELECT count(*) FROM anomalies WHERE pattern_id = ?", [pid]) == [(0,)]
    assert _q(settings, "SELECT count(*) FROM forecast_errors WHERE pattern_id = ?", [pid]) == [(0,)]


def test_forecasts_hold_every_scored_point_with_the_band_the_flags_use(trained, tmp_path):
    settings = copy_home(trained[0], tmp_path)
    pid = trained[2][0]["pattern_id"]
    node = _q(settings, "SELECT node FROM pattern_nodes WHERE pattern_id = ? AND caller = 'USER' LIMIT 1", [pid])[0][0]
    start, end = (H3 + timedelta(minutes=20)).replace(tzinfo=None), (H3 + timedelta(minutes=30)).replace(tzinfo=None)
    with duckdb.connect(str(settings.warehouse)) as con:
        con.execute(
            "UPDATE pattern_series SET calls = calls * 6 WHERE pattern_id = ? AND node = ? AND bucket_ts >= ? "
            "AND bucket_ts < ?",
            [pid, node, start, end],
        )
    report = score_hour(settings, H3)
    h3 = H3.replace(tzinfo=None)
    per_pattern = _q(
        settings,
        "SELECT pattern_id, count(DISTINCT bucket_ts), count(DISTINCT node), min(bucket_ts), max(bucket_ts), "
        "count(*) FILTER (WHERE feature = 'calls' AND (lower IS NULL OR upper IS NULL)), "
        "count(*) FILTER (WHERE lower > expected OR upper < expected) FROM forecasts GROUP BY 1",
    )
    nodes = dict(_q(settings, "SELECT pattern_id, count(DISTINCT node) FROM pattern_nodes GROUP BY 1"))
    assert sorted(r[0] for r in per_pattern) == sorted(report.scored)
    for p, buckets, n, first, last, open_calls, outside in per_pattern:
        assert (buckets, n, first, last) == (60, nodes[p], h3, h3 + timedelta(minutes=59)), p
        assert open_calls == 0 and outside == 0, "calls are two-sided; lower <= expected <= upper"
    assert {f for (f,) in _q(settings, "SELECT DISTINCT feature FROM forecasts")} <= {"calls", "rt_mean", "rt_p95"}
    # every traffic point lies outside its bucket's band, the flagged buckets' threshold is its edge
    traffic = _q(
        settings,
        "SELECT a.observed, a.threshold, f.lower, f.upper, a.direction FROM anomalies a JOIN forecasts f "
        "USING (pattern_id, bucket_ts, node, feature) WHERE a.kind IN ('traffic_spike', 'traffic_drop')",
    )
    assert len(traffic) >= 8
    for observed, threshold, lower, upper, direction in traffic:
        assert observed > upper if direction == "up" else observed < lower
        assert threshold == pytest.approx(upper if direction == "up" else lower)
    inside, unflagged = _q(
        settings,
        "SELECT count(*) FILTER (WHERE s.calls BETWEEN f.lower AND f.upper), count(*) FROM forecasts f "
        "JOIN pattern_series s USING (pattern_id, bucket_ts, node) WHERE f.feature = 'calls' AND NOT EXISTS "
        "(SELECT 1 FROM anomalies a WHERE a.pattern_id = f.pattern_id AND a.bucket_ts = f.bucket_ts "
        "AND a.node = f.node AND a.feature = 'calls')",
    )[0]
    assert unflagged > 100 and inside >= 0.95 * unflagged, (inside, unflagged)
    rows = "SELECT count(*), sum(hash(pattern_id, bucket_ts, node, feature, expected, lower, upper)) FROM forecasts"
    before = _q(settings, rows)
    score_hour(settings, H3)
    assert _q(settings, rows) == before, "rescoring the hour replaces its rows with the same rows"


def test_worker_processes_write_the_rows_one_process_writes(trained, tmp_path, monkeypatch):
    import tasks.scoring.score as score_module

    settings = copy_home(trained[0], tmp_path)
    flooded, short = trained[2][0]["pattern_id"], trained[2][-1]["pattern_id"]
    assert flooded != short
    with duckdb.connect(str(settings.warehouse)) as con:
        con.execute(  # flags, cleaned buckets and their second passes
            "UPDATE pattern_series SET calls = calls * 6 WHERE pattern_id = ? AND bucket_ts >= ? AND bucket_ts < ?",
            [
                flooded,
                (H3 + timedelta(minutes=20)).replace(tzinfo=None),
                (H3 + timedelta(minutes=30)).replace(tzinfo=None),
            ],
        )
        con.execute(  # a skipped pattern among the scored ones
            "DELETE FROM pattern_series WHERE pattern_id = ? AND bucket_ts >= ? AND bucket_ts < ?",
            [short, (H3 - timedelta(minutes=30)).replace(tzinfo=None), H3.replace(tzinfo=None)],
        )
    tables = {
        "anomalies": "SELECT * EXCLUDE (scored_at) FROM anomalies ORDER BY ALL",
        "forecasts": "SELECT * FROM forecasts ORDER BY ALL",
        "forecast_errors": "SELECT * FROM forecast_errors ORDER BY ALL",
        "score_runs": "SELECT * FROM score_runs ORDER BY ALL",
        "incidents": "SELECT * FROM incidents ORDER BY ALL",
    }
    one = score_hour(settings, H3)
    alone = {table: _q(settings, sql) for table, sql in tables.items()}
    monkeypatch.setattr(score_module, "worker_count", lambda patterns: 2)
    workers = score_hour(settings, H3)
    assert (workers.scored, workers.skipped, workers.anomalies) == (one.scored, one.skipped, one.anomalies)
    assert one.skipped == {short: "too little history"} and one.anomalies > 0
    for table, sql in tables.items():
        assert _q(settings, sql) == alone[table], f"{table}: the same rows, bit for bit"
