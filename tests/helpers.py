"""Plain helpers the tests share (fixtures live in conftest.py): where things are, the first
synthetic hour, the shared real data, a private copy of a home, tiny traces for the trace model."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.keys import node_key
from tasks.models.features import FEATURES
from tasks.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
START = datetime(2026, 1, 1, tzinfo=UTC)
# the columns of a pattern's trace calls, as tasks.patterns.trace_calls returns them
TRACE_CALL_COLUMNS = [
    "trace_id",
    "call_id",
    "parent_call_id",
    "node",
    "parent_node",
    "callee",
    "rt_ms",
    "server_rt_ms",
    "self_ms",
    "shape_id",
    "root_ts",
]


def shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real trace samples not present at {path} (the ../shared checkout)")
    return path


def copy_home(settings: Settings, tmp_path: Path) -> Settings:
    """A private copy of a home (warehouse, MLflow db and artifacts; opening its registry re-addresses
    the artifacts to the copy, tasks.models.registry.relocate_artifacts)."""

    home = tmp_path / "home"
    shutil.copytree(settings.home, home)
    return settings.with_(home=home)


# the Alibaba cluster-trace v2022 CallGraph CSV header (tests writing v2022 files by hand)
V2022_HEADER = "timestamp,traceid,service,rpc_id,rpctype,um,uminstanceid,interface,dm,dminstanceid,rt"


def add_downstream_call(source: Path, request_type: str, hour: str = "01") -> int:
    """Every trace of `request_type` in that synthetic hour gains one call from its entry service to
    a new RPC (svc-newfeature, newCall); rewrites the hour's parquet files; returns the calls added."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    truth = pq.read_table(source / "truth" / "trace_templates.parquet")
    traces = pc.filter(truth, pc.equal(truth["request_type"], request_type))["traceid"]
    added = 0
    for part in (source / "dt=2026-01-01" / f"hour={hour}").glob("*.parquet"):
        table = pq.read_table(part)
        roots = table.filter(pc.and_(pc.is_in(table["traceid"], traces), pc.equal(table["rpc_id"], "0.1")))
        new_values = {
            "rpc_id": pa.array(["0.1.99"] * len(roots)),
            "um": roots["dm"],
            "dm": pa.array(["svc-newfeature"] * len(roots)),
            "interface": pa.array(["newCall"] * len(roots)),
            "rpctype": pa.array(["rpc"] * len(roots)),
        }
        extra = roots
        for name, values in new_values.items():
            extra = extra.set_column(extra.schema.get_field_index(name), name, values)
        pq.write_table(pa.concat_tables([table, extra]), part)
        added += len(roots)
    return added


def add_anomaly(settings: Settings, bucket_ts: datetime, caller: str = "svc-a") -> None:
    """One irregular point (calls of `caller` -> svc-b, a traffic spike in pattern 1) written straight
    into the warehouse's `anomalies` (naive UTC `bucket_ts`), for tests of what readers see."""
    from tasks.warehouse import opened

    with opened(settings.warehouse) as con:
        con.execute(
            "INSERT INTO anomalies (bucket_ts, pattern_id, node, caller, callee, interface, feature, observed, "
            "expected, threshold, score, direction, kind) VALUES (?, 1, 'n', ?, 'svc-b', 'get', 'calls', 9, 1, "
            "2, 5, 'up', 'traffic_spike')",
            [bucket_ts, caller],
        )


def flood_user_rpc(settings: Settings, pattern_id: int, start: datetime, minutes: int = 10, factor: int = 6) -> str:
    """Multiply the calls of one of the pattern's user-facing RPCs in `pattern_series` by `factor` for
    `minutes` from `start` (aware UTC): an hour with anomalies to find. Returns the flooded node."""
    from datetime import timedelta

    import duckdb

    end = start + timedelta(minutes=minutes)
    with duckdb.connect(str(settings.warehouse)) as con:
        sql = "SELECT node FROM pattern_nodes WHERE pattern_id = ? AND caller = 'USER' LIMIT 1"
        node = con.execute(sql, [pattern_id]).fetchall()[0][0]
        con.execute(
            "UPDATE pattern_series SET calls = calls * ? WHERE pattern_id = ? AND node = ? "
            "AND bucket_ts >= ? AND bucket_ts < ?",
            [factor, pattern_id, node, start.replace(tzinfo=None), end.replace(tzinfo=None)],
        )
    return node


AB, BC, BD = (node_key(*pair, "op", "http") for pair in (("A", "B"), ("B", "C"), ("B", "D")))
TRACES_START = pd.Timestamp("2026-01-01 00:00:00")


