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
    assert execs == [(Path("/opt/bin/duckdb"), ["/opt/bin/duckdb", "-readonly", str(analytics_path(published))])]

    monkeypatch.setattr(sql_command, "duckdb_cli", lambda: None)
    assert main(["sql", "--home", str(published.home)]) == 2
    assert "pip install duckdb-cli==1.5.6" in capsys.readouterr().err
    assert len(execs) == 1
