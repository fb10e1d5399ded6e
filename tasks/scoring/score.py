"""Score an hour: each critical pattern's champion forecasts every bucket of the hour from the W
buckets before it; observed points outside the calibrated band land in `anomalies`.

Each champion's trace model scores the hour's traces of its pattern too; windows holding more
surprising traces than its calibrated rate allows join the points (`tasks.scoring.trace_scoring`).

Idempotent per (pattern, hour): rescoring replaces. `score_runs` says per pattern what happened
(scored, or skipped: no champion, graph changed since training, or too little history when no
series row lies in the model's lead-in before the hour); `forecast_errors` keeps the hour's calls
MAPE next to the model's calibrated level (the drift rule of the staleness policy reads it). RPCs
in no pattern graph (`novel_rpcs`) become anomalies of kind `novel_rpc`; single calls no earlier
call of their RPC resembles, of kind `extreme_call` (`tasks.scoring.extreme`). Related flagged
points are grouped into `incidents`.

Reads `patterns`, `models` (the champions), `pattern_series`, `anomalies` (earlier flags),
`novel_rpcs`, `calls`; writes `anomalies`, `forecasts` (the forecast and non-alarm band of every scored
point, `tasks.scoring.forecasts`), `score_runs`, `forecast_errors` (`tasks.scoring.store`),
`incidents` (`tasks.scoring.incidents`).

Cost: the series and earlier flags of many patterns are read in one query (`tasks.scoring.grid`),
each pattern's hour is forecast in one batched pass plus a small pass per cleaned flagged bucket
(`tasks.scoring.sequential`), in worker processes, one per core, when there are many patterns
(`tasks.scoring.parallel`), and the results are written in one statement per table: about 20 ms of
CPU per pattern of 8 nodes, 5,000 patterns in 50-60 s on 2 cores (tests/benchmarks/bench_score.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

import duckdb
import numpy as np

from tasks.clock import HOUR, hour_floor, naive_utc
from tasks.keys import split_node_key
from tasks.models.baselines import metrics
from tasks.models.detector import Detector, one_torch_thread
from tasks.models.features import COUNTS, FEATURES
from tasks.models.registry import ChampionRow, champions, model_name
from tasks.scoring.extreme import extreme_anomalies
from tasks.scoring.forecasts import forecast_columns
from tasks.scoring.grid import Columns, Grid, cleaned, fetch_flagged, fetch_series
from tasks.scoring.incidents import rebuild_incidents
from tasks.scoring.novel import novel_anomalies
from tasks.scoring.parallel import worker_count, worker_jobs
from tasks.scoring.sequential import Forecast, forecast_sequentially, span_grid
from tasks.scoring.store import ANOMALY_COLUMNS, AnomalyRow, Scored, store_hour
from tasks.scoring.trace_scoring import trace_rows
from tasks.settings import Settings
from tasks.warehouse import opened

__all__ = ["ANOMALY_COLUMNS", "ScoreReport", "score_hour"]  # ANOMALY_COLUMNS: tasks.scoring.store's, for old imports

log = logging.getLogger(__name__)


@dataclass
class ScoreReport:
    hour: datetime
    scored: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    anomalies: int = 0
    novel: int = 0
    extreme: int = 0  # decisive single calls (tasks.scoring.extreme)
    incidents: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        skipped = "; ".join(f"{p}: {why}" for p, why in self.skipped.items()) or "none"
        return (
            f"{self.hour:%Y-%m-%d %H:00}: scored {len(self.scored)} patterns, {self.anomalies} irregular points "
            f"({self.novel} novel RPC, {self.extreme} extreme calls)"
            f", {self.incidents} incidents; skipped: {skipped}; {self.seconds:.1f} s"
        )


class Skipped(Exception):
    """A pattern that is not scored this hour; the message is the reason written to score_runs."""


class Ready(NamedTuple):
    """A critical pattern whose champion matches its current graph."""

    champion: ChampionRow
    detector: Detector


def _ready_patterns(
    con: duckdb.DuckDBPyConnection, settings: Settings
) -> tuple[list[int], list[Ready], dict[int, str]]:
    """The active critical patterns (in the table's order), those with a champion trained on their
    current graph, and why the others are skipped."""
    critical = con.execute(
        "SELECT pattern_id, graph_hash FROM patterns WHERE status = 'active' AND critical"
    ).fetchall()
    rows = champions(con)
    ready, skipped = [], {}
    for pid, graph_hash in critical:
        row = rows.get(pid)
        if row is None:
            skipped[pid] = "no champion"
        elif row.graph_hash != graph_hash:
            skipped[pid] = "graph changed since training"
        else:
            ready.append(Ready(row, Detector.load(settings, pid, row.model_version)))
    return [pid for pid, _ in critical], ready, skipped


def _anomaly_rows(
    ready: Ready, buckets: np.ndarray, targets: np.ndarray, forecast: Forecast, scored_at: datetime
) -> list[AnomalyRow]:
    """The `anomalies` rows of a forecast's flags."""
    nodes, out = ready.detector.nodes, []
    for flag in forecast.flags:
        s, n, f = flag.sample, flag.node, flag.feature
        caller, callee, interface, _ = split_node_key(nodes[n])
        out.append(
            AnomalyRow(
                buckets[targets[s]].astype(datetime),
                ready.champion.pattern_id,
                nodes[n],
                caller,
                callee,
                interface or None,
                FEATURES[f],
                float(forecast.observed[s, n, f]),
                float(forecast.expected[s, n, f]),
                float(flag.threshold),
                float(flag.score),
                flag.direction,
                flag.kind,
                model_name(ready.champion.pattern_id),
                ready.champion.model_version,
                ready.champion.run_id,
                scored_at,
                callee,
            )
        )
    return out


def _score_pattern(
    ready: Ready, grid: Grid, rows: Columns | None, flagged: Columns | None, scored_at: datetime
) -> Scored:
    """Forecast and flag one pattern's hour from its fetched rows; raises Skipped when it cannot be
    scored. Writes nothing."""
    values, present = grid.dense(rows)
    detector = ready.detector
    if not present[: detector.lead].any():  # the first windows would be all zeros: every point a spike
        raise Skipped("too little history")
    targets = np.arange(detector.lead, grid.size)
    forecast = forecast_sequentially(detector, values, targets, cleaned(values, flagged))
    mape = metrics(forecast.expected, forecast.observed)["mape_calls"]
    version = ready.champion.model_version
    return Scored(
        version,
        _anomaly_rows(ready, grid.buckets, targets, forecast, scored_at),
        mape if np.isfinite(mape) else None,
        detector.thresholds.calibrated_mape_calls,
        forecast_columns(detector, grid.buckets[targets], forecast.observed, forecast.expected, version),
    )


def _outcome(
    ready: list[Ready], index: int, grid: Grid, rows: Columns | None, flagged: Columns | None, scored_at: datetime
) -> Scored | str:
    """The scored hour of ready pattern `index`, or why it is skipped (a worker process's job)."""
    try:
        return _score_pattern(ready[index], grid, rows, flagged, scored_at)
    except Skipped as skip:
        return str(skip)


def _score_all(
    con: duckdb.DuckDBPyConnection, ready: list[Ready], hour: datetime, scored_at: datetime, chunk: int = 200
) -> tuple[dict[int, Scored], dict[int, str]]:
    """Score the ready patterns, reading the series and earlier flags of `chunk` patterns per query;
    forecast in worker processes (`tasks.scoring.parallel`) while the next chunk is read."""
    with worker_jobs(_outcome, ready, worker_count(len(ready))) as work:
        for i in range(0, len(ready), chunk):
            grids = [span_grid(r.detector, hour, hour + HOUR) for r in ready[i : i + chunk]]
            series, flagged = fetch_series(con, grids), fetch_flagged(con, grids, hour)
            rows = [(series.get(g.pattern_id), flagged.get(g.pattern_id)) for g in grids]
            work.submit([(i + j, g, *r, scored_at) for j, (g, r) in enumerate(zip(grids, rows))])
        outcomes = work.results()
    scored, skipped = {}, {}
    for r, outcome in zip(ready, outcomes):
        if isinstance(outcome, str):
            skipped[r.champion.pattern_id] = outcome
        else:
            scored[r.champion.pattern_id] = outcome
    return scored, skipped


def _control_count_tests(settings: Settings, ready: list[Ready]) -> None:
    """Each count point is one of many tests an hour (buckets x nodes x calls and errors of every
    ready pattern): Bonferroni brings the per-point level down so that the hour's chance of a
    false point stays near `trace_alpha`, as the trace windows' does (never above `alarm_p`)."""
    tests = (3600 // settings.bucket_seconds) * sum(len(r.detector.nodes) for r in ready) * len(COUNTS)
    for r in ready:
        r.detector.alarm_p = min(r.detector.thresholds.alarm_p, settings.trace_alpha / max(tests, 1))


def _add_trace_rows(
    con: duckdb.DuckDBPyConnection,
    settings: Settings,
    ready: list[Ready],
    scored: dict[int, Scored],
    hour: datetime,
    scored_at: datetime,
) -> None:
    """The trace models' alarmed windows join their patterns' forecaster points."""
    models = {
        r.champion.pattern_id: (r.champion, r.detector.trace_model)
        for r in ready
        if r.detector.trace_model is not None and r.champion.pattern_id in scored
    }
    for pid, rows in trace_rows(con, settings, models, hour, scored_at).items():
        scored[pid].rows.extend(rows)


def score_hour(settings: Settings, hour: datetime) -> ScoreReport:
    """Score every critical pattern with a champion for `hour` (idempotent per pattern and hour)."""
    hour = hour_floor(hour)
    started = time.perf_counter()
    report = ScoreReport(hour)
    scored_at = naive_utc(datetime.now(UTC))
    with opened(settings.warehouse) as con, one_torch_thread():
        con.execute("BEGIN")
        con.execute("DELETE FROM score_runs WHERE hour = ?", [naive_utc(hour)])
        critical, ready, skipped = _ready_patterns(con, settings)
        _control_count_tests(settings, ready)
        scored, too_little = _score_all(con, ready, hour, scored_at)
        skipped.update(too_little)
        _add_trace_rows(con, settings, ready, scored, hour, scored_at)
        report.scored = [pid for pid in critical if pid in scored]
        report.skipped = {pid: skipped[pid] for pid in critical if pid in skipped}
        store_hour(con, hour, scored, report.skipped)
        report.novel = novel_anomalies(
            con,
            hour,
            scored_at,
            memory=timedelta(hours=settings.train_history_hours),
            warmup=timedelta(hours=settings.min_train_hours),
        )
        report.extreme = extreme_anomalies(
            con, hour, scored_at, settings.bucket_seconds, memory=timedelta(hours=settings.train_history_hours)
        )
        report.anomalies = sum(len(r.rows) for r in scored.values()) + report.novel + report.extreme
        report.incidents = rebuild_incidents(
            con,
            hour,
            settings.incident_gap_buckets,
            settings.bucket_seconds,
            settings.incident_min_buckets,
            settings.alarm_false_per_day,
        )
        con.execute("COMMIT")
    report.seconds = time.perf_counter() - started
    log.debug(report.line())  # the stage says it (tasks.pipeline)
    return report
