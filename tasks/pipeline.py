"""One hour through every stage, in order. `STAGES` is the one ordered list that both `rpcwatch run`
(`run_hour`) and the hourly DAG (dags/rpcwatch_hourly.py: one task per stage, wired in this order)
follow, so the two cannot drift apart; publishing the analysts' snapshot is a stage of its own.

A stage takes the run (`Run`: settings, hour, where the trace files are, where its lines go) and the
previous stage's result, and returns a JSON-able result (the DAG hands it on as XCom). `train` is
mapped: it runs once per shard of stale patterns that `stale` planned (the DAG maps its task over them). This module
imports nothing heavy at import time: the DAG file reads `STAGES` when Airflow parses it.

Each stage's docstring says which tables it writes (`calls`, `rpc_series`, the pattern tables,
`models`, `anomalies`, `incidents`, the `analytics.duckdb` snapshot); this module itself reads and
writes none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tasks.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    """What every stage of one hour needs."""

    settings: Settings
    hour: datetime
    sources: list[Path] | None = None  # default: the settings' incoming folder
    fmt_name: str | None = None  # default: the settings' format
    say: Callable[[str], None] = log.info  # the DAG prints into the task log
    # work to redo whatever the hour's state says: force_ingest, recluster, force_retrain
    forced: frozenset[str] = frozenset()


def ingest(run: Run, _: Any = None) -> dict:
    """Load this hour's trace files into `calls` (unchanged files are skipped)."""
    from tasks.ingest.stage import ingest_hour

    report = ingest_hour(run.settings, run.hour, run.sources, run.fmt_name, force="force_ingest" in run.forced)
    for bad in report.failed_files:
        run.say(f"file failed: {bad.error}")
    run.say(
        f"hour {run.hour}: {len(report.files)} files, {report.rows_read} rows read, {report.rows_kept} kept, "
        f"{report.rows_quarantined} quarantined{' (unchanged, skipped)' if report.skipped_unchanged else ''}"
    )
    return {
        "batch_id": report.batch_id,
        "rows_read": report.rows_read,
        "rows_kept": report.rows_kept,
        "rows_quarantined": report.rows_quarantined,
        "skipped": report.skipped_unchanged,
    }


def validate(run: Run, ingested: dict) -> dict:
    """Run the validation suite; a failed batch-level expectation raises (and stops the hour)."""
    from tasks.ingest.validate import validate_hour

    report = validate_hour(run.settings, run.hour)
    run.say(f"batch {ingested['batch_id']}: {len(report.findings)} expectations, all batch-level passed")
    return {"batch_id": report.batch_id, "expectations": len(report.findings)}


def aggregate(run: Run, _: Any = None) -> dict:
    """Rebuild `rpc_series` for this hour."""
    from tasks.ingest.aggregate import aggregate_hour

    report = aggregate_hour(run.settings, run.hour)
    run.say(f"{report.series_rows} series rows over {report.rpcs} RPCs")
    return {"series_rows": report.series_rows, "rpcs": report.rpcs}


def patterns(run: Run, _: Any = None) -> dict:
    """Rebuild traces, assign them to RPC-chain patterns or re-cluster (when the cadence says), and
    write pattern graphs, per-pattern series and novel RPCs."""
    from tasks.patterns.stage import patterns_hour

    report = patterns_hour(run.settings, run.hour, force="recluster" in run.forced)
    for line in report.lines():
        run.say(line)
    return {
        "reclustered": report.reclustered,
        "reason": report.reason,
        "critical": report.critical,
        "critical_share": report.critical_share,
        "traces": report.reconstruction.traces,
        "clusters": report.changes.clusters if report.reclustered else None,
    }


def stale(run: Run, _: Any = None) -> list[dict[str, Any]]:
    """Which critical patterns' models are stale (no champion, graph changed, drift, age), each
    exported to Parquet so that training never opens DuckDB, split into at most `train_shards`
    shards of similar cost. One `TrainShard.to_dict()` per shard."""
    from tasks.models.retrain import plan_shards

    shards = plan_shards(run.settings, run.hour, force="force_retrain" in run.forced)
    for shard in shards:
        for job in shard.jobs:
            run.say(f"pattern {job.pattern_id} is stale: {', '.join(job.reasons)} (shard {shard.index})")
    if not shards:
        run.say("nothing is stale this hour: no model will be trained")
    return [shard.to_dict() for shard in shards]


