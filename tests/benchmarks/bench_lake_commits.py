"""DuckLake commit rate: N writer processes committing one hour's `rpc_series` rows each, at once, to one lake.

    .venv/bin/python tests/benchmarks/bench_lake_commits.py [--writers 8] [--commits 25] [--rpcs 120]

Starts a throwaway PostgreSQL 15 (tests/pg.py) as the lake's catalog, then runs two phases, each on a
fresh lake (its own catalog database and data folder, so the second does not start with the first's
snapshots): 1 writer (the reference), then `--writers` writers at once. Every writer is a process of
its own on DuckDB 1.4.4 (the `.venv/ducklake` overlay), opens the lake through `tasks.warehouse.connect`
(`tasks.lake.connect_lake`: the warehouse's tables; one after another, as two processes creating a
new lake's catalog at once fail), commits one untimed hour, waits until all are ready, and commits
`--commits` transactions as the aggregate stage writes an hour (`tasks.ingest.aggregate`): BEGIN,
DELETE the hour's rows, INSERT the hour's `--rpcs` x 60 one-minute rows, COMMIT, inside
`tasks.lake.retrying` (a conflicting commit is run again). Every writer writes hours of its own into
the same table: the worst case for a lake whose stages write different tables.

Prints, per phase, commits/s overall (all commits / wall time from the first start to the last end)
and per writer, the conflicts that `retrying` saw and the commits that failed, the p50/p99 latency of
a whole unit (BEGIN .. COMMIT, retries included) and of the COMMIT statement alone, and ends with
`lake_commits writers <N> commits_per_s <x> reference_commits_per_s <y> conflicts <c> failed <f>`.
DuckLake itself also retries a commit whose snapshot id another writer took first
(`ducklake_max_retry_count` 10, `ducklake_retry_wait_ms` 100, backoff 1.5): those retries are not
errors and show only as latency.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a script: the tests' helpers are not on the path

import pg  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OVERLAY = REPO / ".venv" / "ducklake"
FIRST_HOUR = datetime(2026, 1, 1)
BUCKETS = 60  # one-minute buckets in an hour, as `rpc_series` holds them by default
READY, GO = "ready", "go"

# one hour of rpc_series: `rpcs` RPCs x 60 minutes; the values are arbitrary but vary, as real ones do
INSERT_HOUR = f"""
INSERT INTO rpc_series (bucket_ts, caller, callee, interface, rpc_type, calls, errors, rt_mean, rt_p50,
                        rt_p95, bucket_seconds)
SELECT CAST($hour AS TIMESTAMP) + to_minutes(m.range), 'svc-' || (r.range % 40), 'dep-' || r.range,
       'op' || (r.range % 7), 'rpc', 100 + (r.range * 7 + m.range) % 50, (r.range + m.range) % 3,
       10.0 + r.range % 13, 8.0 + r.range % 11, 30.0 + r.range % 17, 60
