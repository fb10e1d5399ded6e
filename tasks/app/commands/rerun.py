"""`rerun`: rerun one hour under the stack's scheduler, through Airflow's REST API (tasks.app.stack.rerun):
its run is cleared, or replaced when the params differ, or triggered; while `rpcwatch_hourly` is
paused the hour runs in `rpcwatch_rerun` instead of unpausing it."""

from __future__ import annotations

import argparse

from tasks.app.commands.common import AddParser, add_common_options, settings_from

PARAMS = {  # the DAG's params (tasks.app.stack.PARAM_NAMES), each a flag: --force-ingest, ...
    "force_ingest": "re-read the hour's files even if unchanged",
    "recluster": "re-cluster patterns now, whatever the cadence",
    "force_retrain": "retrain every critical pattern's model",
}


def cmd_rerun(args: argparse.Namespace) -> int:
    """Hand the hour to the scheduler; with --wait, follow its run to the end (exit 1 if it failed)."""
    from tasks.app.stack import AirflowApi, rerun
    from tasks.settings import parse_utc

    settings = settings_from(args)
    params = [name for name in PARAMS if getattr(args, name)]
    done = rerun(settings, parse_utc(args.hour), params)
    if not args.wait:
        return 0
    run = AirflowApi.of(settings).wait_run(done.dag_id, done.run_id)
    print(f"run {done.run_id} of {done.dag_id}: {run['state']}")
    return 0 if run["state"] == "success" else 1


def register(add_parser: AddParser) -> None:
    """rerun."""
    p = add_parser(
        "rerun",
        help="rerun one hour under the scheduler (clears its run; works while the DAG is paused), see README",
    )
    add_common_options(p, hour=False)
    p.add_argument("--hour", required=True, help="the hour to rerun (its logical date), e.g. 2026-01-01T09:00")
    for name, what in PARAMS.items():
        p.add_argument(f"--{name.replace('_', '-')}", action="store_true", help=f"the DAG param {name}: {what}")
    p.add_argument("--wait", action="store_true", help="wait until the run has finished; exit 1 if it failed")
    p.set_defaults(func=cmd_rerun)
