"""Commands for the per-pattern models and scoring: `stale` (which models are stale, read-only),
`train` (trains them: MLflow runs and the `models` table) and `score` (writes `anomalies`,
`incidents` and `score_runs`, then publishes the snapshot)."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.app.commands.common import AddParser, add_common_options, ingested_hours, latest_hour, settings_from
from tasks.clock import hour_floor
from tasks.settings import Settings, parse_utc

if TYPE_CHECKING:
    from mlflow.entities import Experiment

TRAIN_HEADERS = ["pattern", "version", "alias", "why", "calls MAPE", "x floor", "x seasonal naive"]


def cmd_stale(args: argparse.Namespace) -> int:
    from tasks.app.report import table
    from tasks.models.staleness import stale_patterns
    from tasks.warehouse import opened

    settings = settings_from(args)
    hour = latest_hour(settings, args)
    with opened(settings.warehouse, read_only=True) as con:
        stale = stale_patterns(con, settings, hour, args.force, args.pattern)
    if not stale:
        print(f"nothing is stale at {hour:%Y-%m-%d %H:00}: every critical pattern has a fresh champion")
        return 0
    print(table(["pattern", "reasons"], [[s.pattern_id, ", ".join(s.reasons)] for s in stale]))
    return 0


def _train_row(outcome: dict[str, Any]) -> list[object]:
    """One trained (or skipped, or failed) pattern as a row under TRAIN_HEADERS."""
    if "skipped" in outcome:
        return [outcome["pattern_id"], "-", outcome.get("decision", "skipped"), outcome["skipped"][:60], "", "", ""]
    m = outcome["metrics"]
    return [
        outcome["pattern_id"],
        outcome["model_version"],
        outcome["decision"],
        outcome["reason"][:60],
        *(_metric(m.get(k), spec) for k, spec in METRIC_COLUMNS),
    ]


# the metrics under TRAIN_HEADERS; null (undefined: an exact baseline, no busy node) shows as n/a
METRIC_COLUMNS = (
    ("model_mape_calls", ".3f"),
    ("mape_calls_over_floor", ".2f"),
    ("mape_calls_vs_seasonal_naive", ".2f"),
)


def _metric(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def cmd_train(args: argparse.Namespace) -> int:
    from tasks.app.report import table
    from tasks.models.retrain import train_stale

    settings = settings_from(args)
    hour = latest_hour(settings, args)
    outcomes = train_stale(settings, hour, args.force, args.pattern)
    if not outcomes:
        print(f"nothing is stale at {hour:%Y-%m-%d %H:00}: no model trained")
        return 0
    print(table(TRAIN_HEADERS, [_train_row(o) for o in outcomes]))
    print("\n" + mlflow_hint(settings, sorted({o["pattern_id"] for o in outcomes if "skipped" not in o})))
    return 0


def free_port(host: str = "127.0.0.1", first: int = 5000, tries: int = 20) -> int:
    """The first port from `first` on that nothing listens on (MLflow's usual 5000 first), else any."""
    for port in [*range(first, first + tries), 0]:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError(f"no free port on {host}")


def _shown(path: Path) -> str:
    """A path as a user types it here: relative to the working directory when under it."""
    return os.path.relpath(path) if path.is_relative_to(Path.cwd()) else str(path)


def mlflow_hint(settings: Settings, pattern_ids: list[int]) -> str:
    """Where to compare the versions trained: links into the MLflow server at `mlflow_url` when it
    serves this home's store (asked over its REST API, `ui_problem`), else into the tracking server,
    else (the embedded store) into a UI the hint says how to start, on a free port. The links open
    MLflow's model-training view."""
    from tasks.models.registry import EXPERIMENT, model_name, setup_mlflow
    from tasks.models.tracking import experiment_url, registered_model_url

    experiment = setup_mlflow(settings).get_experiment_by_name(EXPERIMENT)
    base, lines = _ui_base(settings, experiment)
    lines.append(f"  runs:       {experiment_url(base, experiment.experiment_id)}")
    for p in pattern_ids:
        lines.append(f"  pattern {p}:  {registered_model_url(base, model_name(p))}  (tick two versions, Compare)")
    return "\n".join(lines)


def _ui_base(settings: Settings, experiment: Experiment) -> tuple[str, list[str]]:
    """The base URL of a UI on this home's store, and the lines saying which (and how to start one)."""
    from tasks.models.registry import tracking_uri
    from tasks.models.tracking import ui_problem

    uri = tracking_uri(settings)
    problem = ui_problem(settings.mlflow_url, experiment)
    if problem is None:
        return settings.mlflow_url, [f"compare versions in MLflow: {settings.mlflow_url} serves this home's runs"]
    if uri.startswith(("http://", "https://")):  # a tracking server serves its own UI
        return uri, [f"compare versions in MLflow: {uri} (not RPCWATCH_MLFLOW_URL {settings.mlflow_url}: {problem})"]
    port = free_port()
    mlflow = _shown(Path(sys.executable).with_name("mlflow"))
    return f"http://127.0.0.1:{port}", [
        f"no MLflow UI for this home at {settings.mlflow_url}: {problem}. Start one on a free port:",
        f"  {mlflow} ui --backend-store-uri {uri} --port {port}",
        "then compare versions in it:",
    ]


def cmd_score(args: argparse.Namespace) -> int:
    from tasks.publish import publish
    from tasks.scoring.score import score_hour

    settings = settings_from(args)
    hours = [hour_floor(parse_utc(args.hour))] if args.hour else ingested_hours(settings)[-1:]
    for hour in hours:
        print(score_hour(settings, hour).line())
    print(f"see them: rpcwatch anomalies, or read-only in DuckDB: {publish(settings)}")
    return 0


def register(add_parser: AddParser) -> None:
    """stale, train and score, in this order."""
    for name, func, text in [
        ("stale", cmd_stale, "which pattern models are stale, and why"),
        ("train", cmd_train, "train the stale pattern models (MLflow-tracked)"),
    ]:
        p = add_parser(name, help=text)
        add_common_options(p, hour=False)
        p.add_argument("--hour", help="as of this hour (default: the latest ingested)")
        p.add_argument("--pattern", type=int, nargs="+", help="only these pattern ids")
        p.add_argument("--force", action="store_true", help="treat them as stale anyway")
        p.set_defaults(func=func)

    p = add_parser("score", help="score an hour against the champion models into `anomalies`")
    add_common_options(p, hour=False)
    p.add_argument("--hour", help="hour to score (default: the latest ingested)")
    p.set_defaults(func=cmd_score)
