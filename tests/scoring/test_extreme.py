"""Decisive single calls (`tasks.scoring.extreme`) on a real DuckDB warehouse: a call far beyond
anything its RPC did is a point of its own and an incident at once, ordinary calls never are."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from tasks.scoring.extreme import BEYOND_LONGEST, BEYOND_MOST, KIND, extreme_anomalies
from tasks.scoring.incidents import rebuild_incidents
from tasks.warehouse import opened

H = datetime(2026, 1, 1, 10)  # the hour scored (naive UTC, as stored)
NOW = datetime(2026, 1, 2)


def _call(ts: datetime, rpc: str, rt_ms: float, fan_out: int = 0, n: int = 0) -> tuple:
    """A calls row of RPC svc-a -> `rpc`."""
    trace = f"t-{rpc}-{ts.isoformat()}-{n}"
    return (ts, trace, f"c{n}", None, "svc-a", rpc, "/get", "http", rt_ms, False, "f", "b", None, fan_out, rt_ms)


@pytest.fixture
def con(tmp_path):
    """A warehouse whose RPCs `svc-b` and `svc-c` were called 30 times in the hour before H (up to
    50 ms, up to 5 child calls), and `svc-thin` only 5 times."""
    with opened(tmp_path / "w.duckdb") as con:
        history = [_call(H - timedelta(minutes=50 - i), "svc-b", 10.0 + i, fan_out=1 + i % 5, n=i) for i in range(30)]
        history += [_call(H - timedelta(minutes=50 - i), "svc-c", 0.01, n=i) for i in range(30)]
        history += [_call(H - timedelta(minutes=50 - i), "svc-thin", 10.0, n=i) for i in range(5)]
        con.executemany(f"INSERT INTO calls VALUES ({', '.join('?' * 15)})", history)
        yield con


def _points(con) -> list[tuple]:
    return con.execute(
        "SELECT bucket_ts, callee, feature, observed, threshold FROM anomalies WHERE kind = ? ORDER BY 1, 2, 3", [KIND]
    ).fetchall()


def test_a_call_a_hundred_times_its_longest_or_far_beyond_its_fan_out_is_a_point(con):
    con.executemany(
        f"INSERT INTO calls VALUES ({', '.join('?' * 15)})",
        [
            _call(H + timedelta(minutes=5, seconds=57), "svc-b", 6_000.0, n=100),  # 150x its longest (39 ms)
            _call(H + timedelta(minutes=6), "svc-b", 3_000.0, n=101),  # 77x: slow, not decisive
            _call(H + timedelta(minutes=7), "svc-b", 20.0, fan_out=15, n=102),  # 3x its most (5), 10 more
            _call(H + timedelta(minutes=8), "svc-b", 20.0, fan_out=14, n=103),  # not quite
            _call(H + timedelta(minutes=9), "svc-c", 5.0, n=104),  # 500x a 0.01 ms RPC, but 5 ms is jitter
            _call(H + timedelta(minutes=9), "svc-thin", 60_000.0, n=105),  # too little history to judge
        ],
    )
    assert extreme_anomalies(con, H, NOW, 60) == 2
    assert _points(con) == [
        (H + timedelta(minutes=6), "svc-b", BEYOND_LONGEST, 6_000.0, 3_900.0),  # reported where it ends
        (H + timedelta(minutes=7), "svc-b", BEYOND_MOST, 15.0, 15.0),
    ]
    assert extreme_anomalies(con, H, NOW, 60) == 2 and len(_points(con)) == 2  # a rerun replaces


def test_one_extreme_call_is_an_incident_at_once_where_weak_evidence_needs_three_buckets(con):
    con.execute(f"INSERT INTO calls VALUES ({', '.join('?' * 15)})", _call(H + timedelta(minutes=20), "svc-b", 9_000.0))
    extreme_anomalies(con, H, NOW, 60)
    assert rebuild_incidents(con, H, gap_buckets=3, seconds=60, min_buckets=3, false_per_day=1.0) == 1
    [(start, kinds, culprits)] = con.execute("SELECT start_ts, kinds, culprits FROM incidents").fetchall()
    assert (start, kinds, culprits) == (H + timedelta(minutes=20), [KIND], ["svc-b"])


def test_nothing_in_an_hour_of_ordinary_calls(con):
    con.executemany(
        f"INSERT INTO calls VALUES ({', '.join('?' * 15)})",
        [_call(H + timedelta(minutes=i), "svc-b", 10.0 + i, fan_out=1 + i % 5, n=200 + i) for i in range(60)],
    )
    assert extreme_anomalies(con, H, NOW, 60) == 0
