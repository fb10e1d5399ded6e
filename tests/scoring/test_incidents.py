"""Incidents across hour boundaries: a run of flagged points that spans hours is one incident row,
whatever order the hours are scored or rescored in (`tasks.scoring.incidents`); and the same rule
over any points (`incidents_of`, what the evaluation runs) gives what the evaluation's former pandas
copy of the rule gave."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

import duckdb
import pandas as pd
import pytest

from tasks.scoring.incidents import incidents_of, rebuild_incidents
from tasks.scoring.score import ANOMALY_COLUMNS
from tasks.warehouse import opened

H = datetime(2026, 1, 1, 10)  # naive UTC, as stored
GAP, SECONDS, MIN_BUCKETS = 3, 60, 3  # the settings' defaults


def _point(ts: datetime, group: int | str, score: float = 1.0, feature: str = "calls", culprit: str = "svc-b") -> tuple:
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
        culprit,
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
    """The incidents table but for ids, which depend on the order hours are scored in: an incident
    keeps the id it was first stored with (`test_an_incident_keeps_its_first_id...`)."""
    rows = con.execute("SELECT * EXCLUDE (incident_id, aliases) FROM incidents").fetchall()
    return sorted(rows, key=repr)


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


def _flood_id(con) -> tuple[str, list[str]]:
    [(incident_id, aliases)] = con.execute("SELECT incident_id, aliases FROM incidents WHERE patterns = [4]").fetchall()
    return incident_id, aliases


def test_an_incident_keeps_its_first_id_when_it_grows_and_is_rescored(settings):
    """Links in alerts and operators' marks name an id: growing backwards (an earlier hour scored
    later), forwards and rescoring never change it; an incident it swallows becomes an alias."""
    with opened(settings.warehouse) as con:
        _score(con, HOURS[2], FLOOD)  # 10:00-10:09 first
        first, _ = _flood_id(con)
        _score(con, HOURS[1], FLOOD)  # grows back to 09:00
        _score(con, HOURS[0], FLOOD)  # and to 08:51
        _score(con, HOURS[2], FLOOD)  # rescored
        assert _flood_id(con) == (first, [])
        assert con.execute("SELECT min(start_ts) FROM incidents WHERE patterns = [4]").fetchone()[0] == FLOOD[0][0]

    split = [p for p in FLOOD if not (datetime(2026, 1, 1, 9, 20) <= p[0] < datetime(2026, 1, 1, 9, 30))]
    with opened(settings.home / "merge.duckdb") as con:
        for hour in HOURS:
            _score(con, hour, split)  # two incidents of pattern 4: 08:51-09:20 and 09:30-10:10
        ids = [
            r[0]
            for r in con.execute("SELECT incident_id FROM incidents WHERE patterns = [4] ORDER BY start_ts").fetchall()
        ]
        assert len(ids) == 2
        _score(con, HOURS[1], FLOOD)  # the gap filled: one incident, the earlier's id, the later's an alias
        assert _flood_id(con) == (ids[0], [ids[1]])


def test_incident_rpcs_has_a_row_per_incident_and_rpc(settings):
    with opened(settings.warehouse) as con:
        for hour in HOURS:
            _score(con, hour, FLOOD)
        rows = con.execute("""SELECT r.incident_id = i.incident_id, r.pattern_id, r.node, r.points, r.culprit,
                                     r.culprit_rank FROM incident_rpcs r JOIN incidents i USING (incident_id)
                              ORDER BY r.start_ts""").fetchall()
        assert rows == [
            (True, 4, "svc-a|svc-b|get|rpc", 79 + 15, "svc-b", 1),
            (True, None, "svc-y|svc-b|get|rpc", 3, "svc-b", 1),
        ]
        _score(con, HOURS[1], [])  # rescoring without the points: the rows go with their incidents
        assert (
            con.execute("SELECT count(*) FROM incident_rpcs").fetchone()[0]
            == con.execute("SELECT count(*) FROM incidents").fetchone()[0]
        )


def test_a_novel_rpc_joins_the_pattern_incident_of_the_service_that_makes_it(settings):
    """One event, one incident: a new RPC called by a service whose RPCs are flagged at that time."""
    flood = _minutes(datetime(2026, 1, 1, 10, 0), datetime(2026, 1, 1, 10, 9), 4)  # svc-a -> svc-b flagged
    novel = _minutes(datetime(2026, 1, 1, 10, 2), datetime(2026, 1, 1, 10, 6), "svc-a", step=2, score=5.0)
    elsewhere = _minutes(datetime(2026, 1, 1, 10, 2), datetime(2026, 1, 1, 10, 6), "svc-z", step=2, score=5.0)
    with opened(settings.warehouse) as con:
        _score(con, H, flood + novel + elsewhere)
        rows = con.execute("SELECT patterns, points, kinds, incident_group FROM incidents ORDER BY 4").fetchall()
    assert rows == [
        ([4], 10 + 3, ["novel_rpc", "traffic_spike"], "4"),
        ([], 3, ["novel_rpc"], "novel:svc-z"),
    ]


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


# --- the shared rule over any points (`incidents_of`) equals the evaluation's former pandas rule ---

MIN_PEAK = 3.0


def _old_pandas_incidents(points: pd.DataFrame, group: str, gap: timedelta, min_buckets: int) -> pd.DataFrame:
    """The evaluation's own copy of the rule before it ran the product's (tasks/evaluation/labels.py)."""
    points = points.sort_values([group, "bucket_ts"])
    new = points.groupby(group).bucket_ts.diff().fillna(gap * 10) > gap
    points = points.assign(run=new.groupby(points[group]).cumsum())
    runs = (
        points.groupby([group, "run"])
        .agg(
            start=("bucket_ts", "min"),
            end=("bucket_ts", "max"),
            keys=("key", set),
            patterns=("pattern_id", set),
            buckets=("bucket_ts", "nunique"),
            peak=("score", "max"),
        )
        .reset_index()
    )
    return runs[(runs.buckets >= min_buckets) | (runs.peak >= MIN_PEAK)]


def _frame(rows: list[tuple[datetime, str, int | None, str, float]]) -> pd.DataFrame:
    """Points (bucket_ts, grp, pattern_id, node, score) as both rules read them."""
    frame = pd.DataFrame(rows, columns=["bucket_ts", "grp", "pattern_id", "node", "score"])
    return frame.assign(
        bucket_ts=pd.to_datetime(frame.bucket_ts),
        pattern_id=frame.pattern_id.astype("Int32"),
        key=frame.node,
        kind="traffic_spike",
    )


def _shared(frame: pd.DataFrame, gap_buckets: int = GAP) -> list[tuple]:
    with duckdb.connect() as con:
        found = incidents_of(con, frame, gap_buckets, MIN_BUCKETS, SECONDS)
    return sorted(
        (i.start_ts, i.end_ts - timedelta(seconds=SECONDS), tuple(sorted(i.nodes)), round(i.peak_score, 6))
        for i in found
    )


def _reference(frame: pd.DataFrame, gap_buckets: int = GAP) -> list[tuple]:
    runs = _old_pandas_incidents(frame, "grp", timedelta(seconds=gap_buckets * SECONDS), MIN_BUCKETS)
    return sorted(
        (r.start.to_pydatetime(), r.end.to_pydatetime(), tuple(sorted(r.keys)), round(r.peak, 6))
        for r in runs.itertuples()
    )


T0 = datetime(2026, 1, 1, 10)


def _at(minute: float) -> datetime:
    return T0 + timedelta(minutes=minute)


HAND_MADE = {
    "a run of 3 buckets, a run of 2, a lone far-out point": [
        (_at(0), "1", 1, "a|b|get|rpc", 1.0),
        (_at(1), "1", 1, "a|b|get|rpc", 1.0),
        (_at(3), "1", 1, "a|c|put|rpc", 1.5),
        (_at(10), "1", 1, "a|b|get|rpc", 1.0),
        (_at(12), "1", 1, "a|b|get|rpc", 2.0),
        (_at(30), "novel:svc-x", None, "svc-x|b|get|rpc", 3.0),
    ],
    "rows sharing a bucket count once; exactly gap apart stays one run": [
        (_at(0), "2", 2, "a|b|get|rpc", 1.0),
        (_at(0), "2", 2, "a|c|get|rpc", 1.0),
        (_at(3), "2", 2, "a|b|get|rpc", 1.0),
        (_at(3), "2", 2, "a|c|get|rpc", 1.0),
        (_at(7), "2", 2, "a|b|get|rpc", 1.0),
        (_at(8), "2", 2, "a|b|get|rpc", 1.0),
        (_at(9), "2", 2, "a|b|get|rpc", 1.0),
    ],
    "groups interleaved in time stay apart": [
        (_at(m), g, None, f"{g}|b|get|rpc", 1.0)
        for m in range(0, 6)
        for g in ("x", "y")
        if (m + len(g)) % 2 or g == "x"
    ],
    "naive points: no score, persistence only": [
        (_at(m), "a|b|get|", None, "a|b|get|", 0.0) for m in (0, 1, 2, 6, 7, 20, 21, 22, 23)
    ],
}


@pytest.mark.parametrize("name", list(HAND_MADE))
def test_the_shared_rule_gives_the_former_evaluation_incidents(name):
    frame = _frame(HAND_MADE[name])
    assert _shared(frame) == _reference(frame), name
    assert _shared(frame), "every set yields at least one incident"


def test_the_shared_rule_equals_the_former_one_on_random_points_and_gaps():
    rng = random.Random(11)
    for _ in range(20):
        rows = [
            (_at(rng.randrange(0, 90)), g, None, f"{g}|n{rng.randrange(3)}||rpc", rng.choice([0.5, 1.0, 3.0]))
            for g in ("p1", "p2", "novel:z")
            for _ in range(rng.randrange(0, 25))
        ]
        frame = _frame(rows)
        for gap in (1, 3, 5):
            assert _shared(frame, gap) == _reference(frame, gap)


def test_the_gap_setting_changes_the_shared_rule():
    frame = _frame([(_at(m), "1", 1, "a|b|get|rpc", 1.0) for m in (0, 1, 5, 6)])
    assert _shared(frame, gap_buckets=3) == []  # two runs of 2 buckets, 4 min apart
    assert _shared(frame, gap_buckets=4) == [(_at(0), _at(6), ("a|b|get|rpc",), 1.0)]


def test_an_incident_ranks_its_suspects_by_summed_score_and_says_its_strongest_point(settings):
    points = [
        _point(H + timedelta(minutes=1), 4, score=2.0, culprit="svc-db"),
        _point(H + timedelta(minutes=2), 4, score=1.5, culprit="svc-b"),
        _point(H + timedelta(minutes=3), 4, score=1.5, culprit="svc-b"),
        _point(H + timedelta(minutes=3), 4, score=0.5, culprit="svc-a"),
    ]
    with opened(settings.warehouse) as con:
        _score(con, H, points)
        [(culprits, evidence)] = con.execute("SELECT culprits, evidence FROM incidents").fetchall()
    assert culprits == ["svc-b", "svc-db", "svc-a"]  # 3.0, 2.0, 0.5
    assert evidence == "traffic_spike calls: 10.0 (expected 1.0, threshold 2.0) on svc-a|svc-b|get|rpc"
