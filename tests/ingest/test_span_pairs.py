"""Client + server span pairs become one call; fan-out and self time per call; the calls migration."""

from __future__ import annotations

import duckdb
import pyarrow as pa

from helpers import START, shared_file
from tasks.ingest.formats import SpanMapping, Spans, quote_identifier, set_format_variables
from tasks.ingest.stage import hours_in_sources, ingest_hour
from tasks.warehouse import connect

NO_KIND = SpanMapping(
    trace_id="t", span_id="id", parent_id="p", service="svc", operation="op", start="st", start_unit="ms",
    duration="d", duration_unit="ms",
)  # fmt: skip
WITH_KIND = SpanMapping(**{**NO_KIND.__dict__, "kind": "kind"})
KEYS = ("call_id", "parent_call_id", "caller", "callee", "interface", "rt_ms", "server_rt_ms")


def _span(sid: str, parent: str, svc: str, op: str, d: float, kind: str | None = None) -> dict:
    return {"t": "T", "id": sid, "p": parent, "svc": svc, "op": op, "st": 1000, "d": d, "kind": kind}


def _calls(mapping: SpanMapping, spans: list[dict]) -> list[tuple]:
    """The spans (as text, like a CSV) through the span format's SQL: KEYS per call, by call id."""
    con = duckdb.connect()
    columns = list(spans[0]) if mapping.kind else [c for c in spans[0] if c != "kind"]
    table = pa.table({c: pa.array([None if s[c] is None else str(s[c]) for s in spans], pa.string()) for c in columns})
    con.register("given", table)
    names = ", ".join(quote_identifier(c) for c in columns)
    con.execute(f"""CREATE TEMP VIEW raw AS SELECT *, 'f.csv' AS source_file, row_number() OVER () AS file_row,
                    hash({names}) AS raw_hash FROM given""")
    fmt = Spans(mapping)
    set_format_variables(con, fmt)
    keys = ", ".join(KEYS)
    return con.execute(f"SELECT {keys} FROM ({fmt.normalise_sql(set(columns))}) ORDER BY call_id").fetchall()


def test_client_and_server_span_without_kind_are_one_call():
    spans = [
        _span("a", "root", "gw", "/", 10),
        _span("b", "a", "gw", "HTTP GET", 8),  # client: parent in gw, one child, in another service
        _span("c", "b", "order", "/orders", 5),  # its server
        _span("d", "c", "order", "SELECT", 1),  # the server's child hangs under the merged call
    ]
    assert _calls(NO_KIND, spans) == [
        ("a", None, "USER", "gw", "/", 10.0, None),
        ("b", "a", "gw", "order", "/orders", 8.0, 5.0),
        ("d", "b", "order", "order", "SELECT", 1.0, None),
    ]


def test_span_kind_decides_where_the_mapping_has_it():
    spans = [
        _span("a", "root", "gw", "/", 10, "SPAN_KIND_SERVER"),
        _span("b", "a", "gw", "HTTP GET", 8, "SPAN_KIND_CLIENT"),
        _span("c", "b", "gw", "/local", 5, "SERVER"),  # kind pairs even within one service
        _span("e", "a", "gw", "handler", 2, "INTERNAL"),  # looks like a client, but its kind says no
        _span("f", "e", "pay", "/pay", 1, "SERVER"),
    ]
    assert _calls(WITH_KIND, spans) == [
        ("a", None, "USER", "gw", "/", 10.0, None),
        ("b", "a", "gw", "gw", "/local", 8.0, 5.0),
        ("e", "a", "gw", "gw", "handler", 2.0, None),
        ("f", "e", "gw", "pay", "/pay", 1.0, None),
    ]


def test_lone_client_span_stays_a_plain_call():
    spans = [_span("a", "root", "gw", "/", 10, "SERVER"), _span("b", "a", "gw", "HTTP GET", 8, "CLIENT")]
    expected = [("a", None, "USER", "gw", "/", 10.0, None), ("b", "a", "gw", "gw", "HTTP GET", 8.0, None)]
    assert _calls(WITH_KIND, spans) == expected
    assert _calls(NO_KIND, spans) == expected


def test_nested_pairs_keep_the_tree_connected():
    spans = [
        _span("a", "root", "gw", "/", 20),
        _span("b", "a", "gw", "HTTP POST", 18),
        _span("c", "b", "order", "/orders", 15),
        _span("d", "c", "order", "HTTP GET", 9),
        _span("e", "d", "pay", "", 6),  # a server span without an operation: the client's names the call
        _span("f", "e", "pay", "SELECT", 2),
    ]
    assert _calls(NO_KIND, spans) == [
        ("a", None, "USER", "gw", "/", 20.0, None),
        ("b", "a", "gw", "order", "/orders", 18.0, 15.0),
        ("d", "b", "order", "pay", "HTTP GET", 9.0, 6.0),
        ("f", "d", "pay", "pay", "SELECT", 2.0, None),
    ]


