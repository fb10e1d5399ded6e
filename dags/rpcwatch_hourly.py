"""
### rpcwatch_hourly

Every hour, for the data interval that just ended: **ingest** the trace files that arrived for
that hour into the DuckDB warehouse, **validate** them (Great Expectations + DuckDB row checks;
bad rows to `quarantine`, a bad batch fails here naming file and expectation), **aggregate**
per-RPC traffic into `rpc_series`, and group requests into RPC-chain **patterns** (trace
reconstruction, HDBSCAN re-clustering when due, stable pattern ids, per-pattern graphs and series),
then find the **stale** pattern models and **train** only those (mapped, one task per pattern, on the
`gpu` queue, reading Parquet exports instead of DuckDB), **record** them, and **score** the hour
against the champions into `anomalies` and `incidents`.

Each task is one stage of `tasks.pipeline.STAGES`, the ordered list `rpcwatch run` follows too, and
the tasks are wired in that order; the last one, **publish**, copies the tables people read into the
read-only `analytics.duckdb`. DuckDB allows one writer per file, so every task that writes the
warehouse runs in the one-slot pool `RPCWATCH_AIRFLOW_POOL` (default `rpcwatch_duckdb`). Rerunning
a run replaces exactly its hour.
"""

from __future__ import annotations

from typing import Any  # stdlib: the DAG file imports nothing heavy when Airflow parses it

import pendulum
from airflow.sdk import CronDataIntervalTimetable, dag, get_current_context, task


def _stage(name: str, upstream: Any = None) -> Any:
    """Run pipeline stage `name` for this run's data interval (imports happen here, not at parse time)."""
    from tasks import pipeline
    from tasks.settings import load_settings

    hour = get_current_context()["data_interval_start"]
    if hour is None:
        raise RuntimeError("an rpcwatch run needs a data interval (the hour it covers)")
    return pipeline.stage(name).run(pipeline.Run(load_settings(), hour, say=print), upstream)


def _check_against_the_stages(produced: list[Any]) -> None:
    """Fail the parse, naming what differs, unless the tasks wired here are `tasks.pipeline.STAGES`
    in order, mapped where a stage is (the CLI's `rpcwatch run` follows that list too)."""
    from tasks.pipeline import STAGES  # a light module

    wired = [(x.operator.task_id, x.operator.is_mapped) for x in produced]
    stages = [(s.name, s.mapped) for s in STAGES]
    if wired != stages:
        raise ValueError(f"DAG tasks (task, mapped) {wired} are not the pipeline stages {stages}")


def _duckdb_pool() -> str:
    """The one-slot pool of the warehouse writers, `RPCWATCH_AIRFLOW_POOL` (default `rpcwatch_duckdb`),
    read when Airflow parses this file: tasks.settings imports only the standard library."""
    from tasks.settings import load_settings

    return load_settings().airflow_pool


@task
def ingest() -> dict:
    """Load this hour's trace files into `calls` (unchanged files are skipped)."""
    return _stage("ingest")


@task
def validate(ingested: dict) -> dict:
    """Run the validation suite; a failed batch-level expectation fails this task."""
    return _stage("validate", ingested)


@task
def aggregate(validated: dict) -> dict:
    """Rebuild `rpc_series` for this hour."""
    return _stage("aggregate", validated)


@task
def patterns(aggregated: dict) -> dict:
    """Rebuild traces, assign them to RPC-chain patterns or re-cluster (when the cadence says),
    and write pattern graphs, per-pattern series and novel RPCs."""
    return _stage("patterns", aggregated)


@task
def stale(patterned: dict) -> list[dict]:
    """Decide which critical patterns' models are stale (no champion, graph changed, drift,
    age) and export each one's series to Parquet, so training never opens DuckDB. Returns one
    training job (`TrainJob.to_dict()`) per stale pattern."""
    return _stage("stale", patterned)


@task(queue="gpu", pool="default_pool", retries=1)
def train(job: dict) -> dict:
    """Train one stale pattern's model on the GPU queue (CPU when none), tracked in MLflow.
    Returns its outcome (`TrainOutcome.to_dict()`, or `Skipped.to_dict()` for short history)."""
    return _stage("train", job)


@task(trigger_rule="none_failed")  # zero mapped trainings (skipped) still records and says so
def record(outcomes: list[dict]) -> int:
    """Mirror the trainings into DuckDB's `models` table (what staleness and scoring read)."""
    return _stage("record", list(outcomes or []))


@task(trigger_rule="none_failed")
def score(recorded: int) -> dict:
    """Forecast every bucket of the hour with each critical pattern's champion; irregular points
    go to `anomalies`, related ones to `incidents`, novel RPCs too."""
    return _stage("score", recorded)


@task
def publish(scored: dict) -> dict:
    """Publish the analysts' read-only snapshot `analytics.duckdb` (never blocks a run)."""
    return _stage("publish", scored)


@dag(
    dag_id="rpcwatch_hourly",
    schedule=CronDataIntervalTimetable("0 * * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["rpcwatch"],
    doc_md=__doc__,
    default_args={"pool": _duckdb_pool(), "retries": 0},  # every task but `train` writes the warehouse
)
def rpcwatch_hourly() -> None:
    """The stages in the order of `tasks.pipeline.STAGES`, each taking the previous one's result."""
    # Each call returns the task's future result (an XComArg) that the next task takes. Airflow's
    # stubs type a task call with the function's own parameters (dict, ...), not XComArg: a stub
    # gap, hence the ignores.
    ingested = ingest()
    validated = validate(ingested)  # type: ignore[arg-type]
    aggregated = aggregate(validated)  # type: ignore[arg-type]
    patterned = patterns(aggregated)  # type: ignore[arg-type]
    jobs = stale(patterned)  # type: ignore[arg-type]
    outcomes = train.expand(job=jobs)  # one training per stale pattern's job
    recorded = record(outcomes)  # type: ignore[arg-type]
    scored = score(recorded)  # type: ignore[arg-type]
    published = publish(scored)  # type: ignore[arg-type]
    _check_against_the_stages([ingested, validated, aggregated, patterned, jobs, outcomes, recorded, scored, published])


hourly = rpcwatch_hourly()
