"""Benchmark: score one hour (60 one-minute buckets) of 500 or 5,000 critical patterns with their champions.

Builds in a temp folder a real DuckDB warehouse (tasks.warehouse schema) with --patterns active
critical patterns sharing one 8-node call tree. ONE small model is really trained on synthetic traffic
(tasks.forecast prepare/train/calibrate, artifacts written by tasks.training) and its artifacts are
copied into every pattern's model cache (<home>/model-cache/rpcwatch-pattern-<id>/1/artifacts)
with a `models` row (decision 'champion'), so score_hour loads them from the cache without MLflow
(the detectors read the cache folder directly: there is no registry to verify its digests against;
that check hashes a few small files per pattern): in production the MLflow download happens once
per champion version and is cached the same way, so this is the steady-state cost of an hour.
pattern_series holds the hour plus a 30-minute lead-in of Poisson traffic near the trained level,
with injected spikes so that some points are flagged: one pattern in ten gets a 6-minute flood on
one RPC (--flood-every), one in ten a latency spike. Training and building the warehouse are not
timed (about 10 s and 10 s at 5,000 patterns).

Prints wall and CPU seconds (the forked scoring workers' included, `tasks.scoring.parallel`) and
patterns/s, best of --repeat runs. Targets, wall on a 2-core machine: <= 60 s for 5,000 patterns (the
issue's acceptance: `--patterns 5000`), <= 10 s for 500; on a shared machine CPU seconds tell how
much work there was, the gap to twice the wall time how much of the cores other processes took,
and the best run how fast the code is when they let it. Also a reference run of --reference
patterns in the same process (the ratio of seconds per pattern: 1.00 is linear scaling; both runs
use the workers when there are enough patterns for them), and the old per-bucket forecast loop
against the batched one on the first 50 of them (same results, seconds and ratio; both on one torch
thread, as scoring runs). The last line: `score_<N>_patterns <wall> s (target <= <T> s) ... PASS|MISS`.

    .venv/bin/python tests/benchmarks/bench_score.py [--patterns 500] [--reference 100] [--flood-every 10] [--repeat 3]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import tasks.models.detector as detector_module
from tasks.clock import naive_utc
from tasks.models.detector import Detector, one_torch_thread
from tasks.models.features import CALLS, ERRORS, FEATURES, LATENCIES, RT_MEAN, RT_P95
from tasks.models.forecast import TrainConfig, predict, prepare, train
from tasks.models.registry import model_name
from tasks.models.series import PatternData
from tasks.models.thresholds import calibrate
from tasks.models.training import write_artifacts
from tasks.scoring.grid import cleaned, fetch_flagged, fetch_series
from tasks.scoring.parallel import worker_count
from tasks.scoring.score import score_hour
from tasks.scoring.sequential import forecast_sequentially, span_grid
from tasks.settings import Settings, load_settings
from tasks.warehouse import opened

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the reference loop
from scoring_reference import per_bucket_forecast  # noqa: E402

HOUR = datetime(2026, 1, 2, 10, tzinfo=UTC)
TARGETS = {500: 10.0, 5000: 60.0}  # wall seconds on a 2-core machine; other sizes: the 5,000 rate
LEAD_MINUTES = 30
LOOP_PATTERNS = 50  # the per-bucket loop is slow: compared on this many patterns
GRAPH_HASH = "bench-graph"
NODES = [
    f"{caller}|{callee}|{iface}|rpc"
    for caller, callee, iface in [
        ("USER", "svc-gw", "/api"),
        ("svc-gw", "svc-cart", "get"),
        ("svc-gw", "svc-user", "auth"),
        ("svc-cart", "svc-db", "query"),
        ("svc-cart", "svc-price", "quote"),
        ("svc-user", "svc-db", "query"),
        ("svc-price", "svc-cache", "get"),
        ("svc-price", "svc-db", "query"),
    ]
]
EDGES = [(0, 1), (0, 2), (1, 3), (1, 4), (2, 5), (4, 6), (4, 7)]
RATES = np.array([60.0, 40.0, 55.0, 40.0, 35.0, 55.0, 30.0, 8.0])  # calls per minute per node
RT_MS = np.array([40.0, 25.0, 8.0, 3.0, 12.0, 3.0, 1.0, 4.0])


def traffic(rng: np.random.Generator, steps: int) -> np.ndarray:
    """[T, N, F] Poisson calls with a gentle wave, ~1% errors, log-normal latency."""
    wave = 1 + 0.1 * np.sin(np.arange(steps) * 2 * np.pi / 60)[:, None]
    values = np.zeros((steps, len(NODES), len(FEATURES)))
    values[:, :, CALLS] = rng.poisson(RATES * wave)
    values[:, :, ERRORS] = rng.poisson(RATES * wave * 0.01)
    rt = RT_MS * rng.lognormal(0, 0.15, size=(steps, len(NODES)))
    values[:, :, RT_MEAN] = np.where(values[:, :, CALLS] > 0, rt, np.nan)
    values[:, :, RT_P95] = np.where(values[:, :, CALLS] > 0, rt * 2.5, np.nan)
    return values


def train_once(folder: Path) -> float:
    """Train the one real model on 6 hours of synthetic traffic; write its artifacts to `folder`."""
    rng = np.random.default_rng(0)
    steps = 360
    buckets = np.arange(
        np.datetime64(naive_utc(HOUR - timedelta(hours=8)), "s"), steps * 60, 60, dtype="datetime64[s]"
    )[:steps]
    data = PatternData(1, 1, GRAPH_HASH, NODES, EDGES, buckets, traffic(rng, steps), 60)
    cfg = TrainConfig(max_epochs=60, patience=10)
    started = time.perf_counter()
    prep = prepare(data, cfg)
    result = train(prep, cfg, torch.device("cpu"))
    pred = predict(result.model, prep, slice(prep.split, None), torch.device("cpu"))
    thresholds = calibrate(data, prep, pred, 1e-4, "quantile")
    folder.mkdir(parents=True, exist_ok=True)
    write_artifacts(folder, data, prep, cfg, result.model, thresholds)
    return time.perf_counter() - started


def build_warehouse(settings, patterns: int, flood_every: int) -> int:
    """Patterns, graphs, champion rows and model caches of `patterns` patterns; their series."""
    first = settings.home / "model-cache" / "rpcwatch-pattern-1" / "1" / "artifacts"
    for pid in range(2, patterns + 1):
        shutil.copytree(first, settings.home / "model-cache" / f"rpcwatch-pattern-{pid}" / "1" / "artifacts")
    ids = np.arange(1, patterns + 1)
    frames = graph_frames(ids) | {"models": models_frame(ids), "pattern_series": series_frame(ids, flood_every)}
    with opened(settings.warehouse) as con:
        for table, frame in frames.items():
            con.register("frame", frame)
            con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM frame")  # the frame's columns by name
            con.unregister("frame")
    return len(frames["pattern_series"])


def graph_frames(ids: np.ndarray) -> dict[str, pd.DataFrame]:
    """`patterns`, `pattern_nodes` and `pattern_edges` rows: every pattern active, critical, one graph."""
    now = naive_utc(HOUR)
    parts = [n.split("|") for n in NODES]
    patterns = pd.DataFrame(
        {
            "pattern_id": ids,
            "version": 1,
            "graph_hash": GRAPH_HASH,
            "status": "active",
            "critical": True,
            "first_seen": now,
            "last_changed": now,
            "traffic_share": 1 / len(ids),
            "calls": 0,
            "traces": 0,
            "n_nodes": len(NODES),
            "n_edges": len(EDGES),
            "n_shapes": 1,
            "updated_hour": now,
        }
    )
    nodes = pd.DataFrame(
        [(pid, 1, node, *p, 1.0, 0) for pid in ids for node, p in zip(NODES, parts)],
        columns=["pattern_id", "version", "node", "caller", "callee", "interface", "rpc_type", "support", "calls"],
    )
    edges = pd.DataFrame(
        [(pid, 1, NODES[a], NODES[b], 1) for pid in ids for a, b in EDGES],
        columns=["pattern_id", "version", "parent_node", "child_node", "weight"],
    )
    return {"patterns": patterns, "pattern_nodes": nodes, "pattern_edges": edges}


def models_frame(ids: np.ndarray) -> pd.DataFrame:
    """A `models` row per pattern: version 1, the champion, trained on the bench graph."""
    now = naive_utc(HOUR)
    return pd.DataFrame(
        {
            "pattern_id": ids,
            "model_name": [model_name(int(pid)) for pid in ids],
            "model_version": 1,
            "run_id": "bench-run",
            "graph_hash": GRAPH_HASH,
            "pattern_version": 1,
            "trained_for": now,
            "decision": "champion",
            "reason": "bench",
            "stale_reason": "",
            "calibrated_mape_calls": 0.1,
            "seconds": 0.0,
            "device": "cpu",
            "recorded_at": now,
        }
    )


def series_frame(ids: np.ndarray, flood_every: int) -> pd.DataFrame:
    """Lead-in + hour of every pattern; one in `flood_every` patterns gets a 6-bucket flood (8x the
    calls) on one node and one in ten a single latency spike (20x). One frame from one [P, T, N, F]
    array: a frame per pattern doubled the time to build 5,000 patterns' warehouse."""
    rng = np.random.default_rng(1)
    steps = LEAD_MINUTES + 60
    buckets = pd.date_range(naive_utc(HOUR) - timedelta(minutes=LEAD_MINUTES), periods=steps, freq="min")
    values = np.stack([pattern_traffic(rng, int(pid), steps, flood_every) for pid in ids])
    p, t, n = np.nonzero(values[:, :, :, CALLS] > 0)  # pattern by pattern, bucket by bucket, node by node
    v, parts = values[p, t, n], np.array([node.split("|") for node in NODES], dtype=object)
    return pd.DataFrame(
        {
            "pattern_id": ids[p],
            "bucket_ts": buckets[t],
            "node": np.array(NODES, dtype=object)[n],
            "caller": parts[n, 0],
            "callee": parts[n, 1],
            "interface": parts[n, 2],
            "rpc_type": "rpc",
            "calls": v[:, CALLS].astype(np.int64),
            "errors": v[:, ERRORS].astype(np.int64),
            "rt_mean": v[:, RT_MEAN],
            "rt_p95": v[:, RT_P95],
            "bucket_seconds": 60,
        }
    )


