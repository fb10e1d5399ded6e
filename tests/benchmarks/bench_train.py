"""Benchmark: train N synthetic patterns' forecasters one by one and/or batched, on one device.

Each pattern: a random call tree of 5-25 nodes, 6 hours of 60 s buckets of Poisson traffic with a
slow trend (`helpers.synthetic_pattern`), the default model and training settings (early stopping
included). `one` runs `forecast.train` per pattern, `batched` runs `batched.train_batched` on all of
them; both single-threaded on CPU. Time is compared per model-step (one optimizer step of one pattern,
validation included), so a different number of early-stopped epochs does not skew it. `both` ends with

    batched_speedup <x> patterns <N> device <cpu|cuda> quality_delta <max relative change>

where quality is each pattern's calls MAE on its validation split, batched against alone.

    .venv/bin/python tests/benchmarks/bench_train.py [--patterns 50] [--mode one|batched|both]
        [--device auto|cpu|cuda] [--alone N]
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a script: the tests' helpers are not on the path

from helpers import synthetic_pattern  # noqa: E402
from tasks.models.batched import train_batched  # noqa: E402
from tasks.models.forecast import Prepared, TrainConfig, TrainResult, device, predict, prepare, train  # noqa: E402


def calls_mae(result: TrainResult, prep: Prepared, dev: torch.device) -> float:
    """Mean absolute error of the forecast calls over the validation split."""
    pred = predict(result.model, prep, slice(prep.split, None), dev)
    return float(np.abs(pred[..., 0] - prep.y[prep.split :, :, 0].numpy()).mean())


def steps(results: list[TrainResult], preps: list[Prepared], cfg: TrainConfig) -> int:
    """Optimizer steps summed over patterns (model-steps)."""
    return sum(r.epochs * math.ceil(p.split / cfg.batch_size) for r, p in zip(results, preps))


def run(mode: str, preps: list[Prepared], cfg: TrainConfig, dev: torch.device) -> tuple[list[TrainResult], float]:
    started = time.perf_counter()
    if mode == "one":
        results = [train(p, cfg, dev) for p in preps]
    else:
        results = train_batched(preps, cfg, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - started
    epochs = [r.epochs for r in results]
    n = steps(results, preps, cfg)
    print(
        f"  {mode:>7}: {total:.1f} s, {np.mean(epochs):.0f} epochs on average, {n} model-steps "
        f"({1000 * total / n:.2f} ms per model-step)"
    )
    return results, total / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patterns", type=int, default=50)
    parser.add_argument("--mode", choices=["one", "batched", "both"], default="one")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--alone", type=int, help="`one` trains the first N patterns only")
    args = parser.parse_args()
    dev = device(args.device)
    name = (
        torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    )
    torch.set_num_threads(1)  # both modes alike (`train` does this on CPU anyway)
    rng = np.random.default_rng(0)
    cfg = TrainConfig()
    preps = [prepare(synthetic_pattern(i, rng), cfg) for i in range(args.patterns)]
    nodes = [p.x.size(2) for p in preps]
    print(f"training {len(preps)} synthetic patterns ({min(nodes)}-{max(nodes)} nodes) on {name} ...")
    modes = ["one", "batched"] if args.mode == "both" else [args.mode]
    sample = preps[: args.alone] if args.alone else preps  # one by one is slow: a sample suffices for its rate
    out = {mode: run(mode, sample if mode == "one" else preps, cfg, dev) for mode in modes}
    if args.mode == "both":
        alone, batched = out["one"][0], out["batched"][0]
        delta = max(  # over the patterns trained both ways
            abs(calls_mae(b, p, dev) - calls_mae(a, p, dev)) / calls_mae(a, p, dev)
            for a, b, p in zip(alone, batched, sample)
        )
        speedup = out["one"][1] / out["batched"][1]
        print(f"batched_speedup {speedup:.2f} patterns {len(preps)} device {dev.type} quality_delta {delta:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
