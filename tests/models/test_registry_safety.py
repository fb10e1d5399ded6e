"""The registry is the source of truth: cached artifacts are verified against it, and DuckDB's
`models` mirror is repaired from it after a crash between registering and recording."""

from __future__ import annotations

import json
import logging
from datetime import timedelta

import duckdb

from helpers import START, copy_home, flood_user_rpc
from tasks.models.registry import model_name, setup_mlflow
from tasks.models.retrain import plan_training, train_stale
from tasks.scoring.score import score_hour

H3 = START + timedelta(hours=3)
ANOMALIES = "SELECT bucket_ts, pattern_id, node, feature, observed, expected FROM anomalies ORDER BY ALL"


def _q(settings, sql, params=()):
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        return con.execute(sql, list(params)).fetchall()


def _tamper_thresholds(settings) -> dict:
    """Make every band of every cached champion enormous; returns {path: original text}."""
    originals = {}
    for path in sorted((settings.home / "model-cache").glob("*/*/artifacts/thresholds.json")):
        originals[path] = path.read_text()
        th = json.loads(originals[path])
        th["alarm_p"] = 1e-300  # count bands out to the 1e-300 quantiles
        for bands in th["nodes"].values():
            for band in bands.values():
                band.update({"k": 1e3} if "k" in band else {})  # latency bands 1000 sigma wide
        path.write_text(json.dumps(th))
    assert originals, "scoring cached the champions"
    return originals


def _scored_twice_with_tampering(settings, caplog) -> None:
    pid = _q(settings, "SELECT min(pattern_id) FROM models WHERE decision = 'champion'")[0][0]
    flood_user_rpc(settings, pid, H3 + timedelta(minutes=20))  # six times the calls for ten minutes
    score_hour(settings, H3)
    before = _q(settings, ANOMALIES)
    assert before, "the flood is flagged"
    originals = _tamper_thresholds(settings)
    with caplog.at_level(logging.WARNING):
        score_hour(settings, H3)
    assert _q(settings, ANOMALIES) == before, "tampered thresholds changed what is flagged"
    for path, text in originals.items():
        assert path.read_text() == text, f"{path} not restored"
    assert "thresholds.json" in caplog.text, "the tampered file is named in a warning"


def test_a_tampered_cached_thresholds_file_is_detected_and_restored(trained, tmp_path, caplog):
    settings = copy_home(trained[0], tmp_path)
    _scored_twice_with_tampering(settings, caplog)
    client = setup_mlflow(settings).MlflowClient()
    for o in trained[2]:
        digests = json.loads(
            client.get_model_version(model_name(o["pattern_id"]), o["model_version"]).tags["artifacts_sha256"]
        )
        assert {"state_dict.pt", "thresholds.json", "config.json", "graph.json", "normalisation.json"} <= set(digests)


def test_a_version_without_the_digest_tag_is_checked_against_a_fresh_download(trained, tmp_path, caplog):
    settings = copy_home(trained[0], tmp_path)
    client = setup_mlflow(settings).MlflowClient()
    for o in trained[2]:  # a version registered before digests were recorded
        client.delete_model_version_tag(model_name(o["pattern_id"]), o["model_version"], "artifacts_sha256")
    _scored_twice_with_tampering(settings, caplog)


def _versions(settings) -> dict[str, list[int]]:
    client = setup_mlflow(settings).MlflowClient()
    return {
        m.name: sorted(int(v.version) for v in client.search_model_versions(f"name = '{m.name}'"))
        for m in client.search_registered_models()
    }


