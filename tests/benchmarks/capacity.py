"""Per-stage throughput on this machine: runs the stage benchmarks at moderate sizes, one after another,
and prints one table (stage, unit, figure, load, the command behind it), the figures of docs/capacity.md.

    flock /tmp/rpcwatch-heavy.lock .venv/bin/python tests/benchmarks/capacity.py [--only ingest,lake] [--log DIR]

Each benchmark runs as a subprocess of its own (the script in this folder, the arguments shown in the
table); its figure is parsed from the line the script ends with. `load` is the 1-minute load average
just before the run, so a figure taken on a busy machine shows it. The whole set takes ~13 minutes
on 2 cores; `--only` runs some of them. `--log DIR` keeps every run's full output.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
NUMBER = r"([0-9][0-9,]*\.?[0-9]*)"


def num(text: str) -> float:
    return float(text.replace(",", ""))


@dataclass(frozen=True)
class Figure:
    stage: str
    unit: str
    value: float


@dataclass(frozen=True)
class Bench:
    name: str
    script: str
    args: tuple[str, ...]
    parse: Callable[[str], list[Figure]]

    @property
    def command(self) -> str:
        return " ".join([f"tests/benchmarks/{self.script}", *self.args])


def _search(pattern: str, out: str) -> re.Match[str]:
    found = re.search(pattern, out)
    if found is None:
        raise ValueError(f"no line matching {pattern!r} in the output")
    return found


def parse_ingest(out: str) -> list[Figure]:
    m = _search(rf"ingest\+validate\+aggregate {NUMBER} s for {NUMBER} spans \({NUMBER} spans/s\)", out)
    return [Figure("ingest + validate + aggregate", "spans/s", num(m[3]))]


def parse_patterns(out: str) -> list[Figure]:
    m = _search(rf"reconstruction \+ clustering {NUMBER} s for {NUMBER} traces", out)
    return [Figure("traces rebuilt + clustered (patterns stage)", "traces/s", num(m[2]) / num(m[1]))]


def parse_trace_score(out: str) -> list[Figure]:
    m = _search(rf"trace_scoring traces {NUMBER} seconds {NUMBER} traces_per_s {NUMBER}", out)
    return [Figure("traces scored (trace models, one process)", "traces/s", num(m[3]))]


def parse_score(out: str) -> list[Figure]:
    m = _search(rf"score_{NUMBER}_patterns {NUMBER} s", out)
    return [Figure("patterns scored (one hour, 60 buckets each)", "patterns/s", num(m[1]) / num(m[2]))]


def parse_train(out: str) -> list[Figure]:
    patterns = num(_search(rf"training {NUMBER} synthetic patterns", out)[1])
    m = _search(rf"one: {NUMBER} s, {NUMBER} epochs", out)
    return [Figure("patterns trained from scratch (one core)", "patterns/s", patterns / num(m[1]))]


def parse_retrain(out: str) -> list[Figure]:
    m = _search(rf"retrain_{NUMBER}_patterns {NUMBER} s .*?, {NUMBER} h of history, {NUMBER} s a pattern", out)
    return [Figure(f"patterns retrained, {m[3]} h of history (2 shards)", "patterns/s", num(m[1]) / num(m[2]))]


def parse_registry(out: str) -> list[Figure]:
    # the closing table's rows: store, op, models, total_s, per_model_ms, ...
    row = rf"^sqlite\s+(\S+)\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}"
    per_model_ms = {m[1]: num(m[4]) for m in re.finditer(row, out, re.MULTILINE)}
    wanted = [
        ("register", "MLflow registrations (rpcwatch's register_fitted)"),
        ("register_4writers", "MLflow registrations, 4 writers at once"),
        ("champion_by_alias", "MLflow champion lookups by alias"),
        ("load_cold", "MLflow champion loads, cold cache"),
    ]
    return [
        Figure(f"{label} (sqlite)", "ops/s", 1000.0 / per_model_ms[op]) for op, label in wanted if op in per_model_ms
    ]


def parse_lake(out: str) -> list[Figure]:
    m = _search(rf"lake_commits writers {NUMBER} commits_per_s {NUMBER} reference_commits_per_s {NUMBER}", out)
    return [
        Figure("DuckLake commits, 1 writer", "commits/s", num(m[3])),
        Figure(f"DuckLake commits, {m[1]} writers at once", "commits/s", num(m[2])),
    ]


def parse_storage(out: str) -> list[Figure]:
    m = _search(rf"storage_per_hour spans {NUMBER} incoming_mib {NUMBER} warehouse_mib {NUMBER}", out)
    spans = f"{num(m[1]):,.0f} spans/h"
    return [
        Figure(f"incoming trace Parquet at {spans}", "MiB/h", num(m[2])),
        Figure(f"warehouse file growth (upstream tables) at {spans}", "MiB/h", num(m[3])),
    ]


BENCHES = [  # the ones under change by others (ingest, retrain) last
    Bench("lake", "bench_lake_commits.py", ("--writers", "8", "--commits", "25"), parse_lake),
    Bench("storage", "bench_storage.py", ("--hours", "6"), parse_storage),
    Bench(
        "registry",
        "bench_registry.py",
        ("--models", "100", "--store", "sqlite", "--retrain", "5", "--writer-models", "5"),
        parse_registry,
    ),
    Bench("score", "bench_score.py", ("--patterns", "500", "--repeat", "1"), parse_score),
    Bench("patterns", "bench_patterns.py", ("--traces", "200000"), parse_patterns),
    Bench("trace_score", "bench_trace_score.py", ("--traces", "200000", "--train", "2000"), parse_trace_score),
    Bench("train", "bench_train.py", ("--patterns", "4", "--mode", "one"), parse_train),
    Bench("ingest", "bench_ingest.py", ("--spans", "2000000"), parse_ingest),
    Bench("retrain", "bench_retrain.py", ("--patterns", "20"), parse_retrain),
]


@dataclass(frozen=True)
class Measured:
    bench: Bench
    figures: list[Figure]
    load: float
    seconds: float
    error: str = ""


def run(bench: Bench, log: Path | None) -> Measured:
    load = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(HERE / bench.script), *bench.args], cwd=REPO, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    out = done.stdout + done.stderr
    if log is not None:
        (log / f"{bench.name}.log").write_text(f"$ {bench.command}\n{out}")
    try:
        figures = bench.parse(done.stdout)
    except ValueError as err:
        return Measured(bench, [], load, seconds, f"exit {done.returncode}, {err}: {out[-500:]}")
    return Measured(bench, figures, load, seconds)


def table(results: list[Measured]) -> str:
    lines = [
        "| stage | unit | figure | load before | run s | command |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in results:
        for f in r.figures:
            lines.append(
                f"| {f.stage} | {f.unit} | {f.value:,.2f} | {r.load:.2f} | {r.seconds:.0f} | `{r.bench.command}` |"
            )
        if r.error:
            lines.append(f"| {r.bench.name}: FAILED | | | {r.load:.2f} | {r.seconds:.0f} | `{r.bench.command}` |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated names: " + ",".join(b.name for b in BENCHES))
    parser.add_argument("--log", type=Path, help="folder for every run's full output")
    args = parser.parse_args()
    chosen = set(args.only.split(",")) if args.only else {b.name for b in BENCHES}
    if unknown := chosen - {b.name for b in BENCHES}:
        raise SystemExit(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    if args.log:
        args.log.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs; load {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    results = []
    for bench in (b for b in BENCHES if b.name in chosen):
        print(f"running {bench.command} ...", flush=True)
        result = run(bench, args.log)
        results.append(result)
        shown = "; ".join(f"{f.stage} {f.value:,.2f} {f.unit}" for f in result.figures) or result.error
        print(f"  {result.seconds:.0f} s, load before {result.load:.2f}: {shown}", flush=True)
    print()
    print(table(results))
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
