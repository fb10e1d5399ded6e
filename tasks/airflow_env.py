"""Environment for Airflow processes that run rpcwatch's DAGs on embedded defaults (no Airflow import)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from tasks.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def airflow_env(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """AIRFLOW_HOME under the rpcwatch home, SQLite metadata, this repo's dags/ and plugins/."""
    env = dict(os.environ if base is None else base)
    home = settings.airflow_home.resolve()
    env.setdefault("AIRFLOW_HOME", str(home))
    env.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))
    env.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(REPO / "plugins"))
    env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    env.setdefault("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", f"sqlite:///{home / 'airflow.db'}")
    env.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")
    env["RPCWATCH_HOME"] = str(settings.home.resolve())
    env["RPCWATCH_FORMAT"] = settings.format
    env["RPCWATCH_SPAN_MAPPING"] = settings.span_mapping
    if settings.trace_epoch is not None:
        env["RPCWATCH_TRACE_EPOCH"] = settings.trace_epoch.isoformat()
    if settings.source is not None:
        env["RPCWATCH_SOURCE"] = str(settings.source.resolve())
    return env


def airflow_cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run the `airflow` command of this environment (a subprocess: Airflow reads env at import)."""
    airflow = Path(sys.executable).with_name("airflow")
    result = subprocess.run([str(airflow), *args], env=env, capture_output=True, text=True)
    if check and result.returncode:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-25:])
        raise RuntimeError(f"`airflow {' '.join(args)}` failed (exit {result.returncode}):\n{tail}")
    return result


def prepare_airflow(env: dict[str, str], pool: str) -> None:
    """Create/upgrade Airflow's SQLite metadata db and the one-slot DuckDB writer pool."""
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    airflow_cli(env, "db", "migrate")
    airflow_cli(env, "pools", "set", pool, "1", "DuckDB allows one writer process per file")


def dag_test(env: dict[str, str], dag_id: str, logical_date: datetime) -> subprocess.CompletedProcess[str]:
    """`airflow dags test` one run; for an hourly interval DAG, logical date H+1h processes hour H."""
    return airflow_cli(env, "dags", "test", dag_id, logical_date.isoformat(), check=False)
