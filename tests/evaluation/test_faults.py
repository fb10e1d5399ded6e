"""Fault-list evaluation: loading Nezha fault lists, detections, chance level, a real scored warehouse."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pandas as pd
import pytest

from helpers import START, copy_home, shared_file
from tasks.evaluation.faults import FaultScores, evaluate_faults, load_faults, score_faults, top_shares
from tasks.evaluation.naive import naive_points
from tasks.warehouse import opened


def _points(*rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["bucket_ts", "caller", "callee"])


def test_nezha_fault_list_loads_with_services_and_default_windows():
    faults = load_faults(shared_file("nezha-trainticket", "2023-01-29", "fault_list.json"))
    assert len(faults) == 28
    first = faults.iloc[0]
    assert first.service == "ts-contacts-service" and first.inject_time == pd.Timestamp("2023-01-29 08:43:04")
    assert (faults.window_end - faults.inject_time == timedelta(minutes=3)).all()


def test_an_empty_fault_list_is_a_clear_error(tmp_path):
    path = tmp_path / "fault_list.json"
    path.write_text(json.dumps({"08": []}))
    with pytest.raises(ValueError, match="no faults listed"):
        load_faults(path)


def test_detection_delay_and_chance_level_on_hand_made_points():
    buckets = pd.date_range("2023-01-01 00:00", periods=120, freq="5s")  # 10 minutes
    faults = pd.DataFrame(
        {
            "inject_time": [pd.Timestamp("2023-01-01 00:05:02")],
            "service": ["svc-a"],
            "window_end": [pd.Timestamp("2023-01-01 00:05:57")],
        }
    )  # buckets 00:05:00 .. 00:05:55
    points = _points(
        (pd.Timestamp("2023-01-01 00:05:10"), "svc-a", "db"),  # in the window: detected
        (pd.Timestamp("2023-01-01 00:01:00"), "gw", "svc-a"),  # fault-free, touches svc-a
        (pd.Timestamp("2023-01-01 00:02:00"), "gw", "svc-b"),
    )  # fault-free, elsewhere
    s = score_faults("x", points, faults, buckets, 5)
    assert (s.detected, s.per_fault) == (1, ["after 13 s"])  # bucket 00:05:10 ends 13 s after the injection
    # the window opens PRE_EFFECT (90 s) early: buckets 00:03:30 .. 00:05:55 (30); one free bucket touches svc-a
    p = (1 + 1) / (90 + 2)
    assert s.chance == pytest.approx(1 - (1 - p) ** 30)
    assert (s.fault_free_minutes, s.alarmed_fault_free_minutes) == (8, 2)
    assert s.points_per_free_minute == pytest.approx(2 / 8) and s.free_minutes_alarmed == pytest.approx(2 / 8)
    assert score_faults("x", points.iloc[1:], faults, buckets, 5).per_fault == ["missed"]
    early = _points((pd.Timestamp("2023-01-01 00:04:00"), "gw", "svc-a"))  # in the lead-in: caught, delay 0
    assert score_faults("x", early, faults, buckets, 5).per_fault == ["after 0 s"]
    before = _points((pd.Timestamp("2023-01-01 00:03:25"), "gw", "svc-a"))  # before the lead-in: missed
    assert score_faults("x", before, faults, buckets, 5).per_fault == ["missed"]


def test_evaluate_on_a_scored_warehouse_counts_only_faults_after_training(trained, tmp_path):
    from tasks.ingest.aggregate import aggregate_hour
    from tasks.ingest.stage import ingest_hour
    from tasks.patterns.stage import patterns_hour
    from tasks.scoring.score import score_hour

    settings, source, _ = trained
    settings = copy_home(settings, tmp_path).with_(trace_step_s=60)  # one grid: the hand count below
    h4 = START + timedelta(hours=4)
    ingest_hour(settings, h4, [source])
    aggregate_hour(settings, h4)
    patterns_hour(settings, h4)
    score_hour(settings, h4)
    path = tmp_path / "fault_list.json"
    entries = [
        {"inject_time": "2026-01-01 02:30:00", "inject_pod": "svc-cart-5d9f-x1"},  # trained on: not judged
        {"inject_time": "2026-01-01 04:20:00", "inject_pod": "svc-cart-5d9f-x1"},
        {"inject_time": "2026-01-01 04:40:00", "inject_pod": "svc-nowhere-1-2"},
    ]
    path.write_text(json.dumps({"02": entries[:1], "04": entries[1:]}))
    evaluation = evaluate_faults(settings, path)
    faults = evaluation.faults
    scores = [s for units in evaluation.scores.values() for s in units.values()]
    assert list(faults.service) == ["svc-cart", "svc-nowhere"]
    assert [s.name for s in scores] == [
        "rpcwatch points",
        "rpcwatch incident starts",
        "naive points",
        "naive incident starts",
    ]
    for s in scores:
        assert s.faults == 2 and len(s.per_fault) == 2
        assert s.per_fault[1] == "missed", "a service that makes no call can't be hit"
        assert 0 <= s.free_minutes_alarmed <= 1
    ours_points, ours_incidents, naive_points_, _ = scores
    assert ours_incidents.detected <= ours_points.detected, "an incident starts at a flagged point"
    # chance by hand: scored 04:00-04:59 (60 buckets); the windows 04:18-04:23 and 04:38-04:43 (6
    # buckets each: they open 90 s before the injection) leave 48 fault-free ones; svc-nowhere is
    # touched in none (add-one smoothed: p = 1 / 50), svc-cart in k of them (p = (k + 1) / 50)
    with opened(settings.warehouse, read_only=True) as con:
        ours = con.execute("SELECT bucket_ts, caller, callee FROM anomalies").df()
        naive = naive_points(con, 60, _h4(0), _h4(60))
    nowhere = 1 - (1 - 1 / 50) ** 6
    for s, points in ((ours_points, ours), (naive_points_, naive)):
        touched = points[(points.caller == "svc-cart") | (points.callee == "svc-cart")].bucket_ts
        free = touched[touched.between(_h4(0), _h4(59)) & ~touched.between(_h4(18), _h4(23))]
        free = free[~free.between(_h4(38), _h4(43))]
        assert s.chance == pytest.approx(1 - (1 - (free.nunique() + 1) / 50) ** 6 + nowhere), s.name
    assert nowhere < naive_points_.chance < 1 + nowhere, "the naive rule flags svc-cart in some fault-free buckets"


def _h4(minute: int) -> datetime:
    return datetime(2026, 1, 1, 4) + timedelta(minutes=minute)


def test_alarms_cover_their_interval_and_count_from_its_end() -> None:
    """On a 5 s grid: a bucket's point (60 s) covers 12 cells and is known at its bucket's end; a
    trace window's point (5 s) one cell."""
    from tasks.evaluation.faults import score_faults

    inject = pd.Timestamp("2026-01-01 04:20:37")
    faults = pd.DataFrame(
        {
            "inject_time": [inject],
            "window_end": [inject + pd.Timedelta(seconds=180)],
            "service": ["b"],
            "inject_type": ["cpu"],
        }
    )
    grid = pd.date_range("2026-01-01 04:00", "2026-01-01 05:00", freq="5s")
    bucket = pd.DataFrame(
        {"bucket_ts": [pd.Timestamp("2026-01-01 04:20")], "caller": ["a"], "callee": ["b"], "duration_s": [60]}
    )
    window = bucket.assign(bucket_ts=pd.Timestamp("2026-01-01 04:20:45"), duration_s=5)
    lead_in = bucket.assign(bucket_ts=pd.Timestamp("2026-01-01 04:19:00"))  # inside the 90 s before
    early = bucket.assign(bucket_ts=pd.Timestamp("2026-01-01 04:18:00"))  # ends before the lead-in opens
    assert score_faults("b", bucket, faults, grid, 5).per_fault == ["after 23 s"]
    assert score_faults("w", window, faults, grid, 5).per_fault == ["after 13 s"]
    assert score_faults("l", lead_in, faults, grid, 5).per_fault == ["after 0 s"]
    assert score_faults("e", early, faults, grid, 5).per_fault == ["missed"]
    both = score_faults("both", pd.concat([bucket, window]), faults, grid, 5)
    assert both.per_fault == ["after 13 s"]


def test_the_culprit_is_also_judged_among_the_visible_faults_alone() -> None:
    """Ranks per fault (None: missed): the shares count detected faults, and `judge_visibility`
    counts the detected visible ones apart."""
    scores = FaultScores("rpcwatch incident starts", 4, 3, 0.0, 10.0, 60, 0, 0.0)
    scores.hits = [True, True, True, False]
    scores.culprit_ranks = [0, 4, 1, None]
    scores.culprit_top1, scores.culprit_top3 = top_shares(scores.culprit_ranks)
    assert (scores.culprit_top1, scores.culprit_top3) == (pytest.approx(1 / 3), pytest.approx(2 / 3))
    scores.judge_visibility([False, True, True, True])
    assert (scores.detected_visible, scores.visible) == (2, 3)
    assert (scores.culprit_top1_visible, scores.culprit_top3_visible) == (0.0, 0.5)
    assert top_shares([None, None]) == (None, None)
