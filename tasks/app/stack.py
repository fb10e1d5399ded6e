"""The local stack on one machine: `rpcwatch up` starts Airflow (scheduler, DAG processor, API server
with the rpcwatch view, triggerer) and an MLflow server on rpcwatch's home, `rpcwatch down` stops
them; `rpcwatch backfill` and `rpcwatch rerun` hand hours to its scheduler through the REST API.

Each component is a process group of its own, started detached with its log under `<home>/logs/`
and its PID under `<home>/run/`; `down` sends SIGINT to each group (Airflow's and MLflow's clean
shutdown), then SIGTERM, then SIGKILL to what is left, and checks that nothing of them remains.
Everything binds to the host of `RPCWATCH_AIRFLOW_URL` / `RPCWATCH_MLFLOW_URL` (127.0.0.1 by
default) and is sized for a small machine: one API worker, four task processes (tasks.app.airflow_env).
The triggerer runs although no rpcwatch task defers: Airflow's health (the UI's home page,
/api/v2/monitor/health) reports a stack without one as failed, and the team deployment runs one
too (docker-compose.yml); it idles, serving no logs of its own (no port: `--skip-serve-logs`).

`up --executor celery` (`make up EXECUTOR=celery`) runs the team deployment's executor on one machine:
the CeleryExecutor, Airflow's metadata in the PostgreSQL of `AIRFLOW__DATABASE__SQL_ALCHEMY_CONN`,
the Redis broker of `AIRFLOW__CELERY__BROKER_URL` (both started by whoever runs it; refused, saying
so, without them) and two Celery workers, one on the `default` queue, one on the `gpu` queue
(`train`), as docker-compose.yml runs them. `up` again restarts a worker that died."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from tasks.app.airflow_env import airflow_env, login_hint, prepare_airflow
from tasks.clock import hour_floor
from tasks.settings import Settings

DAG_ID = "rpcwatch_hourly"
RERUN_DAG_ID = "rpcwatch_rerun"  # the same tasks, never scheduled: reruns while DAG_ID is paused
PARAM_NAMES = ("force_ingest", "recluster", "force_retrain")  # the DAG's params, all booleans

EXECUTORS = ("local", "celery")
# (component, queue, concurrency): the Celery workers of `up --executor celery`, as docker-compose.yml
# runs them (the gpu worker one task at a time: one GPU)
CELERY_WORKERS = (("worker-default", "default", 2), ("worker-gpu", "gpu", 1))
# A task whose worker died (SIGKILL, OOM, a lost host) sends no more heartbeats; the scheduler fails
# its try after this long, and the task's retries run it again. Airflow's default is 300 s; task
# supervisors heartbeat every 5 s (`[workers] min_heartbeat_interval`): 60 s is 12 missed ones.
HEARTBEAT_TIMEOUT_S = "60"  # the same in docker-compose.yml

READY_TIMEOUT_S = 180  # the API server's first start migrates nothing (prepare_airflow did) but imports a lot
STOP_TIMEOUT_S = 30


@dataclass(frozen=True)
class Component:
    name: str
    argv: list[str]
    health_url: str | None = None  # answers 200 once the component serves


def _url_parts(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


def components(settings: Settings, env: dict[str, str], executor: str = "local") -> list[Component]:
    """What `up` starts, in order: Airflow's scheduler, DAG processor, API server and triggerer, the
    Celery workers (executor `celery`), then MLflow."""
    airflow = str(Path(sys.executable).with_name("airflow"))
    mlflow_host, mlflow_port = _url_parts(settings.mlflow_url, 5000)
    api = f"http://{env['AIRFLOW__API__HOST']}:{env['AIRFLOW__API__PORT']}"
    return [
        Component("scheduler", [airflow, "scheduler"]),
        Component("dag-processor", [airflow, "dag-processor"]),
        Component("api-server", [airflow, "api-server"], f"{api}/api/v2/monitor/health"),
        Component("triggerer", [airflow, "triggerer", "--skip-serve-logs"]),
        *(celery_workers(settings, airflow) if executor == "celery" else []),
        Component(
            "mlflow",
            [
                str(Path(sys.executable).with_name("mlflow")),
                "server",
                "--backend-store-uri",
                str(settings.mlflow_tracking_uri),
                "--artifacts-destination",
                str((settings.home / "mlartifacts").resolve()),
                "--host",
                mlflow_host,
                "--port",
                str(mlflow_port),
                "--workers",
                "1",
            ],
            f"http://{mlflow_host}:{mlflow_port}/health",
        ),
    ]


def celery_workers(settings: Settings, airflow: str) -> list[Component]:
    """The two Celery workers: a node name and a PID file each (two workers on one host and one
    AIRFLOW_HOME would clash on both), no log server (the API server reads task logs from this disk)."""
    return [
        Component(
            name,
            [airflow, "celery", "worker", "--queues", queue, "--concurrency", str(concurrency)]
            + ["--celery-hostname", f"{queue}@%h", "--pid", str(_run_dir(settings) / f"{name}.celery.pid")]
            + ["--skip-serve-logs"],
        )
        for name, queue, concurrency in CELERY_WORKERS
    ]


def stack_env(settings: Settings, executor: str = "local") -> dict[str, str]:
    """Airflow's environment for the stack: the API server on the host and port of `airflow_url`;
    with executor `celery`, the CeleryExecutor's (celery_env)."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor {executor!r}: one of {', '.join(EXECUTORS)}")
    host, port = _url_parts(settings.airflow_url, 8080)
    env = airflow_env(settings)
    env.setdefault("AIRFLOW__API__HOST", host)
    env["AIRFLOW__API__PORT"] = env.get("AIRFLOW__API__PORT") or str(port)
    env.setdefault("AIRFLOW__API__BASE_URL", f"http://{host}:{env['AIRFLOW__API__PORT']}")
    return celery_env(env) if executor == "celery" else env


