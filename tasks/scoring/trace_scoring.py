"""Score an hour's traces with each champion's trace model and keep the windows that hold more
surprising traces than the calibrated rate allows (`tasks.scoring.evidence`).

An alarmed window becomes `anomalies` rows of kind `traces` (feature `surprising_traces`): one per
suspected service among its top three (services blamed by the surprising traces rooted in the
window, `tasks.models.trace_model`), on the call most blamed for it. `observed` is the number of
surprising traces, `expected` the calibrated share of them, `threshold` the smallest count that
would have alarmed, `score` how many orders of magnitude beyond the alarm level the window is
(scaled by the suspect's share of the blame, the first suspect keeping it whole). `bucket_ts` is
the start of the step in which the window ends (a point is known at its step's end): windows step
by `trace_step_s` (5 s), faster than the forecaster's buckets, which thin traffic makes long.

Reads `trace_patterns` and `calls` (`tasks.patterns.trace_calls`); writes nothing: the rows join
the pattern's forecaster rows in `tasks.scoring.store`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

import duckdb
import numpy as np
import pandas as pd
from scipy.stats import binom

from tasks.clock import HOUR, naive_utc
from tasks.keys import split_node_key
from tasks.models.registry import ChampionRow, model_name
from tasks.models.trace_model import TraceModel, TraceScores
from tasks.patterns.trace_calls import trace_calls
from tasks.scoring.evidence import WindowTest, irregular_windows
from tasks.scoring.store import AnomalyRow
from tasks.settings import Settings

FEATURE = "surprising_traces"
KIND = "traces"
SUSPECTS = 3  # services named per alarmed window


def window_test(settings: Settings, hour: datetime, patterns: int) -> WindowTest:
    """The hour's windows: `trace_window_s` long, one ending every `trace_step_s`."""
    return WindowTest.for_hour(
        np.datetime64(naive_utc(hour), "ms"),
        settings.trace_step_s,
        settings.trace_window_s,
        settings.trace_alpha,
        patterns,
    )


def trace_rows(
    con: duckdb.DuckDBPyConnection,
    settings: Settings,
    models: dict[int, tuple[ChampionRow, TraceModel]],
    hour: datetime,
    scored_at: datetime,
) -> dict[int, list[AnomalyRow]]:
    """Per pattern with a trace model: the `anomalies` rows of its alarmed windows in `hour`."""
    lead = timedelta(seconds=settings.trace_window_s)
    calls = trace_calls(con, sorted(models), hour - lead, hour + HOUR)
    scores = {pid: model.score(calls[pid]) for pid, (_, model) in models.items() if pid in calls}
    test = window_test(settings, hour, len(models))
    out: dict[int, list[AnomalyRow]] = {pid: [] for pid in models}
    for pid, scored in scores.items():
        champion, model = models[pid]
        windows = irregular_windows(scored.traces, model.rate, test)
        out[pid] = list(_rows(champion, model, scored, windows, test, settings, scored_at))
    return out


def _rows(
    champion: ChampionRow,
    model: TraceModel,
    scores: TraceScores,
    windows: pd.DataFrame,
    test: WindowTest,
    settings: Settings,
    scored_at: datetime,
) -> Iterable[AnomalyRow]:
    surprising = scores.traces.loc[scores.traces["surprising"], ["trace_id", "root_ts"]]
    blame = scores.blame.merge(surprising, on="trace_id")
    blame_ts = pd.to_datetime(blame["root_ts"]).to_numpy().astype("datetime64[ms]")
    for w in windows.itertuples(index=False):
        end = np.datetime64(w.end, "ms")
        inside = blame[(blame_ts > end - np.timedelta64(int(test.window_s * 1e3), "ms")) & (blame_ts <= end)]
        suspects = inside.groupby("culprit")["weight"].sum().sort_values(ascending=False, kind="stable")
        if not len(suspects):
            continue
        k_alarm = float(binom.isf(test.per_test_alpha, int(w.n), model.rate) + 1)
        bucket_ts = (pd.Timestamp(w.end) - pd.Timedelta(seconds=settings.trace_step_s)).to_pydatetime()
        for culprit, weight in list(suspects.items())[:SUSPECTS]:
            nodes = inside[inside["culprit"] == culprit].groupby("node")["weight"].sum()
            node = str(nodes.sort_values(ascending=False, kind="stable").index[0])
            caller, callee, interface, _ = split_node_key(node)
            yield AnomalyRow(
                bucket_ts,
                champion.pattern_id,
                node,
                caller,
                callee,
                interface or None,
                FEATURE,
                float(w.k),
                float(w.expected),
                k_alarm,
                float(w.score) * float(weight / suspects.iloc[0]),
                "up",
                KIND,
                model_name(champion.pattern_id),
                champion.model_version,
                champion.run_id,
                scored_at,
                str(culprit),
            )
