"""The local stack as a team runs it, with the real scheduler: `make up`, a backfill of four hours
that leaves the same `anomalies` and `incidents` as four hours run one by one, an hour triggered
through the REST API, the authenticated view serving it, an alert reaching a receiver on 127.0.0.1,
Airflow healthy (triggerer included), run ids naming their hour, triggers outside the DAG's hours
refused, `rpcwatch rerun` of a finished hour (cleared, and while the DAG is paused) and `make down`
leaving no process behind. Slow (about 6 minutes on 2 cores): one stack for all."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote, urlencode

import duckdb
import pandas as pd
import pytest

from helpers import REPO, START, Receiver
from tasks.app.airflow_env import QUIET_LOGGERS
from tasks.app.stack import DAG_ID, RERUN_DAG_ID, AirflowApi

pytestmark = [pytest.mark.airflow, pytest.mark.slow]

BACKFILLED = [START + timedelta(hours=h) for h in range(4)]
TRIGGERED = START + timedelta(hours=4)  # through the REST API, after the backfill
RUN_TIMEOUT_S = 900
RPCWATCH = str(REPO / ".venv" / "bin" / "rpcwatch")
ANOMALY_COLUMNS = "bucket_ts, pattern_id, node, feature, kind, direction, culprit, model_version"
ANOMALY_VALUES = "round(observed, 6), round(expected, 6), round(threshold, 6), round(score, 6)"
HEALTH = ("metadatabase", "scheduler", "triggerer", "dag_processor")


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
    assert set(stack["pids"]) == {"scheduler", "dag-processor", "api-server", "triggerer", "mlflow"}


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

    # the reference: the same hours through `rpcwatch run`'s pipeline (tasks.pipeline.run_hour), in
    # this process (four more processes importing torch and MLflow cost half a minute on 2 cores)
    from tasks.pipeline import run_hour
    from tasks.settings import load_settings

    one_by_one = tmp_path / "one-by-one"
    reference = load_settings(env=_env(one_by_one, stack["source"]))
    for hour in BACKFILLED:
        run_hour(reference, hour, [stack["source"]])
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


def test_make_up_runs_the_triggerer_so_airflow_reports_every_component_healthy(stack):
    """The UI's home page shows Airflow's health; without a triggerer it shows a red cross."""
    api, deadline, health = stack["api"], time.monotonic() + 60, {}
    while time.monotonic() < deadline:
        health = api.call("GET", "/api/v2/monitor/health")
        if all(health[part]["status"] == "healthy" for part in HEALTH):
            break
        time.sleep(2)
    assert {part: health[part]["status"] for part in HEALTH} == dict.fromkeys(HEALTH, "healthy"), health


def test_run_ids_name_the_hour_they_process(stack):
    """A manual run through the REST API (and the scheduler's, see the next test) is named for its
    data hour, not for the time it may start (the hour's end)."""
    run = _triggered_run(stack["api"])
    assert run["dag_run_id"] == "manual__2026-01-01T04:00Z" and run["data_interval_start"] == _iso(TRIGGERED)


def test_the_timetable_names_scheduled_runs_for_their_hour(tmp_path):
    """What the scheduler calls to name a run (`timetable.generate_run_id`, as Airflow 3.3's
    scheduler does), on the DAG as the DAG processor parses it."""
    probe = f"""
import importlib.util, json, sys
sys.path.insert(0, r"{REPO / "dags"}"); sys.path.insert(0, r"{REPO / "plugins"}")
spec = importlib.util.spec_from_file_location("d", r"{REPO / "dags" / "rpcwatch_hourly.py"}")
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
from airflow.timetables.base import DataInterval
from airflow.utils.types import DagRunType
from pendulum import datetime
hour = DataInterval(datetime(2026, 1, 1, 8), datetime(2026, 1, 1, 9))
print(json.dumps([d.timetable.generate_run_id(run_type=DagRunType.SCHEDULED, run_after=hour.end, data_interval=hour)
                  for d in (module.hourly, module.rerun)]))
"""
    env = _env(tmp_path / "home", tmp_path / "traces", AIRFLOW_HOME=str(tmp_path / "airflow"))
    env |= {"AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins")}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["scheduled__2026-01-01T08:00Z"] * 2


def _refusal(api: AirflowApi, dag_id: str, body: dict) -> tuple[int, str]:
    with pytest.raises(urllib.error.HTTPError) as refused:
        api.call("POST", f"/api/v2/dags/{dag_id}/dagRuns", body)
    return refused.value.code, json.loads(refused.value.read())["detail"]


def test_a_trigger_that_is_not_one_of_the_dags_hours_is_refused_before_any_run_exists(stack):
    """The UI's Trigger dialog defaults to now: past RPCWATCH_END that made a run with no task that
    'succeeded' at once. Now the REST API (which the dialog calls) answers 400 with the reason."""
    api, env = stack["api"], stack["env"]
    before = {dag_id: api.runs(dag_id) for dag_id in (DAG_ID, RERUN_DAG_ID)}
    after_end = _iso(TRIGGERED + timedelta(hours=1))
    for dag_id in (DAG_ID, RERUN_DAG_ID):
        code, detail = _refusal(api, dag_id, {"logical_date": after_end})
        assert code == 400 and "no run for hour 2026-01-01T05:00 UTC" in detail, detail
        assert "2026-01-01T00:00 UTC .. 2026-01-01T04:00 UTC (RPCWATCH_START .. RPCWATCH_END" in detail, detail
    code, detail = _refusal(api, DAG_ID, {"logical_date": "2026-01-01T02:30:00Z"})
    assert code == 400 and "is not a whole hour" in detail, detail
    code, detail = _refusal(api, DAG_ID, {"logical_date": None})
    assert code == 400 and "needs a logical date" in detail, detail
    assert {dag_id: api.runs(dag_id) for dag_id in (DAG_ID, RERUN_DAG_ID)} == before, "no run was made"
    cli = subprocess.run([RPCWATCH, "rerun", "--hour", after_end], env=env, capture_output=True, text=True)
    assert cli.returncode == 2 and cli.stderr.startswith("rpcwatch: error: hour 2026-01-01T05:00 UTC is not one of")


def _xcom(api: AirflowApi, dag_id: str, run_id: str, task_id: str) -> dict:
    path = f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}/xcomEntries/return_value"
    return api.call("GET", f"{path}?deserialize=true")["value"]


