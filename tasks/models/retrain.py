"""Retrain only what is stale: plan (DuckDB, in the writer pool) -> train (no DuckDB, parallel,
GPU queue) -> record (DuckDB, in the pool). The CLI runs the three in a row; the DAG maps `train`
over shards of the stale patterns (`tasks.models.shards`), each shard's forecasters fitted together.

DuckDB's `models` table mirrors the MLflow registry, which is the source of truth: plan reconciles
the mirror before deciding staleness and record after writing, so a training killed between
registering and recording neither leaves its pattern without champion nor retrains it every hour.

A pattern whose training raises is reported `failed` (a `Skipped` with its reason) and recorded so,
like a skipped one: one pattern never stops the others, nor the hour's scoring.

Reads `patterns`, `pattern_series`, `pattern_nodes`, `pattern_edges`, `models`, `forecast_errors`
(staleness, exports); writes `models` and the Parquet exports under `<home>/exports/<hour>` (removed
once the hour's outcomes are recorded; a crash's leftovers by the next plan). The stages hand each
other `TrainJob`s and `TrainOutcome`s / `Skipped`s (tasks.models.jobs)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

from tasks.clock import HOUR, hour_floor, naive_utc
from tasks.models.jobs import Outcome, Skipped, TrainJob, TrainOutcome, TrainShard
from tasks.models.registry import ModelRow, model_name, registry_mirror
from tasks.models.series import export_pattern, training_range
from tasks.models.staleness import NO_CHAMPION, Stale, stale_patterns
from tasks.settings import Settings
from tasks.warehouse import opened

log = logging.getLogger(__name__)


def plan_training(
    settings: Settings, hour: datetime, force: bool = False, patterns: list[int] | None = None
) -> list[TrainJob]:
    """Stale patterns with their reasons, each exported to Parquet for a lock-free training task."""
    hour = hour_floor(hour)
    start, end = training_range(hour + HOUR, settings.train_history_hours)
    folder = export_folder(settings, hour)
    # earlier hours' leftovers (a crash kept them from being recorded), and this hour's: a replanned
    # hour exports afresh, no file of an older plan among its own
    remove_exports(settings, hours=[hour], before=hour)
    with opened(settings.warehouse) as con:
        reconcile_models(settings, con)  # staleness must see the registry's champions
        stale = [
            s
            for s in stale_patterns(con, settings, hour, force, patterns)
            if _enough_history(con, s.pattern_id, end, settings.min_train_hours)
        ]
        jobs = []
        for s in stale:
            lo, hi = judged_range(s, start, end)
            jobs.append(TrainJob(s.pattern_id, s.reasons, hour, export_pattern(con, s.pattern_id, lo, hi, folder)))
    for job in jobs:
        log.debug("pattern %s is stale: %s", job.pattern_id, ", ".join(job.reasons))  # the stage says it
    if not jobs:
        log.debug("nothing is stale at %s: no model to train", hour)
    return jobs


def judged_range(stale: Stale, start: datetime, end: datetime) -> tuple[datetime, datetime]:
    """The stretch of history a retrain of the pattern reads: [start, end) shifted back by one hour
    when the pattern has a champion. In a run `train` comes before `score`: the hour being run is not
    judged yet, so an attack in it would be learnt as normal before anyone could see it. The same
    for every run and rerun of the hour (never "whatever was scored by then"), so a rerun trains on
    the same data. A pattern without a champion (a first model) has nothing to judge with and reads
    [start, end)."""
    if NO_CHAMPION in stale.reasons:
        return start, end
    return start - HOUR, end - HOUR


def _enough_history(con: duckdb.DuckDBPyConnection, pattern_id: int, end: datetime, min_hours: float) -> bool:
    row = con.execute("SELECT min(bucket_ts) FROM pattern_series WHERE pattern_id = ?", [pattern_id]).fetchone()
    first = row[0] if row else None
    hours = (naive_utc(end) - first).total_seconds() / 3600 if first else 0.0
    if hours < min_hours:
        log.info("pattern %s: %.1f h of history < %.1f h, not trained yet", pattern_id, hours, min_hours)
    return hours >= min_hours


def plan_shards(
    settings: Settings, hour: datetime, force: bool = False, patterns: list[int] | None = None
) -> list[TrainShard]:
    """`plan_training`'s jobs in at most `settings.train_shards` shards of similar cost."""
    from tasks.models.shards import shard_jobs

    return shard_jobs(plan_training(settings, hour, force, patterns), settings.train_shards)


