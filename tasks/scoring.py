"""Score an hour: each critical pattern's champion forecasts every bucket of the hour from the W
buckets before it; observed points outside the calibrated band land in `anomalies`.

Idempotent per (pattern, hour): rescoring replaces. `score_runs` says per pattern what happened
(scored, or skipped and why); `forecast_errors` keeps the hour's calls MAPE next to the model's
calibrated level (the drift rule of the staleness policy reads it). RPCs in no pattern graph
(`novel_rpcs`) become anomalies of kind `novel_rpc`. Related flagged points are grouped into
`incidents`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import numpy as np
import torch

from tasks.forecast import Prepared, _windows, count_band, latency_band, metrics, predict
from tasks.nn import graph_edge_index
from tasks.ingest import HOUR, hour_floor, naive_utc
from tasks.series import FEATURES
from tasks.settings import Settings
from tasks.warehouse import opened

log = logging.getLogger(__name__)

CHAMPIONS_SQL = """
SELECT p.pattern_id, p.graph_hash, m.model_version, m.run_id, m.graph_hash AS model_hash
FROM patterns p JOIN (
    SELECT pattern_id, max(model_version) AS model_version, arg_max(run_id, model_version) AS run_id,
           arg_max(graph_hash, model_version) AS graph_hash
    FROM models WHERE decision = 'champion' GROUP BY pattern_id) m USING (pattern_id)
WHERE p.status = 'active' AND p.critical ORDER BY p.pattern_id
"""


@dataclass
class ScoreReport:
    hour: datetime
    scored: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)
    anomalies: int = 0
    novel: int = 0
    incidents: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        skipped = "; ".join(f"{p}: {why}" for p, why in self.skipped.items()) or "none"
        return (f"{self.hour:%Y-%m-%d %H:00}: scored {len(self.scored)} patterns, {self.anomalies} irregular points "
                f"({self.novel} novel RPC), {self.incidents} incidents; skipped: {skipped}; {self.seconds:.1f} s")


def champion_folder(settings: Settings, pattern_id: int, version: int) -> Path:
    """The champion's artifacts, downloaded from MLflow once and cached under the home."""
    from tasks.training import model_name, setup_mlflow

    folder = settings.home / "model-cache" / model_name(pattern_id) / str(version)
    if not (folder / "artifacts" / "state_dict.pt").exists():
        mlflow = setup_mlflow(settings)
        folder.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(f"models:/{model_name(pattern_id)}/{version}", dst_path=str(folder))
    return folder / "artifacts"


