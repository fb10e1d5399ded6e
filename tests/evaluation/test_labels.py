"""Label evaluation on a tiny hand-made warehouse: recall, event-wise precision, F1, delays, false
alarms, drift hours, for rpcwatch's anomalies and the naive median/MAD rule, with incidents from the
product's rule (so the gap setting changes them)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.app.cli import main
from tasks.evaluation.labels import evaluate_labels, label_report
from tasks.scoring.incidents import rebuild_incidents
from tasks.settings import Settings
from tasks.synth.events import LABEL_SCHEMA
from tasks.warehouse import opened

T = datetime(2026, 1, 1, 10)  # naive UTC, as stored; hours 10:00 and 11:00 are scored
CHECKOUT, BROWSE, SEARCH = 1, 2, 3  # request types' patterns


def _at(minute: int) -> datetime:
    return T + timedelta(minutes=minute)


def _utc(minute: int) -> datetime:
    return _at(minute).replace(tzinfo=UTC)


def _anomaly(minute: int, pattern: int | None, rpc: tuple[str, str, str], score: float = 1.0) -> tuple:
    caller, callee, interface = rpc
    kind = "novel_rpc" if pattern is None else "traffic_spike"
    return (_at(minute), pattern, f"{caller}|{callee}|{interface}|rpc", caller, callee, interface, "calls", score, kind)


CART = ("svc-a", "svc-b", "get")  # checkout's RPC
SHELF = ("svc-x", "svc-y", "put")  # browse's RPC
INDEX = ("svc-s", "svc-t", "find")  # search's RPC
PROBE = ("svc-a", "svc-z", "probe")  # a novel RPC
ANOMALIES = [
    *(_anomaly(m, CHECKOUT, CART) for m in (12, 13, 14)),  # e1 (10:10-10:20), 120 s after its start
    *(_anomaly(m, BROWSE, SHELF) for m in (40, 41, 42)),  # false
    *(_anomaly(m, BROWSE, SHELF) for m in (50, 51, 55, 56)),  # two runs of 2 buckets, 4 min apart
    *(_anomaly(m, SEARCH, INDEX) for m in (80, 81, 82)),  # in the drift d1: true, one drift hour
    _anomaly(101, None, PROBE, score=4.0),  # e3 (11:40-11:45), one bucket but far out
    *(_anomaly(m, BROWSE, SHELF) for m in (110, 111, 112)),  # false
]
LABELS = [  # event_id, kind, start, end (minutes from 10:00), request_type, rpcs
    ("e1", "traffic_spike", 10, 20, "checkout", ["svc-a:svc-b:get"]),
    ("e2", "latency", 60, 65, "browse", ["svc-c:svc-d:list"]),  # nothing flagged: missed
    ("e3", "novel_rpc", 100, 105, "checkout", ["svc-a:svc-z:probe"]),
    ("d1", "drift", 75, 119, "search", ["svc-s:svc-t:find"]),
]


def _rpc_series() -> list[tuple]:
    """CART steady at 10 calls a minute from 09:00 with a spike 10:12-10:14 (the naive rule sees it)."""
    rows = []
    for m in range(-60, 120):
        calls = 50 if m in (12, 13, 14) else 10
        rows.append((_at(m), *CART, "rpc", calls, 0, 5.0, 5.0, 5.0, 60))
    return rows


def _write_home(settings: Settings, folder: Path) -> Path:
    """The warehouse tables the evaluation reads, the labels and the trace truth; returns the labels path."""
    (folder / "truth").mkdir(parents=True)
    traces = [(f"t{p}-{i}", rt, p) for rt, p in (("checkout", 1), ("browse", 2), ("search", 3)) for i in range(5)]
    pq.write_table(
        pa.table({"traceid": [t for t, _, _ in traces], "request_type": [rt for _, rt, _ in traces]}),
        folder / "truth" / "trace_templates.parquet",
    )
    events = [(e, k, _utc(s), _utc(end), rt, rpcs, None) for e, k, s, end, rt, rpcs in LABELS]
    labels = folder / "labels.parquet"
    pq.write_table(pa.Table.from_pylist([dict(zip(LABEL_SCHEMA.names, e)) for e in events], LABEL_SCHEMA), labels)
    with opened(settings.warehouse) as con:
        con.executemany(
            "INSERT INTO trace_patterns (trace_id, hour, status, pattern_id) VALUES (?, ?, 'full', ?)",
            [(t, T, p) for t, _, p in traces],
        )
        con.executemany(
            "INSERT INTO score_runs (hour, pattern_id, status) VALUES (?, ?, 'scored')",
            [(hour, p) for hour in (T, T + timedelta(hours=1)) for p in (1, 2)],
        )
        con.executemany(
            "INSERT INTO anomalies (bucket_ts, pattern_id, node, caller, callee, interface, feature, score, kind) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ANOMALIES,
        )
        con.executemany(
            "INSERT INTO rpc_series (bucket_ts, caller, callee, interface, rpc_type, calls, errors, rt_mean, rt_p50, "
            "rt_p95, bucket_seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            _rpc_series(),
        )
    decide_incidents(settings)
    return labels


def decide_incidents(settings: Settings) -> None:
    """The incidents the pipeline stores for the two hours, by its alarm policy at `settings`
    (two hours of history: the fixed rule)."""
    with opened(settings.warehouse) as con:
        con.execute("DELETE FROM incidents")
        for hour in (T, T + timedelta(hours=1)):
            rebuild_incidents(
                con,
                hour,
                settings.incident_gap_buckets,
                settings.bucket_seconds,
                settings.incident_min_buckets,
                settings.alarm_false_per_day,
            )


@pytest.fixture
def labelled(settings: Settings, tmp_path: Path) -> tuple[Settings, Path]:
    return settings, _write_home(settings, tmp_path / "incoming")


def test_rpcwatch_and_the_naive_rule_are_scored_against_the_labels(labelled):
    settings, labels = labelled
    ours, naive, extra = evaluate_labels(settings, labels)
    assert (ours.events, ours.detected, ours.incidents, ours.true_incidents) == (3, 2, 5, 3)
    assert ours.per_event == {"e1": "detected after 120 s", "e2": "missed", "e3": "detected after 60 s"}
    assert ours.recall == pytest.approx(2 / 3) and ours.precision == pytest.approx(2 / 4)
    assert ours.f1 == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert ours.median_delay_s == 90 and ours.false_alarms_per_pattern_hour == pytest.approx(2 / 4)
    assert (naive.events, naive.detected, naive.incidents, naive.true_incidents) == (3, 1, 1, 1)
    assert naive.per_event == {"e1": "detected after 120 s", "e2": "missed", "e3": "missed"}
    assert (naive.recall, naive.precision, naive.f1) == (pytest.approx(1 / 3), 1.0, pytest.approx(0.5))
    assert extra["d1_alarm_hours"] == 1.0, "the search incident at 11:20 is in hour 11"
    assert extra["forecast_mape_calls"] != extra["forecast_mape_calls"], "no forecast errors stored: nan"


def test_the_evaluation_counts_the_incidents_the_pipeline_decided_at_its_settings(labelled):
    settings, labels = labelled
    decide_incidents(settings.with_(incident_gap_buckets=4))
    ours, naive, _ = evaluate_labels(settings.with_(incident_gap_buckets=4), labels)
    assert (ours.incidents, ours.true_incidents) == (6, 3), "10:50-10:56 is now one run of 4 buckets"
    assert ours.precision == pytest.approx(2 / 5) and ours.recall == pytest.approx(2 / 3)
    decide_incidents(settings.with_(incident_min_buckets=4))
    ours, _, _ = evaluate_labels(settings.with_(incident_min_buckets=4), labels)
    assert (ours.incidents, ours.true_incidents) == (1, 1), "only the far-out novel point is left"


def test_the_report_puts_both_detectors_and_every_event_side_by_side(labelled):
    settings, labels = labelled
    report = label_report(*evaluate_labels(settings, labels))
    rows = {line.split()[0]: line.split() for line in report.splitlines() if line.strip()}
    assert rows["rpcwatch"][1:8] == ["3", "2", "0.67", "5", "2", "0.50", "0.57"]
    assert "naive median/MAD" in report and "d1_alarm_hours 1.000" in report
    assert rows["e2"][1:] == ["missed", "missed"]


def test_nothing_scored_is_a_clear_error(settings, tmp_path):
    labels = _write_home(settings, tmp_path / "incoming")
    with opened(settings.warehouse) as con:
        con.execute("DELETE FROM score_runs")
    with pytest.raises(ValueError, match="nothing scored yet"):
        evaluate_labels(settings, labels)


def test_the_json_holds_every_event_and_the_false_incidents_of_each_detector(labelled, capsys):
    settings, labels = labelled
    assert main(["evaluate", "--home", str(settings.home), "--labels", str(labels), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"rpcwatch", "naive"} <= set(out)
    assert out["rpcwatch"]["events"] == [
        {"event": "e1", "kind": "traffic_spike", "detected": True, "delay_s": 120.0},
        {"event": "e2", "kind": "latency", "detected": False, "delay_s": None},
        {"event": "e3", "kind": "novel_rpc", "detected": True, "delay_s": 60.0},
    ]
    assert [e["detected"] for e in out["naive"]["events"]] == [True, False, False]
    ours, naive = out["rpcwatch"], out["naive"]
    assert (ours["false_incidents"], naive["false_incidents"]) == (2, 0)
    assert (ours["detected"], ours["incidents"], ours["median_delay_s"]) == (2, 5, 90)
    assert ours["precision"] == pytest.approx(0.5) and ours["recall"] == pytest.approx(2 / 3)
    assert out["extra"]["d1_alarm_hours"] == 1.0 and out["extra"]["forecast_mape_calls"] is None, "no NaN in JSON"


def test_the_ceiling_still_needs_a_fault_list(labelled):
    settings, labels = labelled
    with pytest.raises(SystemExit, match="--ceiling and --curve go with --faults only"):
        main(["evaluate", "--home", str(settings.home), "--labels", str(labels), "--ceiling"])
