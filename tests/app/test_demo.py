"""The demo's closing output: incidents strongest first, a real node for the plot example, the verdict."""

from __future__ import annotations

from datetime import datetime

from tasks.app.demo import example_node, incidents_text, verdict
from tasks.publish import publish
from tasks.warehouse import opened

T = datetime(2026, 1, 1, 8, 0)

INCIDENTS = [  # incident_id, start, end, patterns, nodes, peak_score, kinds, points
    (
        "a",
        T.replace(minute=12),
        T.replace(minute=17),
        None,
        ["svc-user|mysql-users|dumpTable|db"],
        24.0,
        ["novel_rpc"],
        5,
    ),
    (
        "b",
        T.replace(minute=33),
        T.replace(minute=39),
        [9],
        ["svc-review|es-search|update_review|db"],
        6.7,
        ["latency"],
        15,
    ),
    (
        "c",
        T.replace(minute=51),
        T.replace(hour=9, minute=9),
        [4],
        ["svc-promo|svc-auth|countAuth|rpc"],
        6.5,
        ["traffic_spike", "errors"],
        358,
    ),
    (
        "d",
        T.replace(hour=4, minute=37),
        T.replace(hour=4, minute=42),
        [6],
        ["svc-risk|redis-1|get_risk|mc"],
        2.5,
        ["traffic_spike"],
        6,
    ),
]

ANOMALIES = [  # bucket_ts, pattern_id, caller, callee, interface, feature, score
    (T.replace(minute=35), 9, "svc-review", "es-search", "update_review", "rt_p95", 6.7),
    (T.replace(minute=55), 4, "svc-promo", "svc-auth", "countAuth", "calls", 6.5),
    (T.replace(minute=56), 4, "svc-auth", "redis-2", "mget_auth", "calls", 3.0),
    (T.replace(hour=4, minute=38), 6, "svc-risk", "redis-1", "get_risk", "calls", 2.5),
]


def _snapshot(settings, incidents=INCIDENTS, anomalies=ANOMALIES):
    """A warehouse with the given incidents and anomalies, published as the analysts' snapshot."""
    with opened(settings.warehouse) as con:
        if incidents:
            con.executemany(
                "INSERT INTO incidents (incident_id, start_ts, end_ts, patterns, nodes, peak_score, kinds, points) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                incidents,
            )
        if anomalies:
            con.executemany(
                """INSERT INTO anomalies (bucket_ts, pattern_id, caller, callee, interface, feature, score)
                               VALUES (?, ?, ?, ?, ?, ?, ?)""",
                anomalies,
            )
        con.execute(
            """INSERT INTO rpc_series (bucket_ts, caller, callee, rpc_type, calls, errors, bucket_seconds)
                       VALUES (?, 'a', 'b', 'rpc', 1, 0, 60)""",
            [T.replace(hour=9, minute=59)],
        )
    return publish(settings)


def test_incidents_are_listed_strongest_first_with_the_rest_counted(settings):
    text = incidents_text(_snapshot(settings), limit=3)
    lines = text.splitlines()
    header = ["start", "end", "minutes", "where", "kinds", "peak_score", "points", "nodes", "suspects"]
    assert lines[0].split() == header
    assert "new RPC svc-user:mysql-users:dumpTable" in lines[2] and "24.0" in lines[2]
    assert "pattern 9" in lines[3] and "pattern 4" in lines[4] and "errors,traffic_spike" in lines[4]
    assert " 18 " in lines[4] and "358" in lines[4]  # 08:51 .. 09:09
    assert lines[-1] == "... and 1 weaker one (query them below)"


def test_no_incident_says_so(settings):
    snapshot = _snapshot(settings, [], [])
    assert incidents_text(snapshot).startswith("no incident")
    assert example_node(snapshot, 9) is None


def test_the_plot_example_is_the_strongest_calls_point_of_a_pattern_incident(settings):
    example = example_node(_snapshot(settings), max_hours=9)
    assert (example.pattern_id, example.node) == (4, "svc-promo:svc-auth:countAuth")
    assert example.hours == 3  # 08:51 .. 09:59 is 1.1 h: 2 whole hours plus one before
    assert example_node(_snapshot(settings), max_hours=2).hours == 2


def test_the_verdict_is_ok_only_when_every_run_succeeded_and_every_row_landed():
    assert verdict([], True, 0.912) == "OK, event F1 0.91"
    assert verdict(["2026-01-01T03:00"], True, 0.5).startswith("PROBLEMS: failed runs")
    assert verdict([], False, None) == "PROBLEMS: rows missing; event F1 n/a"
