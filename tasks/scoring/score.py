"""Score an hour: each critical pattern's champion forecasts every bucket of the hour from the W
buckets before it; observed points outside the calibrated band land in `anomalies`.

Idempotent per (pattern, hour): rescoring replaces. `score_runs` says per pattern what happened
(scored, or skipped: no champion, graph changed since training, or too little history when no
series row lies in the model's lead-in before the hour); `forecast_errors` keeps the hour's calls
MAPE next to the model's calibrated level (the drift rule of the staleness policy reads it). RPCs in no pattern graph
(`novel_rpcs`) become anomalies of kind `novel_rpc`. Related flagged points are grouped into
`incidents`.

Cost: the series and earlier flags of many patterns are read in one query, each pattern's hour
is forecast in one batched pass (plus a small pass per cleaned flagged bucket) and the results
are written in one statement per table: about 20 ms of CPU per pattern of 8 nodes
(tests/benchmarks/bench_score.py).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import numpy as np
import torch

from tasks.clock import HOUR, hour_floor, naive_utc
from tasks.keys import node_key_sql, split_node_key
from tasks.models.baselines import metrics
from tasks.models.features import FEATURES
from tasks.models.forecast import Prepared, TrainConfig, _windows, make_model, predict
from tasks.models.nn import graph_edge_index
from tasks.models.thresholds import count_quantile, latency_band
from tasks.scoring.incidents import rebuild_incidents
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
        return (
            f"{self.hour:%Y-%m-%d %H:00}: scored {len(self.scored)} patterns, {self.anomalies} irregular points "
            f"({self.novel} novel RPC), {self.incidents} incidents; skipped: {skipped}; {self.seconds:.1f} s"
        )


def champion_folder(settings: Settings, pattern_id: int, version: int) -> Path:
    """The champion's artifacts, cached under the home and verified against the registry's digests
    on every load (an edited cached file is downloaded again, never trusted)."""
    from tasks.models.training import cached_artifacts

    return cached_artifacts(settings, pattern_id, version)


# one module per model config, with its parameters and buffers by name: building an STGCN (and
# load_state_dict's bookkeeping) costs more than copying a champion's weights into it
_MODULES: dict[str, tuple[torch.nn.Module, dict[str, torch.Tensor]]] = {}


@dataclass
class Grid:
    """What is read of one pattern: its graph's nodes on `size` buckets of `seconds` from `start`."""

    pattern_id: int
    nodes: list[str]
    start: np.datetime64  # datetime64[s]
    size: int
    seconds: int

    @classmethod
    def between(cls, pattern_id: int, nodes: list[str], start: datetime, end: datetime, seconds: int) -> Grid:
        first, last = np.datetime64(naive_utc(start), "s"), np.datetime64(naive_utc(end), "s")
        return cls(pattern_id, nodes, first, len(np.arange(first, last, np.timedelta64(seconds, "s"))), seconds)

    @property
    def buckets(self) -> np.ndarray:
        return self.start + np.arange(self.size) * np.timedelta64(self.seconds, "s")

    def empty(self) -> np.ndarray:
        """[T, N, F] with no traffic: calls/errors 0, latency NaN."""
        values = np.zeros((self.size, len(self.nodes), len(FEATURES)))
        values[:, :, 1:3] = np.nan
        return values