def celery_env(env: dict[str, str]) -> dict[str, str]:
    """The CeleryExecutor on `env`: Airflow's db must be a server every worker reaches (not the
    embedded SQLite) and a broker must be named; ValueError saying what to set otherwise. Task
    processes on the workers reach the API server's Execution API; a dead worker's tasks are
    retried after HEARTBEAT_TIMEOUT_S."""
    conn = env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
    if conn.startswith("sqlite"):
        raise ValueError(
            "the Celery executor needs Airflow's metadata in PostgreSQL, which every worker reaches: "
            "set AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=postgresql+psycopg2://USER:PASSWORD@HOST:5432/airflow"
        )
    if not env.get("AIRFLOW__CELERY__BROKER_URL"):
        raise ValueError("the Celery executor needs a broker: set AIRFLOW__CELERY__BROKER_URL=redis://127.0.0.1:6379/0")
    env["AIRFLOW__CORE__EXECUTOR"] = "CeleryExecutor"  # asked for: wins over one in the environment
    env.setdefault("AIRFLOW__OPERATORS__DEFAULT_QUEUE", "default")
    env.setdefault("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", f"{env['AIRFLOW__API__BASE_URL']}/execution/")
    env.setdefault("AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT", HEARTBEAT_TIMEOUT_S)
    return env


def _run_dir(settings: Settings) -> Path:
    return settings.home / "run"


def _pid_file(settings: Settings, name: str) -> Path:
    return _run_dir(settings) / f"{name}.json"


def running(settings: Settings) -> dict[str, int]:
    """Component name -> PID (its process group) of what a previous `up` started and is alive."""
    alive = {}
    for path in sorted(_run_dir(settings).glob("*.json")):
        pid = int(json.loads(path.read_text())["pid"])
        if _group_alive(pid):
            alive[path.stem] = pid
    return alive


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode} before serving; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (our own local URL)
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not answer within {READY_TIMEOUT_S} s; see {log}")


