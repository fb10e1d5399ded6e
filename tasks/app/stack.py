"""The local stack on one machine: `rpcwatch up` starts Airflow (scheduler, DAG processor, API server
with the rpcwatch view) and an MLflow server on rpcwatch's home, `rpcwatch down` stops them.

Each component is a process group of its own, started detached with its log under `<home>/logs/`
and its PID under `<home>/run/`; `down` sends SIGINT to each group (Airflow's and MLflow's clean
shutdown), then SIGTERM, then SIGKILL to what is left, and checks that nothing of them remains.
Everything binds to the host of `RPCWATCH_AIRFLOW_URL` / `RPCWATCH_MLFLOW_URL` (127.0.0.1 by
default) and is sized for a small machine: one API worker, four task processes (tasks.app.airflow_env).
No triggerer: no rpcwatch task defers."""

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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tasks.app.airflow_env import airflow_env, login_hint, prepare_airflow
from tasks.clock import hour_floor
from tasks.settings import Settings

DAG_ID = "rpcwatch_hourly"

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


def components(settings: Settings, env: dict[str, str]) -> list[Component]:
    """What `up` starts, in order: Airflow's scheduler, DAG processor and API server, then MLflow."""
    airflow = str(Path(sys.executable).with_name("airflow"))
    mlflow_host, mlflow_port = _url_parts(settings.mlflow_url, 5000)
    api = f"http://{env['AIRFLOW__API__HOST']}:{env['AIRFLOW__API__PORT']}"
    return [
        Component("scheduler", [airflow, "scheduler"]),
        Component("dag-processor", [airflow, "dag-processor"]),
        Component("api-server", [airflow, "api-server"], f"{api}/api/v2/monitor/health"),
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


def stack_env(settings: Settings) -> dict[str, str]:
    """Airflow's environment for the stack: the API server on the host and port of `airflow_url`."""
    host, port = _url_parts(settings.airflow_url, 8080)
    env = airflow_env(settings)
    env.setdefault("AIRFLOW__API__HOST", host)
    env["AIRFLOW__API__PORT"] = env.get("AIRFLOW__API__PORT") or str(port)
    env.setdefault("AIRFLOW__API__BASE_URL", f"http://{host}:{env['AIRFLOW__API__PORT']}")
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


def up(settings: Settings, say: Callable[[str], None] = print) -> dict[str, int]:
    """Start every component that is not running yet; wait until the servers answer; return PIDs."""
    from tasks.models.registry import relocate_artifacts

    env = stack_env(settings)
    prepare_airflow(env, settings.airflow_pool, settings.writer_slots)
    relocate_artifacts(settings)  # a moved or copied home: its MLflow UI links its own artifacts
    already = running(settings)
    logs, run_dir = settings.home / "logs", _run_dir(settings)
    logs.mkdir(parents=True, exist_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    started: dict[str, int] = dict(already)
    for c in components(settings, env):
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
                    return json.load(response)
            except urllib.error.HTTPError as err:
                if err.code < 500 or attempt == retries:
                    raise
            time.sleep(2)
        raise AssertionError("unreachable")

    def runs(self) -> list[dict[str, Any]]:
        return list(self.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns?order_by=logical_date&limit=1000")["dag_runs"])

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

    def unpause(self, paused: bool = False) -> None:
        self.call("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": paused})

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
