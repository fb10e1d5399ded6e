"""Replay of a tiny hand-made day: duplicate spans across neighbouring minute files, a fault
injected just before its capture and one between captures (no abort)."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, datetime, timedelta

import pyarrow.parquet as pq
import pytest

from tasks.evaluation.replay import replay_days

HEADER = "TraceID,SpanID,ParentID,PodName,OperationName,StartTimeUnixNano,EndTimeUnixNano,Duration"
DAY = datetime(2023, 1, 29, 10, tzinfo=UTC)
POD = "ts-a-service-5d9f-x1"
NO_FILL = {"fill_traces": 0, "fill_spans": 0}


def _ns(minute: int, second: int) -> int:
    return int((DAY + timedelta(minutes=minute, seconds=second)).timestamp()) * 1_000_000_000


def _span(trace: str, minute: int, second: int) -> str:
    start = _ns(minute, second)
    return f"{trace},{trace}-s,root,{POD},GET /a,{start},{start + 2_000_000},2000"


def _write(folder, name: str, spans: list[str]) -> None:
    with gzip.open(folder / f"{name}_trace.csv.gz", "wt") as f:
        f.write("\n".join([HEADER, *spans]) + "\n")


@pytest.fixture
def day(tmp_path):
    """Runs 10:00:05-10:01:55 (two files, 2 spans in both), 10:09:10-10:10:50 (two files, 1 span
    in both) and 10:29:10-10:29:50; faults at 10:00:30 (in a run), 10:08:58 (12 s before the
    second run) and 10:20:00 (more than 180 s from any capture)."""
    folder = tmp_path / "2023-01-29"
    (folder / "trace").mkdir(parents=True)
    (folder / "normal").mkdir()
    a = [_span(f"a{i}", 0, 5 + 10 * i) for i in range(6)]  # 10:00:05 .. 10:00:55
    _write(folder / "trace", "10_01", a)
    _write(folder / "trace", "10_02", a[-2:] + [_span(f"b{i}", 1, 5 + 10 * i) for i in range(6)])
    c = [_span(f"c{i}", 9, 10 + 10 * i) for i in range(5)]  # 10:09:10 .. 10:09:50
    _write(folder / "trace", "10_10", c)
    _write(folder / "trace", "10_11", c[-1:] + [_span(f"d{i}", 10, 10 * i) for i in range(6)])
    _write(folder / "trace", "10_30", [_span(f"e{i}", 29, 10 + 10 * i) for i in range(5)])
    faults = [
        {"inject_time": "2023-01-29 10:00:30", "inject_pod": POD, "inject_type": "return"},
        {"inject_time": "2023-01-29 10:08:58", "inject_pod": POD, "inject_type": "cpu_contention"},
        {"inject_time": "2023-01-29 10:20:00", "inject_pod": POD, "inject_type": "exception"},
    ]
    (folder / "fault_list.json").write_text(json.dumps({"10": faults}))
    return folder


def test_gaps_and_duplicates_replay_without_abort(day, tmp_path):
    out, start = tmp_path / "replay", datetime(2026, 1, 1, tzinfo=UTC)
    said: list[str] = []
    counts = replay_days([day], out, start, progress=said.append)
    assert counts == {"runs": 3, "rows": 28, "duplicates": 3, "faults": 3, "moved": 1, "unobservable": 1, **NO_FILL}
    assert "3 duplicate spans dropped" in said[0]
    spans = pq.ParquetDataset(sorted(p for p in out.rglob("part-*.parquet"))).read().to_pandas()
    assert len(spans) == 28 and not spans.duplicated(["TraceID", "SpanID"]).any()
    runs = pq.read_table(out / "runs.parquet").to_pandas()
    in_run, moved, lost = json.loads((out / "fault_list.json").read_text())["faults"]

    def stamp(ts) -> str:
        return f"{ts:%Y-%m-%d %H:%M:%S}"

    # in its run: window = injection + 180 s, clipped to the end of the capture (10:01:55.002)
    assert in_run["observable"] and "note" not in in_run and in_run["run"] == 0
    assert in_run["inject_time"] == "2026-01-01 00:00:25"  # 25 s after the run's first span
    assert in_run["window_end"] == in_run["capture_end"] == stamp(runs.replay_end[0])
    # 12 s before the second capture: moved to its start; its window (168 s left) outlasts the 100 s capture
    assert moved["observable"] and moved["run"] == 1
    assert moved["note"] == "injected 12 s before its capture; window clipped to the capture"
    assert moved["inject_time"] == stamp(runs.replay_start[1])
    assert moved["window_end"] == moved["capture_end"] == stamp(runs.replay_end[1])
    assert moved["real_inject_time"] == "2023-01-29 10:08:58"
    # between captures: kept, not observable, with the reason
    assert lost["observable"] is False and lost["inject_time"] is None and lost["run"] is None
    assert "no capture overlaps its 180 s window" in lost["reason"] and lost["service"] == "ts-a-service"
