"""
### rpcwatch_hourly

**One hour rule:** the run for hour H has logical date H and data interval [H, H+1), however it
was started: scheduled, caught up, backfilled (`airflow backfill create --dag-id rpcwatch_hourly
--from-date A --to-date B`), triggered in the UI or the REST API with logical date H, or `airflow
dags test rpcwatch_hourly H` (the `HourTimetable` of plugins/rpcwatch_hour.py). Its run id names
the hour: `scheduled__2026-01-01T08:00Z` processes 08:00-09:00 UTC. A trigger that is not one of
the DAG's hours (not a whole hour, outside `RPCWATCH_START .. RPCWATCH_END`, not ended yet) is
refused before any run exists, saying why.

For its hour the run **ingests** the trace files that arrived into the DuckDB warehouse,
**validates** them (Great Expectations + DuckDB row checks; bad rows to `quarantine`, a bad batch
fails here naming file and expectation, without retries), **aggregates** per-RPC traffic into
`rpc_series`, groups requests into RPC-chain **patterns** (trace reconstruction, HDBSCAN
re-clustering when due, stable pattern ids, per-pattern graphs and series), finds the **stale**
pattern models and **trains** only those (mapped over `RPCWATCH_TRAIN_SHARDS` shards of similar
cost, each a task on the `gpu` queue training its patterns stacked on a GPU, reading Parquet exports
instead of DuckDB), **records** them, **scores** the hour against the champions into
`anomalies` and `incidents`, **publishes** the read-only `analytics.duckdb` and **alerts** on new
incidents (`RPCWATCH_ALERT_WEBHOOK`). Any task failure is posted there too.

Scheduling: hourly from `RPCWATCH_START` (until `RPCWATCH_END` when set); hours missed while the
scheduler was down are caught up oldest first, one run at a time. **Rerun an hour** by clearing its
run (the scheduler reruns it after the active one), or `rpcwatch rerun --hour H [--force-ingest]
[--recluster] [--force-retrain]` (clears it, or replaces it when the params differ, through the REST
API). A paused DAG runs nothing, cleared runs included: while this one is paused, `rpcwatch rerun`
runs the hour as a run of `rpcwatch_rerun` (same tasks, never scheduled) instead of unpausing,
which would also catch up every missing hour.
Transient failures are retried with exponential backoff; every task has a timeout, the run 2 h.
The stages publish Assets (`rpcwatch://registry/champions`, `rpcwatch://warehouse/anomalies`,
`rpcwatch://analytics/snapshot`) that other DAGs may be scheduled on.

Each task is one stage of `tasks.pipeline.STAGES`, the ordered list `rpcwatch run` follows too.
DuckDB allows one writer per file, so every task that writes the warehouse runs in the one-slot
pool `RPCWATCH_AIRFLOW_POOL` (default `rpcwatch_duckdb`); on the shared DuckLake warehouse
(`RPCWATCH_WAREHOUSE=ducklake`) `rpcwatch airflow`/`up` size that pool for many writers, and a task
whose commit conflicts with another's runs again. Rerunning a run replaces exactly its hour.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any  # stdlib and Airflow only: the DAG file imports nothing heavy when parsed

import pendulum
from airflow.sdk import Asset, Param, dag, get_current_context, task

from rpcwatch_alerts import RpcwatchFailureNotifier  # dags/: a failed task (after its retries) is posted
from rpcwatch_hour import HourRerunTimetable, HourTimetable  # plugins/ (on Airflow's sys.path): one hour rule

# What the stages publish, for DAGs of other teams to be scheduled on (e.g. `schedule=[SNAPSHOT]`).
CHAMPIONS = Asset("rpcwatch://registry/champions")  # MLflow champions, mirrored in DuckDB `models`
ANOMALIES = Asset("rpcwatch://warehouse/anomalies")  # `anomalies` and `incidents`
SNAPSHOT = Asset("rpcwatch://analytics/snapshot")  # the read-only `analytics.duckdb`

# Transient failures (a held DuckDB lock, MLflow or the trace store unreachable, late files, a worker
# that died) are retried with exponential backoff (RPCWATCH_RETRY_DELAY_S: 1, 2, 4 min); a failed
# validation is not (see _stage).
RETRIES = {"retries": 3, "retry_exponential_backoff": 2.0, "max_retry_delay": timedelta(minutes=10)}

PARAMS = {
    "force_ingest": Param(False, type="boolean", description="re-read this hour's files even if unchanged"),
    "recluster": Param(False, type="boolean", description="re-cluster patterns now, whatever the cadence"),
    "force_retrain": Param(False, type="boolean", description="retrain every critical pattern's model"),
}


def _stage(name: str, upstream: Any = None) -> Any:
    """Run pipeline stage `name` for this run's hour, `data_interval_start` (imports happen here,
    not at parse time). A failed validation fails the task without retries: the data is wrong,
    trying again cannot help; the message names file, row and expectation."""
    from airflow.sdk.exceptions import AirflowFailException

    from tasks import pipeline
    from tasks.app.airflow_env import quiet_libraries
    from tasks.ingest.validate import BatchValidationError
    from tasks.settings import load_settings

    quiet_libraries()

    context = get_current_context()
    hour = context["data_interval_start"]
    if hour is None:
        raise RuntimeError("an rpcwatch run needs a data interval (the hour it covers)")
    forced = frozenset(k for k, v in (context.get("params") or {}).items() if k in PARAMS and v)
    run = pipeline.Run(load_settings(), hour, say=logging.getLogger("rpcwatch").info, forced=forced)
    try:
        result = pipeline.call(pipeline.stage(name), run, upstream)
    except BatchValidationError as exc:
        raise AirflowFailException(str(exc)) from exc
    for asset in context["task"].outlets:  # a downstream DAG reads which hour was published, and what
        context["outlet_events"][asset].extra = {"hour": hour.isoformat(), **_counts(result)}
    return result


def _counts(result: Any) -> dict[str, Any]:
    """A stage result's numbers, for an asset event's `extra` (lists as their length)."""
    if isinstance(result, dict):
        return {k: (len(v) if isinstance(v, list | dict) else v) for k, v in result.items()}
    return {"count": result} if isinstance(result, int) else {}


def _check_against_the_stages(produced: list[Any]) -> None:
    """Fail the parse, naming what differs, unless the tasks wired here are `tasks.pipeline.STAGES`
    in order, mapped where a stage is (the CLI's `rpcwatch run` follows that list too)."""
    from tasks.pipeline import STAGES  # a light module

    wired = [(x.operator.task_id, x.operator.is_mapped) for x in produced]
    stages = [(s.name, s.mapped) for s in STAGES]
    if wired != stages:
        raise ValueError(f"DAG tasks (task, mapped) {wired} are not the pipeline stages {stages}")


def _settings() -> Any:
    """rpcwatch's settings, read when Airflow parses this file: tasks.settings imports only the
    standard library."""
    from tasks.settings import load_settings

    return load_settings()


def _hour(value: Any) -> pendulum.DateTime | None:
    return None if value is None else pendulum.instance(value).in_timezone("UTC")


@task(execution_timeout=timedelta(minutes=20))
def ingest() -> dict:
    """Load this hour's trace files into `calls` (unchanged files are skipped)."""
    return _stage("ingest")


@task(execution_timeout=timedelta(minutes=20))
def validate(ingested: dict) -> dict:
    """Run the validation suite; a failed batch-level expectation fails this task (no retry)."""
    return _stage("validate", ingested)


@task(execution_timeout=timedelta(minutes=10))
def aggregate(validated: dict) -> dict:
    """Rebuild `rpc_series` for this hour."""
    return _stage("aggregate", validated)


@task(execution_timeout=timedelta(minutes=20))
def patterns(aggregated: dict) -> dict:
    """Rebuild traces, assign them to RPC-chain patterns or re-cluster (when the cadence says, or
    the `recluster` param), and write pattern graphs, per-pattern series and novel RPCs."""
    return _stage("patterns", aggregated)


@task(execution_timeout=timedelta(minutes=10))
def stale(patterned: dict) -> list[dict]:
    """Decide which critical patterns' models are stale (no champion, graph changed, drift,
    age, or the `force_retrain` param), export each one's series to Parquet, so training never
    opens DuckDB, and split them into at most `RPCWATCH_TRAIN_SHARDS` shards of similar cost.
    Returns one `TrainShard.to_dict()` per shard."""
    return _stage("stale", patterned)


@task(queue="gpu", pool="default_pool", execution_timeout=timedelta(minutes=60))
def train(shard: dict) -> list[dict]:
    """Train one shard of stale patterns on the GPU queue (stacked there; one by one on a CPU),
    each tracked in MLflow. Returns each pattern's outcome (`TrainOutcome.to_dict()`, or
    `Skipped.to_dict()` for short history or for a pattern whose training failed: one pattern's
    error never fails the shard, the others train)."""
    return _stage("train", shard)


# zero mapped trainings (skipped) still records and says so
@task(trigger_rule="none_failed", execution_timeout=timedelta(minutes=10), outlets=[CHAMPIONS])
def record(outcomes: list[list[dict]]) -> int:
    """Mirror each shard's trainings into DuckDB's `models` table (what staleness and scoring read)."""
    return _stage("record", list(outcomes or []))


@task(trigger_rule="none_failed", execution_timeout=timedelta(minutes=20), outlets=[ANOMALIES])
def score(recorded: int) -> dict:
    """Forecast every bucket of the hour with each critical pattern's champion and score its traces
    with the trace models; irregular points go to `anomalies`, related ones to `incidents`."""
    return _stage("score", recorded)


@task(execution_timeout=timedelta(minutes=10), outlets=[SNAPSHOT])
def publish(scored: dict) -> dict:
    """Publish the analysts' read-only snapshot `analytics.duckdb` (never blocks a run)."""
    return _stage("publish", scored)


@task(execution_timeout=timedelta(minutes=5))
def alert(published: dict) -> dict:
    """Post the hour's new incidents above `RPCWATCH_ALERT_MIN_SCORE` to `RPCWATCH_ALERT_WEBHOOK`."""
    return _stage("alert", published)


SETTINGS = _settings()
FIRST, LAST = _hour(SETTINGS.start), _hour(SETTINGS.end)  # the DAG's hours: RPCWATCH_START .. RPCWATCH_END


def _shared() -> dict[str, Any]:
    """What both DAGs are given: their hours, one run at a time, the params, the writer pool,
    retries and failure posts (fresh objects for each DAG)."""
    return {
        "start_date": FIRST,
        "end_date": LAST,
        "max_active_runs": 1,
        "dagrun_timeout": timedelta(hours=2),
        "params": dict(PARAMS),
        "tags": ["rpcwatch"],
        # every task but `train` writes the warehouse: one writer at a time on the file (the pool's
        # size follows RPCWATCH_WAREHOUSE: Settings.writer_slots)
        "default_args": {
            "pool": SETTINGS.airflow_pool,
            **RETRIES,
            "retry_delay": timedelta(seconds=SETTINGS.retry_delay_s),
            "on_failure_callback": RpcwatchFailureNotifier(),
        },
    }


RERUN_DOC = """
### rpcwatch_rerun

Reruns of `rpcwatch_hourly`'s hours **while that DAG is paused** (a paused DAG runs nothing, cleared
runs included, and unpausing it would also catch up every missing hour). Never scheduled and never
paused: it runs only what `rpcwatch rerun --hour H` asks for (a run of logical date H, run id
`manual__<H>Z`), with the same tasks, params, pool and one hour rule as `rpcwatch_hourly`. The
paused DAG's own run for H keeps its state; a note on it names the rerun.
"""


@dag(
    dag_id="rpcwatch_hourly",
    schedule=HourTimetable(FIRST, LAST),
    catchup=SETTINGS.catchup,  # True (default): hours missed while down run oldest first, one at a time
    doc_md=__doc__,
    **_shared(),
)
def rpcwatch_hourly() -> None:
    """The stages in the order of `tasks.pipeline.STAGES`, each taking the previous one's result."""
    _pipeline()


@dag(
    dag_id="rpcwatch_rerun",
    schedule=HourRerunTimetable(FIRST, LAST),
    catchup=False,
    is_paused_upon_creation=False,  # it runs only the hours asked for: nothing to hold back
    allowed_run_types=["manual"],  # type: ignore[list-item]  # converted to DagRunType (not public in airflow.sdk)
    doc_md=RERUN_DOC,
    **_shared(),
)
def rpcwatch_rerun() -> None:
    """The same stages as rpcwatch_hourly, for the hours `rpcwatch rerun` asks for while it is paused."""
    _pipeline()


def _pipeline() -> None:
    """Wire the stages in the order of `tasks.pipeline.STAGES` into the DAG being defined."""
    # Each call returns the task's future result (an XComArg) that the next task takes. Airflow's
    # stubs type a task call with the function's own parameters (dict, ...), not XComArg: a stub
    # gap, hence the ignores.
    ingested = ingest()
    validated = validate(ingested)  # type: ignore[arg-type]
    aggregated = aggregate(validated)  # type: ignore[arg-type]
    patterned = patterns(aggregated)  # type: ignore[arg-type]
    shards = stale(patterned)  # type: ignore[arg-type]
    outcomes = train.expand(shard=shards)  # one training task per shard of stale patterns
    recorded = record(outcomes)  # type: ignore[arg-type]
    scored = score(recorded)  # type: ignore[arg-type]
    published = publish(scored)  # type: ignore[arg-type]
    alerted = alert(published)  # type: ignore[arg-type]
    produced = [ingested, validated, aggregated, patterned, shards, outcomes, recorded, scored, published, alerted]
    _check_against_the_stages(produced)


hourly = rpcwatch_hourly()
rerun = rpcwatch_rerun()
