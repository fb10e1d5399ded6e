"""`rpcwatch sql`: a QUERY on the published snapshot, read-only, as a table or JSON; without one the
DuckDB CLI on the snapshot; a missing snapshot or CLI is a one-line error."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

import tasks.app.commands.sql as sql_command
from helpers import add_anomaly
from tasks.app.cli import main
from tasks.publish import analytics_path, publish

AT = datetime(2026, 1, 1, 3, 5)  # naive UTC, as the warehouse stores it


@pytest.fixture
def published(settings):
    add_anomaly(settings, AT, caller="svc-\x1b[31mred")  # a name with a terminal escape
    publish(settings)
    return settings


def test_a_query_prints_a_table_and_json(published, capsys):
    home = str(published.home)
    query = "SELECT bucket_ts, caller, kind, score FROM recent_anomalies"
    assert main(["sql", "--home", home, query]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["bucket_ts", "caller", "kind", "score"]
    assert lines[2].split() == ["2026-01-01", "03:05:00", "svc-\\x1b[31mred", "traffic_spike", "5.0"], "escaped"
    assert len(lines) == 3

    assert main(["sql", "--home", home, "--json", query]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"bucket_ts": "2026-01-01 03:05:00", "caller": "svc-\x1b[31mred", "kind": "traffic_spike", "score": 5.0}
    ]


def test_the_snapshot_is_read_only_and_errors_are_one_line(published, capsys):
    home = str(published.home)
    before = analytics_path(published).read_bytes()
    assert main(["sql", "--home", home, "DELETE FROM anomalies"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rpcwatch: error: query failed:") and "read-only" in err
    assert analytics_path(published).read_bytes() == before
    assert main(["sql", "--home", home, "SELECT * FROM calls"]) == 2, "the warehouse's tables are not published"
    assert "calls" in capsys.readouterr().err


def test_without_a_snapshot_it_says_to_run_the_pipeline_first(tmp_path, capsys):
    assert main(["sql", "--home", str(tmp_path / "home"), "SELECT 1"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "run the pipeline first" in err


def test_without_a_query_it_opens_the_duckdb_cli_read_only(published, monkeypatch, capsys):
    execs: list[tuple[Path, list[str]]] = []

    class Exec(Exception):
        pass

    def execv(path, argv):
        execs.append((path, argv))
        raise Exec

    monkeypatch.setattr(sql_command.os, "execv", execv)
    monkeypatch.setattr(sql_command, "duckdb_cli", lambda: Path("/opt/bin/duckdb"))
    with pytest.raises(Exec):
        main(["sql", "--home", str(published.home)])
    snapshot = str(analytics_path(published))
    assert execs == [(Path("/opt/bin/duckdb"), sql_command.cli_argv(Path("/opt/bin/duckdb"), Path(snapshot)))]
    assert execs[0][1][:3] == ["/opt/bin/duckdb", "-readonly", "-no-init"] and execs[0][1][-1] == snapshot

    monkeypatch.setattr(sql_command, "duckdb_cli", lambda: None)
    assert main(["sql", "--home", str(published.home)]) == 2
    assert "pip install duckdb-cli==1.5.6" in capsys.readouterr().err
    assert len(execs) == 1


# --- analysts get the snapshot and nothing else (issue 22) ------------------------------------------


def _refused(home: str, query: str, capsys) -> str:
    """`rpcwatch sql QUERY` exits 2 with one line; returns that line."""
    assert main(["sql", "--home", home, query]) == 2, f"ran: {query}"
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("rpcwatch: error: ") and len(out.err.splitlines()) == 1, out.err
    return out.err


def test_copy_over_the_warehouse_is_refused_and_the_warehouse_is_unchanged(published, capsys):
    before = published.warehouse.read_bytes()
    query = f"COPY (SELECT 'gone' AS x) TO '{published.warehouse}' (FORMAT csv)"
    assert "not COPY" in _refused(str(published.home), query, capsys)
    assert published.warehouse.read_bytes() == before


@pytest.mark.parametrize(
    "query",
    [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM glob('/home/*')",
        "SELECT * FROM glob('/*')",
        "SELECT * FROM 'https://example.com/x.parquet'",
    ],
)
def test_files_and_urls_of_the_machine_are_out_of_reach(published, capsys, query):
    assert "disabled" in _refused(str(published.home), query, capsys)


@pytest.mark.parametrize(
    "query",
    [
        "SELECT 1; SELECT 2",
        "SELECT 1; COPY (SELECT 1) TO '/tmp/x.csv'",
        "",
        "   ;  ",
        "-- only a comment",
    ],
)
def test_exactly_one_statement(published, capsys, query):
    assert "one SQL statement" in _refused(str(published.home), query, capsys)


@pytest.mark.parametrize(
    "query",
    [
        "SET enable_external_access = true",
        "SET threads = 1",
        "RESET threads",
        "PRAGMA threads = 1",
        "SET lock_configuration = false",
        "SET allowed_directories = ['/']",
        "LOAD httpfs",
        "INSTALL httpfs",
    ],
)
def test_configuration_and_extensions_cannot_change(published, capsys, query):
    _refused(str(published.home), query, capsys)


def test_attach_and_export_write_or_read_nothing(published, tmp_path, capsys):
    other = tmp_path / "other.duckdb"
    home = str(published.home)
    for query in (
        f"ATTACH '{other}' AS other",
        f"ATTACH '{published.warehouse}' AS w",
        f"EXPORT DATABASE '{tmp_path / 'x'}'",
    ):
        _refused(home, query, capsys)
    assert not other.exists() and not (tmp_path / "x").exists()


def test_queries_still_answer(published, capsys):
    home = str(published.home)
    for query in (
        "DESCRIBE anomalies",
        "SHOW TABLES",
        "PRAGMA show_tables",
        "EXPLAIN SELECT * FROM incidents",
        "WITH a AS (SELECT 1 AS x) SELECT x FROM a",
        "SELECT count(*) FROM recent_anomalies;",
    ):
        assert main(["sql", "--home", home, query]) == 0, query
        assert capsys.readouterr().err == "", query


def test_install_attempts_no_download(published, tmp_path):
    """`INSTALL ... FROM` a repository on this machine: the repository must see no request at all."""
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    asked: list[str] = []

    class Repository(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            asked.append(self.path)
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Repository)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    home = tmp_path / "user-home"  # DuckDB installs extensions under ~/.duckdb
    home.mkdir()
    try:
        query = f"INSTALL httpfs FROM 'http://127.0.0.1:{server.server_address[1]}'"
        done = subprocess.run(
            [str(Path(sys.executable).with_name("rpcwatch")), "sql", "--home", str(published.home), query],
            capture_output=True,
            text=True,
            timeout=60,
            env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
        )
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 2 and done.stderr.startswith("rpcwatch: error: "), done.stderr
    assert asked == [], "a download was attempted"
    assert not (home / ".duckdb").exists()
