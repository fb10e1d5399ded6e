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

Each task is a thin call into `tasks/`. DuckDB allows one writer per file, so every task that
writes the warehouse runs in the one-slot pool `rpcwatch_duckdb`. Rerunning a run replaces exactly
its hour.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import CronDataIntervalTimetable, dag, get_current_context, task

DUCKDB_POOL = "rpcwatch_duckdb"


def _hour_and_settings():
    """The run's data interval start and rpcwatch settings (imported here, not at parse time)."""
    from tasks.settings import load_settings

    return get_current_context()["data_interval_start"], load_settings()


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
        from tasks.ingest import ingest_hour

        hour, settings = _hour_and_settings()
        report = ingest_hour(settings, hour)
        for bad in report.failed_files:
            print(f"file failed: {bad.error}")
        print(f"hour {hour}: {len(report.files)} files, {report.rows_read} rows read, {report.rows_kept} kept, "
              f"{report.rows_quarantined} quarantined{' (unchanged, skipped)' if report.skipped_unchanged else ''}")
        return {"batch_id": report.batch_id, "rows_read": report.rows_read, "rows_kept": report.rows_kept,
                "rows_quarantined": report.rows_quarantined, "skipped": report.skipped_unchanged}

    @task
    def validate(ingested: dict) -> dict:
        """Run the validation suite; a failed batch-level expectation fails this task."""
        from tasks.validate import validate_hour

        hour, settings = _hour_and_settings()
        report = validate_hour(settings, hour)
        print(f"batch {ingested['batch_id']}: {len(report.findings)} expectations, all batch-level passed")
        return {"batch_id": report.batch_id, "expectations": len(report.findings)}

    @task
    def aggregate(validated: dict) -> dict:
        """Rebuild `rpc_series` for this hour."""
        from tasks.aggregate import aggregate_hour

        hour, settings = _hour_and_settings()
        report = aggregate_hour(settings, hour)
        print(f"batch {validated['batch_id']}: {report.series_rows} series rows over {report.rpcs} RPCs")
        return {"series_rows": report.series_rows, "rpcs": report.rpcs}

    @task
    def patterns(aggregated: dict) -> dict:
        """Rebuild traces, assign them to RPC-chain patterns or re-cluster (when the cadence says),
        and write pattern graphs, per-pattern series and novel RPCs."""
        from tasks.patterns import patterns_hour

        hour, settings = _hour_and_settings()
        report = patterns_hour(settings, hour)
        for line in report.lines():
            print(line)
        return {"reclustered": report.reclustered, "reason": report.reason, "critical": report.critical,
                "critical_share": report.critical_share, "traces": report.reconstruction.traces}

    @task
    def stale(patterned: dict) -> list[dict]:
        """Decide which critical patterns' models are stale (no champion, graph changed, drift,
        age) and export each one's series to Parquet, so training never opens DuckDB."""
        from tasks.retrain import plan_training

        hour, settings = _hour_and_settings()
        jobs = plan_training(settings, hour)
        for job in jobs:
            print(f"pattern {job['pattern_id']} is stale: {', '.join(job['reasons'])}")
        if not jobs:
            print("nothing is stale this hour: no model will be trained")
        return jobs

    @task(queue="gpu", pool="default_pool", retries=1)
    def train(job: dict) -> dict:
        """Train one stale pattern's model on the GPU queue (CPU when none), tracked in MLflow."""
        from tasks.retrain import train_job
        from tasks.settings import load_settings

        outcome = train_job(load_settings(), job)
        print(outcome.get("skipped") or f"pattern {outcome['pattern_id']}: version {outcome['model_version']} "
                                         f"-> {outcome['decision']} ({outcome['reason']})")
        return outcome

    @task(trigger_rule="none_failed")  # zero mapped trainings (skipped) still records and says so
    def record(outcomes: list[dict]) -> int:
        """Mirror the trainings into DuckDB's `models` table (what staleness and scoring read)."""
        from tasks.retrain import record_outcomes

        _, settings = _hour_and_settings()
        n = record_outcomes(settings, list(outcomes or []))
        print(f"{n} model(s) recorded" if n else "no model trained this hour")
        return n

    @task(trigger_rule="none_failed")
    def score(recorded: int) -> dict:
        """Forecast every bucket of the hour with each critical pattern's champion; irregular points
        go to `anomalies`, related ones to `incidents`, novel RPCs too."""
        from tasks.publish import publish
        from tasks.scoring import score_hour

        hour, settings = _hour_and_settings()
        report = score_hour(settings, hour)
        print(report.line())
        print(f"published for analysts (read-only, never blocks a run): {publish(settings)}")
        return {"scored": report.scored, "anomalies": report.anomalies, "incidents": report.incidents}

    score(record(train.expand(job=stale(patterns(aggregate(validate(ingest())))))))


hourly = rpcwatch_hourly()
