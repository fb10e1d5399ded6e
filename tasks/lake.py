"""The shared warehouse on DuckLake (`RPCWATCH_WAREHOUSE=ducklake`): its catalog in PostgreSQL, its data
as Parquet files in `RPCWATCH_LAKE_DATA`, a folder on storage every worker mounts at the same path.

Unlike the embedded file (one writing process at a time), many processes write a lake at once: each
commit is a new snapshot, and two transactions that change the same data (a DELETE of the same
file's rows, the same table or view created twice) make the later commit fail with a transaction
conflict. `retrying` runs such a unit of work again, a few times; other errors pass through.

DuckLake's extensions load offline only on the DuckDB 1.4 line (PyPI's `duckdb-ext-ducklake` and
`duckdb-ext-postgres` packages): a lake worker installs `rpcwatch[ducklake]`, which pins DuckDB 1.4.4.
The embedded file stays on DuckDB 2.0 (files it writes are unreadable by 1.4). DuckLake keeps no
PRIMARY KEY or UNIQUE constraint: the lake's tables are the warehouse's SCHEMA without them (the
pipeline replaces rows by DELETE then INSERT in one transaction, never `INSERT OR REPLACE`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import duckdb

from tasks.settings import LAKE_DATA_PATTERN, Lake

log = logging.getLogger(__name__)
T = TypeVar("T")

INSTALL_HINT = "install `rpcwatch[ducklake]` (DuckDB 1.4.4 with its ducklake and postgres extensions)"
CONFLICT_ATTEMPTS = 5  # a unit of work that keeps conflicting after this many tries fails as it is


def extension_directory() -> Path:
    """Where the `duckdb-ext-*` packages put the DuckDB extensions (the `duckdb_ext` package's folder)."""
    spec = importlib.util.find_spec("duckdb_ext")
    folders = list(spec.submodule_search_locations or []) if spec else []
    found = [Path(f) / "extensions" for f in folders if (Path(f) / "extensions").is_dir()]
    if not found:
        raise RuntimeError(f"RPCWATCH_WAREHOUSE=ducklake: the DuckLake extensions are not installed: {INSTALL_HINT}")
    return found[0]


def _check_duckdb() -> None:
    if not duckdb.__version__.startswith("1.4."):
        raise RuntimeError(
            f"RPCWATCH_WAREHOUSE=ducklake needs DuckDB 1.4 (its DuckLake extensions exist for that line only), "
            f"this is DuckDB {duckdb.__version__}: {INSTALL_HINT}"
        )


def lake_schema(schema: str) -> str:
    """The warehouse's SCHEMA as DuckLake takes it: no PRIMARY KEY (DuckLake keeps no constraints
    but NOT NULL), and the view created only when missing (replacing it on every connect would be a
    catalog write per task, and a conflict between tasks connecting at once)."""
    schema = re.sub(r",\s*PRIMARY KEY \([^)]*\)", "", schema)  # a table's key clause
    schema = schema.replace(" PRIMARY KEY", "")  # a column's
    return schema.replace("CREATE OR REPLACE VIEW", "CREATE VIEW IF NOT EXISTS")


def connect_lake(lake: Lake, schema: str, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """A connection whose default catalog is the lake (`USE lake`); the tables created on a write
    connection. The catalog database comes from libpq's own PG* variables, never from SQL text."""
    _check_duckdb()
    data = str(lake.data)
    # ATTACH binds no parameter on DuckDB 1.4, so the data path is a literal: settings held it to an
    # absolute path of [A-Za-z0-9_./-] (nothing that can end the quoted string); checked again here
    if not LAKE_DATA_PATTERN.fullmatch(data):
        raise ValueError(f"RPCWATCH_LAKE_DATA={data}: must be an absolute path of letters, digits and _ . / - only")
    if not read_only:
        lake.data.mkdir(parents=True, exist_ok=True)
    config: dict[str, str | bool | int | float | list[str]] = {
        "extension_directory": str(extension_directory()),  # not SQL: a connection setting
        "autoinstall_known_extensions": False,  # offline: the packages' extensions or none
    }
    con = duckdb.connect(config=config)
    try:
        con.execute("LOAD ducklake")
        con.execute("LOAD postgres")
        _attach(con, f"DATA_PATH '{data.rstrip('/')}/'" + (", READ_ONLY" if read_only else ""))
        con.execute("USE lake")
        if not read_only:
            retrying(lambda: _create(con, lake_schema(schema)), "creating the lake's tables")
    except BaseException:
        con.close()
        raise
    return con


def catalog_address() -> str:
    """Where libpq looks for the catalog, as messages may show it (never the password)."""
    names = ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER")
    return " ".join(f"{name}={os.environ.get(name, '(default)')}" for name in names)


def _attach(con: duckdb.DuckDBPyConnection, options: str) -> None:
    """ATTACH the lake; a catalog that cannot be reached is one line saying where it was looked for."""
    try:
        con.execute(f"ATTACH 'ducklake:postgres:' AS lake ({options})")
    except duckdb.IOException as err:
        if "connect to postgres" not in str(err).lower():
            raise
        reason = str(err).split("failed:", 1)[-1].strip().splitlines()[0]
        raise RuntimeError(
            f"cannot reach the DuckLake catalog in PostgreSQL ({catalog_address()}): {reason}. "
            "Check the PG* variables and that the server is up"
        ) from None


def _create(con: duckdb.DuckDBPyConnection, schema: str) -> None:
    con.execute("BEGIN")
    try:
        con.execute(schema)
        con.execute("COMMIT")
    except BaseException:
        _rollback(con)
        raise


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    with contextlib.suppress(duckdb.Error):  # a failed commit has already ended the transaction
        con.execute("ROLLBACK")


def is_conflict(err: BaseException) -> bool:
    """A DuckLake commit refused because another transaction changed the same data first."""
    return isinstance(err, duckdb.TransactionException) and "conflict" in str(err).lower()


def retrying(work: Callable[[], T], what: str, attempts: int = CONFLICT_ATTEMPTS) -> T:
    """`work()`, run again (after a short, growing pause) when it fails on a lake transaction conflict;
    any other error, or the last attempt's conflict, is raised. `work` must be a whole unit: it opens
    its transaction(s) itself and may safely run again (every pipeline stage replaces its hour)."""
    for attempt in range(1, attempts + 1):
        try:
            return work()
        except duckdb.Error as err:
            if not is_conflict(err) or attempt == attempts:
                raise
            log.warning("%s: lake transaction conflict (attempt %d of %d), retrying: %s", what, attempt, attempts, err)
            time.sleep(0.2 * attempt)
    raise AssertionError("unreachable")
