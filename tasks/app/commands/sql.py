"""`rpcwatch sql`: SQL on the published snapshot `<home>/analytics.duckdb`, read-only. With a QUERY,
runs it in this process's DuckDB and prints a table (or JSON); without one, opens the DuckDB CLI on
the snapshot. Never the warehouse: the snapshot can be read while a run writes, and it is written in
a storage format the `duckdb-cli` on PyPI reads (tasks.publish).

Analysts get the snapshot and nothing else: a QUERY is exactly one statement that reads (SELECT,
DESCRIBE, SHOW, EXPLAIN, PRAGMA, CALL) on a sandboxed connection (tasks.warehouse.READER_CONFIG: no
other file, URL or database, no extension, no setting changed); the CLI is opened read-only, without
an init file, with extensions neither installed nor loaded and then in its safe mode (the same
sandbox, and no dot command that writes a file, opens another or runs a shell)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tasks.app.commands.common import AddParser, add_common_options, settings_from

if TYPE_CHECKING:
    import duckdb

INSTALL_CLI = ".venv/bin/pip install duckdb-cli==1.5.6"  # the version tasks.publish writes for (a test dependency)
# Statement kinds a QUERY may be (DESCRIBE, SHOW, SUMMARIZE parse as SELECT); everything else (COPY,
# ATTACH, INSTALL, LOAD, SET, EXPORT, CREATE, ...) is refused before it runs, the sandbox besides.
READING_STATEMENTS = ("SELECT", "EXPLAIN", "PRAGMA", "CALL")
# Run by the CLI before the analyst's first line, in order; any failure ends the CLI (fails closed).
# `.safe_mode` turns off external access, locks the configuration and the file-touching dot commands.
CLI_LOCKDOWN = ("SET autoinstall_known_extensions = false; SET autoload_known_extensions = false", ".safe_mode")


def duckdb_cli() -> Path | None:
    """The DuckDB CLI: the one installed next to this Python (the `duckdb-cli` package), else on PATH."""
    beside = Path(sys.executable).with_name("duckdb")
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("duckdb")
    return Path(found) if found else None


def snapshot_path(args: argparse.Namespace) -> Path:
    """The published snapshot, or a one-line error: it exists once a run has published."""
    from tasks.publish import analytics_path

    path = analytics_path(settings_from(args))
    if not path.is_file():
        raise FileNotFoundError(
            f"no published snapshot at {path}: run the pipeline first (`rpcwatch run`, the DAG or `rpcwatch demo`)"
        )
    return path


def one_statement(query: str) -> duckdb.Statement:
    """The single reading statement `query` holds (a duckdb Statement), or a ValueError saying why not."""
    import duckdb

    from tasks.warehouse import first_line

    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as err:
        raise ValueError(f"query failed: {first_line(err)}") from err
    if len(statements) != 1:
        raise ValueError(f"query failed: give exactly one SQL statement (got {len(statements)})")
    kind = statements[0].type.name
    if kind not in READING_STATEMENTS:
        allowed = ", ".join(READING_STATEMENTS)
        raise ValueError(f"query failed: the snapshot is read-only and only queries run here ({allowed}), not {kind}")
    return statements[0]


def run_query(path: Path, query: str) -> tuple[list[str], list[tuple]]:
    """(column names, rows) of `query`, one reading statement, on the snapshot opened sandboxed
    (tasks.warehouse.open_sandboxed_reader); no rows for a statement that returns none. A DuckDB error
    (syntax, unknown table, a write, a file outside the snapshot) is a ValueError, one line."""
    import duckdb

    from tasks.warehouse import first_line, open_sandboxed_reader

    statement = one_statement(query)
    try:
        with open_sandboxed_reader(path) as con:
            con.execute(statement.query)
            if con.description is None:
                return [], []
            return [d[0] for d in con.description], con.fetchall()
    except duckdb.Error as err:
        raise ValueError(f"query failed: {first_line(err)}") from err


def cli_argv(cli: Path, path: Path) -> list[str]:
    """The DuckDB CLI on the snapshot, read-only and locked down (`CLI_LOCKDOWN`, no init file)."""
    lockdown = [arg for command in CLI_LOCKDOWN for arg in ("-cmd", command)]
    return [str(cli), "-readonly", "-no-init", *lockdown, str(path)]


def cmd_sql(args: argparse.Namespace) -> int:
    path = snapshot_path(args)
    if args.query is None:
        if args.json:
            raise ValueError("--json goes with a QUERY")
        cli = duckdb_cli()
        if cli is None:
            raise FileNotFoundError(
                f"no DuckDB CLI installed: `{INSTALL_CLI}`, or pass a QUERY: rpcwatch sql 'SELECT ...'"
            )
        print(f"(read-only: {path}, published by the last run; .quit to leave)", file=sys.stderr)
        sys.stderr.flush()
        os.execv(cli, cli_argv(cli, path))
    headers, rows = run_query(path, args.query)
    if args.json:
        print(json.dumps([dict(zip(headers, r)) for r in rows], default=str, indent=1))
    elif headers:
        from tasks.app.report import table

        print(table(headers, rows))
    return 0


def register(add_parser: AddParser) -> None:
    """sql."""
    p = add_parser(
        "sql",
        help="SQL on the published snapshot analytics.duckdb, read-only: a QUERY's result as a table, "
        "or without one the DuckDB CLI",
    )
    add_common_options(p, hour=False)
    p.add_argument("query", nargs="?", help='e.g. "SELECT * FROM incidents ORDER BY peak_score DESC"')
    p.add_argument("--json", action="store_true", help="with a QUERY: its rows as JSON for scripts")
    p.set_defaults(func=cmd_sql)
