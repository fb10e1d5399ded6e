"""Every table of a warehouse (the embedded file or the DuckLake lake) dumped to Parquet by a
subprocess of the environment's own DuckDB, and two dumps compared row by row: the proof that a run
on the lake (tests/test_ducklake.py, tests/test_celery.py) holds the embedded single-machine run's
tables."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from helpers import REPO

# every table of the warehouse, without what differs by nature: wall-clock times, durations, MLflow
# run ids, batch ids (uuids)
EXCLUDED = {"recorded_at", "scored_at", "checked_at", "validated_at", "rebuilt_at", "seconds", "run_id", "batch_id"}
DUMP = r"""
import json, sys
import pyarrow.parquet as pq
from tasks.settings import load_settings
from tasks.warehouse import opened

out, excluded = sys.argv[1], set(json.loads(sys.argv[2]))
with opened(load_settings().warehouse, read_only=True) as con:
    tables = [r[0] for r in con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() ORDER BY 1").fetchall()]
    for table in tables:  # names from the catalog, never input
        columns = [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall() if r[0] not in excluded]
        listed = ", ".join(f'"{c}"' for c in columns)
        pq.write_table(con.sql(f"SELECT {listed} FROM {table} ORDER BY ALL").to_arrow_table(), f"{out}/{table}.parquet")
print(json.dumps(tables))
"""


def dump(env: dict[str, str], folder: Path) -> list[str]:
    """Each table of the warehouse that `env` (RPCWATCH_*, PYTHONPATH) names, as `<folder>/<table>.parquet`;
    returns the table names."""
    folder.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", DUMP, str(folder), json.dumps(sorted(EXCLUDED))],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def rows(path: Path) -> list[tuple]:
    return [tuple(row.values()) for row in pq.read_table(path).to_pylist()]


def same(a: object, b: object) -> bool:
    """Equal, doubles within 1e-4 relative: DuckDB 1.4 and 2.0 sum floats in different orders, so a
    series' means differ in their last digits, and a model trained on them in its 6th (seen: 2e-6)."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-9) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_rows(tables: list[str], want: Path, got: Path, what: str) -> None:
    """Every table dumped in `got` holds the rows of its dump in `want` (see `same`)."""
    for table in tables:
        wanted, found = rows(want / f"{table}.parquet"), rows(got / f"{table}.parquet")
        assert len(found) == len(wanted), f"{table}: {len(found)} rows {what}, {len(wanted)} in the embedded run"
        differ = [(g, w) for g, w in zip(found, wanted) if not same(g, w)]
        assert not differ, f"{table}: {len(differ)} rows {what} differ from the embedded run's, e.g. {differ[0]}"
