"""One ordered list of stages (tasks.pipeline) that `rpcwatch run` and the hourly DAG both follow."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import duckdb

from helpers import REPO, START
from tasks.publish import analytics_path

STAGES = ["ingest", "validate", "aggregate", "patterns", "stale", "train", "record", "score", "publish", "alert"]


def test_the_stage_list_ends_with_publish():
    from tasks import pipeline

    assert [s.name for s in pipeline.STAGES] == STAGES
    assert [s.name for s in pipeline.STAGES if s.mapped] == ["train"], "train runs once per stale pattern"


def test_run_hour_publishes_the_analysts_snapshot(settings, synth_source):
    from tasks.pipeline import run_hour

    source, manifest = synth_source
    report = run_hour(settings, START, [source])
    assert list(report) == STAGES
    assert report["ingest"]["rows_kept"] == manifest["rows_per_hour"]["2026-01-01T00:00"]
    assert report["publish"]["path"] == str(analytics_path(settings))
    with duckdb.connect(str(analytics_path(settings)), read_only=True) as con:
        assert con.execute("SELECT sum(rows_kept) FROM ingest_log").fetchone()[0] == report["ingest"]["rows_kept"]
        assert con.execute("SELECT count(*) FROM published").fetchone()[0] == 1
    assert not list(settings.home.glob(".analytics-*"))


def test_the_dag_tasks_are_the_pipeline_stages_in_order(tmp_path):
    """Parse the DAG file (no Airflow metadata db needed) and walk its tasks from the root."""
    probe = f"""
import importlib.util, json, sys
sys.path.insert(0, r"{REPO / "dags"}")  # as Airflow's DAG processor puts the DAG folder on sys.path
spec = importlib.util.spec_from_file_location("d", r"{REPO / "dags" / "rpcwatch_hourly.py"}")
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
d = module.hourly
print(json.dumps({{t.task_id: sorted(t.downstream_task_ids) for t in d.tasks}}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RPCWATCH_", "AIRFLOW"))}
    env.update(AIRFLOW_HOME=str(tmp_path / "airflow"), AIRFLOW__CORE__LOAD_EXAMPLES="False")
    env.update(AIRFLOW__CORE__PLUGINS_FOLDER=str(REPO / "plugins"))  # the HourTimetable
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    downstream = json.loads(out.stdout.strip().splitlines()[-1])
    order, current = [], "ingest"
    while current:
        order.append(current)
        nxt = downstream.pop(current)
        assert len(nxt) <= 1, f"{current} fans out: {nxt}"
        current = nxt[0] if nxt else None
    assert order == STAGES and not downstream, (order, downstream)
