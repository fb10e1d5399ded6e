"""History hygiene on a real warehouse: an incident's stretch is left out of what training reads."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pandas as pd

from helpers import START, copy_home
from tasks.models.series import export_pattern, load_pattern, load_trace_calls
from tasks.warehouse import opened


def test_the_export_leaves_out_the_patterns_incidents(trained: Any, tmp_path) -> None:
    settings = copy_home(trained[0], tmp_path)
    pid = trained[2][0]["pattern_id"]
    start, end = START, START + timedelta(hours=3)
    lo, hi = START + timedelta(hours=1, minutes=10), START + timedelta(hours=1, minutes=40)
    naive_lo, naive_hi = pd.Timestamp(lo.replace(tzinfo=None)), pd.Timestamp(hi.replace(tzinfo=None))
    with opened(settings.warehouse) as con:
        con.execute(
            "INSERT INTO incidents (incident_id, start_ts, end_ts, patterns, nodes, peak_score, kinds, points) "
            "VALUES ('mine', ?, ?, [?], [], 5.0, ['traffic_spike'], 3), "
            "('other', ?, ?, [-1], ['nobody|nowhere|x|rpc'], 5.0, ['traffic_spike'], 3)",
            [naive_lo, naive_hi, pid, start.replace(tzinfo=None), end.replace(tzinfo=None)],
        )
        meta = export_pattern(con, pid, start, end, tmp_path / "exports")
    stretches = json.loads(meta.read_text())["excluded"]
    assert stretches == [[naive_lo.isoformat(), naive_hi.isoformat()]]
    data = load_pattern(meta)
    assert data.excluded is not None and int(data.excluded.sum()) == 30  # 30 one-minute buckets
    assert pd.Timestamp(data.buckets[data.excluded][0]) == naive_lo
    calls = load_trace_calls(meta)
    assert calls is not None and len(calls)
    root = pd.to_datetime(calls["root_ts"])
    assert not ((root >= naive_lo) & (root < naive_hi)).any()
    assert (root < naive_lo).any() and (root >= naive_hi).any()
