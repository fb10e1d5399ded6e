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


def _open_runs(settings) -> list[str]:
    """Run ids of RUNNING runs, read from the store's file (no MLflow: opening it reconciles)."""
    import sqlite3

    with sqlite3.connect(settings.home / "mlflow.db") as db:
        return [r[0] for r in db.execute("SELECT run_uuid FROM runs WHERE status = 'RUNNING'")]


def _logged_model_folder(settings, run_id: str):
    import sqlite3
    from pathlib import Path

    with sqlite3.connect(settings.home / "mlflow.db") as db:
        [(location,)] = db.execute("SELECT artifact_location FROM logged_models WHERE source_run_id = ?", [run_id])
    return Path(location.removeprefix("file://"))


def test_a_training_killed_after_logging_leaves_no_open_run_and_no_stray_model(trained, tmp_path):
    """kill -9 (failpoint `logged`) after the run logged its model but before anything was
    registered: the rerun fails the dead process's run with the reason and deletes the logged
    model no version uses; its own training registers as usual."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    settings = copy_home(trained[0], tmp_path)
    pid = trained[2][0]["pattern_id"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPCWATCH_")} | {
        "RPCWATCH_HOME": str(settings.home),
        "RPCWATCH_CRASH_AT": "logged",
        "RPCWATCH_CRITICAL_COVERAGE": "0.5",
        "RPCWATCH_MIN_TRAIN_HOURS": "3",
        "RPCWATCH_TRAIN_MAX_EPOCHS": "1",
    }
    rpcwatch = str(Path(sys.executable).with_name("rpcwatch"))
    args = [rpcwatch, "train", "--force", "--pattern", str(pid), "--hour", f"{H3:%Y-%m-%dT%H:%M}"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    [stray] = _open_runs(settings)
    folder = _logged_model_folder(settings, stray)
    assert folder.is_dir(), "the killed training had logged its model"
    versions = _versions(settings)  # the rerun begins: its first touch of the registry reconciles
    assert _open_runs(settings) == []
    from tasks.models.registry import FAILED_REASON_TAG

    run = setup_mlflow(settings).MlflowClient().get_run(stray)
    assert run.info.status == "FAILED"
    reason = run.data.tags[FAILED_REASON_TAG]
    assert "is gone" in reason and "artifacts deleted" in reason and "could not" not in reason
    assert not folder.exists(), "the logged model nobody registered is deleted"
    assert versions[model_name(pid)] == [1], "nothing was registered by the killed training"
    [outcome] = train_stale(settings.with_(train_max_epochs=1), H3, force=True, patterns=[pid])
    assert outcome["model_version"] == 2 and _open_runs(settings) == []


def test_only_runs_without_a_live_process_are_failed(settings):
    """Parallel trainings are safe: a run whose process lives stays open; one whose process on this
    host is gone, or (process unknown, another host) older than any training, is failed. A failed
    run that registered a version keeps its artifacts; one that did not loses them."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from tasks.models.registry import (
        EXPERIMENT,
        FAILED_REASON_TAG,
        ORPHANED_AFTER,
        PID_TAG,
        close_orphaned_runs,
        process_tags,
    )

    mlflow = setup_mlflow(settings)
    client = mlflow.MlflowClient()
    experiment = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = process_tags() | {PID_TAG: gone.stdout.strip()}
    now = int(time.time() * 1000)
    too_old = now - int(ORPHANED_AFTER.total_seconds() * 1000) - 60_000
    elsewhere = {"rpcwatch.host": "another-worker", PID_TAG: "1"}

    def run(tags: dict[str, str], start: int = now) -> str:
        created = client.create_run(experiment, start_time=start, tags=tags)
        client.log_text(created.info.run_id, "weights", "model/weights.txt")
        return created.info.run_id

    live, dead_unregistered, dead_registered = run(process_tags()), run(dead), run(dead)
    young_elsewhere, old_elsewhere = run(elsewhere), run(elsewhere, too_old)
    client.create_registered_model(model_name(1))
    client.create_model_version(model_name(1), client.get_run(dead_registered).info.artifact_uri, dead_registered)

    closed = close_orphaned_runs(client, experiment)
    assert sorted(closed) == sorted([dead_unregistered, dead_registered, old_elsewhere])
    status = {r: client.get_run(r).info.status for r in (live, young_elsewhere, *closed)}
    assert status == {live: "RUNNING", young_elsewhere: "RUNNING"} | dict.fromkeys(closed, "FAILED")
    reasons = {r: client.get_run(r).data.tags[FAILED_REASON_TAG] for r in closed}
    assert "is gone" in reasons[dead_unregistered] and "open for" in reasons[old_elsewhere]
    assert f"registered as {model_name(1)} v1" in reasons[dead_registered]

    def has_artifacts(run_id: str) -> bool:
        return (Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://")) / "model").is_dir()

    assert has_artifacts(dead_registered) and has_artifacts(live)
    assert not has_artifacts(dead_unregistered) and not has_artifacts(old_elsewhere)
