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
warehouse runs in the one-slot pool `rpcwatch_duckdb`. Rerunning a run replaces exactly its hour.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import CronDataIntervalTimetable, dag, get_current_context, task

DUCKDB_POOL = "rpcwatch_duckdb"


def _stage(name: str, upstream: object = None) -> object:
    """Run pipeline stage `name` for this run's data interval (imports happen here, not at parse time)."""
    from tasks import pipeline
    from tasks.settings import load_settings

    run = pipeline.Run(load_settings(), get_current_context()["data_interval_start"], say=print)
    return pipeline.stage(name).run(run, upstream)


def _wire(steps: dict) -> None:
    """Chain the tasks in the order of `tasks.pipeline.STAGES` (a light module, read at parse time),
    mapping `train` over the stale patterns' jobs."""
    from tasks.pipeline import STAGES

    if set(steps) != {s.name for s in STAGES}:  # fail the parse, naming what differs
        raise ValueError(f"DAG tasks {sorted(steps)} are not the pipeline stages {[s.name for s in STAGES]}")
    upstream = None
    for s in STAGES:
        step = steps[s.name]
        upstream = step.expand(job=upstream) if s.mapped else step() if upstream is None else step(upstream)


@dag(
    dag_id="rpcwatch_hourly",
    schedule=CronDataIntervalTimetable("0 * * * *", timezone="UTC"),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["rpcwatch"],
    doc_md=__doc__,
    default_args={"pool": DUCKDB_POOL, "retries": 0},
)
def rpcwatch_hourly():
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
        age) and export each one's series to Parquet, so training never opens DuckDB."""
        return _stage("stale", patterned)

    @task(queue="gpu", pool="default_pool", retries=1)
    def train(job: dict) -> dict:
        """Train one stale pattern's model on the GPU queue (CPU when none), tracked in MLflow."""
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

    _wire(
        {
            "ingest": ingest,
            "validate": validate,
            "aggregate": aggregate,
            "patterns": patterns,
            "stale": stale,
            "train": train,
            "record": record,
            "score": score,
            "publish": publish,
        }
    )


hourly = rpcwatch_hourly()