def tiny_traces(
    n: int,
    seed: int,
    start: pd.Timestamp = TRACES_START,
    slow_c: float = 1.0,
    drop_d: bool = False,
    fast_b: float = 1.0,
    c_sigma: float = 0.2,
    delay_b_ms: float = 0.0,
    delay_c_ms: float = 0.0,
    busy_b_ms: float = 0.0,
) -> pd.DataFrame:
    """n tiny traces for the trace model, one every 2 s: a root A->B that calls B->C and B->D, lognormal
    latencies (C around 5 ms, D around 2 ms) and links (0.5 ms into B, 0.3 ms below), one row per call
    as `tasks.patterns.trace_calls` reads. `delay_X_ms`: a network delay on X's pod, which holds every
    packet X sends (its replies and its requests); `busy_b_ms`: a busy B, slow to send its requests
    and read the replies (its calls' links), the link into it unchanged."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        t, root = f"{seed}-{i}", start + pd.Timedelta(seconds=2 * i)
        link_a, link_c, link_d = (rng.lognormal(np.log(x), 0.2) for x in (0.5, 0.3, 0.3))
        c = rng.lognormal(np.log(5), c_sigma) * slow_c
        d = rng.lognormal(np.log(2), 0.2)
        c_rt, d_rt = c + link_c + delay_b_ms + delay_c_ms + busy_b_ms, d + link_d + delay_b_ms + busy_b_ms
        b = (c_rt + (0 if drop_d else d_rt) + rng.lognormal(np.log(1), 0.2)) * fast_b
        rows += [(t, "1", None, AB, None, "B", b + link_a + delay_b_ms, b, b - c_rt - (0 if drop_d else d_rt), 7, root)]
        rows += [(t, "2", "1", BC, AB, "C", c_rt, c, c, 7, root)]
        if not drop_d:
            rows += [(t, "3", "1", BD, AB, "D", d_rt, d, d, 7, root)]
    return pd.DataFrame(rows, columns=TRACE_CALL_COLUMNS)


class Receiver(ThreadingHTTPServer):
    """A webhook: records every request; answers `status` (with `location` for a redirect)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        self.location: str | None = None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, path: str = "/services/T0001/B0002/s3cretT0ken") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def posted(self) -> list[dict[str, Any]]:
        return [r["json"] for r in self.requests if r["method"] == "POST"]


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def _record(self, method: str) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append(
            {
                "method": method,
                "path": self.path,
                "type": self.headers.get("Content-Type"),
                "json": json.loads(body) if body else None,
            }
        )
        self.send_response(self.server.status)
        if self.server.location:
            self.send_header("Location", self.server.location)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def do_POST(self) -> None:
        self._record("POST")

    def do_GET(self) -> None:
        self._record("GET")

    def log_message(self, *args: Any) -> None:  # quiet test output
        pass


def synthetic_pattern(pid: int, rng: np.random.Generator, steps: int = 360, nodes: int | None = None) -> Any:
    """A pattern's series for the forecaster (a `tasks.models.series.PatternData`): a random call tree
    of `nodes` (default 5-25) RPCs, `steps` 60 s buckets of Poisson traffic with a slow trend, lognormal
    latencies (none where a bucket had no calls), errors at 1 % of the calls."""
    from tasks.models.series import PatternData

    n = int(rng.integers(5, 26)) if nodes is None else nodes
    edges = [(int(rng.integers(0, i)), i) for i in range(1, n)]
    base = rng.lognormal(np.log(20), 1.0, size=n)
    trend = 1 + 0.3 * np.sin(np.linspace(0, np.pi, steps))[:, None]
    values = np.zeros((steps, n, 4))
    values[:, :, 0] = rng.poisson(base * trend)
    values[:, :, 3] = rng.poisson(base * trend * 0.01)
    rt = rng.lognormal(np.log(rng.uniform(2, 80, size=n)), 0.2, size=(steps, n))
    values[:, :, 1] = np.where(values[:, :, 0] > 0, rt, np.nan)
    values[:, :, 2] = np.where(values[:, :, 0] > 0, rt * 2.5, np.nan)
    buckets = np.arange(np.datetime64("2026-01-01T00:00"), steps, dtype="datetime64[m]").astype("datetime64[s]")
    return PatternData(pid, 1, f"g{pid}", [f"n{i}" for i in range(n)], edges, buckets, values, 60)


def export_pattern_data(data: Any, folder: Path, first: int = 0, steps: int | None = None) -> Path:
    """`steps` buckets (default: all) of a `PatternData` from `first`, written as
    `tasks.models.series.export_pattern` writes them (series Parquet + meta JSON); returns the meta."""
    folder.mkdir(parents=True, exist_ok=True)
    steps = len(data.buckets) - first if steps is None else steps
    buckets = data.buckets[first : first + steps]
    t, n = np.meshgrid(np.arange(len(buckets)), np.arange(len(data.nodes)), indexing="ij")
    values = data.values[first : first + steps]
    table = pd.DataFrame(
        {
            "bucket_ts": buckets[t.ravel()].astype("datetime64[us]"),
            "node": np.array(data.nodes)[n.ravel()],
            **{name: values[:, :, f].ravel() for f, name in enumerate(FEATURES)},
        }
    )
    parquet = folder / f"pattern-{data.pattern_id}.parquet"
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), parquet)
    start = pd.Timestamp(buckets[0]).to_pydatetime().replace(tzinfo=UTC)
    meta = {
        "pattern_id": data.pattern_id,
        "version": data.version,
        "graph_hash": data.graph_hash,
        "nodes": data.nodes,
        "edges": data.edges,
        "bucket_seconds": data.bucket_seconds,
        "start": start.isoformat(),
        "end": (start + timedelta(seconds=steps * data.bucket_seconds)).isoformat(),
    }
    path = folder / f"pattern-{data.pattern_id}.json"
    path.write_text(json.dumps(meta))
    return path