def up(settings: Settings, say: Callable[[str], None] = print, executor: str = "local") -> dict[str, int]:
    """Start every component that is not running yet; wait until the servers answer; return PIDs."""
    from tasks.models.registry import relocate_artifacts

    env = stack_env(settings, executor)
    prepare_airflow(env, settings.airflow_pool, settings.writer_slots)
    relocate_artifacts(settings)  # a moved or copied home: its MLflow UI links its own artifacts
    already = running(settings)
    logs, run_dir = settings.home / "logs", _run_dir(settings)
    logs.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    started: dict[str, int] = dict(already)
    for c in components(settings, env, executor):
        if c.name in already:
            say(f"{c.name}: already running (pid {already[c.name]})")
            continue
        log = logs / f"{c.name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(c.argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _pid_file(settings, c.name).write_text(json.dumps({"pid": process.pid, "argv": c.argv}))
        started[c.name] = process.pid
        say(f"{c.name}: started (pid {process.pid}, log {log})")
        if c.health_url:
            _wait_healthy(c.health_url, process, log)
    say(login_hint(env))
    say(f"MLflow UI: {settings.mlflow_url}")
    say(f"rpcwatch view: {env['AIRFLOW__API__BASE_URL']}/rpcwatch/   stop everything with: make down")
    return started


def down(settings: Settings, say: Callable[[str], None] = print) -> list[str]:
    """Stop what `up` started: SIGINT to every process group at once, then SIGTERM, then SIGKILL to
    what is left; return the names of components that were still running."""
    groups = {}
    for path in sorted(_run_dir(settings).glob("*.json")):
        pid = int(json.loads(path.read_text())["pid"])
        if _group_alive(pid):
            groups[path.stem] = pid
    _stop_groups(list(groups.values()))
    for name, pid in groups.items():
        say(f"{name}: stopped (pid {pid})")
    for path in _run_dir(settings).glob("*.json"):
        path.unlink()
    if not groups:
        say("nothing was running")
    return list(groups)


