"""The Airflow UI view of anomalies: Airflow loads the plugin; the page reads the published snapshot."""

from __future__ import annotations

import importlib.util
import json
import os

from conftest import REPO, START, copy_home
from tasks.airflow_env import airflow_cli, airflow_env
from tasks.publish import publish
from tasks.scoring import score_hour


def _module():
    spec = importlib.util.spec_from_file_location("rpcwatch_anomalies", REPO / "plugins" / "rpcwatch_anomalies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_airflow_loads_the_plugin(settings):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RPCWATCH_", "AIRFLOW"))}
    env = airflow_env(settings, base=clean)
    out = airflow_cli(env, "plugins", "--output", "json").stdout
    plugins = json.loads(out[out.index("["):])
    [ours] = [p for p in plugins if p["name"] == "rpcwatch"]
    assert "rpcwatch anomalies" in json.dumps(ours)


def test_the_page_and_api_show_published_anomalies(trained, tmp_path, monkeypatch):
    from datetime import timedelta

    from fastapi.testclient import TestClient

    settings = copy_home(trained[0], tmp_path)
    score_hour(settings, START + timedelta(hours=3))
    publish(settings)
    monkeypatch.setenv("RPCWATCH_HOME", str(settings.home))
    client = TestClient(_module().app)
    page = client.get("/")
    assert page.status_code == 200 and "Incidents" in page.text and "Irregular points" in page.text
    rows = client.get("/api/anomalies").json()
    assert isinstance(rows, list) and all({"bucket", "kind", "score"} <= set(r) for r in rows)
