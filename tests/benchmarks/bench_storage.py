"""Storage per hour at the demo's traffic: incoming trace Parquet and the warehouse file's growth.

    .venv/bin/python tests/benchmarks/bench_storage.py [--hours 6] [--spans-per-hour 200000] [--systems 1]

Generates `--hours` synthetic hours as `make demo` does (seed 7, injected anomalies; `--systems` > 1:
a fleet of that many shops, more patterns), runs the upstream stages of every hour through
`tasks.pipeline` (ingest, validate, aggregate, patterns) into an embedded warehouse, and prints the
bytes an hour adds: the incoming Parquet, the warehouse file (after a CHECKPOINT, growth from the
first hour to the last, so the empty tables' fixed size is left out), and the rows an hour adds to
the biggest tables. Training and scoring are not run: their tables (models, forecasts, anomalies)
hold per-pattern rows, a small share of `calls` (see docs/capacity.md). Ends with
`storage_per_hour spans <n> incoming_mib <x> warehouse_mib <y>`.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb

from tasks import pipeline
from tasks.settings import Settings, load_settings
from tasks.synth.generate import generate

START = datetime(2026, 1, 1, tzinfo=UTC)  # the demo's first hour
UPSTREAM = ("ingest", "validate", "aggregate", "patterns")
TABLES = ("calls", "rpc_series", "trace_patterns", "pattern_series")
MIB = 2**20


def run_hour(settings: Settings, hour: datetime, source: Path) -> None:
    run = pipeline.Run(settings, hour, [source])
    previous = None
    for name in UPSTREAM:
        previous = pipeline.call(pipeline.stage(name), run, previous)


def warehouse_bytes(path: Path) -> tuple[int, dict[str, int]]:
    """The file's size after a CHECKPOINT, and the rows of TABLES."""
    con = duckdb.connect(str(path))
    try:
        con.execute("CHECKPOINT")
        rows = {t: con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in TABLES}  # names: constants
    finally:
        con.close()
    return path.stat().st_size, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=int, default=6)
    parser.add_argument("--spans-per-hour", type=int, default=200_000)
    parser.add_argument("--systems", type=int, default=1)
    args = parser.parse_args()
    if args.hours < 2:
        raise SystemExit("--hours must be at least 2 (growth is measured from the first hour to the last)")
    work = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    source = work / "traces"
    summary = generate(
        START, args.hours, source, seed=7, spans_per_hour=args.spans_per_hour, anomalies=True, systems=args.systems
    )
    spans = sum(summary.rows_per_hour.values())
    incoming = sum(f.stat().st_size for f in source.rglob("part-*.parquet"))
    print(f"generated {args.hours} h, {spans:,} spans, {incoming / MIB:.1f} MiB of trace Parquet")
    settings = load_settings(env={}, home=work / "home")
    path = settings.warehouse
    assert isinstance(path, Path), "the embedded warehouse file"
    started = time.perf_counter()
    run_hour(settings, START, source)
    first_size, first_rows = warehouse_bytes(path)
    for h in range(1, args.hours):
        run_hour(settings, START + timedelta(hours=h), source)
    size, rows = warehouse_bytes(path)
    print(f"upstream stages of {args.hours} h in {time.perf_counter() - started:.1f} s")
    later = args.hours - 1
    per_hour_spans = spans / args.hours
    print("rows an hour: " + ", ".join(f"{t} {(rows[t] - first_rows[t]) / later:,.0f}" for t in TABLES))
    warehouse = (size - first_size) / later
    print(f"warehouse file {size / MIB:.1f} MiB after {args.hours} h, {first_size / MIB:.1f} MiB after the first")
    print(
        f"\nstorage_per_hour spans {per_hour_spans:.0f} incoming_mib {incoming / args.hours / MIB:.2f} "
        f"warehouse_mib {warehouse / MIB:.2f} bytes_per_span {warehouse / per_hour_spans:.1f}"
    )
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
