"""Benchmark: score an hour of traces (default 1,000,000) with the per-pattern trace models.

Builds synthetic trace calls in memory (vectorised numpy, not timed), the rows
`tasks.patterns.trace_calls` hands the trace model (trace_id, call_id, parent_call_id, node,
parent_node, callee, rt_ms, server_rt_ms, self_ms, shape_id, root_ts; ordered by root time, trace
and call as its SQL is). Each of --patterns patterns has its own call tree of 12 to 30 RPCs and
three shapes of it (subtrees cut off, one RPC fanned out two or three times), 5 to 30 calls a
trace; client, server, gap and self latencies are lognormal and add up bottom-up (a server's time
is its own work plus its children's client time; a few leaf calls to a store have no server span).
The scored hour holds a few incidents: 1 % of the traces with one callee 5x slower, 0.3 % missing
a child, 0.2 % with a never-seen child call.

One `TraceModel` per pattern is fitted and calibrated on a training slice (--train traces per
pattern, the hour before; timed apart), then every pattern's traces are scored one pattern after
the other, as `tasks.scoring.trace_scoring.trace_rows` does (one process: `score` is pandas/numpy,
one core). Prints the scoring figure against the target (1 M traces in <= 60 s on a 2-core
machine), the fit time and the peak RSS.

    .venv/bin/python tests/benchmarks/bench_trace_score.py [--traces 1000000] [--patterns 20] [--train 5000]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.keys import node_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers (a script, not a test)
from helpers import TRACE_CALL_COLUMNS  # noqa: E402
from tasks.models.trace_model import TraceModel

TARGET_SECONDS = 60.0
HOUR = np.datetime64("2026-01-02T10:00:00", "ms")
SHAPE_SHARES = np.array([0.6, 0.3, 0.1])
SLOW_SHARE, MISSING_SHARE, NOVEL_SHARE = 0.01, 0.003, 0.002


@dataclass
class Shape:
    """One shape of a pattern's call tree: per call its template node, parent call (-1 at the root)."""

    shape_id: int
    nodes: np.ndarray  # template node per call
    parent: np.ndarray  # parent call per call, -1 for the root; parents come before children
    call_ids: np.ndarray  # object: "0", "0.1", "0.1.2", ...


@dataclass
class Pattern:
    pid: int
    keys: np.ndarray  # object: node key per template node
    callees: np.ndarray  # object
    self_median: np.ndarray  # ms per template node
    no_server: np.ndarray  # bool per template node (a leaf call to a store: no server span)
    shapes: list[Shape]


def make_pattern(pid: int, rng: np.random.Generator) -> Pattern:
    """A random call tree of 12-30 RPCs and three shapes of it, each of 5-30 calls."""
    m = int(rng.integers(12, 31))
    parent = np.array([-1] + [int(rng.integers(max(0, i - 5), i)) for i in range(1, m)])
    callee = [f"p{pid}-svc{i}" if rng.random() > 0.2 or i == 0 else f"p{pid}-store{i % 3}" for i in range(m)]
    caller = ["USER" if i == 0 else callee[parent[i]] for i in range(m)]
    keys = np.array([node_key(caller[i], callee[i], f"op{i % 4}", "rpc") for i in range(m)], dtype=object)
    is_leaf = np.ones(m, dtype=bool)
    is_leaf[parent[1:]] = False
    no_server = is_leaf & np.array(["store" in c for c in callee])
    shapes = []
    for s in range(len(SHAPE_SHARES)):
        keep = np.ones(m, dtype=bool)
        for i in range(1, m):  # cut subtrees (parents come first), keeping at least 5 calls
            keep[i] = keep[parent[i]] and (s == 0 or rng.random() > 0.15)
        if keep.sum() < 5:
            keep[:5] = True
            for i in range(1, 5):
                keep[parent[i]] = True
        nodes = list(np.flatnonzero(keep))
        fan = [i for i in nodes if is_leaf[i] and i > 0]
        if fan and s > 0:  # one leaf RPC called 2-3 times in this shape
            nodes += [fan[int(rng.integers(len(fan)))]] * int(rng.integers(1, 3))
        nodes = np.array(sorted(nodes[:30], key=lambda n: n), dtype=int)  # parents (lower ids) first
        first = {int(n): c for c in range(len(nodes) - 1, -1, -1) for n in [nodes[c]]}
        call_parent = np.array([-1 if parent[n] < 0 else first[int(parent[n])] for n in nodes])
        call_ids: list[str] = []
        for c, p in enumerate(call_parent):
            call_ids.append("0" if p < 0 else f"{call_ids[p]}.{c}")
        shapes.append(Shape(1000 * pid + s, nodes, call_parent, np.array(call_ids, dtype=object)))
    return Pattern(pid, keys, np.array(callee, dtype=object), rng.lognormal(np.log(3), 0.8, size=m), no_server, shapes)


