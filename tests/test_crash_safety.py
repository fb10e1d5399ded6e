"""`kill -9` a `rpcwatch run` at each stage boundary; the rerun heals.

A clean home runs four synthetic hours in one go. A second home runs the same hours one by one,
and each step is first killed with SIGKILL at a named crash point (tasks/failpoints.py): after
ingest, after patterns, after MLflow registered and aliased a model but before DuckDB recorded it,
after scoring, and inside publish (snapshot written, not yet swapped in). Then the step is rerun.
Every warehouse table must end identical (content hashes, wall-clock columns left out) to the
clean run's, the registry must hold the same versions, no staging file may be left, and every
critical pattern must be scored.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import duckdb
import pytest

from helpers import START
from tasks.synth.generate import generate

pytestmark = pytest.mark.slow

HOURS = 4
# columns that say when or how long something ran, or which MLflow run id it got: they differ
# between any two runs by nature; everything else must be equal
VOLATILE = {"checked_at", "validated_at", "rebuilt_at", "recorded_at", "scored_at", "seconds", "run_id"}
# the models' quality is not under test, so a few epochs each (both homes train alike)
ENV = {"RPCWATCH_CRITICAL_COVERAGE": "0.5", "RPCWATCH_MIN_TRAIN_HOURS": "3", "RPCWATCH_TRAIN_MAX_EPOCHS": "3"}
STEPS = [(0, "ingest"), (1, "patterns"), (2, "registered"), (3, "score"), (3, "publish")]


def _rpcwatch(home: Path, source: Path, hour: int | None = None, crash_at: str | None = None) -> int:
    """`rpcwatch run`: a process of its own when it is to be killed; otherwise the same command in
    this process (`tasks.app.cli.main`, the environment as the process would get it), which spares a
    run the 10-15 s that importing torch, MLflow and Great Expectations costs on 2 cores."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPCWATCH_")} | ENV
    env["RPCWATCH_HOME"] = str(home)
    args = ["run", "--source", str(source)]
    if hour is not None:
        args += ["--hour", (START + timedelta(hours=hour)).strftime("%Y-%m-%dT%H:%M")]
    if not crash_at:
        from tasks.app.cli import main

        with pytest.MonkeyPatch.context() as patch:
            for name in [k for k in os.environ if k.startswith("RPCWATCH_")]:
                patch.delenv(name)
            for name, value in env.items():
                patch.setenv(name, value)
            return main(args)
    env["RPCWATCH_CRASH_AT"] = crash_at
    done = subprocess.run(
        [str(Path(sys.executable).with_name("rpcwatch")), *args], env=env, capture_output=True, text=True, timeout=900
    )
    if done.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"rpcwatch run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.returncode


def _table_hashes(warehouse: Path) -> dict[str, tuple[int, int]]:
    with duckdb.connect(str(warehouse), read_only=True) as con:
        tables = [
            r[0]
            for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE NOT temporary ORDER BY 1").fetchall()
        ]
        out = {}
        for table in tables:
            columns = [
                r[0]
                for r in con.execute(
                    "SELECT column_name FROM duckdb_columns() WHERE table_name = ? ORDER BY column_index", [table]
                ).fetchall()
            ]
            kept = ", ".join(f'"{c}"' for c in columns if c not in VOLATILE)  # catalog names, not input
            count, digest = con.execute(f"SELECT count(*), coalesce(sum(hash(row({kept}))), 0) FROM {table}").fetchone()
            out[table] = (count, int(digest))
        return out


def _registry(home: Path) -> dict[str, list[int]]:
    import sqlite3

    with sqlite3.connect(home / "mlflow.db") as db:
        rows = db.execute("SELECT name, version FROM model_versions ORDER BY name, version").fetchall()
    out: dict[str, list[int]] = {}
    for name, version in rows:
        out.setdefault(name, []).append(int(version))
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("crash-traces")
    generate(START, HOURS, out, seed=7, spans_per_hour=30_000)
    return out


def test_kill_9_at_every_stage_boundary_then_rerun_equals_a_clean_run(source, tmp_path):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    assert _rpcwatch(clean, source) == 0
    done = -1
    for hour, point in STEPS:
        for h in range(done + 1, hour):
            assert _rpcwatch(crashed, source, h) == 0
        assert _rpcwatch(crashed, source, hour, crash_at=point) == -signal.SIGKILL, f"no crash at {point}"
        assert _rpcwatch(crashed, source, hour) == 0, f"rerun after the crash at {point}"
        done = hour

    want, got = _table_hashes(clean / "warehouse.duckdb"), _table_hashes(crashed / "warehouse.duckdb")
    assert set(got) == set(want)
    differ = {t: (want[t], got[t]) for t in want if want[t] != got[t]}
    assert not differ, f"tables differ from the clean run (rows, hash): {differ}"
    assert _registry(crashed) == _registry(clean), "a crash must not make the registry file extra versions"
    assert not list(crashed.glob(".analytics-*")), "publish left staging files behind"
    assert (crashed / "analytics.duckdb").exists()
    with duckdb.connect(str(crashed / "warehouse.duckdb"), read_only=True) as con:
        critical = {
            r[0] for r in con.execute("SELECT pattern_id FROM patterns WHERE status = 'active' AND critical").fetchall()
        }
        scored = {
            r[0]
            for r in con.execute(
                "SELECT pattern_id FROM score_runs WHERE status = 'scored' AND hour = ?",
                [(START + timedelta(hours=HOURS - 1)).replace(tzinfo=None)],
            ).fetchall()
        }
    assert critical and scored == critical, "every critical pattern is scored in the last hour"
