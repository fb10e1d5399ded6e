"""`rpcwatch evaluate --faults --json` on a hand-built warehouse: windows clipped to the capture,
unobservable faults listed not counted, add-one smoothed chance, per-type counts, culprit ranks."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pandas as pd
import pytest

from tasks.app.cli import main
from tasks.evaluation.faults import load_faults, rank_services
from tasks.keys import node_key
from tasks.scoring.incidents import Incident
from tasks.warehouse import opened

T0 = datetime(2026, 1, 1)
RPCS = (("gw", "svc-a"), ("svc-a", "db"), ("gw", "svc-b"))


def _at(minute: int) -> datetime:
    return T0 + timedelta(minutes=minute)


def _node(caller: str, callee: str) -> str:
    return node_key(caller, callee, "op", "http")


def _anomaly(minute: int, caller: str, callee: str, score: float) -> tuple:
    return (_at(minute), 1, _node(caller, callee), caller, callee, "op", score)


@pytest.fixture
def warehouse(settings, monkeypatch):
    """One-minute buckets 00:00-01:59 of three steady RPCs (the naive rule flags nothing); the
    first champion trained for 00:00, so 01:00-01:59 is judged (60 buckets); rpcwatch points at
    01:11 (in the first fault's window) and 01:40 (fault-free, touching svc-a), an incident on each."""
    monkeypatch.setenv("RPCWATCH_TRACE_STEP_S", "60")  # judged on the minutes, as the hand counts are
    with opened(settings.warehouse) as con:
        rows = [(_at(m), c, e, "op", "http", 10, 0, 5.0, 5.0, 5.0, 60) for m in range(120) for c, e in RPCS]
        con.executemany("INSERT INTO rpc_series VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        con.execute("INSERT INTO models (pattern_id, trained_for, decision) VALUES (1, ?, 'champion')", [T0])
        con.execute("INSERT INTO score_runs (hour, pattern_id, status) VALUES (?, 1, 'scored')", [_at(60)])
        points = [_anomaly(71, "svc-a", "db", 2.0), _anomaly(71, "gw", "svc-a", 0.5), _anomaly(100, "gw", "svc-a", 1.0)]
        con.executemany(
            "INSERT INTO anomalies (bucket_ts, pattern_id, node, caller, callee, interface, score) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            points,
        )
        incidents = [
            ("i1", _at(71), _at(72), [1], [_node("gw", "svc-a"), _node("svc-a", "db")], 2.0, ["spike"], 2),
            ("i2", _at(100), _at(101), [1], [_node("gw", "svc-a")], 1.0, ["spike"], 1),
        ]
        con.executemany(
            "INSERT INTO incidents (incident_id, start_ts, end_ts, patterns, nodes, peak_score, kinds, points) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            incidents,
        )
    return settings


def _fault_list(path) -> None:
    faults = [
        {"inject_time": "2026-01-01 00:30:00", "inject_pod": "svc-a-1-2", "inject_type": "return"},  # trained on
        {
            "inject_time": "2026-01-01 01:10:00",
            "inject_pod": "svc-a-1-2",
            "inject_type": "return",
            "capture_end": "2026-01-01 01:12:30",  # window clipped: buckets 01:10-01:12
        },
        {"inject_time": "2026-01-01 01:30:00", "inject_pod": "svc-b-1-2", "inject_type": "cpu"},  # 01:30-01:33
        {
            "inject_time": None,
            "real_inject_time": "2023-01-29 10:20:00",
            "inject_pod": "svc-b-1-2",
            "inject_type": "cpu",
            "observable": False,
            "reason": "no capture overlaps its 180 s window",
        },
    ]
    path.write_text(json.dumps({"faults": faults}))


def test_json_scores_by_detector_and_unit(warehouse, tmp_path, capsys):
    path = tmp_path / "fault_list.json"
    _fault_list(path)
    assert main(["evaluate", "--home", str(warehouse.home), "--faults", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out) == {"rpcwatch", "naive", "unobservable"}
    assert [f["real_inject_time"] for f in out["unobservable"]] == ["2023-01-29 10:20:00"]
    # 60 judged buckets, 5 + 6 in windows (each opens 90 s before its injection: 01:08-01:12 and
    # 01:28-01:33): n = 49 fault-free; svc-a touched in k = 1 of them, svc-b in 0
    chance_a, chance_b = 1 - (1 - 2 / 51) ** 5, 1 - (1 - 1 / 51) ** 6
    for unit in ("points", "incidents"):
        ours = out["rpcwatch"][unit]
        assert {k: ours[k] for k in ("faults", "detected", "fault_free_minutes", "alarmed_fault_free_minutes")} == {
            "faults": 2,
            "detected": 1,
            "fault_free_minutes": 49,
            "alarmed_fault_free_minutes": 1,
        }, unit
        assert ours["expected_by_chance"] == pytest.approx(chance_a + chance_b)
        assert ours["median_delay_s"] == 120  # bucket 01:11 ends 120 s after the injection
        assert ours["by_type"]["return"] == {"faults": 1, "detected": 1, "expected_by_chance": pytest.approx(chance_a)}
        assert ours["by_type"]["cpu"] == {"faults": 1, "detected": 0, "expected_by_chance": pytest.approx(chance_b)}
    # the incident of the detected fault: db is the callee of the 2.0 point, svc-a of the 0.5 one
    assert (out["rpcwatch"]["incidents"]["culprit_top1"], out["rpcwatch"]["incidents"]["culprit_top3"]) == (0.0, 1.0)
    assert "culprit_top1" not in out["rpcwatch"]["points"]
    naive = out["naive"]["incidents"]
    assert naive["detected"] == 0 and naive["median_delay_s"] is None and naive["culprit_top1"] is None
    assert naive["expected_by_chance"] == pytest.approx(1 - (1 - 1 / 51) ** 5 + chance_b)


def test_the_table_stays_the_default_and_lists_unobservable_faults(warehouse, tmp_path, capsys):
    path = tmp_path / "fault_list.json"
    _fault_list(path)
    assert main(["evaluate", "--home", str(warehouse.home), "--faults", str(path)]) == 0
    text = capsys.readouterr().out
    assert "rpcwatch incident starts" in text and "unobservable (listed, not counted)" in text


def test_windows_are_clipped_to_the_capture_and_last_180_s_otherwise(tmp_path):
    path = tmp_path / "fault_list.json"
    _fault_list(path)
    faults = load_faults(path)
    observable = faults[faults.observable]
    assert list(observable.window_end - observable.inject_time) == [
        pd.Timedelta(seconds=180),
        pd.Timedelta(seconds=150),
        pd.Timedelta(seconds=180),
    ]
    assert list(faults[~faults.observable].reason) == ["no capture overlaps its 180 s window"]


def test_culprit_ranking_by_callee_score_then_caller_score():
    nodes = [_node("gw", "svc-a"), _node("svc-a", "db"), _node("gw", "svc-b")]
    incident = Incident("i", _at(0), _at(2), [1], nodes, 3.0, ["spike"], 3, [])
    points = pd.DataFrame(
        {
            "bucket_ts": [_at(0), _at(1), _at(1), _at(5)],
            "node": [nodes[0], nodes[1], nodes[2], nodes[1]],  # the last is after the incident
            "score": [3.0, 1.0, 1.0, 50.0],
        }
    )
    # callee sums: svc-a 3, db 1, svc-b 1, gw 0; db and svc-b tie as callee, neither is a caller: name
    assert rank_services(incident, points) == ["svc-a", "db", "svc-b", "gw"]


def _replay_beside(path) -> None:
    """A replay's runs next to the fault list: three captures, the rest of 01:00-01:59 is fill."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    spans = [(_at(65), _at(75)), (_at(88), _at(96)), (_at(105), _at(110))]
    pq.write_table(
        pa.Table.from_pylist(
            [{"day": "d", "run": i, "replay_start": a, "replay_end": b} for i, (a, b) in enumerate(spans)]
        ),
        path.parent / "runs.parquet",
    )
    meta = {
        "fill": True,
        "start": "2026-01-01 00:00:00",
        "prefix_end": "2026-01-01 01:05:00",
        "end": "2026-01-01 02:00:00",
    }
    (path.parent / "replay.json").write_text(json.dumps(meta))


def test_false_alarms_are_counted_over_the_fill_and_the_real_captures_apart(warehouse, tmp_path, capsys):
    path = tmp_path / "fault_list.json"
    _fault_list(path)
    _replay_beside(path)
    assert main(["evaluate", "--home", str(warehouse.home), "--faults", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 60 judged minutes: 26 in captures (11 + 9 + 6), of which 13 in the faults' zones (01:08-01:13,
    # 01:28-01:34: 90 s before the injection to 60 s after the window); 34 minutes of fill
    for unit in ("points", "incidents"):
        ours = out["rpcwatch"][unit]
        assert ours["fill_hours"] == pytest.approx(34 / 60, abs=0.01)
        assert ours["false_in_fill"] == 1, unit  # the 01:40 point and its incident, in the fill
        assert ours["false_incidents_per_day"] == pytest.approx(1 / (34 / 60 / 24))
        assert (ours["real_fault_free_minutes"], ours["real_fault_free_minutes_alarmed"]) == (13, 0)
        # the ceiling has no calls to go on here: `visible` is left null, not guessed
        assert (ours["visible"], ours["detected_visible"]) == (None, None)


def test_the_operating_curve_has_five_settings_and_marks_the_default(warehouse, tmp_path, capsys):
    path = tmp_path / "fault_list.json"
    _fault_list(path)
    _replay_beside(path)
    assert main(["evaluate", "--home", str(warehouse.home), "--faults", str(path), "--curve"]) == 0
    text = capsys.readouterr().out
    assert "Operating curve" in text and "1 (default)" in text
    assert main(["evaluate", "--home", str(warehouse.home), "--faults", str(path), "--json", "--curve"]) == 0
    curve = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["curve"]
    assert [c["setting"] for c in curve] == [0.25, 0.5, 1.0, 2.0, 4.0, None]  # None: the fixed rule
    assert all(c["faults"] == 2 and c["false_per_day"] is not None for c in curve)