def trace_calls(pattern: Pattern, n: int, start: np.datetime64, rng: np.random.Generator, faults: bool) -> pd.DataFrame:
    """n traces of `pattern` rooted over one hour from `start`, one row per call, in SQL order."""
    root_ms = np.sort(rng.integers(0, 3_600_000, size=n))
    trace_shape = rng.choice(len(SHAPE_SHARES), size=n, p=SHAPE_SHARES)
    prefix = f"{pattern.pid}-{start.astype('int64')}-"
    tid_all = np.array([f"{prefix}{i}" for i in range(n)], dtype=object)
    parts = []
    for shape in pattern.shapes:
        traces = np.flatnonzero(trace_shape == shape.shape_id % 1000)
        k, c = len(traces), len(shape.nodes)
        if not k:
            continue
        own = rng.lognormal(np.log(pattern.self_median[shape.nodes]), 0.3, size=(k, c))
        if faults:  # one callee 5x slower in SLOW_SHARE of the traces
            slow = rng.random(k) < SLOW_SHARE
            own[slow, rng.integers(0, c, size=int(slow.sum()))] *= 5.0
        gap = rng.lognormal(np.log(0.4), 0.3, size=(k, c))
        server = own.copy()
        rt = np.zeros((k, c))
        for call in range(c - 1, -1, -1):  # children come after parents: bottom-up
            rt[:, call] = server[:, call] + gap[:, call]
            if shape.parent[call] >= 0:
                server[:, shape.parent[call]] += rt[:, call]
        no_server = pattern.no_server[shape.nodes]
        server[:, no_server] = np.nan
        own[:, no_server] = np.nan
        node = pattern.keys[shape.nodes]
        parent_node = np.where(shape.parent >= 0, pattern.keys[shape.nodes[np.maximum(shape.parent, 0)]], None)
        parent_call = np.where(shape.parent >= 0, shape.call_ids[np.maximum(shape.parent, 0)], None)
        leaf = ~np.isin(np.arange(c), shape.parent)
        parts.append(
            pd.DataFrame(
                {
                    "t": np.repeat(traces, c),
                    "call_id": np.tile(shape.call_ids, k),
                    "parent_call_id": np.tile(parent_call, k),
                    "node": np.tile(node, k),
                    "parent_node": np.tile(parent_node, k),
                    "callee": np.tile(pattern.callees[shape.nodes], k),
                    "rt_ms": rt.ravel(),
                    "server_rt_ms": server.ravel(),
                    "self_ms": own.ravel(),
                    "shape_id": shape.shape_id,
                    "leaf": np.tile(leaf, k),
                }
            )
        )
    frame = pd.concat(parts, ignore_index=True)
    if faults:
        frame = _missing_and_novel(frame, n, rng)
    frame = frame.iloc[np.argsort(frame["t"].to_numpy(), kind="stable")].reset_index(drop=True)
    t = frame.pop("t").to_numpy()
    frame.insert(0, "trace_id", tid_all[t])
    frame["root_ts"] = pd.to_datetime(start + root_ms[t].astype("timedelta64[ms]"))
    return frame[TRACE_CALL_COLUMNS]


