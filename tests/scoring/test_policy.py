"""The alarm policy (`tasks.scoring.policy`): one setting in false incidents a day, a threshold read
from the history's runs, decisive evidence at once, the fixed rule until there is history; and
novelty (`tasks.scoring.novel`): an RPC alarms once, when it is new, and a new edge is decisive."""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pytest
from scipy.stats import norm

from tasks.scoring.incidents import rebuild_incidents
from tasks.scoring.novel import NEW_EDGE, NEW_INTERFACE, novel_anomalies
from tasks.scoring.policy import MIN_BODY, MIN_CALIBRATION_HOURS, threshold
from tasks.scoring.store import ANOMALY_COLUMNS
from tasks.warehouse import opened

H = datetime(2026, 1, 2, 10)  # the hour being decided; its history is the day before


def _hours(per_hour: list[list[float]]) -> dict[datetime, list[float]]:
    return {H - timedelta(hours=i + 1): v for i, v in enumerate(per_hour)}


def test_the_threshold_lets_through_about_the_setting_of_the_normal_candidates_a_day():
    rng = np.random.default_rng(0)
    history = _hours([list(np.expm1(rng.normal(2.0, 0.8, size=20))) for _ in range(24)])  # 480 a day
    for per_day in (0.25, 1.0, 4.0, 24.0):
        t = threshold(history, per_day)
        truth = np.expm1(2.0 + 0.8 * norm.isf(per_day / 480))
        assert t is not None and abs(np.log1p(t) - np.log1p(truth)) < 0.2, per_day
    values = [threshold(history, x) for x in (0.25, 1.0, 4.0)]
    assert values == sorted(values, reverse=True)  # a looser setting, a lower threshold


def test_busy_hours_of_unlabelled_incidents_are_left_out_of_the_history():
    rng = np.random.default_rng(1)
    quiet = [list(np.expm1(rng.normal(2.0, 0.8, size=20))) for _ in range(18)]
    clean = threshold(_hours(quiet), 1.0)
    dirty = threshold(_hours(quiet + [[5000.0] * 40] * 6), 1.0)  # a quarter of the hours hold incidents
    assert clean is not None and dirty is not None and abs(np.log1p(dirty) - np.log1p(clean)) < 0.15
    worse = threshold(_hours(quiet + [[5000.0] * 40] * 16), 1.0)  # 16 of 34 hours inside incidents
    assert worse is not None and abs(np.log1p(worse) - np.log1p(clean)) < 0.15


def test_sparse_candidates_with_fault_dense_hours_keep_the_bar_of_the_quiet_ones():
    """Most quiet hours raise no candidate, one in three raises one; then a run of capture hours
    holds a dozen strong ones each (TrainTicket 01-29's shape). The bar stays where the quiet hours
    put it, below the faults."""
    rng = np.random.default_rng(2)
    quiet = [[float(np.expm1(rng.normal(2.5, 0.5)))] if i % 3 == 0 else [] for i in range(12)]
    faults = [list(np.expm1(rng.normal(5.0, 1.0, size=12))) for _ in range(8)]
    clean, dirty = threshold(_hours(quiet), 1.0), threshold(_hours(quiet + faults), 1.0)
    assert clean is not None and dirty is not None
    assert dirty < 2 * clean + 1 and dirty < np.expm1(4.0)


def test_quiet_history_lets_every_candidate_alarm_and_short_history_is_not_calibrated():
    assert threshold(_hours([[]] * 47 + [[3.0]]), 1.0) == 0.0  # half a candidate a day: within budget
    # five a day are not, though most hours raise none (leaving the busiest quarter out read 0 a day)
    assert threshold(_hours([[]] * 19 + [[3.0]] * 5), 1.0) > 3.0
    # four are too few to read a quantile from (MIN_BODY): not calibrated, every candidate alarms
    assert threshold(_hours([[]] * 20 + [[3.0]] * (MIN_BODY - 1)), 1.0) == 0.0
    assert threshold(_hours([[3.0]] * (MIN_CALIBRATION_HOURS - 1)), 1.0) is None