@dataclass
class Champion:
    """A pattern's champion model: registry row, cached artifact folder, config and graph."""

    pattern_id: int
    version: int
    run_id: str
    folder: Path
    cfg: TrainConfig
    graph: dict

    @classmethod
    def load(cls, settings: Settings, pattern_id: int, version: int, run_id: str) -> Champion:
        folder = champion_folder(settings, pattern_id, version)
        cfg = TrainConfig(**json.loads((folder / "config.json").read_text()))
        return cls(pattern_id, version, run_id, folder, cfg, json.loads((folder / "graph.json").read_text()))

    @property
    def lead(self) -> int:
        """Buckets before the first target that its window needs."""
        return self.cfg.window + self.cfg.horizon - 1

    def grid(self, hour: datetime) -> Grid:
        seconds = self.graph["bucket_seconds"]
        return Grid.between(
            self.pattern_id, self.graph["nodes"], hour - timedelta(seconds=self.lead * seconds), hour + HOUR, seconds
        )

    def weights(self):
        """Model, normaliser and thresholds (weights loaded with `weights_only=True`, as
        `training.load_model` does); the module of an earlier champion with the same config is
        reused with these weights and caches this champion's graph: use it with that graph only,
        before loading the next champion."""
        from torch_geometric.nn import GCNConv

        from tasks.models.forecast import Normaliser

        key = json.dumps(asdict(self.cfg), sort_keys=True)
        if key not in _MODULES:
            model = make_model(self.cfg)
            for conv in model.modules():
                if isinstance(conv, GCNConv):
                    conv.cached = True  # the graph's normalised edges: computed once per champion, not per pass
            _MODULES[key] = model, model.state_dict(keep_vars=False)
        model, own = _MODULES[key]
        state = torch.load(self.folder / "state_dict.pt", map_location="cpu", weights_only=True)
        if state.keys() != own.keys() or any(state[k].shape != v.shape for k, v in own.items()):
            model.load_state_dict(state)  # raises with the mismatch spelled out
        with torch.no_grad():
            for name, tensor in own.items():
                tensor.copy_(state[name])
        for conv in model.modules():
            if isinstance(conv, GCNConv):  # forget the previous champion's graph (as reset_parameters does)
                conv._cached_edge_index = conv._cached_adj_t = None
        norm = Normaliser(**json.loads((self.folder / "normalisation.json").read_text()))
        return model, norm, json.loads((self.folder / "thresholds.json").read_text())


@contextmanager
def _one_thread():
    """Torch on one thread while scoring: these tensors are tiny, and threads only wait on each
    other on a busy host (10x slower measured on 2 shared cores; training does the same)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


GRID_SQL = """
WITH scoring_grid AS (
    SELECT unnest(?::INTEGER[]) AS pattern_id, unnest(?::VARCHAR[]) AS node, unnest(?::BIGINT[]) AS n,
           unnest(?::BIGINT[]) AS start_us, unnest(?::BIGINT[]) AS step_us, unnest(?::BIGINT[]) AS end_us)
"""
SERIES_SQL = (
    GRID_SQL
    + """
SELECT g.pattern_id, (epoch_us(s.bucket_ts) - g.start_us) // g.step_us AS t, g.n, s.calls, s.rt_mean, s.rt_p95, s.errors
FROM pattern_series s JOIN scoring_grid g ON s.pattern_id = g.pattern_id AND s.node = g.node
WHERE s.bucket_ts >= ? AND s.bucket_ts < ? AND epoch_us(s.bucket_ts) >= g.start_us AND epoch_us(s.bucket_ts) < g.end_us
"""
)
FLAGGED_SQL = (
    GRID_SQL
    + """
SELECT g.pattern_id, (epoch_us(a.bucket_ts) - g.start_us) // g.step_us AS t, g.n, list_position(?, a.feature) - 1 AS f,
       a.expected
FROM anomalies a JOIN scoring_grid g ON a.pattern_id = g.pattern_id AND a.node = g.node
WHERE a.bucket_ts >= ? AND a.bucket_ts < ? AND epoch_us(a.bucket_ts) >= g.start_us AND epoch_us(a.bucket_ts) < g.end_us
      AND list_contains(?, a.feature)
