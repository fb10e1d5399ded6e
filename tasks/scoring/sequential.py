"""A detector run over a span of buckets as if bucket by bucket: a flagged observation is replaced
by its forecast before it enters later windows, so a long flood keeps being flagged and its end
does not echo as a drop. A run of more than MAX_CLEANED_RUN flags is accepted as a new level (no
runaway). A flagged count is never cleaned to a forecast beyond the node's normal level (the mean of
its calibration data) on the far side from the observation: after an outage, a lull, or a level
accepted as new, the forecast sits low, and cleaning the recovery's "spikes" to it would hold it
there, flagging the recovery for MAX_CLEANED_RUN buckets; cleaned to the normal level, the forecast
comes back with the traffic. `forecast_span` reads the span (`pattern_series`, and `anomalies` for the points of the
lead-in already flagged); nothing here writes a table.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import duckdb
import numpy as np

from tasks.models.detector import Detector, Flag
from tasks.models.features import COUNTS
from tasks.scoring.grid import Grid, cleaned, fetch_flagged, fetch_series

MAX_CLEANED_RUN = 30  # after this many flagged buckets in a row (30 min) a level is accepted as the new normal


@dataclass
class Forecast:
    """A detector's verdict on targets [S]: expected and observed [S, N, F] and the irregular points."""

    expected: np.ndarray
    observed: np.ndarray
    flags: list[Flag]


class _Pending:
    """The forecasts of the targets, which of them are fresh (from the current `clean`) and the
    flags of each fresh sample."""

    def __init__(self, values: np.ndarray, targets: np.ndarray) -> None:
        self.observed = values[targets].copy()
        self.expected = np.zeros_like(self.observed)
        self.fresh = np.zeros(len(targets), dtype=bool)
        self.found: list[list[Flag]] = [[] for _ in targets]

    def refresh(self, detector: Detector, clean: np.ndarray, targets: np.ndarray, redo: np.ndarray) -> None:
        """Forecast and flag the samples `redo` again from `clean` (one forward pass)."""
        self.expected[redo] = detector.forecast(clean, targets[redo])
        for s in redo:
            self.found[s] = []
        for flag in detector.flags(self.observed[redo], self.expected[redo]):  # node by node: each sample keeps order
            s = int(redo[flag.sample])
            self.found[s].append(flag._replace(sample=s))
        self.fresh[redo] = True


def forecast_sequentially(detector: Detector, values: np.ndarray, targets: np.ndarray, clean: np.ndarray) -> Forecast:
    """Forecast and flag `targets` of `values` as if bucket by bucket, cleaning flagged points.

    Batched, with the results of the bucket-by-bucket loop: windows only look back, so all targets
    are forecast in one pass from `clean`, and those forecasts hold until a flagged point is
    cleaned. Cleaning bucket t changes only the forecasts whose window holds t (the next `window`
    targets); they are forecast again, in one pass, when the loop reaches them. Normal traffic
    takes one pass instead of one per bucket. `clean` is updated in place."""
    pending = _Pending(values, targets)
    flags: list[Flag] = []
    run = np.zeros(values.shape[1:], dtype=int)  # flagged buckets in a row per (node, feature)
    level = normal_level(detector, values.shape[2])
    for s, t in enumerate(targets):
        if not pending.fresh[s]:
            pending.refresh(detector, clean, targets, s + np.flatnonzero(~pending.fresh[s:]))
        flags.extend(pending.found[s])
        if _clean_sample(clean, t, pending.expected[s], pending.found[s], run, level):
            pending.fresh &= ~_sees(targets, t, detector)
    return Forecast(pending.expected, pending.observed, flags)


def _sees(targets: np.ndarray, t: int, detector: Detector) -> np.ndarray:
    """Which targets' input windows hold bucket t."""
    horizon, window = detector.cfg.horizon, detector.cfg.window
    return (targets >= t + horizon) & (targets <= t + horizon + window - 1)


def normal_level(detector: Detector, features: int) -> np.ndarray:
    """Each node's normal calls and errors [N, F] (the mean of its calibration data; NaN where the
    model did not keep it, and for latency)."""
    level = np.full((len(detector.bands), features), np.nan)
    for n, node in enumerate(detector.bands):
        for f in COUNTS:
            mean = node.count(f).mean
            level[n, f] = np.nan if mean is None else mean
    return level


def _clean_sample(
    clean: np.ndarray, t: int, expected: np.ndarray, here: list[Flag], run: np.ndarray, level: np.ndarray
) -> bool:
    """Replace bucket t's flagged points by their forecasts (a spike's never below the node's normal
    `level`, a drop's never above it), unless their run of flags is longer than MAX_CLEANED_RUN (an
    unflagged bucket ends the run); `run` is updated in place. True if `clean` changed."""
    if not here:
        run[:] = 0
        return False
    flagged = np.zeros(run.shape, dtype=bool)
    target = expected.copy()
    for flag in here:
        flagged[flag.node, flag.feature] = True
        normal = level[flag.node, flag.feature]
        if not np.isnan(normal):
            bound = max if flag.direction == "up" else min
            target[flag.node, flag.feature] = bound(target[flag.node, flag.feature], normal)
    run[:] = np.where(flagged, run + 1, 0)
    replace = flagged & (run <= MAX_CLEANED_RUN)
    clean[t][replace] = target[replace]
    return bool(replace.any())


@dataclass
class SpanForecast:
    """A detector's verdict on the buckets [start, end) of its pattern (targets: their indices in
    `buckets`, which start with the lead-in)."""

    buckets: np.ndarray
    targets: np.ndarray
    forecast: Forecast


def span_grid(detector: Detector, start: datetime, end: datetime) -> Grid:
    """The grid of a detector's pattern over [start, end) with the lead-in its first windows need."""
    graph = detector.graph
    return Grid.with_lead_in(detector.pattern_id, graph.nodes, graph.bucket_seconds, detector.lead, start, end)


def forecast_span(con: duckdb.DuckDBPyConnection, detector: Detector, start: datetime, end: datetime) -> SpanForecast:
    """Forecast and flag [start, end) from the stored series, the lead-in's points already flagged
    replaced by their forecasts (as scoring does; read-only)."""
    grid = span_grid(detector, start, end)
    values, _ = grid.dense(fetch_series(con, [grid]).get(detector.pattern_id))
    clean = cleaned(values, fetch_flagged(con, [grid], start).get(detector.pattern_id))
    targets = np.arange(detector.lead, grid.size)
    return SpanForecast(grid.buckets, targets, forecast_sequentially(detector, values, targets, clean))