def _point(ts: datetime, group: int | None, score: float, kind: str = "traffic_spike", feature: str = "calls") -> tuple:
    caller = "svc-a" if group is not None else "svc-x"
    values = dict.fromkeys(ANOMALY_COLUMNS)
    values |= {
        "bucket_ts": ts,
        "pattern_id": group,
        "node": f"{caller}|svc-b|get|rpc",
        "caller": caller,
        "callee": "svc-b",
        "interface": "get",
        "feature": feature,
        "observed": 10.0,
        "expected": 1.0,
        "threshold": 2.0,
        "score": score,
        "direction": "up",
        "kind": kind,
        "scored_at": ts,
        "culprit": "svc-b",
    }
    return tuple(values[c] for c in ANOMALY_COLUMNS)


def _insert(con, points: list[tuple]) -> None:
    con.executemany(
        f"INSERT INTO anomalies ({', '.join(ANOMALY_COLUMNS)}) VALUES ({', '.join('?' * len(ANOMALY_COLUMNS))})",
        points,
    )


@pytest.fixture
def history(settings):
    """A day of scored hours, each holding four short weak runs (one point of score 1-4) of pattern 1."""
    with opened(settings.warehouse) as con:
        con.executemany(
            "INSERT INTO score_runs (hour, pattern_id, status) VALUES (?, 1, 'scored')",
            [(H - timedelta(hours=h),) for h in range(1, 25)],
        )
        _insert(
            con,
            [
                _point(H - timedelta(hours=h) + timedelta(minutes=10 * i), 1, 1.0 + i)
                for h in range(1, 25)
                for i in range(4)
            ],
        )
    return settings


def _incidents(con) -> list[tuple]:
    return con.execute("SELECT start_ts, points FROM incidents WHERE start_ts >= ? ORDER BY 1", [H]).fetchall()


def test_runs_alarm_by_evidence_against_the_history_and_a_new_edge_at_once(history):
    with opened(history.warehouse) as con:
        _insert(
            con,
            [
                *[_point(H + timedelta(minutes=m), 1, 1.2) for m in range(3)],  # persistent but weak: 3.6
                _point(H + timedelta(minutes=20), 1, 40.0),  # one overwhelming point
                _point(H + timedelta(minutes=40), None, 1.0, "novel_rpc", NEW_EDGE),  # a new edge, 1 call
                _point(H + timedelta(minutes=50), 2, 1.0, "novel_rpc", NEW_INTERFACE),  # a new interface, 1 call
            ],
        )
        rebuild_incidents(con, H, 3, 60, 3, false_per_day=1.0)
        decided = _incidents(con)
        rebuild_incidents(con, H, 3, 60, 3)  # the fixed rule: persistence or a point >= 3
        fixed = _incidents(con)
    assert [t.minute for t, _ in decided] == [20, 40]
    assert [t.minute for t, _ in fixed] == [0, 20, 40]


def test_a_looser_setting_lets_weaker_runs_through(history):
    with opened(history.warehouse) as con:
        _insert(con, [_point(H + timedelta(minutes=m), 1, 1.2) for m in range(3)])
        rebuild_incidents(con, H, 3, 60, 3, false_per_day=1.0)
        strict = _incidents(con)
        rebuild_incidents(con, H, 3, 60, 3, false_per_day=48.0)
        loose = _incidents(con)
    assert strict == [] and [t.minute for t, _ in loose] == [0]


