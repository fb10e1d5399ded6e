"""The shared warehouse on DuckLake (issue 14): a real PostgreSQL 15 catalog, real DuckLake on DuckDB 1.4.4
(the `.venv/ducklake` overlay that `make setup` builds from pyproject's `ducklake` extra), the real
pipeline stages in subprocesses, a training task and a scoring task writing the lake at once, and
every table as the embedded DuckDB 2.0 file holds it after the same hours run one stage at a time.

Training and scoring of one hour are not concurrent in the pipeline (scoring reads the models that
training records), so the concurrent pair is the scoring of hour 3 (the first hour with models) and
the retraining of hour 4 (`force_retrain`: stale, two training shards, record), as two processes. For
the result to be the embedded run's, scoring must see the champions of hour 3, not hour 4's: the
scoring process says (a file) once its transaction has read them, and the training process records
only then; from there both write (anomalies, forecasts, incidents | models) and commit in either
order. Run alone, the embedded run does score(3) before hour 4's training: the same data flow.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pg
from helpers import REPO
from lake_tables import dump as _dump
from lake_tables import rows as _rows
from lake_tables import same as _same

pytestmark = pytest.mark.slow

OVERLAY = REPO / ".venv" / "ducklake"
HOURS = 5
SETTINGS_ENV = {  # the `trained` fixture's: patterns trained from hour 3 on
    "RPCWATCH_CRITICAL_COVERAGE": "0.5",
    "RPCWATCH_MIN_TRAIN_HOURS": "3",
    "RPCWATCH_TRAIN_SHARDS": "2",
    "RPCWATCH_START": "2026-01-01T00:00",
    "RPCWATCH_TRAIN_MAX_EPOCHS": "3",  # both runs train alike; the models' quality is not under test
}
UPSTREAM = "ingest,validate,aggregate,patterns"
# (hour, stages, force_retrain) before and after the concurrent pair; every process runs the stages
# of its steps in order, each taking the previous one's result (as `rpcwatch run` and the DAG do)
BEFORE = [
    *[(h, UPSTREAM + ",stale,train,record,score", False) for h in range(3)],
    (3, UPSTREAM + ",stale,train,record", False),
    (4, UPSTREAM, False),
]
SCORING = [(3, "score", False)]
TRAINING = [(4, "stale,train,record", True)]
AFTER = [(4, "score,publish", False)]

DRIVER = r"""
import json, os, sys, time
from datetime import timedelta
from pathlib import Path

from tasks import pipeline
from tasks.settings import load_settings

steps, source = json.loads(sys.argv[1]), Path(sys.argv[2])
settings = load_settings()
start = settings.start
signal, wait = os.environ.get("SIGNAL_AFTER_CHAMPIONS"), os.environ.get("WAIT_BEFORE_RECORD")
if signal:  # the scoring process: say when its transaction has read the champions
    import tasks.scoring.score as score_module

    real = score_module.champions

    def champions(con):
        rows = real(con)
        Path(signal).write_text("read")
        return rows

    score_module.champions = champions
for hour_index, names, force in steps:
    run = pipeline.Run(settings, start + timedelta(hours=hour_index), [source],
                       forced=frozenset({"force_retrain"} if force else ()))
    previous = None
    for name in names.split(","):
        stage = pipeline.stage(name)
        if name == "record" and wait:  # the training process: record once scoring has read its champions
            deadline = time.monotonic() + 300
            while not Path(wait).exists():
                assert time.monotonic() < deadline, "the scoring process never read the champions"
                time.sleep(0.05)
        if stage.mapped:
            previous = [pipeline.call(stage, run, item) for item in previous]
        else:
            previous = pipeline.call(stage, run, previous)