def train_shard(settings: Settings, shard: TrainShard) -> list[Outcome]:
    """Train a shard's stale patterns (reading only their exported files), in the shard's order; a
    pattern with too little history is reported as skipped, not failed."""
    from tasks.models.training import train_patterns

    return train_patterns(settings, shard.jobs)


MODEL_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ModelRow))


def _insert_model(con: duckdb.DuckDBPyConnection, row: ModelRow) -> None:
    """One `models` row with its columns named (no reliance on the table's column order)."""
    con.execute(
        f"INSERT INTO models ({', '.join(MODEL_COLUMNS)}) VALUES ({', '.join('?' for _ in MODEL_COLUMNS)})",
        [getattr(row, c) for c in MODEL_COLUMNS],
    )


def _recorded_row(o: TrainOutcome, now: datetime) -> ModelRow:
    """The `models` row of a version this process trained (validation metrics from its outcome)."""
    m = o.metrics
    return ModelRow(
        pattern_id=o.pattern_id,
        model_name=model_name(o.pattern_id),
        model_version=o.model_version,
        run_id=o.run_id,
        graph_hash=o.graph_hash,
        pattern_version=o.pattern_version,
        trained_for=naive_utc(o.trained_for),
        decision=o.decision,
        reason=o.reason,
        stale_reason=o.stale_reason,
        val_mape_calls=m.get("model_mape_calls"),
        poisson_floor_calls=m.get("poisson_floor_calls"),
        seasonal_naive_mape_calls=m.get("seasonal_naive_mape_calls"),
        moving_average_mape_calls=m.get("moving_average_mape_calls"),
        no_graph_mape_calls=m.get("no_graph_mape_calls"),
        calibrated_mape_calls=m.get("model_mape_calls"),
        seconds=o.seconds,
        device=o.device,
        recorded_at=now,
    )


def _record_not_trained(con: duckdb.DuckDBPyConnection, o: Skipped, now: datetime) -> None:
    """A skipped or failed pattern as a `models` row without a version (decision and reason say
    why); one per pattern and hour, so a retried record writes the same row."""
    if o.trained_for is None:  # an outcome from before skips carried their hour
        return
    hour = naive_utc(o.trained_for)
    con.execute(
        "DELETE FROM models WHERE pattern_id = ? AND model_version IS NULL AND trained_for = ?", [o.pattern_id, hour]
    )
    con.execute(
        """INSERT INTO models (pattern_id, model_name, trained_for, decision, reason, stale_reason, recorded_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?)""",
        [o.pattern_id, model_name(o.pattern_id), hour, o.decision, o.reason, o.stale_reason, now],
    )


def record_outcomes(settings: Settings, outcomes: Iterable[Outcome]) -> int:
    """Mirror the trainings into DuckDB's `models` table (staleness and scoring read it there; a
    skipped or failed pattern gets a row without a version saying why), then reconcile it with the
    registry (a retried training may have registered more). Once committed, the hours' exports are
    removed (`remove_exports`): a rerun of `record` does not read them. Returns the versions recorded."""
    outcomes = list(outcomes)
    trained = [o for o in outcomes if isinstance(o, TrainOutcome)]
    now = naive_utc(datetime.now(UTC))
    with opened(settings.warehouse) as con:
        for o in trained:
            con.execute(
                "DELETE FROM models WHERE pattern_id = ? AND model_version = ?", [o.pattern_id, o.model_version]
            )
            _insert_model(con, _recorded_row(o, now))
        for skipped in (o for o in outcomes if isinstance(o, Skipped)):
            _record_not_trained(con, skipped, now)
        if trained:
            reconcile_models(settings, con)
    hours = {hour_floor(o.trained_for) for o in outcomes if o.trained_for is not None}
    remove_exports(settings, hours=sorted(hours))
    return len(trained)


# --- the Parquet exports of an hour's training: written by plan, read by train, removed by record ---


