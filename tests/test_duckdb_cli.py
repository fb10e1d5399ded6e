"""Analysts open the published snapshot with the DuckDB CLI from PyPI (`duckdb-cli` 1.5.6, a test
dependency), which reads DuckDB 1.5's storage format at most; the pipeline writes with DuckDB 2.0.
The snapshot is written in the older format (tasks.publish.SNAPSHOT_STORAGE_VERSION)."""

from __future__ import annotations

import csv
import re
import subprocess
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import pytest

from helpers import REPO, add_anomaly, copy_home
from tasks.app.commands.sql import duckdb_cli
from tasks.publish import PUBLISHED, SNAPSHOT_STORAGE_VERSION, publish

LATEST = datetime(2026, 1, 2, 12, 0)  # naive UTC, after every bucket of the trained home


def readme_query(part: str) -> str:
    """The README's example query (in a ```sql block) that holds `part`, verbatim, without its comment."""
    blocks = re.findall(r"^```sql\n(.*?)^```", (REPO / "README.md").read_text(), flags=re.M | re.S)
    for statement in "".join(blocks).split(";"):
        if part in statement:
            return "\n".join(line for line in statement.strip().splitlines() if not line.startswith("--")) + ";"
    raise AssertionError(f"no README query with {part!r}")


@pytest.fixture
def cli() -> Path:
    found = duckdb_cli()
    if found is None:
        pytest.skip("no DuckDB CLI installed: `.venv/bin/pip install duckdb-cli==1.5.6` (pyproject's test extra)")
    return found


@pytest.fixture
def snapshot(trained, tmp_path) -> Path:
    """A snapshot published from a real (trained) warehouse with three irregular points added."""
    settings = copy_home(trained[0], tmp_path)
    for bucket in (LATEST - timedelta(hours=7), LATEST - timedelta(hours=6), LATEST):  # the first is not recent
        add_anomaly(settings, bucket)
    return publish(settings)