def _series(con: duckdb.DuckDBPyConnection, pattern_id: int, nodes: list[str], start: datetime, end: datetime,
            seconds: int) -> tuple[np.ndarray, np.ndarray]:
    buckets = np.arange(np.datetime64(naive_utc(start), "s"), np.datetime64(naive_utc(end), "s"),
                        np.timedelta64(seconds, "s"))
    values = np.zeros((len(buckets), len(nodes), len(FEATURES)))
    values[:, :, 1:3] = np.nan
    index = {n: i for i, n in enumerate(nodes)}
    rows = con.execute("""SELECT bucket_ts, node, calls, rt_mean, rt_p95, errors FROM pattern_series
                          WHERE pattern_id = ? AND bucket_ts >= ? AND bucket_ts < ?""",
                       [pattern_id, naive_utc(start), naive_utc(end)]).fetchall()
    for ts, node, *features in rows:
        if node in index:
            t = int((np.datetime64(ts, "s") - buckets[0]) // np.timedelta64(seconds, "s"))
            values[t, index[node]] = features
    return buckets, values


def _flags(obs: np.ndarray, exp: np.ndarray, nodes: list[str], thresholds: dict) -> list[tuple]:
    """(sample, node index, feature, threshold, score, direction, kind) of every irregular point."""
    alarm_p = thresholds["alarm_p"]
    out = []
    for n, node in enumerate(nodes):
        th = thresholds["nodes"][node]
        for f, kind_up, kind_down in ((0, "traffic_spike", "traffic_drop"), (3, "errors", None)):
            lo, hi = count_band(exp[:, n, f], th[FEATURES[f]]["alpha"], alarm_p)
            for s in np.flatnonzero(obs[:, n, f] > hi):
                out.append((s, n, f, hi[s], (obs[s, n, f] - exp[s, n, f]) / max(hi[s] - exp[s, n, f], 1e-9), "up", kind_up))
            if kind_down:
                for s in np.flatnonzero(obs[:, n, f] < lo):
                    out.append((s, n, f, lo[s], (exp[s, n, f] - obs[s, n, f]) / max(exp[s, n, f] - lo[s], 1e-9), "down", kind_down))
        calls = obs[:, n, 0]
        for f in (1, 2):
            lo, hi = latency_band(exp[:, n, f], calls, th[FEATURES[f]]["sigma"], th[FEATURES[f]]["k"])
            ok = (calls > 0) & np.isfinite(obs[:, n, f])
            for s in np.flatnonzero(ok & (obs[:, n, f] > hi)):
                out.append((s, n, f, hi[s], np.log(obs[s, n, f] / exp[s, n, f]) / max(np.log(hi[s] / exp[s, n, f]), 1e-9), "up", "latency"))
    return out


MAX_CLEANED_RUN = 30  # after this many flagged buckets in a row (30 min) a level is accepted as the new normal


def _forecast_sequentially(model, cfg, norm, values: np.ndarray, targets: np.ndarray, edge_index, nodes: list[str],
                           thresholds: dict, clean: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
    """Forecast bucket by bucket; a flagged observation is replaced by its forecast before it
    enters later windows, so a long flood keeps being flagged and its end does not echo as a
    drop. A run of more than MAX_CLEANED_RUN flags is accepted as a new level (no runaway)."""
    observed = values[targets].copy()
    expected = np.zeros_like(observed)
    flags: list[tuple] = []
    run = np.zeros(values.shape[1:], dtype=int)
    for s, t in enumerate(targets):
        starts = np.array([t - cfg.horizon - cfg.window + 1])
        x, offsets = _windows(norm, clean, starts, cfg.window)
        prep = Prepared(x, torch.zeros(0), np.array([t]), 0, edge_index, offsets, norm)
        expected[s] = predict(model, prep, slice(None), torch.device("cpu"))[0]
        flagged = np.zeros(values.shape[1:], dtype=bool)
        for _, n, f, threshold, score, direction, kind in _flags(observed[s:s + 1], expected[s:s + 1], nodes, thresholds):
            flags.append((s, n, f, threshold, score, direction, kind))
            flagged[n, f] = True
        run = np.where(flagged, run + 1, 0)
        replace = flagged & (run <= MAX_CLEANED_RUN)
        clean[t][replace] = expected[s][replace]
    return expected, observed, flags


def _cleaned_lead_in(con, pattern_id: int, nodes: list[str], buckets: np.ndarray, values: np.ndarray, until: datetime) -> np.ndarray:
    """The series with points already flagged (previous hour) replaced by their forecasts."""
    clean = values.copy()
    index = {n: i for i, n in enumerate(nodes)}
    seconds = int((buckets[1] - buckets[0]) / np.timedelta64(1, "s")) if len(buckets) > 1 else 60
    for ts, node, feature, expected in con.execute(
            "SELECT bucket_ts, node, feature, expected FROM anomalies WHERE pattern_id = ? AND bucket_ts >= ? AND bucket_ts < ?",
            [pattern_id, buckets[0].astype(datetime), naive_utc(until)]).fetchall():
        t = int((np.datetime64(ts, "s") - buckets[0]) // np.timedelta64(seconds, "s"))
        if node in index and feature in FEATURES:
            clean[t, index[node], FEATURES.index(feature)] = expected
    return clean


def _score_pattern(con, settings: Settings, hour: datetime, champion: tuple, scored_at: datetime) -> tuple[int, float]:
    from tasks.training import load_model

    pattern_id, _, version, run_id, _ = champion
    model, cfg, graph, norm, thresholds = load_model(champion_folder(settings, pattern_id, version))
    seconds, nodes = graph["bucket_seconds"], graph["nodes"]
    lead = cfg.window + cfg.horizon - 1
    buckets, values = _series(con, pattern_id, nodes, hour - timedelta(seconds=lead * seconds), hour + HOUR, seconds)
    targets = np.arange(lead, len(buckets))
    edge_index = graph_edge_index(len(nodes), [tuple(e) for e in graph["edges"]])
    clean = _cleaned_lead_in(con, pattern_id, nodes, buckets, values, hour)
    expected, observed, flags = _forecast_sequentially(model, cfg, norm, values, targets, edge_index, nodes,
                                                       thresholds, clean)
    rows = []
    for s, n, f, threshold, score, direction, kind in flags:
        caller, callee, interface, _ = nodes[n].split("|", 3)
        rows.append([buckets[targets[s]].astype(datetime), pattern_id, nodes[n], caller, callee, interface or None,
                     FEATURES[f], float(observed[s, n, f]), float(expected[s, n, f]), float(threshold), float(score),
                     direction, kind, f"rpcwatch-pattern-{pattern_id}", version, run_id, scored_at])
    start, end = naive_utc(hour), naive_utc(hour + HOUR)
    con.execute("DELETE FROM anomalies WHERE pattern_id = ? AND bucket_ts >= ? AND bucket_ts < ?", [pattern_id, start, end])
    if rows:
        con.executemany("INSERT INTO anomalies VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    mape = metrics(expected, observed)["mape_calls"]
    con.execute("DELETE FROM forecast_errors WHERE pattern_id = ? AND hour = ?", [pattern_id, start])
    con.execute("INSERT INTO forecast_errors VALUES (?, ?, ?, ?, ?)",
                [pattern_id, start, version, mape if np.isfinite(mape) else None, thresholds["calibrated_mape_calls"]])
    return len(rows), mape


def _novel_anomalies(con: duckdb.DuckDBPyConnection, hour: datetime, scored_at: datetime) -> int:
    start, end = naive_utc(hour), naive_utc(hour + HOUR)
    con.execute("DELETE FROM anomalies WHERE kind = 'novel_rpc' AND bucket_ts >= ? AND bucket_ts < ?", [start, end])
    return con.execute("""INSERT INTO anomalies
        SELECT bucket_ts, NULL, concat_ws('|', caller, callee, coalesce(interface, ''), rpc_type), caller, callee,
               interface, 'calls', calls, 0, 0, calls, 'up', 'novel_rpc', NULL, NULL, NULL, ?
        FROM novel_rpcs WHERE bucket_ts >= ? AND bucket_ts < ?""", [scored_at, start, end]).fetchone()[0]


def _incidents(con: duckdb.DuckDBPyConnection, hour: datetime, gap_buckets: int, seconds: int, min_buckets: int) -> int:
    """Flagged points of one pattern (novel RPCs: of one calling service) no more than `gap_buckets`
    apart are one incident: a flood is one incident, not 300 rows. A run must span `min_buckets`
    buckets (like an alert's `for: 3m`) unless a point is far out (score >= 3). Rebuilt for the hour
    and the one before."""
    start, end = naive_utc(hour - HOUR), naive_utc(hour + HOUR)
    con.execute("DELETE FROM incidents WHERE start_ts >= ? AND start_ts < ?", [start, end])
    return con.execute(f"""INSERT INTO incidents
        WITH a AS (
            SELECT *, coalesce(CAST(pattern_id AS VARCHAR), 'novel:' || caller) AS grp FROM anomalies
            WHERE bucket_ts >= ? AND bucket_ts < ?),
        marked AS (
            SELECT *, CASE WHEN bucket_ts - lag(bucket_ts) OVER (PARTITION BY grp ORDER BY bucket_ts)
                           <= INTERVAL '{gap_buckets * seconds} seconds' THEN 0 ELSE 1 END AS new_run FROM a),
        runs AS (SELECT *, sum(new_run) OVER (PARTITION BY grp ORDER BY bucket_ts ROWS UNBOUNDED PRECEDING) AS run FROM marked)
        SELECT md5(grp || ':' || CAST(min(bucket_ts) AS VARCHAR))[:12], min(bucket_ts), max(bucket_ts) + INTERVAL '{seconds} seconds',
               list(DISTINCT pattern_id) FILTER (WHERE pattern_id IS NOT NULL), list(DISTINCT node), max(score),
               list(DISTINCT kind), count(*)
        FROM runs GROUP BY grp, run
        HAVING count(DISTINCT bucket_ts) >= {min_buckets} OR max(score) >= 3""", [start, end]).fetchone()[0]


def score_hour(settings: Settings, hour: datetime) -> ScoreReport:
    """Score every critical pattern with a champion for `hour` (idempotent per pattern and hour)."""
    hour = hour_floor(hour)
    started = time.perf_counter()
    report = ScoreReport(hour)
    scored_at = naive_utc(datetime.now(timezone.utc))
    with opened(settings.warehouse) as con:
        con.execute("BEGIN")
        start = naive_utc(hour)
        con.execute("DELETE FROM score_runs WHERE hour = ?", [start])
        critical = [r[0] for r in con.execute("SELECT pattern_id FROM patterns WHERE status = 'active' AND critical").fetchall()]
        champions = {r[0]: r for r in con.execute(CHAMPIONS_SQL).fetchall()}
        for pid in critical:
            champion = champions.get(pid)
            why = ("no champion" if champion is None else
                   "graph changed since training" if champion[1] != champion[4] else None)
            if why is None:
                n, mape = _score_pattern(con, settings, hour, champion, scored_at)
                report.scored.append(pid)
                report.anomalies += n
                con.execute("INSERT INTO score_runs VALUES (?, ?, 'scored', NULL, ?, ?, ?)",
                            [start, pid, champion[2], n, mape if np.isfinite(mape) else None])
            else:
                report.skipped[pid] = why
                con.execute("INSERT INTO score_runs VALUES (?, ?, 'skipped', ?, NULL, 0, NULL)", [start, pid, why])
        report.novel = _novel_anomalies(con, hour, scored_at)
        report.anomalies += report.novel
        report.incidents = _incidents(con, hour, settings.incident_gap_buckets, settings.bucket_seconds,
                                      settings.incident_min_buckets)
        con.execute("COMMIT")
    report.seconds = time.perf_counter() - started
    log.info(report.line())
    return report
