"""Format adapters on tiny hand-built rows: the normalised call each raw row becomes."""

from __future__ import annotations

import json
from typing import cast

import duckdb
import pyarrow as pa
import pytest

from tasks.ingest.formats import (
    AlibabaV2021,
    AlibabaV2022,
    SpanMapping,
    Spans,
    make_format,
    quote_identifier,
    set_format_variables,
)


def _normalise(fmt, rows: list[dict]) -> list[dict]:
    """Rows (as text, like a CSV) through the format's SQL; names and values are bound, never SQL text."""
    con = duckdb.connect()
    columns = list(rows[0])
    table = pa.table({c: pa.array([None if r[c] is None else str(r[c]) for r in rows], pa.string()) for c in columns})
    con.register("given", table)
    names = ", ".join(quote_identifier(c) for c in columns)
    con.execute(f"""CREATE TEMP VIEW raw AS SELECT *, 'f.csv' AS source_file, row_number() OVER () AS file_row,
                    hash({names}) AS raw_hash FROM given""")
    set_format_variables(con, fmt)
    result = con.execute(fmt.normalise_sql(set(columns)) + " ORDER BY call_id, caller")
    keys = [d[0] for d in result.description]
    return [dict(zip(keys, r)) for r in result.fetchall()]


def test_v2022_missing_markers_roots_and_parents():
    rows = [
        {
            "timestamp": 1000,
            "traceid": "T",
            "rpc_id": "0.1",
            "rpctype": "http",
            "um": "UNKNOWN",
            "interface": "UNAVAILABLE",
            "dm": "A",
            "rt": 5,
        },
        {
            "timestamp": 1001,
            "traceid": "T",
            "rpc_id": "0.1.2",
            "rpctype": "UNKNOWN",
            "um": "A",
            "interface": "get",
            "dm": "USER",
            "rt": 1,
        },
    ]
    root, child = _normalise(AlibabaV2022(epoch_ms=0), rows)
    assert (root["caller"], root["callee"], root["interface"], root["parent_call_id"]) == ("UNKNOWN", "A", None, "0")
    assert (child["parent_call_id"], child["rpc_type"], child["callee"]) == ("0.1", "UNKNOWN", "USER")
    assert str(root["ts"]) == "1970-01-01 00:00:01" and root["rt_ms"] == 5.0
    assert root["server_rt_ms"] is None and child["server_rt_ms"] is None, "only span pairs have a server side"


def test_v2021_caller_and_callee_rows_merge_into_one_call():
    rows = [
        {
            "traceid": "T",
            "timestamp": 10,
            "rpcid": "0.1.1",
            "um": "A",
            "rpctype": "rpc",
            "dm": "B",
            "interface": "i",
            "rt": 7,
        },
        {
            "traceid": "T",
            "timestamp": 11,
            "rpcid": "0.1.1",
            "um": "A",
            "rpctype": "rpc",
            "dm": "B",
            "interface": "i",
            "rt": -6,
        },
        {
            "traceid": "T",
            "timestamp": 12,
            "rpcid": "0.1.2",
            "um": "A",
            "rpctype": "rpc",
            "dm": "C",
            "interface": "i",
            "rt": -4,
        },
    ]
    merged = _normalise(AlibabaV2021(epoch_ms=60_000), rows)
    assert [(c["call_id"], c["rt_ms"]) for c in merged] == [("0.1.1", 7.0), ("0.1.2", 4.0)]
    assert str(merged[0]["ts"]) == "1970-01-01 00:01:00.010000", "epoch + the earlier of the two timestamps"


