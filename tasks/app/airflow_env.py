"""Environment for Airflow processes that run rpcwatch's DAGs on embedded defaults (no Airflow import).

No rpcwatch table: `prepare_airflow` creates or upgrades Airflow's own metadata db (by default
SQLite under the rpcwatch home) and its DuckDB writer pool, through the `airflow` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from tasks.settings import Settings

REPO = Path(__file__).resolve().parents[2]  # tasks/app/airflow_env.py -> the repository


SIMPLE_AUTH_MANAGER = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
# libraries whose INFO lines say nothing an operator acts on (docs registration, temporary folders,
# table creation, HTTP requests): at WARNING in task logs
QUIET_LOGGERS = ("great_expectations", "alembic", "sqlalchemy", "mlflow", "httpx", "urllib3", "filelock", "fsspec")


def quiet_libraries() -> None:
    """Set the libraries' loggers to WARNING in this process. Airflow's `namespace_levels` (set
    too, for its own processes) filters its structlog loggers; a task's stdlib loggers pass it."""
    import logging

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def airflow_env(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """AIRFLOW_HOME under the rpcwatch home, SQLite metadata, this repo's dags/ and plugins/.

    An AIRFLOW_HOME set in the environment is used instead (made absolute); the SQLite db and the
    login's password file then live there too, and a `sql_alchemy_conn` in its airflow.cfg is kept.
    The API server binds to 127.0.0.1 with one worker and asks for a login (user `admin`, password
    generated into the passwords file, see login_hint); any AIRFLOW__* set in the environment wins.
    """
    env = dict(os.environ if base is None else base)
    explicit = env.get("AIRFLOW_HOME", "").strip()
    home = Path(explicit).expanduser().absolute() if explicit else settings.airflow_home.resolve()
    if home.exists() and not home.is_dir():
        raise ValueError(
            f"AIRFLOW_HOME={explicit or home} is not a folder (unset AIRFLOW_HOME to use {settings.airflow_home})"
        )
    env["AIRFLOW_HOME"] = str(home)
    env.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))
    env.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(REPO / "plugins"))
    env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    if not (explicit and _in_airflow_cfg(home, "database", "sql_alchemy_conn")):
        env.setdefault("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{home / 'airflow.db'}")
    # task logs at INFO: every stage says what it did and ends on a summary line (a logger,
    # `rpcwatch`); libraries' chatter at WARNING; MLflow's lines through Airflow's handlers at their
    # own level (MLflow's own handler writes to stderr, which a task log files as ERROR)
    env.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO")
    env.setdefault("AIRFLOW__LOGGING__NAMESPACE_LEVELS", " ".join(f"{name}=WARNING" for name in QUIET_LOGGERS))
    env.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bar redraws in task logs help nobody
    # `airflow standalone` / `airflow api-server` on a dev machine: loopback only, one API worker,
    # 4 LocalExecutor processes (Airflow's defaults: 0.0.0.0, 4 API workers, 32 task processes forked
    # at once; the DAG's tasks queue on a one-slot pool anyway), and a real login, not all-admins.
    env.setdefault("AIRFLOW__API__HOST", "127.0.0.1")
    env.setdefault("AIRFLOW__API__WORKERS", "1")
    env.setdefault("AIRFLOW__CORE__PARALLELISM", "4")
    env.setdefault("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "admin:admin")
    env.setdefault("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")
    env.setdefault(
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(home / "simple_auth_manager_passwords.json.generated")
    )
    # `airflow standalone` starts its components as plain `airflow ...`: make that this venv's.
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = os.pathsep.join(p for p in (bindir, env.get("PATH", "")) if p)
    env["RPCWATCH_HOME"] = str(settings.home.resolve())
    env["RPCWATCH_FORMAT"] = settings.format
    env["RPCWATCH_SPAN_MAPPING"] = settings.span_mapping
    if settings.trace_epoch is not None:
        env["RPCWATCH_TRACE_EPOCH"] = settings.trace_epoch.isoformat()
    if settings.source is not None:
        env["RPCWATCH_SOURCE"] = str(settings.source.resolve())
    # what the DAG file reads when parsed: its schedule, and where the stack listens
    env["RPCWATCH_START"] = settings.start.isoformat()
    if settings.end is not None:
        env["RPCWATCH_END"] = settings.end.isoformat()
    env["RPCWATCH_CATCHUP"] = str(settings.catchup).lower()
    env["RPCWATCH_AIRFLOW_URL"], env["RPCWATCH_MLFLOW_URL"] = settings.airflow_url, settings.mlflow_url
    return env


def _in_airflow_cfg(home: Path, section: str, key: str) -> bool:
    """Whether the airflow.cfg in `home` sets `key` in `section` (an existing Airflow home's own db)."""
    import configparser

    cfg = home / "airflow.cfg"
    if not cfg.is_file():
        return False
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read(cfg)
    except configparser.Error:
        return False
    return bool(parser.get(section, key, fallback="").strip())


def _is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "1", "yes", "on")