def test_an_rpc_alarms_as_new_once_and_a_known_edge_with_a_new_interface_is_weak(settings):
    hour = datetime(2026, 1, 1, 12)
    with opened(settings.warehouse) as con:
        series = [
            (hour - timedelta(hours=2), "a", "b", "old", "rpc", 3, 0, 1.0, 1.0, 1.0, 60),  # seen two hours ago
            (hour + timedelta(minutes=5), "a", "b", "old", "rpc", 1, 0, 1.0, 1.0, 1.0, 60),
            (hour + timedelta(minutes=6), "a", "b", "new", "rpc", 2, 0, 1.0, 1.0, 1.0, 60),
            (hour + timedelta(minutes=7), "x", "b", "old", "rpc", 5, 0, 1.0, 1.0, 1.0, 60),
            (hour + timedelta(minutes=8), "x", "b", "old", "rpc", 5, 0, 1.0, 1.0, 1.0, 60),
        ]
        con.executemany("INSERT INTO rpc_series VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", series)
        con.executemany(
            "INSERT INTO novel_rpcs (bucket_ts, caller, callee, interface, rpc_type, calls) VALUES (?, ?, ?, ?, ?, ?)",
            [(ts, c, e, i, t, n) for ts, c, e, i, t, n, *_ in series if ts >= hour],
        )
        assert novel_anomalies(con, hour, hour, memory=timedelta(hours=48)) == 2
        rows = con.execute("SELECT bucket_ts, caller, interface, feature, score FROM anomalies ORDER BY 1").fetchall()
        assert novel_anomalies(con, hour, hour, memory=timedelta(hours=1)) == 3  # forgotten: new again
    assert [(r[1], r[2], r[3], r[4]) for r in rows] == [("a", "new", NEW_INTERFACE, 2.0), ("x", "old", NEW_EDGE, 5.0)]
    assert rows[1][0] == hour + timedelta(minutes=7)  # the first bucket only


def test_novelty_needs_history_and_a_known_caller(settings):
    """In the warehouse's first buckets every RPC is new, and a call whose parent span was not
    captured (caller UNKNOWN, e.g. a trace cut at the hour's edge) has no edge to judge."""
    hour = datetime(2026, 1, 1, 12)
    with opened(settings.warehouse) as con:
        series = [
            (hour, "a", "b", "old", "rpc", 3, 0, 1.0, 1.0, 1.0, 60),  # the warehouse's first bucket
            (hour + timedelta(minutes=30), "x", "b", "old", "rpc", 5, 0, 1.0, 1.0, 1.0, 60),
            (hour + timedelta(minutes=40), "UNKNOWN", "b", "old", "rpc", 5, 0, 1.0, 1.0, 1.0, 60),
        ]
        con.executemany("INSERT INTO rpc_series VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", series)
        con.executemany(
            "INSERT INTO novel_rpcs (bucket_ts, caller, callee, interface, rpc_type, calls) VALUES (?, ?, ?, ?, ?, ?)",
            [(ts, c, e, i, t, n) for ts, c, e, i, t, n, *_ in series],
        )
        assert novel_anomalies(con, hour, hour, warmup=timedelta(hours=1)) == 0  # too little history
        assert novel_anomalies(con, hour, hour, warmup=timedelta(minutes=10)) == 1
        rows = con.execute("SELECT bucket_ts, caller, feature FROM anomalies").fetchall()
    assert rows == [(hour + timedelta(minutes=30), "x", NEW_EDGE)]  # not the first bucket, not UNKNOWN


def test_many_never_seen_interfaces_in_one_bucket_are_decisive_a_few_are_not(history):
    def scan(minute: int, n: int) -> list[tuple]:
        points = []
        for i in range(n):
            row = list(_point(H + timedelta(minutes=minute), None, 1.0, "novel_rpc", NEW_INTERFACE))
            row[ANOMALY_COLUMNS.index("node")] = f"svc-x|svc-b|/probe/{i}|rpc"
            points.append(tuple(row))
        return points

    with opened(history.warehouse) as con:
        _insert(con, scan(10, 3) + scan(30, 12))  # a deploy's few new endpoints; a scanner's dozen
        rebuild_incidents(con, H, 3, 60, 3, false_per_day=1.0)
        assert [t.minute for t, _ in _incidents(con)] == [30]


def test_an_hour_given_as_airflow_gives_it_is_decided_the_same(history):
    """Airflow hands tasks pendulum DateTimes; their differences do not divide by a plain timedelta."""
    import pendulum

    with opened(history.warehouse) as con:
        _insert(con, [_point(H + timedelta(minutes=20), 1, 40.0)])
        rebuild_incidents(con, pendulum.instance(H, tz="UTC"), 3, 60, 3, false_per_day=1.0)
        assert [t.minute for t, _ in _incidents(con)] == [20]
