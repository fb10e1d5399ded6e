"""The Airflow UI view of anomalies: Airflow loads the plugin; the page reads the published snapshot."""

from __future__ import annotations

import importlib.util
import json
import os
import re

from helpers import REPO, START, add_anomaly, copy_home
from tasks.app.airflow_env import airflow_cli, airflow_env
from tasks.publish import publish
from tasks.scoring.score import score_hour


def _module():
    spec = importlib.util.spec_from_file_location("rpcwatch_anomalies", REPO / "plugins" / "rpcwatch_anomalies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_airflow_loads_the_plugin(settings):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RPCWATCH_", "AIRFLOW"))}
    env = airflow_env(settings, base=clean)
    out = airflow_cli(env, "plugins", "--output", "json").stdout
    plugins = json.loads(out[out.index("[") :])
    [ours] = [p for p in plugins if p["name"] == "rpcwatch"]
    assert "rpcwatch anomalies" in json.dumps(ours)


def test_the_page_and_api_show_published_anomalies(trained, tmp_path, monkeypatch):
    from datetime import timedelta

    from fastapi.testclient import TestClient

    settings = copy_home(trained[0], tmp_path)
    score_hour(settings, START + timedelta(hours=3))
    # a known irregular point after whatever scoring found: the newest row the page and the API show
    add_anomaly(settings, START.replace(tzinfo=None) + timedelta(hours=3, minutes=59), caller="svc-known")
    publish(settings)
    monkeypatch.setenv("RPCWATCH_HOME", str(settings.home))
    module = _module()
    # Airflow's real login is checked over HTTP in test_plugin_auth.py; here the access check is
    # replaced so that the page itself can be tested without an API server.
    module.app.dependency_overrides[module.require_read_access] = lambda: None
    client = TestClient(module.app, raise_server_exceptions=False)
    page = client.get("/")
    assert page.status_code == 200 and "Incidents" in page.text and "Irregular points" in page.text
    assert "svc-known" in page.text
    assert "suspects" in page.text and "evidence" in page.text, "incidents name their suspects and evidence"
    rows = client.get("/api/anomalies").json()
    assert isinstance(rows, list) and rows, "the known point is published"
    assert all({"bucket", "kind", "score"} <= set(r) for r in rows)
    assert (rows[0]["bucket"], rows[0]["caller"], rows[0]["kind"]) == ("2026-01-01 03:59", "svc-known", "traffic_spike")
    for route in ("/", "/api/anomalies"):
        for limit in (-1, 0):
            reply = client.get(route, params={"limit": limit})
            assert reply.status_code == 422, (route, limit, reply.status_code, reply.text[:200])


def test_every_route_requires_a_login():
    """Without a token (header or the UI's `_token` cookie) every route, docs included, answers 401."""
    from fastapi.testclient import TestClient

    client = TestClient(_module().app, raise_server_exceptions=False)
    for route in ("/", "/api/anomalies", "/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect"):
        reply = client.get(route, follow_redirects=False)
        assert reply.status_code in (401, 404), (route, reply.status_code, reply.text[:200])
        if route in ("/", "/api/anomalies", "/docs", "/openapi.json"):
            assert reply.status_code == 401, (route, reply.status_code)


def test_access_is_checked_on_the_pipeline_dag():
    """Read access to the anomalies is read access to the DAG that produces them."""
    module = _module()
    dag_ids = set(
        re.findall(r"""dag_id\s*=\s*["']([^"']+)["']""", (REPO / "dags").joinpath("rpcwatch_hourly.py").read_text())
    )
    assert module.DAG_ID in dag_ids


def test_airflow_home_outside_the_rpcwatch_home(settings, tmp_path):
    """An explicitly set AIRFLOW_HOME elsewhere is used for everything Airflow keeps (db, passwords)."""
    from tasks.app.airflow_env import prepare_airflow

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RPCWATCH_", "AIRFLOW"))}
    elsewhere = tmp_path / "elsewhere" / "airflow"
    env = airflow_env(settings, base={**clean, "AIRFLOW_HOME": str(elsewhere)})
    assert env["AIRFLOW_HOME"] == str(elsewhere)
    assert str(elsewhere) in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    prepare_airflow(env, settings.airflow_pool)
    assert (elsewhere / "airflow.db").exists()
    assert not settings.airflow_home.exists()


def test_relative_airflow_home_is_made_absolute(settings, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = airflow_env(settings, base={"AIRFLOW_HOME": "af"})
    assert env["AIRFLOW_HOME"] == str(tmp_path / "af")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == f"sqlite:///{tmp_path / 'af' / 'airflow.db'}"


def test_local_airflow_is_bound_to_localhost_with_a_login(settings):
    """`rpcwatch airflow standalone`: 127.0.0.1, one API worker, a real login (no all-admins)."""
    env = airflow_env(settings, base={})
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1"
    assert env["AIRFLOW__API__WORKERS"] == "1"
    assert int(env["AIRFLOW__CORE__PARALLELISM"]) <= 4
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] == "False"
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == "admin:admin"
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"].startswith(env["AIRFLOW_HOME"])


def test_make_airflow_says_how_to_log_in(settings, tmp_path, capsys):
    """prepare_airflow (run by `rpcwatch airflow ...`) prints the user name and the password file."""
    from tasks.app.airflow_env import prepare_airflow

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RPCWATCH_", "AIRFLOW"))}
    env = airflow_env(settings, base=clean)
    prepare_airflow(env, settings.airflow_pool)
    out = capsys.readouterr()
    said = out.out + out.err
    assert "admin" in said and env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] in said
    assert "http://127.0.0.1:8080" in said
