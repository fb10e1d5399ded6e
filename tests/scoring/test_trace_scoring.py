"""Trace scoring on a real DuckDB warehouse: the hour's traces of a pattern read back from `calls`
and `trace_patterns`, scored by a trace model, alarmed windows as `anomalies` rows with suspects."""

from __future__ import annotations

from datetime import datetime

import pandas as pd

from helpers import tiny_traces as traces
from tasks.models.registry import ChampionRow
from tasks.models.trace_model import TraceModel
from tasks.patterns.trace_calls import trace_calls
from tasks.scoring.trace_scoring import FEATURE, KIND, trace_rows
from tasks.warehouse import opened

HOUR = datetime(2026, 1, 1, 1)


def _land(con, frame: pd.DataFrame, pattern_id: int) -> None:
    """The traces as `calls` rows (service names from the node keys) and `trace_patterns` rows."""
    calls = frame.assign(
        ts=frame.root_ts,
        caller=frame.node.str.split("|").str[0],
        interface="op",
        rpc_type="http",
        is_error=False,
        source_file="test",
        batch_id="b",
        fan_out=0,
    )
    con.register("new_calls", calls)
    con.execute(
        """INSERT INTO calls (ts, trace_id, call_id, parent_call_id, caller, callee, interface, rpc_type, rt_ms,
                              is_error, source_file, batch_id, server_rt_ms, fan_out, self_ms)
           SELECT ts, trace_id, call_id, parent_call_id, caller, callee, interface, rpc_type, rt_ms, is_error,
                  source_file, batch_id, server_rt_ms, fan_out, self_ms FROM new_calls"""
    )
    con.execute(
        """INSERT INTO trace_patterns (trace_id, hour, root_ts, shape_id, status, n_calls, pattern_id, method)
           SELECT trace_id, date_trunc('hour', min(root_ts)), min(root_ts), 7, 'full', count(*), ?, 'exact'
           FROM new_calls GROUP BY trace_id""",
        [pattern_id],
    )
    con.unregister("new_calls")


def test_a_slow_stretch_alarms_with_its_suspect_and_the_rest_of_the_hour_does_not(settings):
    start = pd.Timestamp(HOUR)
    normal_before = traces(900, seed=21, start=start)  # 00:00-30:00, a trace every 2 s
    slow = traces(30, seed=22, start=start + pd.Timedelta(minutes=30), slow_c=8.0)  # 30:00-31:00
    normal_after = traces(870, seed=23, start=start + pd.Timedelta(minutes=31))
    history = traces(1800, seed=24, start=start - pd.Timedelta(hours=1))
    with opened(settings.warehouse) as con:
        for frame in (history, normal_before, slow, normal_after):
            _land(con, frame, pattern_id=3)
        read = trace_calls(con, [3], HOUR - pd.Timedelta(hours=1), HOUR)[3]
        assert read["trace_id"].nunique() == 1800 and set(read["parent_node"].dropna()) == {history.node[0]}
        model = TraceModel(settings.trace_p).fit(read).calibrate(read, settings.trace_window_s)
        champion = ChampionRow(3, 1, "run", "hash", HOUR, None)
        rows = trace_rows(con, settings, {3: (champion, model)}, HOUR, datetime(2026, 1, 2))[3]
    assert rows, "30 traces with C eight times slower in one minute alarm"
    assert {r.kind for r in rows} == {KIND} and {r.feature for r in rows} == {FEATURE}
    first = min(r.bucket_ts for r in rows)
    assert pd.Timestamp("2026-01-01 01:29:55") <= first <= pd.Timestamp("2026-01-01 01:30:30")  # its last step
    assert max(r.bucket_ts for r in rows) < pd.Timestamp("2026-01-01 01:32:00"), "nothing after the slow minute"
    top = max(rows, key=lambda r: r.score)
    assert top.culprit == "C" and top.callee == "C"
    assert max(r.observed - r.threshold for r in rows if r.culprit == "C") >= 0  # the count, not only single traces
    assert all(pd.Timestamp(r.bucket_ts).second % settings.trace_step_s == 0 for r in rows)
