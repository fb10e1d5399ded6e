"""Scoring an hour against champion models: anomalies, incidents, idempotency, skips, novel RPCs."""

from __future__ import annotations

from datetime import timedelta

import duckdb

from helpers import START, copy_home
from per_bucket_scoring import per_bucket_forecast
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

    from tasks.models.nn import graph_edge_index
    from tasks.models.training import load_model
    from tasks.scoring.score import _cleaned_lead_in, _series, champion_folder

    settings = copy_home(trained[0], tmp_path)
    pid = trained[2][0]["pattern_id"]
    version = _q(
        settings, "SELECT max(model_version) FROM models WHERE pattern_id = ? AND decision = 'champion'", [pid]
    )[0][0]
    model, cfg, graph, norm, thresholds = load_model(champion_folder(settings, pid, version))
    nodes, seconds = graph["nodes"], graph["bucket_seconds"]
    lead = cfg.window + cfg.horizon - 1
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        buckets, values = _series(
            con, pid, nodes, H3 - timedelta(seconds=lead * seconds), H3 + timedelta(hours=1), seconds
        )
        clean = _cleaned_lead_in(con, pid, nodes, buckets, values, H3)
    edge_index = graph_edge_index(len(nodes), [tuple(e) for e in graph["edges"]])
    busiest = int(np.argmax(values[:, :, 0].mean(axis=0)))
    return (model, cfg, norm, edge_index, nodes, thresholds), values, clean, np.arange(lead, len(buckets)), busiest


def test_batched_forecast_loop_gives_the_per_bucket_results_with_floods_cleaned(trained, tmp_path, monkeypatch):
    import numpy as np

    import tasks.scoring.score as scoring

    (model, cfg, norm, edge_index, nodes, thresholds), values, clean, targets, busiest = _champion_inputs(
        trained, tmp_path
    )
    floods = {"normal": [], "8-bucket flood": [(10, 18)], "40-bucket flood and a short one": [(5, 45), (50, 54)]}
    passes = []
    forecast = scoring._forecast
    monkeypatch.setattr(scoring, "_forecast", lambda *a: passes.append(len(a[4])) or forecast(*a))
    for case, runs in floods.items():
        observed = values.copy()
        for a, b in runs:
            observed[targets[a:b], busiest, 0] *= 10
        passes.clear()
        ref_clean, new_clean = clean.copy(), clean.copy()
        ref_clean[targets] = observed[targets]
        new_clean[targets] = observed[targets]
        exp_ref, obs_ref, flags_ref = per_bucket_forecast(
            model, cfg, norm, observed, targets, edge_index, nodes, thresholds, ref_clean
        )
        exp_new, obs_new, flags_new = scoring._forecast_sequentially(
            model, cfg, norm, observed, targets, edge_index, nodes, thresholds, new_clean
        )
        assert np.allclose(exp_new, exp_ref, rtol=1e-5, atol=1e-6), case
        assert np.array_equal(obs_new, obs_ref, equal_nan=True)
        assert [f[:3] + f[5:] for f in flags_new] == [f[:3] + f[5:] for f in flags_ref], case
        assert np.allclose([f[3:5] for f in flags_new], [f[3:5] for f in flags_ref], rtol=1e-5), case
        assert np.allclose(new_clean, ref_clean, rtol=1e-5, atol=1e-6, equal_nan=True), "the same points cleaned"
        spikes = [s for s, n, f, *_ in flags_new if (n, f) == (busiest, 0)]
        assert passes[0] == len(targets), "one pass forecasts the whole hour"
        assert len(passes) <= 1 + len({s for s, *_ in flags_new}), "then one small pass per cleaned bucket at most"
        assert max(passes[1:], default=0) <= cfg.window, "a cleaned bucket re-forecasts only the windows that hold it"
        if case != "normal":
            assert len(spikes) >= 8 and len(passes) > 1, (case, spikes, passes)
        if case.startswith("40"):
            assert set(range(5, 5 + scoring.MAX_CLEANED_RUN)) <= set(spikes), "the long flood is cleaned 30 buckets"
            t = targets[5 + scoring.MAX_CLEANED_RUN]
            assert ref_clean[t, busiest, 0] == observed[t, busiest, 0], "then accepted as the new level"


def test_vectorised_flags_equal_the_per_node_bands():
    import numpy as np

    from tasks.models.features import FEATURES
    from tasks.models.thresholds import count_band, latency_band
    from tasks.scoring.score import _flags

    rng = np.random.default_rng(0)
    nodes = [f"n{i}" for i in range(7)]
    thresholds = {
        "alarm_p": 1e-3,
        "nodes": {
            n: {
                "calls": {"alpha": float(rng.choice([0, 0.01, 0.3])), "phi": float(rng.choice([1.0, 1.0, 4.0]))},
                "errors": {"alpha": float(rng.choice([0, 0.05]))},  # no phi: models calibrated before it existed
                "rt_mean": {"sigma": 0.3, "k": 5.0, "phi": 2.0},
                "rt_p95": {"sigma": 0.4, "k": 6.0},
            }
            for n in nodes
        },
    }
    exp = rng.uniform(0.01, 50, size=(40, len(nodes), 4))
    obs = rng.poisson(exp * rng.choice([1, 1, 1, 3, 0.2], size=exp.shape)).astype(float)
    obs[:, :, 1:3] = exp[:, :, 1:3] * rng.lognormal(0, 1, size=(40, len(nodes), 2))
    expected = []
    for n, node in enumerate(nodes):
        th = thresholds["nodes"][node]
        for f, up, down in ((0, "traffic_spike", "traffic_drop"), (3, "errors", None)):
            lo, hi = count_band(
                exp[:, n, f], th[FEATURES[f]]["alpha"], thresholds["alarm_p"], th[FEATURES[f]].get("phi", 1.0)
            )
            expected += [(s, n, f, hi[s], "up", up) for s in np.flatnonzero(obs[:, n, f] > hi)]
            expected += [(s, n, f, lo[s], "down", down) for s in np.flatnonzero(obs[:, n, f] < lo)] if down else []
        for f in (1, 2):
            _, hi = latency_band(
                exp[:, n, f],
                obs[:, n, 0],
                th[FEATURES[f]]["sigma"],
                th[FEATURES[f]]["k"],
                th[FEATURES[f]].get("phi", 1.0),
            )
            expected += [
                (s, n, f, hi[s], "up", "latency") for s in np.flatnonzero((obs[:, n, 0] > 0) & (obs[:, n, f] > hi))
            ]
    got = [
        (s, n, f, threshold, direction, kind)
        for s, n, f, threshold, _, direction, kind in _flags(obs, exp, nodes, thresholds)
    ]
    assert got == expected and len({g[-1] for g in got}) == 4


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