def _missing_and_novel(frame: pd.DataFrame, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """Drop one non-root leaf call in MISSING_SHARE of the traces; add a never-seen child call under
    the root in NOVEL_SHARE of them."""
    t = frame["t"].to_numpy()
    child = frame["parent_call_id"].notna().to_numpy() & frame["leaf"].to_numpy()
    drop_traces = rng.random(n) < MISSING_SHARE
    candidates = np.flatnonzero(child & drop_traces[t])
    _, first = np.unique(t[candidates], return_index=True)  # the first leaf call of each such trace
    frame = frame.drop(index=candidates[first])
    novel = np.flatnonzero(rng.random(n) < NOVEL_SHARE)
    roots = frame[frame["parent_call_id"].isna() & np.isin(frame["t"].to_numpy(), novel)]
    callee = roots["callee"].iloc[0] if len(roots) else "x"
    extra = roots.assign(
        call_id="0.99",
        parent_call_id="0",
        node=node_key(str(callee), "svc-new", "newCall", "rpc"),
        parent_node=roots["node"],
        callee="svc-new",
        rt_ms=roots["rt_ms"] * 0.2,
        server_rt_ms=roots["rt_ms"] * 0.15,
        self_ms=roots["rt_ms"] * 0.15,
    )
    return pd.concat([frame, extra], ignore_index=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--traces", type=int, default=1_000_000, help="traces scored, over all patterns")
    parser.add_argument("--patterns", type=int, default=20)
    parser.add_argument("--train", type=int, default=5000, help="training traces per pattern")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    patterns = [make_pattern(pid, rng) for pid in range(1, args.patterns + 1)]
    per = np.full(args.patterns, args.traces // args.patterns)
    per[: args.traces % args.patterns] += 1
    train = {p.pid: trace_calls(p, args.train, HOUR - np.timedelta64(1, "h"), rng, faults=False) for p in patterns}
    hour = {p.pid: trace_calls(p, int(k), HOUR, rng, faults=True) for p, k in zip(patterns, per)}
    rows = sum(len(f) for f in hour.values())
    print(
        f"data: {args.patterns} patterns, {args.train} training traces each, {args.traces:,} traces to score "
        f"({rows:,} calls, {rows / args.traces:.1f} a trace), built in {time.perf_counter() - started:.1f} s "
        f"(not timed); peak RSS {peak_rss_mib():.0f} MiB"
    )

    started = time.perf_counter()
    models = {pid: TraceModel(trace_p=0.01).fit(calls) for pid, calls in train.items()}
    fit_s = time.perf_counter() - started
    for pid, calls in train.items():
        models[pid].calibrate(calls, window_s=30)
    calibrate_s = time.perf_counter() - started - fit_s
    rates = np.array([m.rate for m in models.values()])
    print(
        f"fit: {args.patterns} models on {args.train * args.patterns:,} traces in {fit_s:.2f} s, calibrate "
        f"{calibrate_s:.2f} s; calibrated rate median {np.median(rates):.4f} (max {rates.max():.4f})"
    )

    started, cpu = time.perf_counter(), time.process_time()
    scores = {pid: models[pid].score(calls) for pid, calls in hour.items()}
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    scored = sum(len(s.traces) for s in scores.values())
    surprising = sum(int(s.traces["surprising"].sum()) for s in scores.values())
    blamed = sum(len(s.blame) for s in scores.values())
    print(
        f"score: {scored:,} traces, {surprising:,} surprising ({surprising / max(scored, 1):.2%}), {blamed:,} blame "
        f"rows; CPU {cpu:.2f} s; peak RSS {peak_rss_mib():.0f} MiB"
    )
    per_million = seconds * 1e6 / max(scored, 1)
    print(
        f"\ntrace_scoring traces {scored} seconds {seconds:.2f} traces_per_s {scored / seconds:.0f} "
        f"target_s {TARGET_SECONDS:.0f}"
    )
    print(
        f"  at this rate 1,000,000 traces take {per_million:.1f} s (target <= {TARGET_SECONDS:.0f} s): "
        f"{'PASS' if per_million <= TARGET_SECONDS else 'MISS'}"
    )
    print(f"fit_seconds {fit_s:.2f} calibrate_seconds {calibrate_s:.2f} peak_rss_mib {peak_rss_mib():.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
