"""The hourly DAG through real Airflow (`airflow dags test` on a SQLite metadata db)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import duckdb
import pytest

from helpers import REPO, START
from tasks.app.airflow_env import airflow_env, dag_test, prepare_airflow
from tasks.settings import load_settings

pytestmark = pytest.mark.slow

HOURS = 3  # of the hours test: hour 0 too little history, hour 1 trains, hour 2 trains nothing
HEAVY = ("torch", "mlflow", "great_expectations", "hdbscan", "torch_geometric", "pandas", "duckdb", "sklearn")
TABLES = {
    "calls": "count(*), sum(hash(trace_id, call_id, ts, caller, callee, rt_ms))",
    "quarantine": "count(*)",
    "rpc_series": "count(*), sum(calls), sum(hash(bucket_ts, caller, callee, interface, calls, rt_p95))",
    "ingest_log": "count(*), sum(rows_kept)",
    "trace_patterns": "count(*), sum(hash(trace_id, shape_id, pattern_id, method))",
    "patterns": "count(*), sum(hash(pattern_id, version, graph_hash, status))",
    "pattern_series": "count(*), sum(calls)",
}


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow-run") / "home"
    settings = load_settings(env={}, home=home)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RPCWATCH_", "AIRFLOW"))}
    env = airflow_env(settings, base=clean)
    prepare_airflow(env, settings.airflow_pool)
    return settings, env


def _snapshot(settings) -> dict[str, tuple]:
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        return {t: con.execute(f"SELECT {sql} FROM {t}").fetchone() for t, sql in TABLES.items()}


def _failure(output: str) -> str:
    """The first task error with its exception line, then the output's end (a failed `dags test`
    prints thousands of lines; the cause is rarely in the last ones)."""
    lines = output.splitlines()
    first = next((i for i, line in enumerate(lines) if "Task failed with exception" in line), None)
    cause = [] if first is None else lines[first : first + 60]
    return "\n".join([*cause, "...", output[-2000:]])


def _models(settings) -> int:
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        return int(con.execute("SELECT count(*) FROM models").fetchone()[0])


def _run(env, source: Path, hour) -> subprocess.CompletedProcess:
    env = dict(env, RPCWATCH_SOURCE=str(source))
    result = dag_test(env, "rpcwatch_hourly", hour)  # the one hour rule: logical date H processes H
    assert result.returncode == 0, _failure(result.stdout + result.stderr)
    return result


@pytest.mark.airflow
def test_dag_file_is_light_and_wired(airflow):
    settings, env = airflow
    probe = f"""
import importlib.util, json, sys
sys.path.insert(0, r"{REPO / "dags"}")  # as Airflow's DAG processor puts the DAG folder on sys.path
spec = importlib.util.spec_from_file_location("d", r"{REPO / "dags" / "rpcwatch_hourly.py"}")
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
heavy = sorted(m for m in {HEAVY!r} if m in sys.modules)
d = module.hourly
print(json.dumps({{"heavy": heavy,
    "tasks": sorted(d.task_ids), "pools": sorted({{t.pool for t in d.tasks}}),
    "upstream": {{t.task_id: sorted(t.upstream_task_ids) for t in d.tasks}}, "timetable": type(d.timetable).__name__,
    "queues": {{t.task_id: t.queue for t in d.tasks}}, "pool_of": {{t.task_id: t.pool for t in d.tasks}}}}))
