"""Benchmark: an hour's retraining of N stale patterns on this machine, the way the DAG does it.

Each synthetic pattern (`helpers.synthetic_pattern`: a random call tree of 5-25 nodes, Poisson
traffic with a slow trend) has `--hours` + 1 hours of 60 s buckets (48 h of history by default:
the pipeline's RPCWATCH_TRAIN_HISTORY_HOURS). Its export of the first `--hours` trains its champion
first (set-up, not timed: from scratch at a small epoch budget, `--champion-epochs`, into a real MLflow
sqlite registry under a temporary home). Then the hour is retrained as the DAG's `train` tasks do it:
the stale patterns split into `--workers` shards of similar cost (`shard_jobs`), one process per shard
at once (as Airflow runs mapped tasks), each calling `train_shard` on the export an hour later: the
champion's weights loaded from the registry, fine-tuned (`RPCWATCH_WARM_START`), evaluated against the
baselines, calibrated, logged with its plots, registered and judged against the champion.

An epoch is a fixed budget of windows (`TrainConfig.epoch_windows`, early stopping on the newest
`stop_windows`), so the retrain costs about the same at 6 h or 48 h of history. Quality: before the
timed retrain, the first `--compare` patterns are also fine-tuned from the same champions on every
window (no budget: the training before the budget existed), not timed; each pattern's validation
metrics (whole validation split) are compared with the budgeted retrain's. Ends with

    quality <metric> mean <budgeted> vs <every window> (<+x.x %>) ... : WITHIN 2 %|OFF BY MORE
    retrain_<N>_patterns <seconds> s (target <= 900 s for 500 patterns at 48 h), ...: PASS|FAIL|NO VERDICT

The time verdict is given only for the target's own size (500 patterns, 48 h, 2 workers); any other
run prints its per-pattern rate and the 500-pattern projection without a verdict.

    .venv/bin/python tests/benchmarks/bench_retrain.py [--patterns 500] [--workers 2] [--hours 48]
        [--champion-epochs 10] [--compare 8] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a script: the tests' helpers are not on the path

from helpers import export_pattern_data, synthetic_pattern  # noqa: E402
from tasks.models.fitting import fit, train_config  # noqa: E402
from tasks.models.jobs import TrainJob, TrainShard  # noqa: E402
from tasks.models.registry import setup_mlflow  # noqa: E402
from tasks.models.shards import shard_jobs  # noqa: E402
from tasks.settings import Settings, load_settings  # noqa: E402

HOUR = timedelta(hours=1)
TARGET_S = 900.0
TARGET = {"patterns": 500, "hours": 48, "workers": 2}  # the budget holds for this run only
QUALITY = ("model_mape_calls", "model_mae_rt_mean", "model_mae_rt_p95")  # validation metrics compared
TOLERANCE = 0.02


def _train(args: tuple[dict[str, str], Path, TrainShard]) -> list[dict]:
    from tasks.models.retrain import train_shard

    env, home, shard = args
    return [o.to_dict() for o in train_shard(load_settings(env=env, home=home), shard)]


def _every_window(args: tuple[dict[str, str], Path, list[TrainJob]]) -> dict[int, dict[str, float]]:
    """The jobs fine-tuned from their champions on every window (no epoch budget): validation scores."""
    from tasks.models.registry import setup_mlflow
    from tasks.models.series import load_pattern
    from tasks.models.training import warm_start

    env, home, jobs = args
    settings = load_settings(env=env, home=home)
    cfg = replace(train_config(settings), epoch_windows=None, stop_windows=None)
    client = setup_mlflow(settings).MlflowClient()
    out = {}
    for job in jobs:
        start = warm_start(settings, client, job.pattern_id, cfg)
        out[job.pattern_id] = fit(settings, load_pattern(job.meta_path), cfg, start.state).scores
    return out


def every_window_scores(env: dict[str, str], settings: Settings, jobs: list[TrainJob], workers: int) -> dict:
    """`_every_window` for `jobs`, split over `workers` processes."""
    parts = [jobs[i::workers] for i in range(workers) if jobs[i::workers]]
    with multiprocessing.get_context("spawn").Pool(len(parts)) as pool:
        found = pool.map(_every_window, [(env, settings.home, part) for part in parts])
    return {pid: scores for part in found for pid, scores in part.items()}


def quality_report(budgeted: dict[int, dict], every: dict[int, dict]) -> bool:
    """Per metric: the mean over patterns of each way, their relative change, and how the
    per-pattern changes spread. True when every metric's mean is within TOLERANCE."""
    held = True
    for name in QUALITY:
        pairs = [(budgeted[p][name], every[p][name]) for p in every if p in budgeted]
        pairs = [(b, e) for b, e in pairs if b is not None and e is not None and np.isfinite([b, e]).all() and e > 0]
        if not pairs:
            print(f"  quality {name}: no pattern to compare")
            continue
        b, e = np.array(pairs).T
        change = (b.mean() - e.mean()) / e.mean()
        each = (b - e) / e
        within = change <= TOLERANCE  # worse by more than the tolerance fails; better never does
        held &= bool(within)
        print(
            f"  quality {name} mean {b.mean():.4f} budgeted vs {e.mean():.4f} every window ({change:+.1%}); "
            f"per pattern median {np.median(each):+.1%}, worst {each.max():+.1%}, "
            f"{(each <= TOLERANCE).mean():.0%} of {len(each)} within {TOLERANCE:.0%}: "
            f"{'WITHIN' if within else 'OFF BY MORE THAN'} {TOLERANCE:.0%}"
        )
    return held


