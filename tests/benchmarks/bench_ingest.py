"""Benchmark: one synthetic hour of N spans (default 10 M) through ingest + validate + aggregate.

The reference, in the same process on the same files: DuckDB's bare
`CREATE TABLE t AS SELECT * FROM read_parquet(...)` into a fresh database file.
Target: (ingest + validate + aggregate) / reference <= 1.5 on an idle machine (issue 25).

    .venv/bin/python tests/benchmarks/bench_ingest.py [--spans 10000000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from tasks.ingest.aggregate import aggregate_hour
from tasks.ingest.stage import discover_files, ingest_hour
from tasks.ingest.validate import validate_hour
from tasks.settings import load_settings
from tasks.synth.generate import day_factor, generate

HOUR = datetime(2026, 1, 1, 10, tzinfo=UTC)
TARGET = 1.5


def reference_seconds(files: list[Path], db: Path) -> float:
    db.unlink(missing_ok=True)  # a kept work folder is reused: start from a fresh file
    started = time.perf_counter()
    con = duckdb.connect(str(db))
    paths = ", ".join(f"'{p}'" for p in files)
    con.execute(f"CREATE TABLE ref AS SELECT * FROM read_parquet([{paths}])")
    con.close()
    return time.perf_counter() - started


def timed(label: str, func, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = func(*args)
    seconds = time.perf_counter() - started
    print(f"  {label:<10} {seconds:7.2f} s")
    return seconds, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spans", type=int, default=10_000_000)
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temp folder)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="rpcwatch-bench-"))
    source = work / "traces"
    print(f"generating one hour of ~{args.spans:,} spans into {source} ...")
    mid_hour = HOUR.timestamp() + 1800  # the generator's daily curve scales each hour's traffic
    summary = generate(HOUR, 1, source, seed=1, spans_per_hour=int(args.spans / float(day_factor(mid_hour))))
    files, _ = discover_files([source], HOUR)
    rows = summary.rows_per_hour[f"{HOUR:%Y-%m-%dT%H:00}"]
    size = sum(f.stat().st_size for f in files) / 2**20
    print(f"  {rows:,} spans in {len(files)} file(s), {size:.0f} MiB, synth {summary.spans_per_second():,.0f} spans/s")

    import great_expectations  # noqa: F401  (import cost ~2.5-5 s is paid once per process, not per hour)

    settings = load_settings(env={}, home=work / "home")
    (work / "home").mkdir(parents=True, exist_ok=True)
    print("reference, before (same process, same files):")
    ref_before, _ = timed("CTAS", reference_seconds, files, work / "reference-1.duckdb")
    print("rpcwatch:")
    t_ingest, report = timed("ingest", ingest_hour, settings, HOUR, [source])
    t_validate, _ = timed("validate", validate_hour, settings, HOUR)
    t_aggregate, _ = timed("aggregate", aggregate_hour, settings, HOUR)
    print("reference, after:")
    ref_after, _ = timed("CTAS", reference_seconds, files, work / "reference-2.duckdb")
    ref = min(ref_before, ref_after)  # the faster reference: the stricter ratio
    total = t_ingest + t_validate + t_aggregate
    ratio = total / ref
    assert report.rows_kept == rows, f"landed {report.rows_kept:,} of {rows:,} rows"
    print(
        f"\ningest+validate+aggregate {total:.2f} s for {rows:,} spans ({rows / total:,.0f} spans/s); "
        f"bare CTAS {ref:.2f} s; ratio {ratio:.2f} (target <= {TARGET}): {'MET' if ratio <= TARGET else 'MISSED'}"
    )
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
