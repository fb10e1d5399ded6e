"""Commands that run bigger things: `demo` (synthetic hours through the Airflow DAG, then the
report; writes everything the pipeline writes), `airflow` (the Airflow CLI on rpcwatch's home), and
`up` / `down` (the local stack: Airflow and MLflow servers, tasks.app.stack)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tasks.app.commands.common import AddParser, add_common_options, settings_from


def cmd_demo(args: argparse.Namespace) -> int:
    from tasks.app.demo import run_demo

    return run_demo(settings_from(args), hours=args.hours, spans_per_hour=args.spans_per_hour, seed=args.seed)


def cmd_airflow(args: argparse.Namespace) -> int:
    """Run the `airflow` CLI with rpcwatch's embedded defaults (AIRFLOW_HOME under the home)."""
    from tasks.app.airflow_env import airflow_env, prepare_airflow

    settings = settings_from(args)
    env = airflow_env(settings)
    prepare_airflow(env, settings.airflow_pool, settings.writer_slots)
    airflow = Path(sys.executable).with_name("airflow")
    os.execve(airflow, [str(airflow), *args.airflow_args], env)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from tasks.app.stack import up

    up(settings_from(args), executor=args.executor)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from tasks.app.stack import down

    down(settings_from(args))
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    from tasks.app.stack import backfill
    from tasks.settings import parse_utc

    backfill(settings_from(args), parse_utc(args.first), parse_utc(args.last))
    return 0


def register(add_parser: AddParser) -> None:
    """demo, airflow, up and down, in this order."""
    p = add_parser(
        "demo",
        help="synthetic hours with injected anomalies through the Airflow DAG, then incidents and the evaluation",
    )
    add_common_options(p, hour=False)
    p.add_argument("--hours", type=int, default=10, help="synthetic hours (>= 8 for the drift event)")
    p.add_argument("--spans-per-hour", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_demo)

    p = add_parser("airflow", help="the airflow CLI on rpcwatch's home, e.g. `rpcwatch airflow standalone`")
    add_common_options(p, hour=False)
    p.add_argument("airflow_args", nargs=argparse.REMAINDER, help="arguments for airflow")
    p.set_defaults(func=cmd_airflow)

    p = add_parser("up", help="start Airflow (scheduler, DAG processor, API server) and an MLflow server, detached")
    add_common_options(p, hour=False)
    p.add_argument(
        "--executor",
        choices=("local", "celery"),
        default="local",
        help="celery: the CeleryExecutor with a worker on the default and one on the gpu queue "
        "(needs AIRFLOW__DATABASE__SQL_ALCHEMY_CONN on PostgreSQL and AIRFLOW__CELERY__BROKER_URL)",
    )
    p.set_defaults(func=cmd_up)

    p = add_parser("down", help="stop what `rpcwatch up` started; nothing is left running")
    add_common_options(p, hour=False)
    p.set_defaults(func=cmd_down)

    p = add_parser("backfill", help="have the scheduler run hours FROM..TO (inclusive) in order, as live runs would")
    add_common_options(p, hour=False)
    p.add_argument("--from", dest="first", required=True, help="first hour, e.g. 2026-01-01T00:00")
    p.add_argument("--to", dest="last", required=True, help="last hour (inclusive), e.g. 2026-01-01T03:00")
    p.set_defaults(func=cmd_backfill)