@contextlib.contextmanager
def held(lock: Path | None) -> Iterator[None]:
    """The timed part alone on the machine: other heavy jobs that take the same lock wait."""
    if lock is None:
        yield
        return
    with lock.open("a") as f:
        print(f"waiting for {lock} ...", flush=True)
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def run_shards(env: dict[str, str], settings: Settings, jobs: list[TrainJob], workers: int) -> list[dict]:
    """Every shard in its own process at once (fresh interpreters: as Airflow's task processes)."""
    shards = shard_jobs(jobs, workers)
    with multiprocessing.get_context("spawn").Pool(len(shards)) as pool:
        return [o for out in pool.map(_train, [(env, settings.home, s) for s in shards]) for o in out]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patterns", type=int, default=500)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hours", type=int, default=48, help="history each training sees")
    parser.add_argument("--champion-epochs", type=int, default=10)
    parser.add_argument("--compare", type=int, default=8, help="patterns also trained on every window")
    parser.add_argument("--lock", type=Path, help="a lock file held (flock) around the timed part: on a shared machine")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (RPCWATCH_DEVICE; stacked training on cuda)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    steps = args.hours * 60
    datas = [synthetic_pattern(i, rng, steps=steps + 60) for i in range(args.patterns)]
    hour = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=args.hours + 1)
    with tempfile.TemporaryDirectory(prefix="rpcwatch-bench-retrain-") as tmp:
        root = Path(tmp)
        env = {"RPCWATCH_DEVICE": args.device, "RPCWATCH_TRAIN_SHARDS": str(args.workers)}
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
        print(f"set-up took {time.perf_counter() - started:.0f} s", flush=True)
        started = time.perf_counter()
        compared = new[: args.compare]
        print(f"quality reference: {len(compared)} patterns fine-tuned on every window (not timed) ...", flush=True)
        every = every_window_scores(env, settings, compared, args.workers)
        print(f"  took {time.perf_counter() - started:.0f} s", flush=True)
        with held(args.lock):
            print(f"retraining the hour ({os.getloadavg()[0]:.2f} load) ...", flush=True)
            started = time.perf_counter()
            outcomes = run_shards(env, settings, new, args.workers)
            seconds = time.perf_counter() - started
    trained = [o for o in outcomes if "model_version" in o]
    print(f"  {len(trained)} retrained, decisions {dict(Counter(o['decision'] for o in trained))}")
    fitting = np.mean([o["seconds"] for o in trained]) if trained else float("nan")
    print(f"  fine-tuning alone: {fitting:.2f} s a pattern on average (one core)")
    quality = quality_report({o["pattern_id"]: o["metrics"] for o in trained}, every)
    line = time_line(args, seconds, len(trained) == args.patterns and quality)
    print(line)
    return 1 if line.endswith("FAIL") or not quality or len(trained) < args.patterns else 0


def time_line(args: argparse.Namespace, seconds: float, complete: bool) -> str:
    """The timing's last line: a verdict only for the target's own run, a projection otherwise."""
    rate = seconds / args.patterns
    head = (
        f"retrain_{args.patterns}_patterns {seconds:.1f} s (target <= {TARGET_S:.0f} s for "
        f"{TARGET['patterns']} patterns at {TARGET['hours']} h on {TARGET['workers']} workers), "
        f"{args.workers} workers, {args.hours} h of history, {rate:.2f} s a pattern"
    )
    if {"patterns": args.patterns, "hours": args.hours, "workers": args.workers} != TARGET:
        return f"{head}, {rate * TARGET['patterns']:.0f} s projected for {TARGET['patterns']}: NO VERDICT"
    return f"{head}: {'PASS' if seconds <= TARGET_S and complete else 'FAIL'}"


if __name__ == "__main__":
    raise SystemExit(main())