def _rerun(env: dict, hour, *flags: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [RPCWATCH, "rerun", "--hour", _iso(hour), *flags, "--wait"],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done


def _hours_data(home: Path) -> dict[str, list[tuple]]:
    columns = f"{ANOMALY_COLUMNS}, {ANOMALY_VALUES}"
    incidents = "incident_id, start_ts, end_ts, patterns, nodes, round(peak_score, 6), kinds, points, culprits"
    return {"anomalies": _published(home, "anomalies", columns), "incidents": _published(home, "incidents", incidents)}


def test_rerun_of_a_finished_hour_clears_its_run_and_replaces_exactly_its_data(stack):
    """`rpcwatch rerun --hour H` (the README's rerun) clears the hour's run: the same run reruns
    every task under the scheduler and leaves the same rows (an unchanged file set is skipped)."""
    api, env = stack["api"], stack["env"]
    run, before = _triggered_run(api), _hours_data(stack["home"])
    done = _rerun(env, TRIGGERED)
    assert f"cleared run {run['dag_run_id']} of {DAG_ID}" in done.stdout and "success" in done.stdout, done.stdout
    again = _triggered_run(api)
    assert again["dag_run_id"] == run["dag_run_id"] and again["state"] == "success"
    assert again["end_date"] > run["end_date"], "the run ran again"
    assert _xcom(api, DAG_ID, run["dag_run_id"], "ingest")["skipped"] is True, "unchanged files: skipped"
    assert _hours_data(stack["home"]) == before


def test_rerun_while_paused_runs_the_hour_alone_in_rpcwatch_rerun(stack):
    """A paused DAG runs nothing, and unpausing it would catch up every missing hour: `rpcwatch
    rerun` runs the hour in `rpcwatch_rerun` (same tasks, params kept: here `force_ingest`) and
    leaves the paused DAG paused, with a note on its run for the hour."""
    api, env = stack["api"], stack["env"]
    api.unpause(paused=True)
    try:
        runs, before = api.runs(), _hours_data(stack["home"])
        done = _rerun(env, TRIGGERED, "--force-ingest")
        assert f"runs in {RERUN_DAG_ID}" in done.stdout and "success" in done.stdout, done.stdout
        [rerun] = api.runs(RERUN_DAG_ID)
        assert rerun["dag_run_id"] == "manual__2026-01-01T04:00Z" and rerun["state"] == "success"
        assert rerun["conf"] == {"force_ingest": True} and rerun["data_interval_start"] == _iso(TRIGGERED)
        assert _xcom(api, RERUN_DAG_ID, rerun["dag_run_id"], "ingest")["skipped"] is False, "forced: files re-read"
        assert api.call("GET", f"/api/v2/dags/{DAG_ID}")["is_paused"] is True
        now = api.runs()
        assert [(r["dag_run_id"], r["state"]) for r in now] == [(r["dag_run_id"], r["state"]) for r in runs]
        assert RERUN_DAG_ID in (_triggered_run(api)["note"] or ""), "the paused DAG's run names its rerun"
        assert _hours_data(stack["home"]) == before
    finally:
        api.unpause()


def _decide(api: AirflowApi, path: str, form: dict[str, str]) -> dict:
    """A decision posted to the view as its form does (a logged-in user, here with a Bearer token)."""
    request = urllib.request.Request(
        api.base + path,
        data=urlencode(form).encode(),
        headers={"Authorization": f"Bearer {api.token}", "Content-Type": "application/x-www-form-urlencoded"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _add_flood(source: Path, hour, traces: int = 400, copies: int = 4) -> None:
    """`copies` more of `traces` of the hour's requests, squeezed into 04:20-04:25: a traffic spike in
    the patterns they belong to (new trace ids: no duplicate rows)."""
    folder = source / f"dt={hour:%Y-%m-%d}" / f"hour={hour:%H}"
    rows = pd.concat(pd.read_parquet(f) for f in sorted(folder.glob("*.parquet")) if not f.name.startswith("zz-"))
    base = int(rows.timestamp.min())
    ids = list(rows.traceid.drop_duplicates().iloc[:traces])
    picked = rows[rows.traceid.isin(ids)]
    rank = picked.traceid.map({t: i for i, t in enumerate(ids)})
    shifted = picked.timestamp - picked.groupby("traceid").timestamp.transform("min") + base + 20 * 60_000
    flood = [
        picked.assign(traceid=picked.traceid + f"-flood{c}", timestamp=shifted + (rank * 300_000) // traces + c)
        for c in range(copies)
    ]
    pd.concat(flood).to_parquet(folder / "zz-flood.parquet", index=False)


def test_an_operator_marks_an_incident_false_in_the_view_and_the_mark_holds(stack, receiver):
    """The operator's loop on the running stack. A flood lands in the triggered hour (files re-read:
    `rpcwatch rerun --force-ingest`); one of its pattern incidents is acknowledged and marked false
    positive in the view (the real API server, its login); its hour is rescored again: the incident
    keeps its id and its mark, its alert is held back (the task log says why), and the next retrain
    of its pattern leaves its period out."""
    from tasks.models.retrain import plan_training
    from tasks.settings import load_settings

    api, env, home = stack["api"], stack["env"], stack["home"]
    _add_flood(stack["source"], TRIGGERED)
    _rerun(env, TRIGGERED, "--force-ingest")
    incidents = api.call("GET", "/rpcwatch/api/incidents?since=all&limit=1000")
    ours = [i for i in incidents if i["patterns"] and i["start"].startswith(f"{TRIGGERED:%Y-%m-%dT%H}")]
    assert ours, incidents
    chosen = max(ours, key=lambda i: (i["points"], i["incident_id"]))
    incident_id, pattern = chosen["incident_id"], chosen["patterns"][0]
    page = f"/rpcwatch/incident/{incident_id}"
    assert "acknowledged by admin" in _decide(api, f"{page}/ack", {"note": "looking"})["said"]
    said = _decide(api, f"{page}/mark", {"mark": "false_positive", "note": "a load test"})["said"]
    assert said.startswith("marked false_positive by admin"), said
    status, _, body = _raw(api, page)
    assert status == 200 and b"acked by admin" in body and b"false positive (admin)" in body

    # as if its alert had not gone out yet (the webhook was down then): the rerun's alert step decides
    with duckdb.connect(str(home / "warehouse.duckdb")) as con:
        con.execute("DELETE FROM alerts_sent WHERE incident_id = ?", [incident_id])
    posted = len(receiver.posted)
    _rerun(env, TRIGGERED, "--force-ingest")
    after = {i["incident_id"]: i for i in api.call("GET", "/rpcwatch/api/incidents?since=all&limit=1000")}
    assert incident_id in after and after[incident_id]["start"] == chosen["start"], "rescored, same id"
    status, _, body = _raw(api, page)
    assert b"false positive (admin)" in body, "the mark survives the rescoring"
    assert not any(incident_id in json.dumps(p) for p in receiver.posted[posted:]), "no alert about it"
    run = _triggered_run(api)
    folder = home / "airflow" / "logs" / f"dag_id={DAG_ID}" / f"run_id={run['dag_run_id']}" / "task_id=alert"
    said_in_log = [str(r.get("event")) for r in _log_records(folder)]
    assert f"not posting incident {incident_id}: marked false_positive by admin" in said_in_log, said_in_log[-5:]

    [job] = plan_training(load_settings(env=env), TRIGGERED + timedelta(hours=1), force=True, patterns=[pattern])
    excluded = json.loads(job.meta_path.read_text())["excluded"]
    start, end = pd.Timestamp(chosen["start"]).tz_localize(None), pd.Timestamp(chosen["end"]).tz_localize(None)
    assert any(pd.Timestamp(lo) <= start and pd.Timestamp(hi) >= end for lo, hi in excluded), excluded


def test_make_down_leaves_no_process(stack):
    down = subprocess.run(["make", "down"], cwd=REPO, env=stack["env"], capture_output=True, text=True, timeout=300)
    assert down.returncode == 0, down.stderr[-2000:]
    for pid in stack["pids"].values():
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)  # the component's whole process group is gone
    assert not list((stack["home"] / "run").glob("*.json"))
