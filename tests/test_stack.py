"""The local stack as a team runs it, with the real scheduler: `make up`, a backfill of four hours
that leaves the same `anomalies` and `incidents` as four hours run one by one, an hour triggered
through the REST API, the authenticated view serving it, an alert reaching a receiver on 127.0.0.1,
and `make down` leaving no process behind. Slow (about 6 minutes on 2 cores): one stack for all."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from helpers import REPO, START, Receiver
from tasks.app.airflow_env import QUIET_LOGGERS
from tasks.app.stack import AirflowApi

pytestmark = pytest.mark.airflow

BACKFILLED = [START + timedelta(hours=h) for h in range(4)]
TRIGGERED = START + timedelta(hours=4)  # through the REST API, after the backfill
RUN_TIMEOUT_S = 900
RPCWATCH = str(REPO / ".venv" / "bin" / "rpcwatch")
ANOMALY_COLUMNS = "bucket_ts, pattern_id, node, feature, kind, direction, culprit, model_version"
ANOMALY_VALUES = "round(observed, 6), round(expected, 6), round(threshold, 6), round(score, 6)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _add_lateral_movement(source: Path, hour) -> None:
    """Five requests in which a service calls one it never called: a novel RPC in `hour`."""
    folder = source / f"dt={hour:%Y-%m-%d}" / f"hour={hour:%H}"
    rows = pd.read_parquet(next(folder.glob("*.parquet")))
    first = rows[rows.traceid == rows.traceid.iloc[0]]
    copies = []
    for i in range(5):
        copy = first.assign(traceid=f"lateral-{i}", timestamp=first.timestamp + 600_000 + i)
        leaf = copy.index[-1]
        copy.loc[leaf, ["dm", "dminstanceid", "interface"]] = ["svc-vault", "svc-vault_POD_0", "/admin/export"]
        copies.append(copy)
    pd.concat(copies).to_parquet(folder / "zz-lateral.parquet", index=False)


def _env(home: Path, source: Path, **extra: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RPCWATCH_", "AIRFLOW"))}
    return (
        clean
        | {
            "RPCWATCH_HOME": str(home),
            "RPCWATCH_SOURCE": str(source),
            "RPCWATCH_MIN_TRAIN_HOURS": "2",
            "RPCWATCH_CRITICAL_COVERAGE": "0.5",
        }
        | extra
    )


def _iso(hour) -> str:
    return hour.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture(scope="module")
def receiver():
    server = Receiver()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, receiver):
    """Five synthetic hours (a novel RPC in the last), `make up` on a fresh home; `make down` after."""
    from tasks.synth.generate import generate

    root = tmp_path_factory.mktemp("stack")
    source = root / "traces"
    generate(START, 5, source, seed=5, spans_per_hour=30_000, anomalies=True)
    for hour in (BACKFILLED[-1], TRIGGERED):
        _add_lateral_movement(source, hour)
    api_port = _free_port()
    env = _env(
        root / "home",
        source,
        RPCWATCH_START=_iso(START),
        RPCWATCH_END=_iso(TRIGGERED),
        RPCWATCH_CATCHUP="false",  # the test starts every run itself
        RPCWATCH_AIRFLOW_URL=f"http://127.0.0.1:{api_port}",
        RPCWATCH_MLFLOW_URL=f"http://127.0.0.1:{_free_port()}",
        RPCWATCH_ALERT_WEBHOOK=receiver.url(),
        RPCWATCH_ALERT_MIN_SCORE="0",
    )
    up = subprocess.run(["make", "up"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, (up.stdout + up.stderr)[-3000:]
    home = root / "home"
    pids = {p.stem: json.loads(p.read_text())["pid"] for p in (home / "run").glob("*.json")}
    try:
        api = AirflowApi(
            f"http://127.0.0.1:{api_port}", home / "airflow" / "simple_auth_manager_passwords.json.generated"
        )
        yield {"env": env, "home": home, "source": source, "root": root, "api": api, "pids": pids, "up": up.stdout}
    finally:
        subprocess.run(["make", "down"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _published(home: Path, table: str, columns: str) -> list[tuple]:
    with duckdb.connect(str(home / "analytics.duckdb"), read_only=True) as con:
        return con.execute(f"SELECT {columns} FROM {table} ORDER BY ALL").fetchall()


def _raw(api: AirflowApi, path: str) -> tuple[int, str, bytes]:
    request = urllib.request.Request(api.base + path, headers={"Authorization": f"Bearer {api.token}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


def test_make_up_says_where_to_click_and_how_to_log_in(stack):
    assert "Airflow UI: http://127.0.0.1:" in stack["up"] and "password: in" in stack["up"]
    assert "MLflow UI: http://127.0.0.1:" in stack["up"] and "/rpcwatch/" in stack["up"]
    assert set(stack["pids"]) == {"scheduler", "dag-processor", "api-server", "mlflow"}


def test_a_backfill_of_four_hours_equals_four_hours_run_one_by_one(stack, tmp_path):
    api, env = stack["api"], stack["env"]
    api.wait_parsed()
    backfill = subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "rpcwatch"),
            "backfill",
            "--from",
            _iso(BACKFILLED[0]),
            "--to",
            _iso(BACKFILLED[-1]),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert backfill.returncode == 0, backfill.stderr[-2000:]
    api.unpause()
    runs = api.wait_for([_iso(h) for h in BACKFILLED], RUN_TIMEOUT_S)
    assert [r["state"] for r in runs] == ["success"] * 4, runs
    assert [r["logical_date"] for r in api.runs()] == [_iso(h) for h in BACKFILLED], "no other run was started"
    assert all(r["run_type"] == "backfill" and r["data_interval_start"] == r["logical_date"] for r in runs)
    assert [r["logical_date"] for r in sorted(runs, key=lambda r: r["start_date"])] == [_iso(h) for h in BACKFILLED]

    one_by_one = tmp_path / "one-by-one"
    reference = _env(one_by_one, stack["source"])
    for hour in BACKFILLED:
        subprocess.run([RPCWATCH, "run", "--hour", _iso(hour)], env=reference, check=True)
    columns = f"{ANOMALY_COLUMNS}, {ANOMALY_VALUES}"
    backfilled = _published(stack["home"], "anomalies", columns)
    assert backfilled, "the backfilled hours hold irregular points"
    assert backfilled == _published(one_by_one, "anomalies", columns)
    forecast_columns = "pattern_id, bucket_ts, node, feature, round(expected, 6), round(lower, 6), round(upper, 6)"
    forecasts = _published(stack["home"], "forecasts", forecast_columns)
    assert len(forecasts) > 1000, "the models trained in the backfill scored its last hours"
    assert forecasts == _published(one_by_one, "forecasts", forecast_columns), "same models, same forecasts"
    incident_columns = "incident_id, start_ts, end_ts, patterns, nodes, round(peak_score, 6), kinds, points, culprits"
    assert _published(stack["home"], "incidents", incident_columns) == _published(
        one_by_one, "incidents", incident_columns
    )


def test_an_hour_triggered_through_the_rest_api_runs_under_the_scheduler_and_is_alerted(stack, receiver):
    api = stack["api"]
    run = api.call("POST", "/api/v2/dags/rpcwatch_hourly/dagRuns", {"logical_date": _iso(TRIGGERED)})
    assert run["data_interval_start"] == _iso(TRIGGERED), "the one hour rule: logical date H processes H"
    [finished] = api.wait_for([_iso(TRIGGERED)], RUN_TIMEOUT_S)
    assert finished["state"] == "success" and finished["run_type"] == "manual"
    novel = _published(stack["home"], "anomalies", "callee, interface, kind")
    assert ("svc-vault", "/admin/export", "novel_rpc") in novel, "the lateral movement landed as an anomaly"
    alerts = [p["text"] for p in receiver.posted]
    assert any("svc-vault" in text and "/rpcwatch/" in text for text in alerts), alerts


def _log_records(folder: Path) -> list[dict]:
    """The JSON lines of a task's log files (every attempt), as Airflow 3 writes them."""
    records = []
    for path in sorted(folder.glob("attempt=*.log")):
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                records.append({"event": line, "level": "?", "logger": "?"})
    return records