def test_self_call_with_two_children_is_not_a_pair():
    spans = [
        _span("a", "root", "gw", "/", 20),
        _span("b", "a", "gw", "fan", 18),
        _span("c", "b", "order", "/orders", 5),
        _span("d", "b", "pay", "/pay", 6),
    ]
    assert _calls(NO_KIND, spans) == [
        ("a", None, "USER", "gw", "/", 20.0, None),
        ("b", "a", "gw", "gw", "fan", 18.0, None),
        ("c", "b", "gw", "order", "/orders", 5.0, None),
        ("d", "b", "gw", "pay", "/pay", 6.0, None),
    ]


def _self_calls_before(path: str) -> tuple[int, int]:
    """Self-calls of the file as one call per span (caller = parent span's service), and spans."""
    svc = "regexp_extract(PodName, '^(.+)-[^-]+-[^-]+$', 1)"
    return duckdb.execute(
        f"""WITH s AS (SELECT TraceID, SpanID, ParentID, {svc} AS svc FROM read_csv(?, all_varchar = true))
        SELECT count(*) FILTER (WHERE c.svc = p.svc), count(*)
        FROM s c LEFT JOIN s p ON p.TraceID = c.TraceID AND p.SpanID = c.ParentID""",
        [path],
    ).fetchone()  # type: ignore[return-value]


def test_real_trainticket_minute(settings):
    minute = shared_file("nezha-trainticket", "2023-01-29", "trace", "08_43_trace.csv.gz")
    before, spans = _self_calls_before(str(minute))
    settings = settings.with_(format="spans", span_mapping="nezha-trainticket")
    for hour in hours_in_sources(settings, [minute]):
        ingest_hour(settings, hour, [minute])
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        one = con.execute("""SELECT count(*), count(server_rt_ms), count(*) FILTER (WHERE caller = callee),
            count(*) FILTER (WHERE caller = callee AND interface LIKE 'HTTP %'),
            count(*) FILTER (WHERE server_rt_ms > rt_ms OR self_ms < 0 OR self_ms > rt_ms)
            FROM calls""").fetchone()
        orphans = con.execute("""SELECT count(*) FROM calls c WHERE parent_call_id IS NOT NULL AND NOT EXISTS
            (SELECT 1 FROM calls p WHERE p.trace_id = c.trace_id AND p.call_id = c.parent_call_id)""").fetchone()
        fan_out_wrong = con.execute("""SELECT count(*) FROM calls p WHERE fan_out <> (SELECT count(*) FROM calls c
            WHERE c.trace_id = p.trace_id AND c.parent_call_id = p.call_id)""").fetchone()
    assert one is not None and orphans is not None and fan_out_wrong is not None
    calls, paired, after, http_self, impossible = one
    assert (spans, before) == (4445, 3676), "the file as one call per span"
    assert (calls, paired) == (spans - 714, 714), "714 client spans merged with their server child"
    assert after == before - paired == 2962, "every pair was a self-call; the rest are in-process spans"
    assert http_self == 0, "no HTTP client span is left as a self-call"
    assert impossible == 0 and orphans[0] == 0 and fan_out_wrong[0] == 0


def test_alibaba_calls_get_fan_out_and_self_time_but_no_server_side(settings):
    sample = shared_file("alibaba", "v2022-callgraph-sample.csv.gz")
    for hour in hours_in_sources(settings, [sample]):
        ingest_hour(settings, hour, [sample])
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        row = con.execute("""SELECT count(*), count(server_rt_ms), count(fan_out), sum(fan_out),
            count(*) FILTER (WHERE parent_call_id IS NOT NULL), count(*) FILTER (WHERE self_ms BETWEEN 0 AND rt_ms)
            FROM calls""").fetchone()
    assert row is not None
    calls, server_side, with_fan_out, fan_out, children, self_ok = row
    assert calls > 0 and server_side == 0 and with_fan_out == calls == self_ok
    # rpc ids repeat in Alibaba traces (async calls): every row of a repeated id counts its children
    assert fan_out > 0 and children > 0


def test_calls_of_an_older_warehouse_gain_the_new_columns(tmp_path):
    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("""CREATE TABLE calls (ts TIMESTAMP NOT NULL, trace_id VARCHAR NOT NULL, call_id VARCHAR NOT NULL,
            parent_call_id VARCHAR, caller VARCHAR NOT NULL, callee VARCHAR NOT NULL, interface VARCHAR,
            rpc_type VARCHAR NOT NULL, rt_ms DOUBLE NOT NULL, is_error BOOLEAN NOT NULL,
            source_file VARCHAR NOT NULL, batch_id VARCHAR NOT NULL)""")
        con.execute(
            "INSERT INTO calls VALUES (?, 'T', '0', NULL, 'USER', 'a', 'i', 'http', 1, false, 'f', 'b')", [START]
        )
    for _ in range(2):  # and a second open changes nothing
        con = connect(path)
        rows = con.execute("SELECT server_rt_ms, fan_out, self_ms, rt_ms FROM calls").fetchall()
        columns = [r[0] for r in con.execute("DESCRIBE calls").fetchall()]
        con.close()
        assert rows == [(None, None, None, 1.0)]
        assert columns[-3:] == ["server_rt_ms", "fan_out", "self_ms"]
