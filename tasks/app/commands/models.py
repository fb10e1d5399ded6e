"""Commands for the per-pattern models and scoring: `stale` (which models are stale, read-only),
`train` (trains them: MLflow runs and the `models` table) and `score` (writes `anomalies`,
`incidents` and `score_runs`, then publishes the snapshot)."""

from __future__ import annotations

import argparse
from typing import Any

from tasks.app.commands.common import AddParser, add_common_options, ingested_hours, latest_hour, settings_from
from tasks.clock import hour_floor
from tasks.settings import parse_utc

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
    print(
        f"\ncompare versions in MLflow: .venv/bin/mlflow ui --backend-store-uri {settings.mlflow_tracking_uri}"
        f"  (then http://127.0.0.1:5000, experiment 'rpcwatch', models 'rpcwatch-pattern-<id>')"
    )
    return 0


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