def test_a_crash_before_record_is_repaired_from_the_registry(trained, tmp_path):
    """kill -9 after MLflow registered and aliased v1 but before `record` wrote DuckDB's rows."""
    settings = copy_home(trained[0], tmp_path)
    columns = "pattern_id, model_name, model_version, run_id, graph_hash, pattern_version, decision, val_mape_calls"
    rows = _q(settings, f"SELECT {columns} FROM models ORDER BY pattern_id")
    with duckdb.connect(str(settings.warehouse)) as con:
        con.execute("DELETE FROM models")
    versions = _versions(settings)
    assert plan_training(settings, H3) == [], "the registered champions are seen: nothing is stale"
    assert train_stale(settings, H3) == [] and _versions(settings) == versions, "no new version registered"
    mirrored = _q(settings, f"SELECT {columns} FROM models ORDER BY pattern_id")
    assert [r[:7] for r in mirrored] == [r[:7] for r in rows]
    assert all(abs(a[7] - b[7]) < 1e-4 for a, b in zip(mirrored, rows))
    assert _q(settings, "SELECT count(*) FROM models WHERE trained_for IS NULL OR calibrated_mape_calls IS NULL") == [
        (0,)
    ]
    report = score_hour(settings, H3)
    assert report.scored and not report.skipped, "scoring finds the champions"


def test_a_version_registered_without_the_champion_alias_is_not_a_champion(trained, tmp_path):
    """kill -9 between register_model and setting the alias: the alias is what makes a champion,
    so the version is mirrored as `unpromoted` and its pattern stays without champion (retrained)."""
    settings = copy_home(trained[0], tmp_path)
    pid = trained[2][0]["pattern_id"]
    client = setup_mlflow(settings).MlflowClient()
    client.delete_registered_model_alias(model_name(pid), "champion")
    with duckdb.connect(str(settings.warehouse)) as con:
        con.execute("DELETE FROM models WHERE pattern_id = ?", [pid])
    jobs = plan_training(settings, H3)
    assert [(j.pattern_id, j.reasons) for j in jobs] == [(pid, ["no_champion"])]
    assert _q(settings, "SELECT model_version, decision FROM models WHERE pattern_id = ?", [pid]) == [(1, "unpromoted")]
    assert score_hour(settings, H3).skipped == {pid: "no champion"}


def test_the_duckdb_champion_follows_the_registry_alias(trained, tmp_path):
    """A champion row whose alias the registry no longer holds (alias removed or rolled back) is demoted."""
    settings = copy_home(trained[0], tmp_path)
    pid = trained[2][0]["pattern_id"]
    setup_mlflow(settings).MlflowClient().delete_registered_model_alias(model_name(pid), "champion")
    assert [(j.pattern_id, j.reasons) for j in plan_training(settings, H3)] == [(pid, ["no_champion"])]
    assert _q(settings, "SELECT decision FROM models WHERE pattern_id = ?", [pid]) == [("demoted",)]


def test_a_challenger_that_ties_after_a_crash_does_not_leave_the_pattern_stale(trained, tmp_path):
    """The loop of the crash: `models` lost v1's row, the pattern was retrained, the new version
    could not beat v1 (the registry's champion) and was recorded as challenger."""
    from tasks.models.forecast import TrainConfig
    from tasks.models.retrain import record_outcomes
    from tasks.models.staleness import stale_patterns
    from tasks.models.training import train_pattern
    from tasks.warehouse import opened

    settings = copy_home(trained[0], tmp_path)
    pid = trained[2][0]["pattern_id"]
    [job] = plan_training(settings, H3, force=True, patterns=[pid])
    with duckdb.connect(str(settings.warehouse)) as con:
        con.execute("DELETE FROM models WHERE pattern_id = ?", [pid])
    worse = train_pattern(settings, job.meta_path, H3, TrainConfig(max_epochs=1, hidden=4), reason="no_champion")
    assert worse.decision == "challenger"
    record_outcomes(settings, [worse])
    assert _q(settings, "SELECT model_version, decision FROM models WHERE pattern_id = ? ORDER BY 1", [pid]) == [
        (1, "champion"),
        (worse.model_version, "challenger"),
    ]
    with opened(settings.warehouse, read_only=True) as con:
        assert stale_patterns(con, settings, H3) == [], "the registry's champion is seen: no retraining loop"