print("done", flush=True)
"""


def _missing() -> str | None:
    if why := pg.missing():
        return why
    if not (OVERLAY / "duckdb_ext" / "extensions").is_dir() or not (OVERLAY / "duckdb").is_dir():
        return f"the DuckLake overlay is not built at {OVERLAY} (`make setup` builds it)"
    return None


def _env(home: Path, lake: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RPCWATCH_", "PG"))}
    env.update(SETTINGS_ENV, RPCWATCH_HOME=str(home), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([str(OVERLAY)] if lake else []))
    if lake:
        env.update(lake)
    return env


def _start(steps: list, source: Path, env: dict[str, str], **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, json.dumps(steps), str(source)],
        env={**env, **extra},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], what: str) -> str:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and out.rstrip().endswith("done"), f"{what} failed:\n{out[-4000:]}"
    return out


def _run(steps: list, source: Path, env: dict[str, str], what: str) -> str:
    return _finish(_start(steps, source, env), what)


def test_training_and_scoring_write_the_lake_at_once_and_it_holds_the_embedded_tables(tmp_path):
    if why := _missing():
        pytest.skip(why)
    began = time.perf_counter()
    source = tmp_path / "traces"
    subprocess.run(
        [sys.executable, "-m", "tasks.app.cli", "synth", "--start", "2026-01-01T00:00", "--hours", str(HOURS)]
        + ["--out", str(source), "--seed", "3", "--spans-per-hour", "40000"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )

    embedded = _env(tmp_path / "embedded", None)  # DuckDB 2.0, the file, one stage after another
    _run(BEFORE + SCORING + TRAINING + AFTER, source, embedded, "the embedded run")
    file_tables = _dump(embedded, tmp_path / "file-tables")

    with pg.postgres(prefix="rpcwatch-lake-pg-") as server:
        server.create_database("lake")
        lake_env = server.libpq_env("lake") | {
            "RPCWATCH_WAREHOUSE": "ducklake",
            "RPCWATCH_LAKE_DATA": str(tmp_path / "lake-data"),
        }
        lake = _env(tmp_path / "lake-home", lake_env)
        _run(BEFORE, source, lake, "the lake run's first hours")
        flag = tmp_path / "champions-read"
        scoring = _start(SCORING, source, lake, SIGNAL_AFTER_CHAMPIONS=str(flag))
        training = _start(TRAINING, source, lake, WAIT_BEFORE_RECORD=str(flag))
        _finish(training, "the training process")
        _finish(scoring, "the scoring process")
        _run(AFTER, source, lake, "the lake run's last hour")
        lake_tables = _dump(lake, tmp_path / "lake-tables")
        snapshots = subprocess.run(
            [str(pg.PG_BIN / "psql"), "-h", server.host, "-p", str(server.port), "-U", server.user, "-d", "lake"]
            + ["-Atc", "SELECT count(*) FROM ducklake_snapshot"],
            capture_output=True,
            text=True,
        )

    assert lake_tables == file_tables, "the lake has the embedded warehouse's tables"
    assert int(snapshots.stdout.strip()) > len(BEFORE), "the catalog in PostgreSQL holds the lake's commits"
    assert list((tmp_path / "lake-data").rglob("*.parquet")), "the lake's data is Parquet in RPCWATCH_LAKE_DATA"
    assert not (tmp_path / "lake-home" / "warehouse.duckdb").exists(), "no embedded file in lake mode"
    for table in file_tables:
        want = _rows(tmp_path / "file-tables" / f"{table}.parquet")
        got = _rows(tmp_path / "lake-tables" / f"{table}.parquet")
        assert len(got) == len(want), f"{table}: {len(got)} rows on the lake, {len(want)} in the file"
        differ = [(g, w) for g, w in zip(got, want) if not _same(g, w)]
        assert not differ, f"{table}: {len(differ)} of the lake's rows differ from the file's, e.g. {differ[0]}"
    counts = {t: len(_rows(tmp_path / "file-tables" / f"{t}.parquet")) for t in ("models", "anomalies", "forecasts")}
    assert counts["models"] >= 2 * 2 and counts["forecasts"] > 0, f"both hours trained and scored: {counts}"
    print(f"embedded and lake runs in {time.perf_counter() - began:.0f} s: {counts}")


def test_an_unreachable_lake_catalog_is_one_line_naming_where_it_was_looked_for(tmp_path):
    if not (OVERLAY / "duckdb_ext" / "extensions").is_dir():
        pytest.skip(f"the DuckLake overlay is not built at {OVERLAY} (`make setup` builds it)")
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = _env(tmp_path / "home", {"RPCWATCH_WAREHOUSE": "ducklake", "RPCWATCH_LAKE_DATA": str(tmp_path / "lake")})
    env.update(PGHOST="127.0.0.1", PGPORT=str(port), PGDATABASE="lake", PGUSER="rpcwatch", PGPASSWORD="s3cret")
    done = subprocess.run(
        [sys.executable, "-m", "tasks.app.cli", "summary"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[0].startswith("rpcwatch: error: cannot reach the DuckLake catalog"), lines[0]
    assert f"PGHOST=127.0.0.1 PGPORT={port} PGDATABASE=lake" in lines[0] and "s3cret" not in lines[0]
