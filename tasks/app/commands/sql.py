"""`rpcwatch sql`: SQL on the published snapshot `<home>/analytics.duckdb`, read-only. With a QUERY,
runs it in this process's DuckDB and prints a table (or JSON); without one, opens the DuckDB CLI on
the snapshot (`-readonly`). Never the warehouse: the snapshot can be read while a run writes, and
it is written in a storage format the `duckdb-cli` on PyPI reads (tasks.publish)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from tasks.app.commands.common import AddParser, add_common_options, settings_from

INSTALL_CLI = ".venv/bin/pip install duckdb-cli==1.5.6"  # the version tasks.publish writes for (a test dependency)


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


def run_query(path: Path, query: str) -> tuple[list[str], list[tuple]]:
    """(column names, rows) of `query` on the snapshot opened read-only; no rows for a statement that
    returns none. A DuckDB error (syntax, unknown table, a write) is a ValueError, one message."""
    import duckdb

    try:
        with duckdb.connect(str(path), read_only=True) as con:
            con.execute(query)
            if con.description is None:
                return [], []
            return [d[0] for d in con.description], con.fetchall()
    except duckdb.Error as err:
        raise ValueError(f"query failed: {err}") from err


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
        os.execv(cli, [str(cli), "-readonly", str(path)])
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