def cli_csv(cli: Path, path: Path, sql: str) -> list[dict[str, str]]:
    done = subprocess.run(
        [str(cli), "-readonly", "-csv", str(path), "-c", sql], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"{cli} could not read the snapshot: {done.stderr}"
    return list(csv.DictReader(done.stdout.splitlines()))


def test_the_snapshot_is_written_in_the_pinned_storage_version(settings):
    with duckdb.connect(str(publish(settings)), read_only=True) as con:
        tags = con.execute("SELECT tags FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    assert tags[0]["storage_version"].startswith(SNAPSHOT_STORAGE_VERSION), tags


def test_the_duckdb_cli_runs_the_readme_queries_on_the_snapshot(cli, snapshot):
    recent = cli_csv(cli, snapshot, readme_query("FROM recent_anomalies"))  # the view, as DuckDB 1.5 parses it
    assert sorted((r["bucket_ts"], r["caller"], r["kind"], float(r["score"])) for r in recent) == [
        ("2026-01-02 06:00:00", "svc-a", "traffic_spike", 5.0),
        ("2026-01-02 12:00:00", "svc-a", "traffic_spike", 5.0),
    ], "the last 6 hours of irregular points; 7 hours before the newest is not recent"

    query = readme_query("SELECT pattern_id, n_nodes, round(100 * traffic_share")
    patterns = cli_csv(cli, snapshot, query)
    with duckdb.connect(str(snapshot), read_only=True) as con:
        expected = con.execute(query).fetchall()
    assert expected, "the trained home has critical patterns"
    assert sorted((int(r["pattern_id"]), int(r["n_nodes"])) for r in patterns) == sorted((p, n) for p, n, _ in expected)


def test_the_duckdb_cli_reads_every_published_column(cli, snapshot):
    """Each row as a whole (`SELECT count(x) FROM t AS x`), so every column is read, lists included."""
    names = (*PUBLISHED, "recent_anomalies", "published")
    sql = " UNION ALL ".join(f"SELECT '{name}' AS name, count(x) AS n FROM {name} AS x" for name in names)
    with duckdb.connect(str(snapshot), read_only=True) as con:
        expected = dict(con.execute(sql).fetchall())
    assert expected["patterns"] and expected["pattern_nodes"] and expected["anomalies"] == 3
    assert {r["name"]: int(r["n"]) for r in cli_csv(cli, snapshot, sql)} == expected


def test_the_pinned_cli_opens_the_snapshot_and_not_the_warehouse(cli, snapshot):
    """The README's read path: the warehouse beside the snapshot is in DuckDB 2.0's storage format
    (version 69), which the pinned 1.5 CLI refuses with that reason; the snapshot opens."""
    warehouse = snapshot.with_name("warehouse.duckdb")
    assert warehouse.is_file()
    done = subprocess.run(
        [str(cli), "-readonly", str(warehouse), "-c", "SELECT 1"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "version number 69" in done.stderr and "between 64 and 68" in done.stderr
    assert cli_csv(cli, snapshot, "SELECT count(*) AS n FROM anomalies") == [{"n": "3"}]


def test_the_duckdb_cli_opens_the_snapshot_read_only(cli, settings):
    path = publish(settings)
    done = subprocess.run(
        [str(cli), "-readonly", str(path), "-c", "CREATE TABLE mine AS SELECT 1"], capture_output=True, text=True
    )
    assert done.returncode != 0 and "read-only" in done.stderr


def _exec_argv(settings, monkeypatch) -> list[str]:
    """What `rpcwatch sql` without a QUERY runs: the argv it hands to execv (caught, not exec'd)."""
    import tasks.app.commands.sql as sql_command
    from tasks.app.cli import main

    class Exec(Exception):
        pass

    caught: list[list[str]] = []

    def execv(path, argv):
        caught.append(list(argv))
        raise Exec

    monkeypatch.setattr(sql_command.os, "execv", execv)
    with pytest.raises(Exec):
        main(["sql", "--home", str(settings.home)])
    return caught[0]


def test_the_interactive_cli_reaches_the_snapshot_and_nothing_else(cli, settings, tmp_path, monkeypatch):
    """`rpcwatch sql` without a QUERY opens the CLI; typed in it, each attack is refused."""
    add_anomaly(settings, LATEST)
    publish(settings)
    argv = _exec_argv(settings, monkeypatch)
    user_home = tmp_path / "user"  # the CLI's ~ (extensions would be installed under ~/.duckdb)
    user_home.mkdir()
    env = {"HOME": str(user_home), "PATH": "/usr/bin:/bin"}

    def typed(lines: str) -> subprocess.CompletedProcess:
        return subprocess.run(argv, input=lines, capture_output=True, text=True, timeout=60, env=env)

    done = typed("SELECT caller FROM anomalies;\n")
    assert done.returncode == 0 and "svc-a" in done.stdout, done.stderr
    before = settings.warehouse.read_bytes()
    made = tmp_path / "made"
    attacks = [
        "SELECT * FROM read_csv('/etc/passwd');",
        "SELECT * FROM glob('/*');",
        f"COPY (SELECT 'gone' AS x) TO '{settings.warehouse}' (FORMAT csv);",
        f"COPY (SELECT 1) TO '{made}';",
        f"ATTACH '{settings.warehouse}' AS w;",
        "SET enable_external_access = true;",
        "SET threads = 1;",
        "INSTALL httpfs;",
        "LOAD httpfs;",
        f".sh touch {made}",
        f".output {made}",
        f".once {made}",
        f".open {made}",
        f".log {made}",
        ".read /etc/passwd",
        ".import /etc/passwd x",
        f".safe_mode off\n.sh touch {made}",
    ]
    for attack in attacks:
        done = typed(attack + "\nSELECT 'still-here';\n")
        assert done.returncode != 0 and "still-here" in done.stdout, (attack, done.stdout, done.stderr)
        assert "root:" not in done.stdout and "bin" not in done.stdout, (attack, done.stdout)
        assert not made.exists(), attack
    assert settings.warehouse.read_bytes() == before
    assert not (user_home / ".duckdb").exists(), "nothing installed"
