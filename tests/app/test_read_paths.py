"""Every read path opens DuckDB sandboxed (the file and nothing else); read commands answer while a
run holds the warehouse (the published snapshot, or one line naming the holder, exit 2); a file that
cannot be opened says why (lock, not a DuckDB file, permission); a writer waits, bounded, for a
reader's lock. Real files, real processes holding real DuckDB locks, the real `rpcwatch` command."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import duckdb
import pytest

from helpers import add_anomaly
from tasks.publish import analytics_path, publish
from tasks.warehouse import connect, opened

RPCWATCH = str(Path(sys.executable).with_name("rpcwatch"))
POINT_AT = datetime(2026, 1, 1, 3, 5)  # naive UTC

HOLDER = """
import duckdb, sys, time
con = duckdb.connect(sys.argv[1], read_only=sys.argv[2] == "read")
print("holding", flush=True)
time.sleep(float(sys.argv[3])) if len(sys.argv) > 3 else sys.stdin.readline()
"""


@contextmanager
def holding(path: Path, mode: str = "write") -> Iterator[subprocess.Popen]:
    """Another process with `path` open (`write`: a run's connection; `read`: a reader's), until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        yield holder
    finally:
        holder.communicate("done\n", timeout=30)


def rpcwatch(
    *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RPCWATCH_")}
    return subprocess.run(
        [*prefix, RPCWATCH, *args], capture_output=True, text=True, timeout=120, env={**clean, **(env or {})}
    )


def one_line_error(done: subprocess.CompletedProcess) -> str:
    """The command exited 2 with one line `rpcwatch: error: ...` and no traceback; returns the line."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("rpcwatch: error: "), done.stderr
    return done.stderr


# --- the sandbox, on every read path -----------------------------------------------------------------


def _openers(settings) -> dict[str, object]:
    """Each way a read path opens DuckDB, as a context manager factory."""
    from tasks.app.report import reading
    from tasks.app.view import open_snapshot

    return {
        "report.reading (anomalies, summary, patterns, plot)": lambda: reading(settings),
        "view.open_snapshot (the Airflow view and its pictures)": lambda: open_snapshot(analytics_path(settings)),
        "warehouse.opened read-only (stale, evaluate, alerts, hours)": lambda: opened(
            settings.warehouse, read_only=True
        ),
    }


@pytest.mark.parametrize(
    "which",
    [
        "report.reading (anomalies, summary, patterns, plot)",
        "view.open_snapshot (the Airflow view and its pictures)",
        "warehouse.opened read-only (stale, evaluate, alerts, hours)",
    ],
)
def test_every_read_path_reaches_its_file_and_nothing_else(settings, which):
    add_anomaly(settings, POINT_AT)
    publish(settings)
    with _openers(settings)[which]() as con:
        assert con.execute("SELECT count(*) FROM anomalies").fetchone() == (1,), "the file itself opens"
        shown = con.execute(
            "SELECT current_setting('enable_external_access'), current_setting('lock_configuration'), "
            "current_setting('autoinstall_known_extensions'), current_setting('autoload_known_extensions')"
        ).fetchone()
        assert shown == (False, True, False, False)
        with pytest.raises(duckdb.PermissionException):
            con.execute("SELECT * FROM read_csv('/etc/passwd')")
        with pytest.raises(duckdb.PermissionException):
            con.execute(f"COPY (SELECT 1) TO '{settings.home / 'out.csv'}'")
        with pytest.raises(duckdb.InvalidInputException, match="locked"):
            con.execute("SET enable_external_access = true")
    assert not (settings.home / "out.csv").exists()


# --- read commands while a run holds the warehouse (defect 6) -----------------------------------------


def _read_commands(home: str) -> dict[str, list[str]]:
    return {
        "patterns": ["patterns", "--home", home],
        "stale": ["stale", "--home", home],
        "plot": ["plot", "--home", home, "--pattern", "1", "--node", "svc-a:svc-b:get"],
        "summary": ["summary", "--home", home],
        "anomalies": ["anomalies", "--home", home],
        "sql": ["sql", "--home", home, "SELECT count(*) AS n FROM anomalies"],
    }


def _run_all(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Each command as its own `rpcwatch` process, all at once (they only read)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RPCWATCH_")}
    started = {
        name: subprocess.Popen([RPCWATCH, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean)
        for name, args in commands.items()
    }
    done = {}
    for name, proc in started.items():
        out, err = proc.communicate(timeout=120)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


def test_read_commands_while_a_run_holds_the_warehouse_and_nothing_is_published(settings):
    add_anomaly(settings, POINT_AT)
    with holding(settings.warehouse) as holder:
        results = _run_all(_read_commands(str(settings.home)))
    for name, done in results.items():
        line = one_line_error(done)
        if name == "sql":
            assert "no published snapshot" in line
        else:
            assert str(settings.warehouse) in line and f"PID {holder.pid}" in line, (name, line)


def test_read_commands_while_a_run_holds_the_warehouse_read_the_snapshot(settings):
    add_anomaly(settings, POINT_AT)
    publish(settings)
    with holding(settings.warehouse) as holder:
        results = _run_all(_read_commands(str(settings.home)))
    for name in ("patterns", "summary", "anomalies", "sql"):
        assert results[name].returncode == 0, (name, results[name].stderr)
        assert "Traceback" not in results[name].stderr
    assert "svc-a" in results["anomalies"].stdout and results["sql"].stdout.split()[-1] == "1"
    assert "analytics.duckdb" in results["patterns"].stderr, "says it read the snapshot"
    assert "no champion" in one_line_error(results["plot"]), "plot reads the snapshot: no model there, said in one line"
    stale = one_line_error(results["stale"])  # what the next training would do: the warehouse's own state
    assert str(settings.warehouse) in stale and f"PID {holder.pid}" in stale


# --- why a file cannot be opened (defect 7) ------------------------------------------------------------


def test_a_file_of_random_bytes_is_not_a_duckdb_database(settings):
    settings.warehouse.parent.mkdir(parents=True)
    settings.warehouse.write_bytes(os.urandom(16384))
    for read_only in (True, False):
        with pytest.raises(RuntimeError) as raised:
            connect(settings.warehouse, read_only=read_only)
        text = str(raised.value)
        assert "is not a DuckDB database (corrupt or another file)" in text and str(settings.warehouse) in text
        assert "lock" not in text and len(text.splitlines()) == 1
    line = one_line_error(rpcwatch("summary", "--home", str(settings.home)))
    assert "is not a DuckDB database" in line and "lock" not in line
    line = one_line_error(rpcwatch("aggregate", "--home", str(settings.home), "--hour", "2026-01-01T00:00"))
    assert "is not a DuckDB database" in line and "lock" not in line


def test_a_truncated_warehouse_is_called_corrupt(settings):
    add_anomaly(settings, POINT_AT)
    data = settings.warehouse.read_bytes()
    settings.warehouse.write_bytes(data[: len(data) // 3 + 1000])
    line = one_line_error(rpcwatch("stale", "--home", str(settings.home)))
    assert "is not a DuckDB database (corrupt or another file)" in line


def test_a_folder_in_place_of_the_warehouse_says_so(settings):
    settings.warehouse.mkdir(parents=True)
    with pytest.raises(RuntimeError, match="is a directory"):
        connect(settings.warehouse)


def test_a_lock_held_by_another_process_names_it(settings):
    add_anomaly(settings, POINT_AT)
    with holding(settings.warehouse) as holder:
        with pytest.raises(RuntimeError) as raised:
            connect(settings.warehouse, read_only=True)
        assert f"PID {holder.pid}" in str(raised.value) and "not a DuckDB" not in str(raised.value)
        with pytest.raises(RuntimeError) as raised:
            connect(settings.warehouse, lock_wait_s=0)
        assert f"PID {holder.pid}" in str(raised.value)


def test_permission_denied_says_so(settings):
    """Root reads any file: the command runs without the capabilities that let it (setpriv)."""
    add_anomaly(settings, POINT_AT)
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and no setpriv to drop CAP_DAC_OVERRIDE: root bypasses file modes")
        prefix = (setpriv, "--bounding-set", "-dac_override,-dac_read_search")
    settings.warehouse.chmod(0)
    try:
        for command in (("summary",), ("aggregate", "--hour", "2026-01-01T00:00")):
            line = one_line_error(rpcwatch(*command, "--home", str(settings.home), prefix=prefix))
            assert "permission denied" in line.lower() and str(settings.warehouse) in line, line
            assert "lock" not in line and "not a DuckDB" not in line
    finally:
        settings.warehouse.chmod(0o644)


# --- a writer waits, bounded, for a reader (risk: a reader failed the hourly run) -----------------------


def test_a_writer_waits_for_a_reader_that_lets_go(settings, caplog):
    add_anomaly(settings, POINT_AT)
    reader = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(settings.warehouse), "read", "2"], stdout=subprocess.PIPE, text=True
    )
    assert reader.stdout.readline().strip() == "holding"
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="tasks.warehouse"):
        con = connect(settings.warehouse, lock_wait_s=60)
    waited = time.monotonic() - started
    try:
        assert con.execute("SELECT count(*) FROM anomalies").fetchone() == (1,)
    finally:
        con.close()
        reader.wait(timeout=30)
    assert 0.5 < waited < 30, waited
    assert any(f"PID {reader.pid}" in r.getMessage() and "waiting" in r.getMessage() for r in caplog.records)


def test_a_writer_gives_up_after_its_bound_saying_who_holds_the_lock(settings):
    add_anomaly(settings, POINT_AT)
    with holding(settings.warehouse, "read") as holder:
        started = time.monotonic()
        with pytest.raises(RuntimeError) as raised:
            connect(settings.warehouse, lock_wait_s=1.5)
        waited = time.monotonic() - started
    assert 1.5 <= waited < 10, waited
    text = str(raised.value)
    assert f"PID {holder.pid}" in text and "1.5 s" in text and str(settings.warehouse) in text
    assert len(text.splitlines()) == 1