"""
)


def _fetch(
    con: duckdb.DuckDBPyConnection, grids: list[Grid], sql: str, params: list
) -> dict[int, dict[str, np.ndarray]]:
    """Run `sql` against the grids (`scoring_grid`: a row per pattern node with its index `n` and
    bucket range in epoch microseconds, bound as parameters): one query for all patterns, its
    columns split per pattern. Node names are matched in SQL: no row passes through a Python loop."""
    us = [int(g.start.astype("datetime64[us]").astype(np.int64)) for g in grids]
    step = [g.seconds * 1_000_000 for g in grids]
    grid = [
        [g.pattern_id for g in grids for _ in g.nodes],
        [node for g in grids for node in g.nodes],
        [n for g in grids for n in range(len(g.nodes))],
        [u for g, u in zip(grids, us) for _ in g.nodes],
        [s for g, s in zip(grids, step) for _ in g.nodes],
        [u + s * g.size for g, u, s in zip(grids, us, step) for _ in g.nodes],
    ]
    cols = con.execute(sql, grid + params).fetchnumpy()
    pid = np.asarray(cols["pattern_id"])
    if not len(pid):
        return {}
    order = np.argsort(pid, kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    cuts = np.flatnonzero(np.diff(pid[order])) + 1
    return {
        int(part["pattern_id"][0]): part
        for part in ({k: v[a:b] for k, v in cols.items()} for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(pid)]))
    }


def _floats(column) -> np.ndarray:
    """A fetched column as float64, NULL as NaN (as assigning None to a float array gives)."""
    return np.ma.filled(np.ma.asarray(column).astype(np.float64), np.nan)


def _bounds(grids: list[Grid], end: np.datetime64 | None = None) -> tuple[datetime, datetime]:
    first = min(g.start for g in grids)
    last = end if end is not None else max(g.start + g.size * np.timedelta64(g.seconds, "s") for g in grids)
    return first.astype(datetime), np.datetime64(last, "s").astype(datetime)


def _fetch_series(con, grids: list[Grid]) -> dict[int, dict[str, np.ndarray]]:
    """Stored pattern_series rows of every grid (bucket index t, node index n, features)."""
    return _fetch(con, grids, SERIES_SQL, list(_bounds(grids))) if grids else {}


def _fetch_flagged(con, grids: list[Grid], until: datetime) -> dict[int, dict[str, np.ndarray]]:
    """Points of every grid before `until` already flagged (t, n, feature index f, expected)."""
    if not grids:
        return {}
    first, last = _bounds(grids, np.datetime64(naive_utc(until), "s"))
    return _fetch(con, grids, FLAGGED_SQL, [list(FEATURES), first, last, list(FEATURES)])


def _dense(grid: Grid, rows: dict[str, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray]:
    """Values [T, N, F] of a grid from its fetched rows, and which buckets had any stored row."""
    values, present = grid.empty(), np.zeros(grid.size, dtype=bool)
    if rows:
        t, n = rows["t"].astype(np.int64), rows["n"].astype(np.int64)
        values[t, n] = np.column_stack([_floats(rows[f]) for f in FEATURES])
        present[t] = True
    return values, present


def _cleaned(values: np.ndarray, flagged: dict[str, np.ndarray] | None) -> np.ndarray:
    """`values` with the points already flagged replaced by their forecasts."""
    clean = values.copy()
    if flagged:
        clean[flagged["t"].astype(np.int64), flagged["n"].astype(np.int64), flagged["f"].astype(np.int64)] = _floats(
            flagged["expected"]
        )
    return clean


def _series(
    con: duckdb.DuckDBPyConnection, pattern_id: int, nodes: list[str], start: datetime, end: datetime, seconds: int
) -> tuple[np.ndarray, np.ndarray]:
    """Buckets [T] and dense values [T, N, F] of one pattern (calls/errors 0, latency NaN where no row)."""
    grid = Grid.between(pattern_id, nodes, start, end, seconds)
    return grid.buckets, _dense(grid, _fetch_series(con, [grid]).get(pattern_id))[0]


def _cleaned_lead_in(
    con, pattern_id: int, nodes: list[str], buckets: np.ndarray, values: np.ndarray, until: datetime
) -> np.ndarray:
    """The series with points already flagged (previous hour) replaced by their forecasts."""
    seconds = int((buckets[1] - buckets[0]) / np.timedelta64(1, "s")) if len(buckets) > 1 else 60
    grid = Grid(pattern_id, nodes, buckets[0].astype("datetime64[s]"), len(buckets), seconds)
    return _cleaned(values, _fetch_flagged(con, [grid], until).get(pattern_id))


def _count_bands(
    expected: np.ndarray, alpha: np.ndarray, alarm_p: float, observed: np.ndarray, lower: np.ndarray, phi: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`forecast.count_band` of K series at once (expected, observed [S, K]; alpha, phi, lower [K]:
    whether the series has a lower bound): bursts of phi calls, so the band is phi x the band of
    expected / phi."""
    lo, hi = _burst_bands(expected / phi, alpha, alarm_p, observed / phi, lower)
    return lo * phi, hi * phi