def _stop_groups(pgids: list[int]) -> None:
    left = list(pgids)
    for sig, wait_s in ((signal.SIGINT, STOP_TIMEOUT_S), (signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        for pgid in left:
            with contextlib.suppress(ProcessLookupError):  # gone meanwhile
                os.killpg(pgid, sig)
        deadline = time.monotonic() + wait_s
        while left and time.monotonic() < deadline:
            left = [g for g in left if _group_alive(g)]
            time.sleep(0.2)
        if not left:
            return
    raise RuntimeError(f"process groups {left} survived SIGKILL")


def backfill(settings: Settings, first: datetime, last: datetime, say: Callable[[str], None] = print) -> None:
    """Ask the scheduler for the hours first..last (inclusive, by logical date = the hour processed),
    oldest first, one run at a time; runs already there are kept. Through the stack's REST API when
    it runs (its API server writes Airflow's db, so no second writer fights the scheduler for a
    SQLite lock), else with `airflow backfill create` on the db directly."""
    from tasks.app.airflow_env import airflow_cli

    first, last = hour_floor(first), hour_floor(last)
    if last < first:
        raise ValueError(f"backfill: --to {last:%Y-%m-%dT%H:00} is before --from {first:%Y-%m-%dT%H:00}")
    if running(settings).get("api-server"):
        body: dict[str, object] = {"dag_id": DAG_ID, "from_date": first.isoformat(), "to_date": last.isoformat()}
        body |= {"max_active_runs": 1, "reprocess_behavior": "none", "run_backwards": False}
        AirflowApi.of(settings).call("POST", "/api/v2/backfills", body, retries=5)
    else:
        env = stack_env(settings)
        prepare_airflow(env, settings.airflow_pool, settings.writer_slots)
        args = ["--dag-id", DAG_ID, "--from-date", first.isoformat(), "--to-date", last.isoformat()]
        airflow_cli(env, "backfill", "create", *args, "--max-active-runs", "1", "--reprocess-behavior", "none")
    hours = int((last - first).total_seconds() // 3600) + 1
    say(f"backfill of {hours} hour(s) {first:%Y-%m-%dT%H:00} .. {last:%Y-%m-%dT%H:00} handed to the scheduler")
    if not running(settings).get("scheduler"):
        say("no scheduler is running under this home: start one with `make up` (the DAG must be unpaused)")


@dataclass(frozen=True)
class Rerun:
    """What `rerun` did: the run that reprocesses the hour, and how: `cleared` (the hour's run, same
    params), `replaced` (the run deleted, then triggered anew with other params) or `triggered` (the
    hour had no run)."""

    dag_id: str
    run_id: str
    action: str
    url: str  # the run in Airflow's UI


def rerun(
    settings: Settings, hour: datetime, params: Collection[str] = (), say: Callable[[str], None] = print
) -> Rerun:
    """Rerun `hour` (the logical date, floored to the hour) under the scheduler with exactly `params`
    (names of PARAM_NAMES), through the stack's REST API; returns at once (see AirflowApi.wait_run).

    The hour's run is cleared when its params are those asked for, else deleted and triggered anew
    (Airflow keeps one run per logical date and never changes a run's conf); an hour without a run
    is triggered. A paused DAG runs nothing, cleared runs included, and unpausing it would also
    catch up every missing hour: while `rpcwatch_hourly` is paused the same happens in
    `rpcwatch_rerun` (the same tasks, never scheduled), and a note on the paused DAG's run for the
    hour names the rerun. Refused (ValueError, RuntimeError), saying why, for an hour outside the
    DAG's hours or not ended yet, and while the hour's run is running."""
    hour = hour_floor(hour)
    if unknown := sorted(set(params) - set(PARAM_NAMES)):
        raise ValueError(f"rerun: unknown params {unknown}; the DAG's are {', '.join(PARAM_NAMES)}")
    api = _reach(settings)
    hourly = _refusing(api, "GET", f"/api/v2/dags/{DAG_ID}/details", what=f"read {DAG_ID}")
    _check_hour(hourly, hour)
    dag_id = RERUN_DAG_ID if hourly["is_paused"] else DAG_ID
    if dag_id == RERUN_DAG_ID and _refusing(api, "GET", f"/api/v2/dags/{RERUN_DAG_ID}", what="read it")["is_paused"]:
        raise RuntimeError(
            f"{DAG_ID} is paused and so is {RERUN_DAG_ID}, which reruns its hours meanwhile: unpause "
            f"{RERUN_DAG_ID} (it is never scheduled, it runs only the hours you rerun) or {DAG_ID}"
        )
    done = _rerun_in(api, settings, dag_id, hour, frozenset(params))
    if dag_id == RERUN_DAG_ID:
        say(
            f"{DAG_ID} is paused (it runs nothing, and unpausing it would also catch up every missing hour): "
            f"hour {_shown(hour)} runs in {RERUN_DAG_ID}"
        )
    say(f"hour {_shown(hour)}: {done.action} run {done.run_id} of {done.dag_id}; the scheduler runs it")
    say(f"  {done.url}")
    if dag_id == RERUN_DAG_ID:
        _note_on_paused(api, hour, done, say)
    return done


def _rerun_in(api: AirflowApi, settings: Settings, dag_id: str, hour: datetime, params: frozenset[str]) -> Rerun:
    """Clear, replace or trigger the run of `dag_id` for `hour` (see rerun)."""
    existing = api.run_of(dag_id, hour)
    if existing is not None and existing["state"] == "running":
        raise RuntimeError(
            f"hour {_shown(hour)} is running now (run {existing['dag_run_id']} of {dag_id}): "
            "rerun it once it has finished"
        )
    if existing is not None and _params_of(existing) == params:
        run_id = existing["dag_run_id"]
        _refusing(api, "POST", f"{_run_path(dag_id, run_id)}/clear", {"dry_run": False}, what="clear it")
        return Rerun(dag_id, run_id, "cleared", _ui_url(settings, dag_id, run_id))
    if existing is not None:
        _refusing(api, "DELETE", _run_path(dag_id, existing["dag_run_id"]), what="replace it")
    body = {"logical_date": hour.isoformat(), "conf": dict.fromkeys(sorted(params), True)}
    run = _refusing(api, "POST", f"/api/v2/dags/{dag_id}/dagRuns", body, what="trigger it")
    action = "triggered" if existing is None else "replaced"
    return Rerun(dag_id, run["dag_run_id"], action, _ui_url(settings, dag_id, run["dag_run_id"]))


def _params_of(run: dict[str, Any]) -> frozenset[str]:
    """The DAG params a run was started with (those set true in its conf)."""
    conf = run.get("conf") or {}
    return frozenset(name for name in PARAM_NAMES if conf.get(name))


def _check_hour(details: dict[str, Any], hour: datetime) -> None:
    """ValueError unless `hour` is one of the DAG's hours (its start..end dates, the end included)
    and has ended, as the DAG's timetable refuses a trigger (plugins/rpcwatch_hour.py)."""
    first, last = (_parse_utc(details.get(key)) for key in ("start_date", "end_date"))
    if (first is not None and hour < first) or (last is not None and hour > last):
        hours = f"{_shown(first)} .. {_shown(last)}"
        raise ValueError(
            f"hour {_shown(hour)} is not one of {DAG_ID}'s hours {hours} "
            "(RPCWATCH_START .. RPCWATCH_END, the last included)"
        )
    if hour + timedelta(hours=1) > datetime.now(UTC):
        raise ValueError(f"hour {_shown(hour)} has not ended yet: its files are still arriving")


def _note_on_paused(api: AirflowApi, hour: datetime, done: Rerun, say: Callable[[str], None]) -> None:
    """Note on the paused DAG's own run for `hour` (if any) which run reran it."""
    own = api.run_of(DAG_ID, hour)
    if own is None:
        return
    note = f"rerun while {DAG_ID} was paused: {done.dag_id} run {done.run_id} ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)"
    _refusing(api, "PATCH", _run_path(DAG_ID, own["dag_run_id"]), {"note": note}, what="note the rerun")
    if own["state"] == "queued":
        say(
            f"  note: {DAG_ID}'s own run {own['dag_run_id']} is queued (cleared while paused): it runs again on unpause"
        )


def _run_path(dag_id: str, run_id: str) -> str:
    return f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}"


def _ui_url(settings: Settings, dag_id: str, run_id: str) -> str:
    return f"{settings.airflow_url.rstrip('/')}/dags/{dag_id}/runs/{quote(run_id, safe=':')}"


def _parse_utc(value: str | None) -> datetime | None:
    return None if not value else datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone(UTC)


def _shown(hour: datetime | None) -> str:
    return "(open)" if hour is None else f"{hour:%Y-%m-%dT%H:%M} UTC"


def _reach(settings: Settings) -> AirflowApi:
    """A logged-in client of the stack's REST API, or RuntimeError saying how to start one."""
    base = stack_env(settings)["AIRFLOW__API__BASE_URL"]
    try:
        return AirflowApi.of(settings)
    except FileNotFoundError as err:
        raise RuntimeError(
            f"no Airflow login under this home ({err.filename}): start the stack with `make up`"
        ) from err
    except (urllib.error.URLError, OSError) as err:
        why = getattr(err, "reason", err)
        raise RuntimeError(
            f"cannot reach Airflow's REST API at {base} ({why}): start the stack with `make up`"
        ) from err


def _refusing(api: AirflowApi, method: str, path: str, body: object = None, *, what: str) -> Any:
    """`api.call`, retried on server errors (SQLite busy for a moment); an HTTP error becomes a
    RuntimeError with Airflow's own reason (its `detail`)."""
    try:
        return api.call(method, path, body, retries=5)
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"Airflow refused to {what} ({err.code}): {_detail(err)}") from err


def _detail(err: urllib.error.HTTPError) -> str:
    """The `detail` of an error answer of Airflow's REST API (its reason), else the raw body."""
    raw = err.read().decode(errors="replace")
    try:
        detail = json.loads(raw).get("detail", raw)
    except (ValueError, AttributeError):
        return raw.strip()[:500]
    return detail if isinstance(detail, str) else json.dumps(detail)[:500]


class AirflowApi:
    """Airflow's REST API as a client uses it: a JWT from /auth/token (the stack's `admin`), then
    Bearer calls."""

    def __init__(self, base: str, password_file: Path, user: str = "admin") -> None:
        self.base = base.rstrip("/")
        password = json.loads(password_file.read_text())[user]
        token = self.call("POST", "/auth/token", {"username": user, "password": password}, auth=False)
        self.token = token["access_token"]

    @classmethod
    def of(cls, settings: Settings) -> AirflowApi:
        env = stack_env(settings)
        passwords = env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", "")
        return cls(env["AIRFLOW__API__BASE_URL"], Path(passwords))

    def call(self, method: str, path: str, body: object = None, auth: bool = True, retries: int = 0) -> Any:
        """One request; a server error (e.g. Airflow's SQLite db locked by the scheduler for a moment)
        is retried `retries` times, 2 s apart."""
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {self.token}"} if auth else {})
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(retries + 1):
            request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 (the stack's own URL)
                    payload = response.read()
                    return json.loads(payload) if payload else None
            except urllib.error.HTTPError as err:
                if err.code < 500 or attempt == retries:
                    raise
            time.sleep(2)
        raise AssertionError("unreachable")

    def runs(self, dag_id: str = DAG_ID) -> list[dict[str, Any]]:
        return list(self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns?order_by=logical_date&limit=1000")["dag_runs"])

    def run_of(self, dag_id: str, hour: datetime) -> dict[str, Any] | None:
        """The run of `dag_id` whose logical date is `hour` (at most one: Airflow keeps logical dates
        unique per DAG), or None."""
        query = urlencode({"logical_date_gte": hour.isoformat(), "logical_date_lte": hour.isoformat()})
        found = self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns?{query}")["dag_runs"]
        return found[0] if found else None

    def run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return dict(self.call("GET", _run_path(dag_id, run_id)))

    def wait_parsed(self, timeout_s: float = 180) -> None:
        """Until the DAG processor has parsed rpcwatch_hourly."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.call("GET", f"/api/v2/dags/{DAG_ID}")
                return
            except urllib.error.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)

    def unpause(self, paused: bool = False, dag_id: str = DAG_ID) -> None:
        self.call("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": paused})

    def wait_run(self, dag_id: str, run_id: str, timeout_s: float | None = None, poll_s: float = 3) -> dict[str, Any]:
        """Poll one run until it has finished (success or failed); returns it. TimeoutError after
        `timeout_s` (None: no limit)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while (run := self.run(dag_id, run_id))["state"] not in ("success", "failed"):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} of {dag_id} not finished in {timeout_s:.0f} s ({run['state']})")
            time.sleep(poll_s)
        return run

    def wait_for(
        self, logical_dates: list[str], timeout_s: float, finished: Callable[[dict[str, Any]], None] = lambda r: None
    ) -> list[dict[str, Any]]:
        """Poll until every run with these logical dates (ISO, `...Z`) has finished; `finished` is
        called once per run as it ends. Returns the runs, oldest first."""
        deadline, told = time.monotonic() + timeout_s, set()
        while True:
            runs = [r for r in self.runs() if r["logical_date"] in logical_dates]
            for r in runs:
                if r["state"] in ("success", "failed") and r["dag_run_id"] not in told:
                    told.add(r["dag_run_id"])
                    finished(r)
            if len(runs) == len(logical_dates) and len(told) == len(runs):
                return sorted(runs, key=lambda r: r["logical_date"])
            if time.monotonic() > deadline:
                raise TimeoutError(f"runs {logical_dates} not finished in {timeout_s:.0f} s")
            time.sleep(3)
