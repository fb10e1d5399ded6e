"""Span ids that occur more than once in a trace: what parent and caller each row gets, from the
ingest stage to the trace rebuild of the patterns stage (issue 22; the scaling check is
tests/benchmarks/bench_duplicate_spans.py).

The rules: every raw row stays one call (or one quarantined row), never silently dropped. At
ingest, an id that occurs several times stands, as a parent, for its first row (by file, then row):
its service is its children's caller, and only that row pairs as the server side of a client span
(the other rows of that server id stay calls of their own). In the trace rebuild a child attaches to
the instance of its parent id whose callee is the child's caller, else to the earliest stored one.
"""

from __future__ import annotations

import csv
from pathlib import Path

import duckdb

from helpers import START, V2022_HEADER
from tasks.ingest.stage import ingest_hour
from tasks.patterns.traces import load_scope, rebuild
from tasks.warehouse import opened

NEZHA = ["TraceID", "SpanID", "ParentID", "PodName", "OperationName", "StartTimeUnixNano", "Duration"]
NS = int(START.timestamp()) * 10**9


def _write(path: Path, header: list[str], rows: list[list[object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])


def _span(sid: str, parent: str, pod: str, op: str, at_us: int, dur_us: int) -> list[object]:
    return ["t", sid, parent, pod, op, NS + at_us * 1000, dur_us]


def _rebuilt_parents(settings) -> dict[tuple, tuple | None]:
    """Per call (call_id, callee): the (call_id, callee) of the call the trace rebuild attaches it to."""
    with opened(settings.warehouse) as con:
        forest = load_scope(con, START)
        parent_idx = rebuild(con, forest).parent_idx
        rows = con.execute("SELECT rowid, call_id, callee FROM calls").fetchall()
    names = {rowid: (call, callee) for rowid, call, callee in rows}
    who = [names[int(r)] for r in forest.rowid]
    return {who[i]: (who[p] if p >= 0 else None) for i, p in enumerate(parent_idx)}


def test_duplicate_span_ids_keep_every_row_and_take_the_first_row_as_parent(settings, tmp_path):
    source = tmp_path / "incoming" / "dt=2026-01-01" / "hour=00"
    rows = [
        _span("r", "root", "gw-1-2", "/", 0, 900),
        _span("c", "r", "gw-1-2", "GET /o", 10, 500),  # a client span (inferred: no kind column) ...
        _span("s", "c", "order-1-2", "/o", 20, 400),  # ... and its server child: one call with c
        _span("s", "c", "order-1-2", "/o", 30, 300),  # the server id again (a retry): a call of its own
        _span("x", "s", "db-1-2", "q1", 40, 100),  # x twice, in two services
        _span("x", "s", "cache-1-2", "get", 50, 90),
        _span("y", "x", "disk-1-2", "read", 60, 10),  # child of x: its caller is x's first row (db)
        _span("y", "x", "disk-1-2", "read", 60, 10),  # an exact repeat: quarantined
    ]
    _write(source / "spans.csv", NEZHA, rows)
    spans = settings.with_(format="spans", span_mapping="nezha-trainticket")
    report = ingest_hour(spans, START, [tmp_path / "incoming"])
    assert (report.rows_read, report.rows_kept, report.rows_quarantined) == (7, 6, 1), "8 spans, 1 pair merged"
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        calls = con.execute("""SELECT call_id, parent_call_id, caller, callee, interface, round(rt_ms, 3),
                                      round(server_rt_ms, 3) FROM calls ORDER BY call_id, callee""").fetchall()
        [reason] = con.execute("SELECT reason FROM quarantine").fetchone() or [None]
    assert calls == [
        ("c", "r", "gw", "order", "/o", 0.5, 0.4),
        ("r", None, "USER", "gw", "/", 0.9, None),
        ("s", "c", "gw", "order", "/o", 0.3, None),
        ("x", "c", "order", "cache", "get", 0.09, None),
        ("x", "c", "order", "db", "q1", 0.1, None),
        ("y", "x", "db", "disk", "read", 0.01, None),
    ]
    assert reason.startswith("duplicate of row 7 in"), reason
    parents = _rebuilt_parents(spans)
    assert parents[("y", "disk")] == ("x", "db"), "the instance whose callee is y's caller"
    assert parents[("x", "db")] == parents[("x", "cache")] == parents[("s", "order")] == ("c", "order")


def test_rebuild_attaches_a_child_to_the_duplicate_whose_callee_is_its_caller(settings, tmp_path):
    """Alibaba rpc ids repeat for async calls: 0.1.1 is A -> B and A -> C."""
    base = int(START.timestamp() * 1000)
    source = tmp_path / "incoming" / "dt=2026-01-01" / "hour=00"

    def call(rpc_id: str, um: str, dm: str, ms: int) -> list[object]:
        return [base + ms, "T", "S", rpc_id, "rpc", um, "U", "op", dm, "D", 1.0]

    rows = [
        call("0.1", "USER", "A", 1),
        call("0.1.1", "A", "B", 2),
        call("0.1.1", "A", "C", 3),
        call("0.1.1.1", "C", "D", 4),  # under the A -> C instance
        call("0.1.1.2", "B", "E", 5),  # under the A -> B instance
        call("0.1.1.3", "Z", "F", 6),  # no instance calls Z: the earliest stored
    ]
    _write(source / "calls.csv", V2022_HEADER.split(","), rows)
    ingest_hour(settings, START, [tmp_path / "incoming"])
    parents = _rebuilt_parents(settings)
    assert parents[("0.1.1.1", "D")] == ("0.1.1", "C")
    assert parents[("0.1.1.2", "E")] == ("0.1.1", "B")
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        [(earliest,)] = con.execute("SELECT arg_min(callee, rowid) FROM calls WHERE call_id = '0.1.1'").fetchall()
    assert parents[("0.1.1.3", "F")] == ("0.1.1", earliest)
    assert parents[("0.1.1", "B")] == parents[("0.1.1", "C")] == ("0.1", "A")
