"""Retrain only what is stale: plan (DuckDB, in the writer pool) -> train (no DuckDB, parallel,
GPU queue) -> record (DuckDB, in the pool). The CLI runs the three in a row; the DAG maps `train`."""

from __future__ import annotations

import logging
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from tasks.ingest import HOUR, hour_floor, naive_utc
from tasks.series import export_pattern, training_range
from tasks.settings import Settings
from tasks.staleness import stale_patterns
from tasks.warehouse import opened

log = logging.getLogger(__name__)


def plan_training(settings: Settings, hour: datetime, force: bool = False,
                  patterns: list[int] | None = None) -> list[dict]:
    """Stale patterns with their reasons, each exported to Parquet for a lock-free training task."""
    hour = hour_floor(hour)
    start, end = training_range(hour + HOUR, settings.train_history_hours)
    folder = settings.home / "exports" / f"{hour:%Y%m%dT%H}"
    with opened(settings.warehouse) as con:
        stale = [s for s in stale_patterns(con, settings, hour, force, patterns)
                 if _enough_history(con, s.pattern_id, end, settings.min_train_hours)]
        jobs = [{"pattern_id": s.pattern_id, "reasons": s.reasons, "hour": hour.isoformat(),
                 "meta_path": str(export_pattern(con, s.pattern_id, start, end, folder))} for s in stale]
    for job in jobs:
        log.info("pattern %s is stale: %s", job["pattern_id"], ", ".join(job["reasons"]))
    if not jobs:
        log.info("nothing is stale at %s: no model to train", hour)
    return jobs


def _enough_history(con, pattern_id: int, end: datetime, min_hours: float) -> bool:
    first = con.execute("SELECT min(bucket_ts) FROM pattern_series WHERE pattern_id = ?", [pattern_id]).fetchone()[0]
    hours = (naive_utc(end) - first).total_seconds() / 3600 if first else 0.0
    if hours < min_hours:
        log.info("pattern %s: %.1f h of history < %.1f h, not trained yet", pattern_id, hours, min_hours)
    return hours >= min_hours


def train_job(settings: Settings, job: dict) -> dict:
    """Train one stale pattern (reads only its exported files); a pattern with too little history
    is reported as skipped, not failed."""
    from tasks.forecast import NotEnoughHistory
    from tasks.training import train_pattern

    hour = datetime.fromisoformat(job["hour"])
    try:
        outcome = train_pattern(settings, Path(job["meta_path"]), hour, reason=",".join(job["reasons"]))
    except NotEnoughHistory as err:
        log.warning("pattern %s skipped: %s", job["pattern_id"], err)
        return {"pattern_id": job["pattern_id"], "skipped": str(err)}
    return asdict(outcome)


def record_outcomes(settings: Settings, outcomes: list[dict]) -> int:
    """Mirror the trainings into DuckDB's `models` table (staleness and scoring read it there)."""
    rows = [o for o in outcomes if "skipped" not in o]
    now = naive_utc(datetime.now(timezone.utc))
    with opened(settings.warehouse) as con:
        for o in rows:
            m = o["metrics"]
            con.execute("DELETE FROM models WHERE pattern_id = ? AND model_version = ?", [o["pattern_id"], o["model_version"]])
            con.execute("INSERT INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", [
                o["pattern_id"], f"rpcwatch-pattern-{o['pattern_id']}", o["model_version"], o["run_id"], o["graph_hash"],
                o["pattern_version"], naive_utc(datetime.fromisoformat(o["trained_for"])), o["decision"], o["reason"],
                o.get("stale_reason", ""), m.get("model_mape_calls"), m.get("poisson_floor_calls"),
                m.get("seasonal_naive_mape_calls"), m.get("moving_average_mape_calls"), m.get("no_graph_mape_calls"),
                m.get("model_mape_calls"), o["seconds"], o["device"], now])
    return len(rows)


def train_stale(settings: Settings, hour: datetime, force: bool = False, patterns: list[int] | None = None) -> list[dict]:
    outcomes = [train_job(settings, job) for job in plan_training(settings, hour, force, patterns)]
    record_outcomes(settings, outcomes)
    return outcomes
