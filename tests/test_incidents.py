"""Incidents across hour boundaries: a run of flagged points that spans hours is one incident row,
whatever order the hours are scored or rescored in (`tasks.scoring.incidents`)."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest

from tasks.scoring.incidents import rebuild_incidents
from tasks.scoring.score import ANOMALY_COLUMNS
from tasks.warehouse import opened

H = datetime(2026, 1, 1, 10)  # naive UTC, as stored
GAP, SECONDS, MIN_BUCKETS = 3, 60, 3  # the settings' defaults


def _point(ts: datetime, group: int | str, score: float = 1.0, feature: str = "calls") -> tuple:
    """An anomalies row: a pattern's point (int group) or a novel RPC of a calling service (str group)."""
    pid, caller = (group, "svc-a") if isinstance(group, int) else (None, group)
    node = f"{caller}|svc-b|get|rpc"
    return (
        ts,
        pid,
        node,
        caller,
        "svc-b",
        "get",
        feature,
        10.0,
        1.0,
        2.0,
        score,
        "up",
        "novel_rpc" if pid is None else "traffic_spike",
        None,
        None,
        None,
        ts,
    )


def _minutes(first: datetime, last: datetime, group, step: int = 1, **kw) -> list[tuple]:
    n = int((last - first).total_seconds() // 60)
    return [_point(first + timedelta(minutes=m), group, **kw) for m in range(0, n + 1, step)]


def _score(con, hour: datetime, points: list[tuple]) -> None:
    """What score_hour does to these tables: replace the hour's anomalies, then rebuild incidents."""
    con.execute("DELETE FROM anomalies WHERE bucket_ts >= ? AND bucket_ts < ?", [hour, hour + timedelta(hours=1)])
    rows = [p for p in points if hour <= p[0] < hour + timedelta(hours=1)]
    if rows:
        con.executemany(
            f"INSERT INTO anomalies ({', '.join(ANOMALY_COLUMNS)}) VALUES ({', '.join('?' * len(ANOMALY_COLUMNS))})",
            rows,
        )
    rebuild_incidents(con, hour, GAP, SECONDS, MIN_BUCKETS)


def _table(con) -> list[tuple]:
    return sorted(con.execute("SELECT * FROM incidents").fetchall(), key=repr)


def _expected(con) -> list[tuple[str, datetime, datetime, int]]:
    """The rule computed in Python from every stored anomaly: (group, start, end, points)."""
    groups: dict[str, list[tuple]] = {}
    for ts, pid, caller, score in con.execute("SELECT bucket_ts, pattern_id, caller, score FROM anomalies").fetchall():
        groups.setdefault(str(pid) if pid is not None else f"novel:{caller}", []).append((ts, score))
    out = []
    for grp, points in groups.items():
        points.sort()
        run = [points[0]]
        for p in points[1:] + [None]:
            if p is not None and p[0] - run[-1][0] <= timedelta(seconds=GAP * SECONDS):
                run.append(p)
                continue
            if len({ts for ts, _ in run}) >= MIN_BUCKETS or max(s for _, s in run) >= 3:
                out.append((grp, run[0][0], run[-1][0] + timedelta(seconds=SECONDS), len(run)))
            run = [p]
    return sorted(out)


def _found(con) -> list[tuple[str, datetime, datetime, int]]:
    rows = con.execute("""SELECT coalesce(CAST(patterns[1] AS VARCHAR), 'novel:' || split_part(nodes[1], '|', 1)),
                                 start_ts, end_ts, points FROM incidents""").fetchall()
    return sorted(rows)


# pattern 4 flagged from 08:51 to 10:09 (and its latency every 5 min: several rows per bucket); a
# calling service with a short run across 09:00 (3 buckets: an incident) and one across 10:00
# (2 buckets, low score: none)
FLOOD = (
    _minutes(datetime(2026, 1, 1, 8, 51), datetime(2026, 1, 1, 10, 9), 4)
    + _minutes(datetime(2026, 1, 1, 8, 55), datetime(2026, 1, 1, 10, 5), 4, step=5, feature="rt_mean")
    + _minutes(datetime(2026, 1, 1, 8, 59), datetime(2026, 1, 1, 9, 3), "svc-y", step=2)
    + [_point(datetime(2026, 1, 1, 9, 58), "svc-x"), _point(datetime(2026, 1, 1, 10, 1), "svc-x")]
)
HOURS = [H - timedelta(hours=2), H - timedelta(hours=1), H]


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 1, 0], [1, 2, 0, 1], [0, 2, 1, 2, 0]])
def test_an_incident_spanning_hours_is_one_row_whatever_the_scoring_order(settings, order):
    with opened(settings.warehouse) as con:
        for i in order:
            _score(con, HOURS[i], FLOOD)
        found = _found(con)
        assert [f for f in found if f[0] == "4"] == [
            ("4", datetime(2026, 1, 1, 8, 51), datetime(2026, 1, 1, 10, 10), 79 + 15)
        ], "one incident with all its points"
        assert [f[:3] for f in found if f[0] != "4"] == [
            ("novel:svc-y", datetime(2026, 1, 1, 8, 59), datetime(2026, 1, 1, 9, 4))
        ]
        assert found == _expected(con)