def export_folder(settings: Settings, hour: datetime) -> Path:
    """Where `plan_training` exports the stale patterns of `hour` (one folder per hour)."""
    return settings.home / "exports" / f"{hour_floor(hour):%Y%m%dT%H}"


def remove_exports(settings: Settings, hours: Iterable[datetime] = (), before: datetime | None = None) -> None:
    """Remove the exports of `hours`, and of every hour before `before`: recorded, their files are
    never read again (a rerun of `record` reads none; a rerun of the hour plans and exports anew).
    A removal cut short by a crash leaves a folder that the next plan removes."""
    root = settings.home / "exports"
    if not root.is_dir():
        return
    names = {export_folder(settings, hour).name for hour in hours}
    cutoff = export_folder(settings, before).name if before is not None else None
    for folder in root.iterdir():
        name = folder.name  # %Y%m%dT%H sorts as the hours do
        if folder.is_dir() and _is_hour(name) and (name in names or (cutoff is not None and name < cutoff)):
            try:
                shutil.rmtree(folder)
            except OSError as err:  # the exports are disposable: a later plan or record tries again
                log.warning("could not remove the training exports %s: %s", folder, err)


def _is_hour(name: str) -> bool:
    """A folder name `plan_training` writes (YYYYMMDDTHH), nothing else under exports/."""
    try:
        datetime.strptime(name, "%Y%m%dT%H")
    except ValueError:
        return False
    return len(name) == len("20260101T00")


def reconcile_models(settings: Settings, con: duckdb.DuckDBPyConnection) -> int:
    """Repair DuckDB's `models` mirror from the registry: every registered version without a row
    gets one (from its tags and run), and each pattern's current champion is the version the
    registry's `champion` alias points to. Without it a training killed after registering but
    before `record` reads as "no champion": every later hour retrains, the retrained model ties
    the real champion, stays a challenger, and the pattern is stale forever. Returns rows changed."""
    known = {(p, v) for p, v in con.execute("SELECT pattern_id, model_version FROM models").fetchall()}
    try:
        mirror = registry_mirror(settings, known)
    except Exception as err:  # noqa: BLE001  registry unreachable: decide on the mirror as it is
        log.warning("model registry unreachable, staleness decided on DuckDB's copy: %s", err)
        return 0
    if mirror is None:
        return 0
    for row in mirror.missing:
        log.warning(
            "pattern %s: v%s is registered but was never recorded (a killed run): mirrored as %s",
            row.pattern_id,
            row.model_version,
            row.decision,
        )
        _insert_model(con, row)
    return len(mirror.missing) + sum(_follow_alias(con, pid, version) for pid, version in mirror.champions.items())


def _changed(con: duckdb.DuckDBPyConnection, sql: str, params: list[object]) -> int:
    """Rows an UPDATE changed."""
    row = con.execute(sql, params).fetchone()
    return int(row[0]) if row else 0


def _follow_alias(con: duckdb.DuckDBPyConnection, pattern_id: int, champion: int | None) -> int:
    """Make the aliased version (None: no alias) the pattern's current champion row. Champion rows
    after it (alias removed or rolled back) are demoted; those before it stay: they are history."""
    changed = 0
    if champion is not None:
        changed += _changed(
            con,
            """UPDATE models SET decision = 'champion', reason = concat_ws('; ', reason, ?)
                                  WHERE pattern_id = ? AND model_version = ? AND decision <> 'champion'""",
            ["the registry's champion alias is on it", pattern_id, champion],
        )
    changed += _changed(
        con,
        """UPDATE models SET decision = 'demoted', reason = concat_ws('; ', reason, ?)
                              WHERE pattern_id = ? AND decision = 'champion' AND model_version > ?""",
        [
            f"the registry's champion alias is on v{champion}" if champion else "the registry has no champion alias",
            pattern_id,
            champion or 0,
        ],
    )
    return changed


def train_stale(
    settings: Settings, hour: datetime, force: bool = False, patterns: list[int] | None = None
) -> list[dict[str, Any]]:
    """Plan, train and record in a row (the CLI's `rpcwatch train`); the outcomes as `to_dict()`s."""
    outcomes = [o for shard in plan_shards(settings, hour, force, patterns) for o in train_shard(settings, shard)]
    record_outcomes(settings, outcomes)
    return [o.to_dict() for o in outcomes]