FROM range($rpcs) r, range({BUCKETS}) m
"""
DELETE_HOUR = "DELETE FROM rpc_series WHERE bucket_ts >= $hour AND bucket_ts < $end"


@dataclass(frozen=True)
class Phase:
    writers: int
    wall_s: float
    results: list[dict]

    @property
    def commits(self) -> int:
        return sum(len(r["unit_s"]) for r in self.results)

    @property
    def commits_per_s(self) -> float:
        return self.commits / self.wall_s

    def total(self, key: str) -> int:
        return sum(int(r[key]) for r in self.results)

    def percentile(self, key: str, q: float) -> float:
        values = sorted(v for r in self.results for v in r[key])
        return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


# --- a writer process (DuckDB 1.4.4) --------------------------------------------------------------


def writer(index: int, commits: int, rpcs: int, data: Path, go: Path) -> None:
    """Connect, commit one untimed hour, say ready, wait for the go file, commit `commits` hours;
    print the timings as JSON."""
    import duckdb

    from tasks.lake import retrying
    from tasks.settings import Lake
    from tasks.warehouse import connect

    con = connect(Lake(data))
    unit_s: list[float] = []
    commit_s: list[float] = []
    attempts = 0

    def write_hour(hour: datetime) -> None:
        nonlocal attempts
        attempts += 1
        con.execute("BEGIN")
        try:
            con.execute(DELETE_HOUR, {"hour": hour, "end": hour + timedelta(hours=1)})
            con.execute(INSERT_HOUR, {"hour": hour, "rpcs": rpcs})
            began = time.perf_counter()
            con.execute("COMMIT")
            commit_s.append(time.perf_counter() - began)
        except BaseException:
            with contextlib.suppress(duckdb.Error):  # a failed commit has already ended the transaction
                con.execute("ROLLBACK")
            raise

    # one untimed hour first (before FIRST_HOUR, the writer's own): the first write's one-off costs
    retrying(lambda: write_hour(FIRST_HOUR - timedelta(hours=index + 1)), "warm-up")
    commit_s.clear()
    attempts = 0
    print(READY, flush=True)
    while not go.exists():
        time.sleep(0.005)
    failed: list[str] = []
    started = time.time()
    for k in range(commits):
        hour = FIRST_HOUR + timedelta(hours=index * commits + k)  # hours of this writer's own
        began = time.perf_counter()
        try:
            retrying(lambda hour=hour: write_hour(hour), f"writer {index} hour {hour:%m-%d %H}")
        except duckdb.Error as err:
            failed.append(f"{type(err).__name__}: {str(err).splitlines()[0][:120]}")
            continue
        unit_s.append(time.perf_counter() - began)
    ended = time.time()
    con.close()
    done = len(unit_s)
    print(
        json.dumps(
            {
                "writer": index,
                "started": started,
                "ended": ended,
                "unit_s": unit_s,
                "commit_s": commit_s,
                "conflicts": attempts - done - len(failed),  # every attempt that did not end its unit
                "failed": len(failed),
                "errors": failed[:3],
            }
        ),
        flush=True,
    )


# --- the driver -----------------------------------------------------------------------------------


def run_phase(server: pg.Server, name: str, writers: int, commits: int, rpcs: int, work: Path) -> Phase:
    """`writers` processes on a fresh lake (catalog database `name`, data under work/name)."""
    server.create_database(name)
    data, go = work / name / "data", work / name / GO
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RPCWATCH_", "PG"))}
    env |= server.libpq_env(name)
    env |= {"PYTHONPATH": os.pathsep.join([str(REPO), str(OVERLAY)]), "RPCWATCH_HOME": str(work / name / "home")}
    args = [str(commits), str(rpcs), str(data), str(go)]
    procs: list[subprocess.Popen[str]] = []
    try:
        # started one after another, each once the previous has connected: two processes attaching a
        # new lake at once both try to create its catalog tables in PostgreSQL, and one fails
        for i in range(writers):
            proc = subprocess.Popen(
                [sys.executable, __file__, "--writer", str(i), *args],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            procs.append(proc)
            line = proc.stdout.readline().strip() if proc.stdout else ""
            if line != READY:
                proc.wait(timeout=60)
                why = proc.stderr.read()[-3000:] if proc.stderr else ""
                raise RuntimeError(f"a writer failed to connect: {line} {why}")
        go.touch()  # all connected and warm: they commit at once
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=1800)
            if proc.returncode:
                raise RuntimeError(f"a writer failed (exit {proc.returncode}): {err[-3000:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:  # none left waiting for a go file that never comes
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = max(r["ended"] for r in results) - min(r["started"] for r in results)
    return Phase(writers, wall, results)


def report(phase: Phase) -> None:
    ms = 1000.0
    print(
        f"  {phase.writers} writer(s): {phase.commits} commits in {phase.wall_s:.1f} s = "
        f"{phase.commits_per_s:.1f} commits/s; conflicts retried {phase.total('conflicts')}, "
        f"failed {phase.total('failed')}"
    )
    print(
        f"    unit (BEGIN..COMMIT, retries in) p50 {phase.percentile('unit_s', 0.5) * ms:.0f} ms, "
        f"p99 {phase.percentile('unit_s', 0.99) * ms:.0f} ms; COMMIT alone p50 "
        f"{phase.percentile('commit_s', 0.5) * ms:.0f} ms, p99 {phase.percentile('commit_s', 0.99) * ms:.0f} ms"
    )
    rates = [len(r["unit_s"]) / (r["ended"] - r["started"]) for r in phase.results]
    print(
        "    per writer commits/s: "
        + ", ".join(f"{x:.2f}" for x in rates)
        + f" (median {statistics.median(rates):.2f})"
    )
    for r in phase.results:
        for error in r["errors"]:
            print(f"    writer {r['writer']} failed: {error}")


def snapshot_count(server: pg.Server, name: str) -> int:
    done = subprocess.run(
        [str(pg.PG_BIN / "psql"), "-h", server.host, "-p", str(server.port), "-U", server.user, "-d", name]
        + ["-Atc", "SELECT count(*) FROM ducklake_snapshot"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.strip())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--commits", type=int, default=25, help="transactions each writer commits")
    parser.add_argument("--rpcs", type=int, default=120, help="RPCs in an hour (the demo has ~120): rows = rpcs x 60")
    parser.add_argument("--writer", type=int, help=argparse.SUPPRESS)  # internal: run as writer N
    parser.add_argument("writer_args", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer is not None:
        commits, rpcs, data, go = args.writer_args
        writer(args.writer, int(commits), int(rpcs), Path(data), Path(go))
        return 0

    if why := pg.missing():
        raise SystemExit(f"cannot run: {why}")
    if not (OVERLAY / "duckdb_ext" / "extensions").is_dir():
        raise SystemExit(f"cannot run: the DuckLake overlay is not built at {OVERLAY} (`make setup` builds it)")
    print(
        f"DuckLake commits: {args.commits} per writer, {args.rpcs * BUCKETS:,} rpc_series rows each "
        f"(one hour of {args.rpcs} RPCs); catalog PostgreSQL 15 on loopback; load {os.getloadavg()[0]:.2f}"
    )
    work = Path(tempfile.mkdtemp(prefix="bench-lake-"))
    try:
        with pg.postgres(prefix="bench-lake-pg-") as server:
            reference = run_phase(server, "lake1", 1, args.commits, args.rpcs, work)
            report(reference)
            many = run_phase(server, f"lake{args.writers}", args.writers, args.commits, args.rpcs, work)
            report(many)
            snapshots = snapshot_count(server, f"lake{args.writers}")
        print(f"  catalog snapshots after the {args.writers}-writer phase: {snapshots}")
        files = len(list((work / f"lake{args.writers}" / "data").rglob("*.parquet")))
        print(f"  Parquet files written by the {args.writers}-writer phase: {files}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nlake_commits writers {args.writers} commits_per_s {many.commits_per_s:.2f} "
        f"reference_commits_per_s {reference.commits_per_s:.2f} conflicts {many.total('conflicts')} "
        f"failed {many.total('failed')} p50_ms {many.percentile('unit_s', 0.5) * 1000:.0f} "
        f"p99_ms {many.percentile('unit_s', 0.99) * 1000:.0f}"
    )
    return 0 if many.total("failed") == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