def test_spans_take_caller_from_parent_span_and_strip_pod_suffix():
    mapping = SpanMapping.load("nezha-trainticket")
    rows = [
        {
            "TraceID": "t",
            "SpanID": "a",
            "ParentID": "root",
            "PodName": "ts-gateway-service-6f6cfc45b-h5m2n",
            "OperationName": "/*",
            "StartTimeUnixNano": 1_000_000_000,
            "Duration": 2000,
        },
        {
            "TraceID": "t",
            "SpanID": "b",
            "ParentID": "a",
            "PodName": "ts-order-service-7d9c8b-x2x2x",
            "OperationName": "GET /orders",
            "StartTimeUnixNano": 1_001_000_000,
            "Duration": 500,
        },
        {
            "TraceID": "t",
            "SpanID": "c",
            "ParentID": "zz",
            "PodName": "ts-order-service-7d9c8b-x2x2x",
            "OperationName": "lost",
            "StartTimeUnixNano": 1_002_000_000,
            "Duration": 100,
        },
    ]
    a, b, c = _normalise(Spans(mapping), rows)
    assert (a["caller"], a["callee"], a["parent_call_id"], a["rt_ms"]) == ("USER", "ts-gateway-service", None, 2.0)
    assert (b["caller"], b["callee"], b["interface"], b["rt_ms"]) == (
        "ts-gateway-service",
        "ts-order-service",
        "GET /orders",
        0.5,
    )
    assert c["caller"] == "UNKNOWN", "a parent outside the batch is unknown, not invented"
    assert str(b["ts"]) == "1970-01-01 00:00:01.001000"


def test_span_mapping_from_file_with_end_time_and_status(tmp_path):
    path = tmp_path / "jaeger.json"
    path.write_text(
        json.dumps(
            {
                "trace_id": "tid",
                "span_id": "sid",
                "parent_id": "pid",
                "service": "svc",
                "operation": "op",
                "start": "start_us",
                "start_unit": "us",
                "end": "end_us",
                "end_unit": "us",
                "status": "code",
                "error_values": ["ERR"],
            }
        )
    )
    fmt = make_format("spans", span_mapping=str(path))
    rows = [
        {
            "tid": "t",
            "sid": "a",
            "pid": "",
            "svc": "s",
            "op": "o",
            "start_us": 1_000_000,
            "end_us": 1_003_000,
            "code": "ERR",
        }
    ]
    [call] = _normalise(fmt, rows)
    assert call["rt_ms"] == 3.0 and call["is_error"] is True and call["caller"] == "USER"


def test_bad_mappings_are_named():
    with pytest.raises(ValueError, match="neither a JSON file nor a bundled mapping"):
        SpanMapping.load("no-such-mapping")


def test_hostile_mapping_names_and_values_stay_data():
    """Column names and values of a span mapping are outside text: quoted or bound, never run."""
    mapping = SpanMapping(
        trace_id='t"id',
        span_id="s'id",
        parent_id="p); DROP TABLE raw; --",
        service="svc",
        operation="op",
        start="st",
        start_unit="ms",
        duration="d",
        duration_unit="ms",
        status="code",
        error_values=("it's bad", '"x"'),
        root_parent_values=("r'oot",),
        service_regex="^([^']+)'-[0-9]+$",
        rpc_type="sp'an",
    )
    rows = [
        {
            't"id': "t",
            "s'id": "a",
            "p); DROP TABLE raw; --": "r'oot",
            "svc": "api'-7",
            "op": "/",
            "st": 1000,
            "d": 2,
            "code": "it's bad",
        },
        {
            't"id': "t",
            "s'id": "b",
            "p); DROP TABLE raw; --": "a",
            "svc": "db'-1",
            "op": "q",
            "st": 1001,
            "d": 1,
            "code": "ok",
        },
    ]
    a, b = _normalise(Spans(mapping), rows)
    assert (a["caller"], a["callee"], a["parent_call_id"], a["is_error"], a["rpc_type"]) == (
        "USER",
        "api",
        None,
        True,
        "sp'an",
    )
    assert (b["caller"], b["callee"], b["parent_call_id"], b["is_error"]) == ("api", "db", "a", False)


@pytest.mark.parametrize("ms", ["99999999999999999999", "9999999999999999", "-9999999999999999", "x"])
def test_timestamps_that_overflow_are_null_not_an_error(ms):
    row = {
        "timestamp": ms,
        "traceid": "T",
        "rpc_id": "0.1",
        "rpctype": "http",
        "um": "A",
        "interface": "i",
        "dm": "B",
        "rt": 1,
    }
    [call] = _normalise(AlibabaV2022(epoch_ms=1_000), [row])
    assert call["ts"] is None


def test_epoch_must_be_an_integer():
    with pytest.raises(ValueError, match="epoch_ms"):
        AlibabaV2022(epoch_ms=cast(int, "0) OR (1")).normalise_sql(set())  # text where an int belongs