def pattern_traffic(rng: np.random.Generator, pid: int, steps: int, flood_every: int) -> np.ndarray:
    """[T, N, F] of one pattern, with its flood and latency spike if it gets one."""
    v = traffic(rng, steps)
    if pid % flood_every == 0:
        start, node = LEAD_MINUTES + int(rng.integers(5, 50)), int(rng.integers(0, len(NODES)))
        v[start : start + 6, node, CALLS] *= 8
    if pid % 10 == 3:
        v[LEAD_MINUTES + int(rng.integers(0, 60)), int(rng.integers(0, len(NODES))), list(LATENCIES)] *= 20
    return v


def target_seconds(patterns: int) -> float:
    return TARGETS.get(patterns, TARGETS[5000] * patterns / 5000)


def cpu_seconds() -> float:
    """CPU seconds of this process and of its ended (waited for) children: scoring's workers."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed_score(settings, critical: int) -> tuple[float, float, object]:
    """Wall and CPU seconds (workers' included) of scoring the hour with the first `critical`
    patterns critical."""
    with opened(settings.warehouse) as con:
        con.execute("UPDATE patterns SET critical = pattern_id <= ?", [critical])
    started, cpu = time.perf_counter(), cpu_seconds()
    report = score_hour(settings, HOUR)
    return time.perf_counter() - started, cpu_seconds() - cpu, report


def compare_loops(settings, patterns: int) -> tuple[float, float, bool]:
    """Seconds of the per-bucket and the batched forecast loop over the first `patterns` patterns."""
    seconds = {"per-bucket": 0.0, "batched": 0.0}
    same = True
    with opened(settings.warehouse, read_only=True) as con, one_torch_thread():  # both on one thread, as scoring runs
        for pid in range(1, patterns + 1):
            detector = Detector.load(settings, pid, 1)
            grid = span_grid(detector, HOUR, HOUR + timedelta(hours=1))
            values, _ = grid.dense(fetch_series(con, [grid]).get(pid))
            flagged = fetch_flagged(con, [grid], HOUR).get(pid)
            targets = np.arange(detector.lead, grid.size)
            results = {}
            for name, loop in (("per-bucket", per_bucket_forecast), ("batched", forecast_sequentially)):
                clean = cleaned(values, flagged)
                started = time.perf_counter()
                results[name] = loop(detector, values, targets, clean)
                seconds[name] += time.perf_counter() - started
            old, new = results["per-bucket"], results["batched"]
            same &= np.allclose(old.expected, new.expected, rtol=1e-4, atol=1e-6, equal_nan=True) and [
                f[:3] + f[5:] for f in old.flags
            ] == [f[:3] + f[5:] for f in new.flags]
    return seconds["per-bucket"], seconds["batched"], same


def cache_without_registry(settings: Settings, pattern_id: int, version: int) -> Path:
    """The benchmark's stand-in for `cached_artifacts`: the cache folder as written, unverified."""
    return settings.home / "model-cache" / model_name(pattern_id) / str(version) / "artifacts"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patterns", type=int, default=500)
    parser.add_argument("--reference", type=int, default=100)
    parser.add_argument("--flood-every", type=int, default=10, help="one pattern in this many gets a 6-minute flood")
    parser.add_argument("--repeat", type=int, default=3, help="full runs; the best counts (the machine is shared)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (its path is printed)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rpcwatch-bench-score-"))
    settings = load_settings(env={}, home=work / "home")
    detector_module.cached_artifacts = cache_without_registry  # no MLflow registry here (see the docstring)
    print(f"training one model, building a warehouse of {args.patterns} patterns in {work} ...")
    trained = train_once(settings.home / "model-cache" / "rpcwatch-pattern-1" / "1" / "artifacts")
    started = time.perf_counter()
    rows = build_warehouse(settings, args.patterns, args.flood_every)
    print(f"  training {trained:.1f} s; warehouse {time.perf_counter() - started:.1f} s ({rows:,} pattern_series rows)")
    timed_score(settings, 5)  # warm-up: imports (scipy.stats), first calls: once per process (forks inherit them)

    fixed_s, _, _ = timed_score(settings, 0)  # opening the warehouse, novel RPCs, incidents
    ref_s, ref_cpu, ref = timed_score(settings, args.reference)
    print(
        f"  reference: {len(ref.scored)} patterns in {ref_s:.2f} s (CPU {ref_cpu:.2f} s, "
        f"{len(ref.scored) / ref_s:.0f} patterns/s), {ref.anomalies} anomalies; no pattern: {fixed_s:.2f} s"
    )
    runs = [timed_score(settings, args.patterns) for _ in range(args.repeat)]  # rescoring replaces: same work
    total_s, total_cpu, report = min(runs, key=lambda run: run[0])
    rate = len(report.scored) / total_s
    print(
        f"  full: {len(report.scored)} patterns x 60 buckets in {total_s:.2f} s (CPU {total_cpu:.2f} s, {rate:.0f} "
        f"patterns/s), {report.anomalies} anomalies written, {report.incidents} incidents, "
        f"{len(report.skipped)} skipped"
    )
    print(
        f"  all {args.repeat} runs: "
        + ", ".join(f"{w:.2f} s (CPU {c:.2f} s)" for w, c, _ in runs)
        + f"; median {np.median([w for w, _, _ in runs]):.2f} s"
    )
    ratio = ((total_s - fixed_s) / len(report.scored)) / ((ref_s - fixed_s) / len(ref.scored))
    print(f"  seconds per pattern beyond the fixed cost, full / reference: {ratio:.2f} (1.00 = linear scaling)")

    loops = min(args.reference, LOOP_PATTERNS)
    old_s, new_s, same = compare_loops(settings, loops)
    print(
        f"  forecast loop on {loops} patterns: per-bucket {old_s:.2f} s, batched {new_s:.2f} s "
        f"({old_s / new_s:.1f}x faster), same expected values and flags: {same}"
    )
    target = target_seconds(args.patterns)
    print(
        f"\nscore_{len(report.scored)}_patterns {total_s:.2f} s (target <= {target:.0f} s), CPU {total_cpu:.2f} s, "
        f"best of {args.repeat}, {worker_count(len(report.scored)) or 'no'} worker processes: "
        f"{'PASS' if total_s <= target else 'MISS'}"
    )
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