def _triggered_run(api: AirflowApi) -> dict:
    [run] = [r for r in api.runs() if r["logical_date"] == _iso(TRIGGERED)]
    return run


def test_the_triggered_hours_task_logs_say_what_each_stage_did(stack):
    """Every task's log holds rpcwatch's own lines at INFO, ending on its summary; libraries'
    INFO chatter (Great Expectations registering its docs, MLflow's table migrations) is not there,
    and nothing is filed as an error."""
    run = _triggered_run(stack["api"])
    folder = stack["home"] / "airflow" / "logs" / "dag_id=rpcwatch_hourly" / f"run_id={run['dag_run_id']}"
    for task in ("ingest", "validate", "aggregate", "patterns", "stale", "record", "score", "publish", "alert"):
        records = _log_records(folder / f"task_id={task}")
        ours = [r for r in records if r.get("logger") == "rpcwatch"]
        assert ours and all(r["level"] == "info" for r in ours), (task, records[-5:])
        chatter = [r for r in records if str(r.get("logger")).split(".")[0] in QUIET_LOGGERS and r["level"] == "info"]
        assert not chatter, (task, chatter[:3])
        errors = [r for r in records if r.get("level") == "error"]
        assert not errors, (task, errors)
    trainings = list((folder.parent).glob("run_id=backfill__*/task_id=train/**/attempt=*.log"))
    assert trainings, "the backfilled hours trained models"
    for path in trainings:  # MLflow's registry news ("Created version ...") is not filed as an error
        records = _log_records(path.parent)
        assert not [r for r in records if r.get("level") == "error"], (path, records[-5:])
        assert any(r.get("logger") == "rpcwatch" and " -> " in str(r.get("event")) for r in records), path
    score = [r["event"] for r in _log_records(folder / "task_id=score") if r.get("logger") == "rpcwatch"]
    assert "scored" in score[-1] and "incidents" in score[-1], score
    alert = [r["event"] for r in _log_records(folder / "task_id=alert") if r.get("logger") == "rpcwatch"]
    assert "posted" in alert[-1], alert