def _burst_bands(
    expected: np.ndarray, alpha: np.ndarray, alarm_p: float, observed: np.ndarray, lower: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The bands in bursts, exact wherever `observed` may lie outside, else -inf/inf. Both
    quantiles grow with the expected count, so a point inside the band at its series' largest
    (lower bound) or smallest (upper bound) expected count, with a count to spare, is inside its
    own: the costly quantiles are computed for the few other points only."""
    q, lam = alarm_p / 2, np.maximum(expected, 1e-9)
    lo, hi = np.full_like(lam, -np.inf), np.full_like(lam, np.inf)
    if not lam.size:
        return lo, hi
    per_point = np.broadcast_to(alpha, lam.shape)
    up = observed > count_quantile("isf", q, lam.min(axis=0), alpha) - 1
    down = lower & (observed < count_quantile("ppf", q, lam.max(axis=0), alpha) + 1)
    hi[up] = count_quantile("isf", q, lam[up], per_point[up])
    lo[down] = count_quantile("ppf", q, lam[down], per_point[down])
    return lo, hi


COUNTS = (0, 3)  # calls, errors


def _flags(obs: np.ndarray, exp: np.ndarray, nodes: list[str], thresholds: dict) -> list[tuple]:
    """(sample, node index, feature, threshold, score, direction, kind) of every irregular point."""
    th = [thresholds["nodes"][node] for node in nodes]
    alpha = np.array([[t[FEATURES[f]]["alpha"] for f in COUNTS] for t in th])  # [N, 2]
    phi = np.array([[t[FEATURES[f]].get("phi", 1.0) for f in COUNTS] for t in th])  # burst size; 1 before it existed
    lo, hi = (
        b.reshape(exp.shape[:2] + (len(COUNTS),))
        for b in _count_bands(
            exp[:, :, COUNTS].reshape(len(exp), -1),
            alpha.reshape(-1),
            thresholds["alarm_p"],
            obs[:, :, COUNTS].reshape(len(obs), -1),
            np.tile([True, False], len(nodes)),
            phi.reshape(-1),
        )
    )  # errors: no lower bound
    out = []
    for n in range(len(nodes)):
        for c, (f, kind_up, kind_down) in enumerate(((0, "traffic_spike", "traffic_drop"), (3, "errors", None))):
            for s in np.flatnonzero(obs[:, n, f] > hi[:, n, c]):
                out.append(
                    (
                        s,
                        n,
                        f,
                        hi[s, n, c],
                        (obs[s, n, f] - exp[s, n, f]) / max(hi[s, n, c] - exp[s, n, f], 1e-9),
                        "up",
                        kind_up,
                    )
                )
            if kind_down:
                for s in np.flatnonzero(obs[:, n, f] < lo[:, n, c]):
                    out.append(
                        (
                            s,
                            n,
                            f,
                            lo[s, n, c],
                            (exp[s, n, f] - obs[s, n, f]) / max(exp[s, n, f] - lo[s, n, c], 1e-9),
                            "down",
                            kind_down,
                        )
                    )
        calls = obs[:, n, 0]
        for f in (1, 2):
            band = th[n][FEATURES[f]]
            low, high = latency_band(exp[:, n, f], calls, band["sigma"], band["k"], band.get("phi", 1.0))
            ok = (calls > 0) & np.isfinite(obs[:, n, f])
            for s in np.flatnonzero(ok & (obs[:, n, f] > high)):
                out.append(
                    (
                        s,
                        n,
                        f,
                        high[s],
                        np.log(obs[s, n, f] / exp[s, n, f]) / max(np.log(high[s] / exp[s, n, f]), 1e-9),
                        "up",
                        "latency",
                    )
                )
    return out


MAX_CLEANED_RUN = 30  # after this many flagged buckets in a row (30 min) a level is accepted as the new normal


def _forecast(model, cfg, norm, clean: np.ndarray, targets: np.ndarray, edge_index) -> np.ndarray:
    """Forecasts [S, N, F] of `targets`, each from its window of `clean`, in one forward pass."""
    starts = targets - cfg.horizon - cfg.window + 1
    first, last = starts.min(), starts.max() + cfg.window  # only the buckets these windows read
    x, offsets = _windows(norm, clean[first:last], starts - first, cfg.window)
    prep = Prepared(x, torch.zeros(0), targets, 0, edge_index, offsets, norm)
    return predict(model, prep, slice(None), torch.device("cpu"))


def _forecast_sequentially(
    model,
    cfg,
    norm,
    values: np.ndarray,
    targets: np.ndarray,
    edge_index,
    nodes: list[str],
    thresholds: dict,
    clean: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, list[tuple]]:
    """Forecast as if bucket by bucket; a flagged observation is replaced by its forecast before it
    enters later windows, so a long flood keeps being flagged and its end does not echo as a
    drop. A run of more than MAX_CLEANED_RUN flags is accepted as a new level (no runaway).

    Batched, with the results of the bucket-by-bucket loop: windows only look back, so all targets
    are forecast in one pass from `clean`, and those forecasts hold until a flagged point is
    cleaned. Cleaning bucket t changes only the forecasts whose window holds t (the next `window`
    targets); they are forecast again, in one pass, when the loop reaches them. Normal traffic
    takes one pass instead of one per bucket. `clean` is updated in place."""
    observed = values[targets].copy()
    expected = np.zeros_like(observed)
    fresh = np.zeros(len(targets), dtype=bool)  # expected[s] is the forecast from the current `clean`
    found: list[list[tuple]] = [[] for _ in targets]  # flags of each fresh sample
    flags: list[tuple] = []
    run = np.zeros(values.shape[1:], dtype=int)  # flagged buckets in a row per (node, feature)
    for s, t in enumerate(targets):
        if not fresh[s]:
            _refresh(
                model,
                cfg,
                norm,
                clean,
                targets,
                edge_index,
                s + np.flatnonzero(~fresh[s:]),
                observed,
                expected,
                found,
                nodes,
                thresholds,
            )
            fresh[s:] = True
        flags.extend(found[s])
        if _clean_sample(clean, t, expected[s], found[s], run):
            fresh &= ~_sees(targets, t, cfg)
    return expected, observed, flags


def _refresh(
    model, cfg, norm, clean, targets, edge_index, redo: np.ndarray, observed, expected, found, nodes, thresholds
) -> None:
    """Forecast and flag the samples `redo` again from `clean` (one forward pass)."""
    expected[redo] = _forecast(model, cfg, norm, clean, targets[redo], edge_index)
    for s in redo:
        found[s] = []
    for f in _flags(observed[redo], expected[redo], nodes, thresholds):  # node by node: each sample keeps its order
        s = int(redo[f[0]])
        found[s].append((s, *f[1:]))


def _sees(targets: np.ndarray, t: int, cfg) -> np.ndarray:
    """Which targets' input windows hold bucket t."""
    return (targets >= t + cfg.horizon) & (targets <= t + cfg.horizon + cfg.window - 1)


def _clean_sample(clean: np.ndarray, t: int, expected: np.ndarray, here: list[tuple], run: np.ndarray) -> bool:
    """Replace bucket t's flagged points by their forecasts, unless their run of flags is longer than
    MAX_CLEANED_RUN (an unflagged bucket ends the run); `run` is updated in place. True if `clean` changed."""
    if not here:
        run[:] = 0
        return False
    flagged = np.zeros(run.shape, dtype=bool)
    for _, n, f, *_ in here:
        flagged[n, f] = True
    run[:] = np.where(flagged, run + 1, 0)
    replace = flagged & (run <= MAX_CLEANED_RUN)
    clean[t][replace] = expected[replace]
    return bool(replace.any())


class Skipped(Exception):
    """A pattern that is not scored this hour; the message is the reason written to score_runs."""


@dataclass
class Scored:
    """One pattern's scored hour, written by `_store`."""

    version: int
    rows: list[tuple]  # anomalies rows
    mape: float | None  # calls MAPE of the hour
    calibrated: float  # the model's calibrated calls MAPE


def _score_pattern(
    champion: Champion, grid: Grid, rows: dict | None, flagged: dict | None, scored_at: datetime
) -> Scored:
    """Forecast and flag one pattern's hour from its fetched rows; raises Skipped when it cannot be
    scored. Writes nothing."""
    values, present = _dense(grid, rows)
    lead, nodes = champion.lead, grid.nodes
    if not present[:lead].any():  # the first windows would be all zeros: every point a spike
        raise Skipped("too little history")
    model, norm, thresholds = champion.weights()
    buckets, targets = grid.buckets, np.arange(lead, grid.size)
    edge_index = graph_edge_index(len(nodes), [tuple(e) for e in champion.graph["edges"]])
    expected, observed, flags = _forecast_sequentially(
        model, champion.cfg, norm, values, targets, edge_index, nodes, thresholds, _cleaned(values, flagged)
    )
    out = []
    for s, n, f, threshold, score, direction, kind in flags:
        caller, callee, interface, _ = split_node_key(nodes[n])
        out.append(
            (
                buckets[targets[s]].astype(datetime),
                champion.pattern_id,
                nodes[n],
                caller,
                callee,
                interface or None,
                FEATURES[f],
                float(observed[s, n, f]),
                float(expected[s, n, f]),
                float(threshold),
                float(score),
                direction,
                kind,
                f"rpcwatch-pattern-{champion.pattern_id}",
                champion.version,
                champion.run_id,
                scored_at,
            )
        )
    mape = metrics(expected, observed)["mape_calls"]
    return Scored(champion.version, out, mape if np.isfinite(mape) else None, thresholds["calibrated_mape_calls"])


def _score_all(
    con, champions: list[Champion], hour: datetime, scored_at: datetime, chunk: int = 200
) -> tuple[dict[int, Scored], dict[int, str]]:
    """Score the champions' patterns, reading the series and earlier flags of `chunk` patterns per query."""
    scored, skipped = {}, {}
    for i in range(0, len(champions), chunk):
        part = champions[i : i + chunk]
        grids = [c.grid(hour) for c in part]
        series, flagged = _fetch_series(con, grids), _fetch_flagged(con, grids, hour)
        for champion, grid in zip(part, grids):
            pid = champion.pattern_id
            try:
                scored[pid] = _score_pattern(champion, grid, series.get(pid), flagged.get(pid), scored_at)
            except Skipped as skip:
                skipped[pid] = str(skip)
    return scored, skipped


ANOMALY_COLUMNS = [
    "bucket_ts",
    "pattern_id",
    "node",
    "caller",
    "callee",
    "interface",
    "feature",
    "observed",
    "expected",
    "threshold",
    "score",
    "direction",
    "kind",
    "model_name",
    "model_version",
    "run_id",
    "scored_at",
]


def _insert(con, table: str, columns: list[str], rows: list[tuple]) -> None:
    """Insert Python rows into `table` in one statement (None stays NULL)."""
    import pyarrow as pa

    if rows:
        con.register("scored_rows", pa.table({c: pa.array(list(v)) for c, v in zip(columns, zip(*rows))}))
        con.execute(f"INSERT INTO {table} ({', '.join(columns)}) SELECT * FROM scored_rows")
        con.unregister("scored_rows")


def _store(con, hour: datetime, scored: dict[int, Scored], skipped: dict[int, str]) -> None:
    """Replace the hour's anomalies and forecast errors of the scored patterns and write every
    pattern's score_runs row, each table in one statement (not one per pattern or row)."""
    start, end = naive_utc(hour), naive_utc(hour + HOUR)
    ids = sorted(scored)
    con.execute(
        "DELETE FROM anomalies WHERE list_contains(?, pattern_id) AND bucket_ts >= ? AND bucket_ts < ?",
        [ids, start, end],
    )
    _insert(con, "anomalies", ANOMALY_COLUMNS, [row for r in scored.values() for row in r.rows])
    con.execute("DELETE FROM forecast_errors WHERE hour = ? AND list_contains(?, pattern_id)", [start, ids])
    _insert(
        con,
        "forecast_errors",
        ["pattern_id", "hour", "model_version", "mape_calls", "calibrated_mape_calls"],
        [(pid, start, r.version, r.mape, r.calibrated) for pid, r in scored.items()],
    )
    _insert(
        con,
        "score_runs",
        ["hour", "pattern_id", "status", "reason", "model_version", "flagged", "mape_calls"],
        [(start, pid, "scored", None, r.version, len(r.rows), r.mape) for pid, r in scored.items()]
        + [(start, pid, "skipped", why, None, 0, None) for pid, why in skipped.items()],
    )


def _novel_anomalies(con: duckdb.DuckDBPyConnection, hour: datetime, scored_at: datetime) -> int:
    start, end = naive_utc(hour), naive_utc(hour + HOUR)
    con.execute("DELETE FROM anomalies WHERE kind = 'novel_rpc' AND bucket_ts >= ? AND bucket_ts < ?", [start, end])
    return con.execute(
        f"""INSERT INTO anomalies
        SELECT bucket_ts, NULL, {node_key_sql()}, caller, callee,
               interface, 'calls', calls, 0, 0, calls, 'up', 'novel_rpc', NULL, NULL, NULL, ?
        FROM novel_rpcs WHERE bucket_ts >= ? AND bucket_ts < ?""",
        [scored_at, start, end],
    ).fetchone()[0]


def score_hour(settings: Settings, hour: datetime) -> ScoreReport:
    """Score every critical pattern with a champion for `hour` (idempotent per pattern and hour)."""
    hour = hour_floor(hour)
    started = time.perf_counter()
    report = ScoreReport(hour)
    scored_at = naive_utc(datetime.now(UTC))
    with opened(settings.warehouse) as con, _one_thread():
        con.execute("BEGIN")
        start = naive_utc(hour)
        con.execute("DELETE FROM score_runs WHERE hour = ?", [start])
        critical = [
            r[0] for r in con.execute("SELECT pattern_id FROM patterns WHERE status = 'active' AND critical").fetchall()
        ]
        champions = {r[0]: r for r in con.execute(CHAMPIONS_SQL).fetchall()}
        ready, skipped = [], {}
        for pid in critical:
            row = champions.get(pid)
            if row is None:
                skipped[pid] = "no champion"
            elif row[1] != row[4]:
                skipped[pid] = "graph changed since training"
            else:
                ready.append(Champion.load(settings, pid, row[2], row[3]))
        scored, too_little = _score_all(con, ready, hour, scored_at)
        skipped.update(too_little)
        report.scored = [pid for pid in critical if pid in scored]
        report.skipped = {pid: skipped[pid] for pid in critical if pid in skipped}
        _store(con, hour, scored, report.skipped)
        report.anomalies = sum(len(r.rows) for r in scored.values())
        report.novel = _novel_anomalies(con, hour, scored_at)
        report.anomalies += report.novel
        report.incidents = rebuild_incidents(
            con, hour, settings.incident_gap_buckets, settings.bucket_seconds, settings.incident_min_buckets
        )
        con.execute("COMMIT")
    report.seconds = time.perf_counter() - started
    log.info(report.line())
    return report
