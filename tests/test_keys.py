"""Node keys are unambiguous: names holding the separator (`|`), the escape (`\\`) or the edge
marker (`>`) split back into exactly their fields, in Python and in SQL alike."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import START
from tasks.ingest.aggregate import aggregate_hour
from tasks.ingest.stage import ingest_hour
from tasks.keys import edge_key, node_key, node_key_sql, split_edge_key, split_node_key
from tasks.patterns.stage import patterns_hour

AWKWARD = [
    ("a", "b", "c", "rpc"),
    ("a|b", "c", None, "rpc"),  # was the same key as ("a", "b|c", ...)
    ("a", "b|c", None, "rpc"),
    ("x\\", "|y", "i|j", "http"),
    ("svc > other", ">", "List<T>", "mq"),
    ("", "", None, ""),
]


@pytest.mark.parametrize("fields", AWKWARD)
def test_a_key_splits_back_into_its_fields_and_sql_builds_the_same_key(fields):
    key = node_key(*fields)
    assert split_node_key(key) == fields
    with duckdb.connect() as con:
        sql_key = con.execute(
            f"SELECT {node_key_sql()} FROM (SELECT ? AS caller, ? AS callee, ? AS interface, ? AS rpc_type)",
            list(fields),
        ).fetchone()[0]
    assert sql_key == key


def test_different_rpcs_never_share_a_key_and_edges_split_at_their_marker():
    keys = [node_key(*f) for f in AWKWARD]
    assert len(set(keys)) == len(keys)
    for parent in keys:
        for child in keys:
            assert split_edge_key(edge_key(parent, child)) == (parent, child)
    assert node_key("a", "b", "c", "rpc") == "a|b|c|rpc", "plain names keep the plain key"


def test_a_plain_split_would_have_merged_two_rpcs():
    assert "|".join(["a|b", "c", "", "rpc"]) == "|".join(["a", "b|c", "", "rpc"])
    with pytest.raises(ValueError, match="not a node key"):
        split_node_key("a|b|c")


def _ambiguous_traces(folder: Path) -> Path:
    """Two request types whose RPC names collide under a plain `|` join."""
    rows = []
    for i in range(60):
        ts = 1_000 * (i + 1)
        caller, callee = ("a|b", "c") if i % 2 else ("a", "b|c")
        rows += [
            {
                "timestamp": ts,
                "traceid": f"t{i}",
                "rpc_id": "0",
                "rpctype": "http",
                "um": "USER",
                "dm": "front",
                "interface": "GET /x",
                "rt": 5.0,
            },
            {
                "timestamp": ts + 1,
                "traceid": f"t{i}",
                "rpc_id": "0.1",
                "rpctype": "rpc",
                "um": caller,
                "dm": callee,
                "interface": "op>1",
                "rt": 2.0,
            },
        ]
    table = pa.Table.from_pylist(rows)
    table = table.set_column(0, "timestamp", table["timestamp"].cast(pa.string()))
    table = table.set_column(7, "rt", table["rt"].cast(pa.string()))
    folder.mkdir(parents=True)
    pq.write_table(table, folder / "calls.parquet")
    return folder


def test_rpcs_with_separator_in_their_names_stay_apart_through_the_pipeline(settings, tmp_path):
    epoch = START.replace(tzinfo=None)
    settings = settings.with_(trace_epoch=START, pattern_min_traces=5, critical_min_calls_per_hour=1)
    source = _ambiguous_traces(tmp_path / "traces")
    ingest_hour(settings, START, [source])
    aggregate_hour(settings, START)
    patterns_hour(settings, START)
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        nodes = con.execute(
            "SELECT DISTINCT node, caller, callee, interface FROM pattern_nodes WHERE caller <> 'USER'"
        ).fetchall()
        calls = con.execute("SELECT min(ts) FROM calls").fetchone()[0]
    assert calls >= epoch and calls < epoch + timedelta(hours=1)
    assert {(c, d, i) for _, c, d, i in nodes} == {("a|b", "c", "op>1"), ("a", "b|c", "op>1")}
    assert all(split_node_key(n)[:3] == (c, d, i) for n, c, d, i in nodes)