def test_the_published_assets_say_which_hour_they_hold(stack):
    """A downstream DAG scheduled on an rpcwatch Asset reads the hour (and the counts) in `extra`."""
    run = _triggered_run(stack["api"])
    events = stack["api"].call("GET", "/api/v2/assets/events?limit=100&order_by=-timestamp")["asset_events"]
    mine = {e["uri"]: e["extra"] for e in events if e.get("source_run_id") == run["dag_run_id"]}
    assert set(mine) == {
        "rpcwatch://registry/champions",
        "rpcwatch://warehouse/anomalies",
        "rpcwatch://analytics/snapshot",
    }
    assert all(extra["hour"].startswith(_iso(TRIGGERED)[:13]) for extra in mine.values()), mine
    anomalies = mine["rpcwatch://warehouse/anomalies"]
    assert anomalies["anomalies"] >= 1 and anomalies["incidents"] >= 1 and anomalies["scored"] >= 1, anomalies


def test_the_view_serves_the_triggered_hour_with_its_pictures_to_a_logged_in_user(stack):
    api = stack["api"]
    status, kind, body = _raw(api, "/rpcwatch/?since=all")
    assert status == 200 and "text/html" in kind and b"svc-vault" in body
    incidents = api.call("GET", "/rpcwatch/api/incidents?since=all&kind=novel_rpc")
    lateral = next(i for i in incidents if i["start"].startswith("2026-01-01T04"))
    for picture in ("graph.png", "forecast.png"):
        status, kind, body = _raw(api, f"/rpcwatch/incident/{lateral['incident_id']}/{picture}")
        assert status == 200 and kind == "image/png" and body.startswith(b"\x89PNG") and len(body) > 5_000
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(api.base + "/rpcwatch/api/anomalies", timeout=30)
    assert refused.value.code == 401, "no token, no anomalies"


def test_make_down_leaves_no_process(stack):
    down = subprocess.run(["make", "down"], cwd=REPO, env=stack["env"], capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stderr[-2000:]
    for pid in stack["pids"].values():
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # the component's whole process group is gone
    assert not list((stack["home"] / "run").glob("*.json"))
