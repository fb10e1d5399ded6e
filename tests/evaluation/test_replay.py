"""Replaying captures with gaps as one timeline: runs, back-to-back placement, faults in replay time."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime

import pyarrow.parquet as pq
import pytest

from helpers import shared_file
from tasks.evaluation.replay import replay_days, replay_hours


@pytest.fixture
def day(tmp_path):
    """Two runs of a real TrainTicket day: 08_43+08_44 (one capture) and 08_52 (eight minutes later)."""
    folder = tmp_path / "2023-01-29"
    (folder / "trace").mkdir(parents=True)
    (folder / "normal").mkdir()
    for name in ("08_43", "08_44", "08_52"):
        shutil.copy(shared_file("nezha-trainticket", "2023-01-29", "trace", f"{name}_trace.csv.gz"), folder / "trace")
    faults = json.loads(shared_file("nezha-trainticket", "2023-01-29", "fault_list.json").read_text())
    (folder / "fault_list.json").write_text(json.dumps({"08": faults["08"][:2]}))  # 08:43:04 and 08:52:06
    return folder


def test_runs_are_placed_back_to_back_and_faults_follow_their_run(day, tmp_path):
    out = tmp_path / "replay"
    start = datetime(2023, 1, 29, 8, tzinfo=UTC)
    counts = replay_days([day], out, start, progress=lambda _: None)
    runs = pq.read_table(out / "runs.parquet").to_pandas()
    assert counts == {**counts, "runs": 2, "faults": 2, "moved": 0, "unobservable": 0} and list(runs.files) == [2, 1]
    assert runs.replay_start[0] == start and runs.replay_start[1] >= runs.replay_end[0]
    assert (runs.replay_start[1] - runs.replay_end[0]).total_seconds() < 1e-3
    rows_in = sum(pq.read_metadata(p).num_rows for p in out.rglob("*.parquet") if p.name.startswith("part-"))
    assert (
        rows_in
        == counts["rows"]
        == -counts["duplicates"]
        + 4445
        + sum(1 for _ in open_csv(day / "trace" / "08_44_trace.csv.gz"))
        + sum(1 for _ in open_csv(day / "trace" / "08_52_trace.csv.gz"))
    )
    faults = json.loads((out / "fault_list.json").read_text())["faults"]
    offsets = list(runs.offset_s)
    for fault, run, offset in zip(faults, (0, 1), offsets):
        real = datetime.fromisoformat(fault["real_inject_time"]).replace(tzinfo=UTC)
        replay = datetime.fromisoformat(fault["inject_time"]).replace(tzinfo=UTC)
        assert fault["run"] == run and fault["service"] == "ts-contacts-service"
        assert abs((replay - real).total_seconds() - offset) < 1
    assert replay_hours(out) == [start]


def test_a_fault_outside_every_capture_is_kept_as_unobservable(day, tmp_path):
    (day / "fault_list.json").write_text(
        json.dumps({"10": [{"inject_time": "2023-01-29 10:00:00", "inject_pod": "p-a-b"}]})
    )
    counts = replay_days([day], tmp_path / "replay", datetime(2023, 1, 29, 8, tzinfo=UTC), progress=lambda _: None)
    [fault] = json.loads((tmp_path / "replay" / "fault_list.json").read_text())["faults"]
    assert counts["unobservable"] == 1 and fault["observable"] is False
    assert fault["reason"].startswith("no capture overlaps its 180 s window (the previous capture ends")


def open_csv(path):
    import gzip

    with gzip.open(path, "rt") as f:
        next(f)  # header
        yield from f