def train(run: Run, shard: dict[str, Any]) -> list[dict[str, Any]]:
    """Train one shard of stale patterns (stacked on a GPU when there is one), each tracked in
    MLflow. Takes a `TrainShard.to_dict()`, returns the `to_dict()` of each `TrainOutcome` or `Skipped`."""
    from tasks.models.jobs import Skipped, TrainShard
    from tasks.models.retrain import train_shard

    outcomes = train_shard(run.settings, TrainShard.from_dict(shard))
    for o in outcomes:
        run.say(
            o.reason
            if isinstance(o, Skipped)
            else f"pattern {o.pattern_id}: v{o.model_version} -> {o.decision} ({o.reason})"
        )
    return [outcome.to_dict() for outcome in outcomes]


def record(run: Run, outcomes: Iterable[list[dict[str, Any]]] | None) -> int:
    """Mirror the trainings into DuckDB's `models` table (what staleness and scoring read); takes
    each shard's outcomes."""
    from tasks.models.jobs import outcome_from_dict
    from tasks.models.retrain import record_outcomes

    n = record_outcomes(run.settings, [outcome_from_dict(o) for shard in outcomes or [] for o in shard])
    run.say(f"{n} model(s) recorded" if n else "no model trained this hour")
    return n


def score(run: Run, _: Any = None) -> dict:
    """Forecast every bucket of the hour with each critical pattern's champion: irregular points to
    `anomalies`, related ones to `incidents`, novel RPCs too."""
    from tasks.scoring.score import score_hour

    report = score_hour(run.settings, run.hour)
    run.say(report.line())
    return {
        "scored": report.scored,
        "skipped": {str(k): v for k, v in report.skipped.items()},
        "anomalies": report.anomalies,
        "incidents": report.incidents,
    }


def publish(run: Run, _: Any = None) -> dict:
    """Copy the tables people read into the read-only snapshot `analytics.duckdb` (tasks.publish)."""
    from tasks.publish import publish as publish_snapshot

    path = publish_snapshot(run.settings)
    run.say(f"published for analysts (read-only, never blocks a run): {path}")
    return {"path": str(path)}


def alert(run: Run, _: Any = None) -> dict:
    """Post the hour's new incidents above the alert severity to the webhook (none set: nothing)."""
    from tasks.alerts.webhook import alert_new_incidents

    return {"posted": alert_new_incidents(run.settings, run.hour, say=run.say)}


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Run, Any], Any]
    mapped: bool = False  # once per item of the previous stage's result


STAGES: tuple[Stage, ...] = (
    Stage("ingest", ingest),
    Stage("validate", validate),
    Stage("aggregate", aggregate),
    Stage("patterns", patterns),
    Stage("stale", stale),
    Stage("train", train, mapped=True),
    Stage("record", record),
    Stage("score", score),
    Stage("publish", publish),
    Stage("alert", alert),
)


def stage(name: str) -> Stage:
    return next(s for s in STAGES if s.name == name)


def call(s: Stage, run: Run, previous: Any) -> Any:
    """Run one stage. On a DuckLake warehouse a stage whose commit lost a transaction conflict to
    another worker runs again (tasks.lake.retrying): every stage replaces its hour, so a rerun is
    safe. `train` never opens the warehouse; the embedded file has one writer and no conflicts."""
    if run.settings.warehouse_mode != "ducklake" or s.name == "train":
        return s.run(run, previous)
    from tasks.lake import retrying

    return retrying(lambda: s.run(run, previous), f"{s.name} {run.hour:%Y-%m-%dT%H:%M}")


# kill -9 points of the crash-safety tests (tasks/failpoints.py) at these stage boundaries; the one
# inside publish is in tasks.publish
CRASH_AFTER = ("ingest", "patterns", "score")


def run_hour(
    settings: Settings, hour: datetime, sources: list[Path] | None = None, fmt_name: str | None = None
) -> dict[str, Any]:
    """Every stage of `STAGES` for one hour, in order; returns each stage's result by name. A failed
    batch-level validation (or any stage's error) stops the hour."""
    from tasks.failpoints import crash_point
    from tasks.progress import progress as progress_bar

    run = Run(settings, hour, sources, fmt_name)
    results: dict[str, Any] = {}
    previous: Any = None  # the previous stage's result (a list of shards before the mapped `train`)
    for s in STAGES:
        if s.mapped:  # e.g. one training per shard of stale patterns: a bar at a terminal
            previous = [call(s, run, item) for item in progress_bar(previous, s.name, unit="shard")]
        else:
            previous = call(s, run, previous)
        results[s.name] = previous
        if s.name in CRASH_AFTER:
            crash_point(s.name)
    return results