def login_hint(env: dict[str, str]) -> str:
    """How to reach and log in to the Airflow UI that this environment starts."""
    host = env.get("AIRFLOW__API__HOST", "0.0.0.0")
    port = env.get("AIRFLOW__API__PORT", "8080")
    url = f"http://{'localhost' if host in ('0.0.0.0', '::', '') else host}:{port}/"
    manager = env.get("AIRFLOW__CORE__AUTH_MANAGER", SIMPLE_AUTH_MANAGER)
    if manager != SIMPLE_AUTH_MANAGER:
        return f"Airflow UI: {url} (log in with your {manager.rsplit('.', 1)[-1]} account)"
    if _is_true(env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS")):
        return f"Airflow UI: {url} (no login: AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS makes everyone admin)"
    users = [
        u.split(":")[0] for u in env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "admin:admin").split(",") if u
    ]
    passwords = env.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE") or str(
        Path(env["AIRFLOW_HOME"]) / "simple_auth_manager_passwords.json.generated"
    )
    when = "" if Path(passwords).exists() else " (Airflow writes it on its first start)"
    return (
        f"Airflow UI: {url}  user: {', '.join(users)}  password: in {passwords}{when}\n  show it with: cat {passwords}"
    )


def airflow_cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the `airflow` command of this environment (a subprocess: Airflow reads env at import)."""
    airflow = Path(sys.executable).with_name("airflow")
    result = subprocess.run([str(airflow), *args], env=env, capture_output=True, text=True)
    if check and result.returncode:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-25:])
        raise RuntimeError(f"`airflow {' '.join(args)}` failed (exit {result.returncode}):\n{tail}")
    return result


def prepare_airflow(env: dict[str, str], pool: str, slots: int = 1) -> None:
    """Create/upgrade Airflow's metadata db and the DuckDB writer pool (one slot on the embedded file,
    `Settings.writer_slots` on a lake); say how to log in. Skipped (12 s saved per call) when this
    Airflow version already prepared this db and pool."""
    home = Path(env["AIRFLOW_HOME"])
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(
            f"AIRFLOW_HOME={home} cannot be created ({exc}); set AIRFLOW_HOME to a writable folder or unset it"
        ) from exc
    stamp, wanted = home / PREPARED_STAMP, _prepared_marker(env, pool, slots)
    if not (_db_exists(env) and stamp.is_file() and stamp.read_text() == wanted):
        airflow_cli(env, "db", "migrate")
        why = "DuckDB allows one writer process per file" if slots == 1 else "writers of the shared DuckLake warehouse"
        airflow_cli(env, "pools", "set", pool, str(slots), why)
        stamp.write_text(wanted)
    print(login_hint(env), file=sys.stderr, flush=True)


PREPARED_STAMP = ".rpcwatch-prepared"


def _prepared_marker(env: dict[str, str], pool: str, slots: int = 1) -> str:
    """What a prepared metadata db is prepared for: Airflow's version, the db, the pool (and its size)."""
    from importlib.metadata import version

    conn = env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "airflow.cfg")
    sized = pool if slots == 1 else f"{pool}:{slots}"  # a one-slot pool's marker as before: no new migrate
    return json.dumps({"airflow": version("apache-airflow"), "db": conn, "pool": sized})


def _db_exists(env: dict[str, str]) -> bool:
    """A SQLite metadata db must still be there; another database is taken as present (a server's
    db is not deleted under a stamp; `airflow db migrate` is idempotent anyway)."""
    conn = env.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
    if conn.startswith("sqlite:///"):
        return Path(conn.removeprefix("sqlite:///")).is_file()
    return True


def dag_test(env: dict[str, str], dag_id: str, logical_date: datetime) -> subprocess.CompletedProcess[str]:
    """`airflow dags test` one run: logical date H processes hour [H, H+1) (plugins/rpcwatch_hour.py)."""
    return airflow_cli(env, "dags", "test", dag_id, logical_date.isoformat(), check=False)
