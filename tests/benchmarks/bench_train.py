"""Benchmark: train N synthetic patterns' forecasters on the available device (CUDA if present).

Each pattern: a random call tree of 5-25 nodes, 6 hours of 60 s buckets of Poisson traffic with a
slow trend, the default model and training settings (early stopping included). Prints seconds
per pattern, the total, and the device. On CPU the reference is the same loop single-threaded.

    .venv/bin/python tests/benchmarks/bench_train.py [--patterns 50] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from tasks.models.forecast import TrainConfig, device, prepare, train
from tasks.models.series import PatternData


def synthetic_pattern(pid: int, rng: np.random.Generator, steps: int = 360) -> PatternData:
    n = int(rng.integers(5, 26))
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patterns", type=int, default=50)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    dev = device(args.device)
    name = (
        torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    )
    rng = np.random.default_rng(0)
    cfg = TrainConfig()
    patterns = [synthetic_pattern(i, rng) for i in range(args.patterns)]
    print(f"training {len(patterns)} synthetic patterns on {name} ...")
    seconds, epochs = [], []
    started = time.perf_counter()
    for data in patterns:
        t = time.perf_counter()
        result = train(prepare(data, cfg), cfg, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t)
        epochs.append(result.epochs)
    total = time.perf_counter() - started
    print(
        f"  per pattern: median {np.median(seconds):.2f} s, p90 {np.quantile(seconds, 0.9):.2f} s, "
        f"{np.mean(epochs):.0f} epochs on average ({1000 * sum(seconds) / sum(epochs):.1f} ms per epoch)"
    )
    print(f"\n{len(patterns)} patterns in {total:.1f} s on {name} ({total / len(patterns):.2f} s per pattern)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