"""
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts["heavy"] == [], f"heavy imports at DAG parse time: {facts['heavy']}"
    from tasks.pipeline import STAGES

    names = [s.name for s in STAGES]
    assert sorted(facts["tasks"]) == sorted(names), "one task per pipeline stage"
    assert facts["pools"] == ["default_pool", "rpcwatch_duckdb"]
    assert facts["queues"]["train"] == "gpu" and facts["pool_of"]["train"] == "default_pool"
    assert facts["upstream"] == {name: names[i - 1 : i] for i, name in enumerate(names)}, "wired in the stages' order"
    assert names[-3:] == ["score", "publish", "alert"]
    assert facts["timetable"] == "HourTimetable"


@pytest.mark.airflow
def test_a_bad_batch_fails_the_validate_task_with_its_message_and_is_posted(airflow, synth_copy, receiver):
    settings, env = airflow
    source, _ = synth_copy
    (source / "dt=2026-01-01" / "hour=00" / "zz-broken.parquet").write_bytes(b"not parquet")
    env = dict(env, RPCWATCH_SOURCE=str(source), RPCWATCH_ALERT_WEBHOOK=receiver.url())
    result = dag_test(env, "rpcwatch_hourly", START)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "expect_file_to_be_readable" in output and "zz-broken.parquet" in output
    assert "AirflowFailException" in output and "up_for_retry" not in output.lower(), "bad data is not retried"
    [failure] = receiver.posted  # the DAG's failure notifier, called by Airflow for the failed task
    assert "validate" in failure["text"] and "zz-broken.parquet" in failure["text"]


@pytest.mark.airflow
def test_hours_through_the_dag_match_the_manifest_train_stale_patterns_once_and_rerun_identically(tmp_path):
    """Hours 0-2 through the DAG (one `dags test` costs half a minute, so one run of hours proves all
    of this): every row of the manifest lands; hour 0 maps no training task (too little history),
    hour 1 trains the patterns once they have 2 h of history, hour 2 (unchanged traffic) trains
    nothing; a rerun of hour 2 leaves every table as it was."""
    import json
    import sqlite3

    from tasks.synth.generate import generate

    source = tmp_path / "traces"
    generate(START, HOURS, source, seed=5, spans_per_hour=30_000)
    manifest = json.loads((source / "manifest.json").read_text())
    settings = load_settings(env={}, home=tmp_path / "home")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RPCWATCH_", "AIRFLOW"))}
    env = dict(airflow_env(settings, base=clean), RPCWATCH_MIN_TRAIN_HOURS="2", RPCWATCH_CRITICAL_COVERAGE="0.5")
    env["RPCWATCH_TRAIN_MAX_EPOCHS"] = "3"  # the test counts models; how well they forecast is not asked
    prepare_airflow(env, settings.airflow_pool)
    trained = []
    for i in range(HOURS):
        result = _run(env, source, START + timedelta(hours=i))
        trained.append(_models(settings))
    assert "nothing is stale this hour" in result.stdout + result.stderr
    assert trained[0] == 0 and trained[1] >= 1, trained
    assert trained[2] == trained[1], "unchanged traffic trains no model"
    with sqlite3.connect(settings.airflow_home / "airflow.db") as db:
        hour0 = db.execute(
            "SELECT map_index, state FROM task_instance WHERE task_id = 'train' AND run_id IN "
            "(SELECT run_id FROM dag_run WHERE logical_date = ?)",
            [START.strftime("%Y-%m-%d %H:%M:%S.%f")],
        ).fetchall()
    assert hour0 == [(-1, "skipped")], "hour 0: nothing to map, the train task is skipped"

    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        per_hour = dict(
            con.execute(
                "SELECT strftime(date_trunc('hour', ts), '%Y-%m-%dT%H:00'), count(*) FROM calls GROUP BY 1"
            ).fetchall()
        )
        series = con.execute("SELECT sum(calls) FROM rpc_series").fetchone()[0]
    last = f"{START + timedelta(hours=HOURS):%Y-%m-%dT%H:00}"
    expected = {h: n for h, n in manifest["rows_per_hour"].items() if h in per_hour or h < last}
    assert per_hour == expected
    assert series == sum(expected.values())
    before = _snapshot(settings)
    _run(env, source, START + timedelta(hours=HOURS - 1))
    assert _snapshot(settings) == before, "a rerun of the hour changes no table"
    assert _models(settings) == trained[-1], "nor trains a model"
    assert (settings.home / "analytics.duckdb").exists(), "the publish task published the analysts' snapshot"
    mlflow_db = settings.home / "mlflow.db"
    assert mlflow_db.exists() and (settings.home / "mlartifacts").is_dir()


@pytest.mark.airflow
def test_the_dag_trains_a_40_pattern_hour_through_shards(tmp_path):
    """A fleet of four shops (about 55 request types) through the DAG: hour 0 has too little
    history, hour 1 trains every critical pattern in `RPCWATCH_TRAIN_SHARDS` mapped tasks, each
    shard's forecasters stacked (`RPCWATCH_BATCH_TRAINING=on`, which a GPU gets by default)."""
    import sqlite3

    from tasks.synth.generate import generate

    source = tmp_path / "traces"
    generate(START, 2, source, seed=5, spans_per_hour=120_000, systems=4)
    settings = load_settings(env={}, home=tmp_path / "home")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RPCWATCH_", "AIRFLOW"))}
    scale = {"RPCWATCH_TRAIN_SHARDS": "3", "RPCWATCH_BATCH_TRAINING": "on", "RPCWATCH_TRAIN_MAX_EPOCHS": "3"}
    env = airflow_env(settings, base=clean) | scale | {"RPCWATCH_MIN_TRAIN_HOURS": "1.5"}
    env |= {"RPCWATCH_CRITICAL_COVERAGE": "1.0", "RPCWATCH_CRITICAL_MIN_CALLS_PER_HOUR": "0"}
    prepare_airflow(env, settings.airflow_pool)
    _run(env, source, START)
    result = _run(env, source, START + timedelta(hours=1))
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        models = con.execute("SELECT count(DISTINCT pattern_id), count(*) FROM models").fetchone()
        critical = con.execute("SELECT count(*) FROM patterns WHERE critical").fetchone()[0]
    assert models[0] == models[1] == critical >= 40, (models, critical)
    with sqlite3.connect(settings.airflow_home / "airflow.db") as db:
        # hour 0 mapped nothing (index -1, skipped); hour 1 one task per shard
        mapped = db.execute(
            "SELECT map_index, state FROM task_instance WHERE task_id = 'train' AND map_index >= 0"
        ).fetchall()
    assert sorted(mapped) == [(k, "success") for k in range(3)], "one task per shard, not one per pattern"
    assert result.stdout.count("(shard ") == critical, "every stale pattern is in one shard"