def test_the_incidents_table_is_identical_across_scoring_orders(tmp_path, settings):
    tables = []
    for n, order in enumerate([[0, 1, 2], [2, 1, 0], [1, 0, 2, 1]]):
        with opened(tmp_path / f"w{n}.duckdb") as con:
            for i in order:
                _score(con, HOURS[i], FLOOD)
            tables.append(_table(con))
    assert tables[0] == tables[1] == tables[2] and len(tables[0]) == 2


def test_rescoring_an_hour_that_splits_a_run_leaves_two_incidents_and_no_stale_one(settings):
    hole = [p for p in FLOOD if not (datetime(2026, 1, 1, 9, 20) <= p[0] < datetime(2026, 1, 1, 9, 40))]
    with opened(settings.warehouse) as con:
        for hour in HOURS:
            _score(con, hour, FLOOD)
        _score(con, HOURS[1], hole)  # the rescored hour no longer flags 09:20-09:40
        runs = [f for f in _found(con) if f[0] == "4"]
        assert [(a, b) for _, a, b, _ in runs] == [
            (datetime(2026, 1, 1, 8, 51), datetime(2026, 1, 1, 9, 20)),
            (datetime(2026, 1, 1, 9, 40), datetime(2026, 1, 1, 10, 10)),
        ]
        assert _found(con) == _expected(con)


def test_random_points_scored_in_random_orders_give_the_rule_over_all_points(tmp_path):
    rng = random.Random(5)
    start = datetime(2026, 1, 1, 6)
    hours = [start + timedelta(hours=i) for i in range(4)]
    for trial in range(8):
        with opened(tmp_path / f"r{trial}.duckdb") as con:
            for _ in range(8):  # score (or rescore with other points) a random hour
                hour, points = rng.choice(hours), []
                for group in (1, 2, "svc-q"):
                    for _ in range(rng.randint(0, 4)):  # a few bursts, often at one of the hour's edges
                        edge = rng.choice([hour, hour + timedelta(hours=1)])
                        first = edge + timedelta(minutes=rng.choice([-20, -6, -3, -1, 0, 1, 2, 30]))
                        points += [
                            _point(first + timedelta(minutes=m), group, score=rng.choice([1.0, 1.0, 4.0]))
                            for m in range(0, rng.randint(1, 40), rng.randint(1, 4))
                        ]
                _score(con, hour, points)
            assert _found(con) == _expected(con), f"trial {trial}"
            ids = [r[0] for r in con.execute("SELECT incident_id FROM incidents").fetchall()]
            assert len(ids) == len(set(ids))
