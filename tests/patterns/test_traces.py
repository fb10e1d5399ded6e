"""Trace reconstruction on tiny hand-built call trees in a real DuckDB warehouse."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import duckdb

from tasks.patterns.stage import patterns_hour
from tasks.patterns.temp_tables import SCOPE_REBUILT
from tasks.patterns.traces import rebuild_hour
from tasks.warehouse import connect

H = datetime(2026, 1, 1, tzinfo=UTC)


def _calls(settings, rows: list[tuple]) -> duckdb.DuckDBPyConnection:
    """rows: (trace, call_id, parent_call_id, caller, callee, seconds after H)."""
    con = connect(settings.warehouse)
    for trace, call, parent, caller, callee, at in rows:
        ts = (H + timedelta(seconds=at)).replace(tzinfo=None)
        con.execute(
            "INSERT INTO calls (ts, trace_id, call_id, parent_call_id, caller, callee, interface, rpc_type, rt_ms, "
            "is_error, source_file, batch_id) VALUES (?, ?, ?, ?, ?, ?, 'op', 'rpc', 1.0, false, 'f', 'b')",
            [ts, trace, call, parent, caller, callee],
        )
    return con


def _rebuilt(con) -> dict[str, tuple]:
    return {
        t: (shape, status, n)
        for t, shape, status, n in con.execute(
            f"SELECT trace_id, shape_id, status, n_calls FROM {SCOPE_REBUILT}"
        ).fetchall()
    }


def test_shape_ignores_sibling_order_and_timing_but_not_structure(settings):
    tree = [
        ("0.1", None, "USER", "A"),
        ("0.1.1", "0.1", "A", "B"),
        ("0.1.2", "0.1", "A", "C"),
        ("0.1.2.1", "0.1.2", "C", "D"),
    ]
    rows = [("t1", c, p, u, d, i) for i, (c, p, u, d) in enumerate(tree)]
    swapped = {"0.1.1": "0.1.2", "0.1.2": "0.1.1", "0.1.2.1": "0.1.1.1"}
    rows += [("t2", swapped.get(c, c), swapped.get(p, p), u, d, 10 - i / 2) for i, (c, p, u, d) in enumerate(tree)]
    rows += [("t3", c, p, u, d, 20 + i) for i, (c, p, u, d) in enumerate(tree)] + [("t3", "0.1.3", "0.1", "A", "E", 25)]
    con = _calls(settings, rows)
    rebuild_hour(con, H)
    got = _rebuilt(con)
    assert got["t1"][0] == got["t2"][0] != got["t3"][0]
    assert {s for _, s, _ in got.values()} == {"full"}
    rpcs, edges = con.execute("SELECT rpcs, edges FROM shapes WHERE shape_id = ?", [got["t1"][0]]).fetchone()
    assert len(rpcs) == 4 and "A|C|op|rpc > C|D|op|rpc" in edges


def test_missing_parent_attaches_to_nearest_ancestor_and_missing_root_fails(settings):
    rows = [
        ("t1", "0.1", None, "USER", "A", 1),
        ("t1", "0.1.1.1", "0.1.1", "B", "C", 2),  # 0.1.1 lost
        ("t2", "0.1.1", "0.1", "A", "B", 3),
        ("t2", "0.1.2", "0.1", "A", "C", 4),
    ]  # root lost
    con = _calls(settings, rows)
    report = rebuild_hour(con, H)
    got = _rebuilt(con)
    assert got["t1"][1] == "partial" and got["t2"][1] == "failed"
    assert (report.full, report.partial, report.failed) == (0, 1, 1)
    [edges] = con.execute("SELECT edges FROM shapes WHERE shape_id = ?", [got["t1"][0]]).fetchone()
    assert edges == ["USER|A|op|rpc > B|C|op|rpc"]


def test_duplicate_call_ids_attach_children_to_the_matching_instance(settings):
    rows = [
        ("t", "0.1", None, "USER", "A", 1),
        ("t", "0.1.1", "0.1", "A", "B", 2),
        ("t", "0.1.1", "0.1", "A", "C", 3),
        ("t", "0.1.1.1", "0.1.1", "C", "D", 4),
    ]
    con = _calls(settings, rows)
    rebuild_hour(con, H)
    [edges] = con.execute("SELECT edges FROM shapes").fetchone()
    assert "A|C|op|rpc > C|D|op|rpc" in edges and "A|B|op|rpc > C|D|op|rpc" not in edges


def test_span_ids_without_dots_and_a_lost_parent(settings):
    rows = [("t", "a1", None, "USER", "gw", 1), ("t", "b2", "a1", "gw", "api", 2), ("t", "c3", "zz", "api", "db", 3)]
    con = _calls(settings, rows)
    rebuild_hour(con, H)
    shape, status, n = _rebuilt(con)["t"]
    assert (status, n) == ("partial", 3), "an orphan span without a dotted id becomes a second root"


def test_late_tail_is_merged_next_hour_without_double_counting(settings):
    rows = [
        ("t", "0.1", None, "USER", "A", 3599.9),
        ("t", "0.1.1", "0.1", "A", "B", 3600.2),
        ("u", "0.1", None, "USER", "A", 3700),
    ]
    con = _calls(settings, rows)
    con.close()
    settings = settings.with_(critical_min_calls_per_hour=1, pattern_min_traces=1)
    patterns_hour(settings, H)  # sees only the root: the tail arrives with the next hour
    patterns_hour(settings, H + timedelta(hours=1))
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        rows = con.execute("SELECT trace_id, hour, n_calls FROM trace_patterns ORDER BY 1").fetchall()
        tails = con.execute("SELECT hour, traces, late_tail_traces FROM reconstruction ORDER BY 1").fetchall()
    assert rows == [("t", H.replace(tzinfo=None), 2), ("u", (H + timedelta(hours=1)).replace(tzinfo=None), 1)]
    assert tails == [(H.replace(tzinfo=None), 1, 1), ((H + timedelta(hours=1)).replace(tzinfo=None), 1, 0)]


def test_parent_loops_are_failed_not_infinite(settings):
    rows = [("t", "x", "y", "A", "B", 1), ("t", "y", "x", "B", "A", 2)]
    con = _calls(settings, rows)
    report = rebuild_hour(con, H)
    assert report.failed == 1
