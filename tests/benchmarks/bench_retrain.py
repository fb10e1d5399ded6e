"""Benchmark: an hour's retraining of N stale patterns on this machine, the way the DAG does it.

Each synthetic pattern (`helpers.synthetic_pattern`: a random call tree of 5-25 nodes, Poisson
traffic with a slow trend) has `--hours` + 1 hours of 60 s buckets (6 h of history by default, as
`bench_train.py`; the pipeline trains on up to RPCWATCH_TRAIN_HISTORY_HOURS, 48, and an epoch's cost
grows with the history). Its export of the first `--hours` trains its champion
first (set-up, not timed: from scratch at a small epoch budget, `--champion-epochs`, into a real MLflow
sqlite registry under a temporary home). Then the hour is retrained as the DAG's `train` tasks do it:
the stale patterns split into `--workers` shards of similar cost (`shard_jobs`), one process per shard
at once (as Airflow runs mapped tasks), each calling `train_shard` on the export an hour later: the
champion's weights loaded from the registry, fine-tuned (`RPCWATCH_WARM_START`), evaluated against the
baselines, calibrated, logged with its plots, registered and judged against the champion. Ends with

    retrain_<N>_patterns <seconds> s (target <= 900 s), <workers> workers, <H> h of history, <s> s a pattern: PASS|FAIL

A champion of 10 epochs is further from the new optimum than a converged one; at 48 h of history a
converged champion (`--champion-epochs 200`) still fine-tuned for about as long (25.9 s against 26.8 s).

    .venv/bin/python tests/benchmarks/bench_retrain.py [--patterns 500] [--workers 2] [--hours 6] [--champion-epochs 10]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a script: the tests' helpers are not on the path

from helpers import export_pattern_data, synthetic_pattern  # noqa: E402
from tasks.models.jobs import TrainJob, TrainShard  # noqa: E402
from tasks.models.registry import setup_mlflow  # noqa: E402
from tasks.models.shards import shard_jobs  # noqa: E402
from tasks.settings import Settings, load_settings  # noqa: E402

HOUR = timedelta(hours=1)
TARGET_S = 900.0


def _train(args: tuple[dict[str, str], Path, TrainShard]) -> list[dict]:
    from tasks.models.retrain import train_shard

    env, home, shard = args
    return [o.to_dict() for o in train_shard(load_settings(env=env, home=home), shard)]


def run_shards(env: dict[str, str], settings: Settings, jobs: list[TrainJob], workers: int) -> list[dict]:
    """Every shard in its own process at once (fresh interpreters: as Airflow's task processes)."""
    shards = shard_jobs(jobs, workers)
    with multiprocessing.get_context("spawn").Pool(len(shards)) as pool:
        return [o for out in pool.map(_train, [(env, settings.home, s) for s in shards]) for o in out]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patterns", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hours", type=int, default=6, help="history each training sees")
    parser.add_argument("--champion-epochs", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    steps = args.hours * 60
    datas = [synthetic_pattern(i, rng, steps=steps + 60) for i in range(args.patterns)]
    hour = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=args.hours + 1)
    with tempfile.TemporaryDirectory(prefix="rpcwatch-bench-retrain-") as tmp:
        root = Path(tmp)
        env = {"RPCWATCH_DEVICE": "cpu", "RPCWATCH_TRAIN_SHARDS": str(args.workers)}
        settings = load_settings(env=env, home=root / "home")
        setup_mlflow(settings)  # the registry's tables made once (the DAG's plan task does it), not raced
        old = [
            TrainJob(d.pattern_id, ["new"], hour - HOUR, export_pattern_data(d, root / "old", 0, steps)) for d in datas
        ]
        new = [
            TrainJob(d.pattern_id, ["model_age"], hour, export_pattern_data(d, root / "new", 60, steps)) for d in datas
        ]
        setup = env | {"RPCWATCH_WARM_START": "false", "RPCWATCH_TRAIN_MAX_EPOCHS": str(args.champion_epochs)}
        started = time.perf_counter()
        print(f"set-up: {args.patterns} champions from scratch ({args.champion_epochs} epochs) ...", flush=True)
        run_shards(setup, settings, old, args.workers)
        print(f"set-up took {time.perf_counter() - started:.0f} s; retraining the hour ...", flush=True)
        started = time.perf_counter()
        outcomes = run_shards(env, settings, new, args.workers)
        seconds = time.perf_counter() - started
    trained = [o for o in outcomes if "model_version" in o]
    print(f"  {len(trained)} retrained, decisions {dict(Counter(o['decision'] for o in trained))}")
    fitting = np.mean([o["seconds"] for o in trained]) if trained else float("nan")
    print(f"  fine-tuning alone: {fitting:.2f} s a pattern on average (one core)")
    verdict = "PASS" if seconds <= TARGET_S and len(trained) == args.patterns else "FAIL"
    print(
        f"retrain_{args.patterns}_patterns {seconds:.1f} s (target <= {TARGET_S:.0f} s), {args.workers} workers, "
        f"{args.hours} h of history, "
        f"{seconds / args.patterns:.2f} s a pattern: {verdict}"
    )
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
