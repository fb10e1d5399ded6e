"""Publish the user-facing tables to a separate DuckDB file that analysts read.

DuckDB allows one writing process per file, so an analyst's open shell on the warehouse would block
the next hourly run. Instead, after each run the tables people query are copied into a new file
that then replaces `<home>/analytics.duckdb` atomically (`os.replace`): an open reader keeps the
file it opened (POSIX semantics) and never blocks or breaks a run; the next `connect` sees the new
snapshot. Readers open it read-only.

A staging file is removed when its publish fails, and by the next publish when its process died
(kill -9) before the swap: publish holds the warehouse's write lock, so no other publish can be
writing one.

The snapshot is written in an older storage format than the warehouse (`SNAPSHOT_STORAGE_VERSION`):
analysts open it with the DuckDB CLI, and the CLI on PyPI (`duckdb-cli` 1.5.6) reads files up to
DuckDB 1.5's format only, while this DuckDB (2.0) writes its own by default. Pinning the snapshot's
format keeps the warehouse and the pipeline on DuckDB 2.0 (no downgrade); every published column
type (lists, timestamps, unsigned integers) and the view exist in that format.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from tasks.settings import Settings
from tasks.warehouse import RECENT_ANOMALIES_SQL, opened

PUBLISHED = (
    "anomalies",
    "forecasts",
    "incidents",
    "incident_rpcs",
    "incident_actions",
    "silences",
    "alerts_sent",
    "patterns",
    "pattern_nodes",
    "pattern_edges",
    "pattern_history",
    "pattern_series",
    "models",
    "score_runs",
    "reconstruction",
    "rpc_series",
    "validation_runs",
    "ingest_log",
    "clustering_runs",
)
# The snapshot's on-disk format (its connection's storage_compatibility_version): DuckDB 2.0 writes
# storage version 69 by default, which DuckDB 1.5 and the `duckdb-cli` 1.5.x on PyPI refuse ("can only
# read versions between 64 and 68"); "v1.5.0" writes 68. Raise it once the CLIs people use read newer
# files. A run on the DuckDB 1.4 line (the DuckLake warehouse, tasks.lake) writes its own older
# default, which every reader above opens.
SNAPSHOT_STORAGE_VERSION = "v1.5.0"
STAGING_GLOB = ".analytics-*"  # a staging file and its DuckDB write-ahead log (.wal)


def analytics_path(settings: Settings) -> Path:
    return settings.home / "analytics.duckdb"


def _remove_staging(folder: Path) -> None:
    """Remove every staging file (and WAL) in `folder`: call only while holding the warehouse lock."""
    for path in folder.glob(STAGING_GLOB):
        path.unlink(missing_ok=True)


def snapshot_config() -> dict[str, str | bool | int | float | list[str]]:
    """The staging file's connection config: its storage format pinned where this DuckDB writes a newer
    one by default (DuckDB 1.4, the DuckLake line, writes an older one already and knows no "v1.5.0")."""
    major_minor = tuple(int(part) for part in duckdb.__version__.split(".")[:2])
    return {"storage_compatibility_version": SNAPSHOT_STORAGE_VERSION} if major_minor >= (1, 5) else {}


def _write_snapshot(con: duckdb.DuckDBPyConnection, staging: Path, now: datetime) -> None:
    """Copy the published tables and the view into a new DuckDB file at `staging`.

    The file is its own connection (its path is never SQL text: DuckDB 1.4 cannot bind ATTACH's path),
    fed each table as a stream of Arrow batches, so the warehouse may be the embedded file or a lake."""
    with duckdb.connect(str(staging), config=snapshot_config()) as snapshot:
        for table in PUBLISHED:  # names from the constant above, never from input
            relation = con.sql(f"SELECT * FROM {table}")
            # DuckDB 2.0 names it to_arrow_reader (fetch_arrow_reader deprecated), 1.4 only fetch_arrow_reader
            rows = relation.to_arrow_reader() if hasattr(relation, "to_arrow_reader") else relation.fetch_arrow_reader()
            snapshot.register("published_rows", rows)
            snapshot.execute(f"CREATE TABLE {table} AS SELECT * FROM published_rows")
            snapshot.unregister("published_rows")
        snapshot.execute("CREATE VIEW recent_anomalies AS " + RECENT_ANOMALIES_SQL)
        snapshot.execute("CREATE TABLE published AS SELECT ?::TIMESTAMP AS published_at", [now.replace(tzinfo=None)])


def publish(settings: Settings) -> Path:
    """Write a fresh snapshot file and swap it in; returns the published path."""
    from tasks.failpoints import crash_point

    target = analytics_path(settings)
    now = datetime.now(UTC)
    staging = target.with_name(f".analytics-{now:%Y%m%dT%H%M%S%f}.duckdb")
    with opened(settings.warehouse) as con:
        _remove_staging(target.parent)  # left by a publish killed before its swap
        try:
            _write_snapshot(con, staging, now)
            crash_point("publish")  # crash-safety tests: snapshot written, not yet swapped in
            os.replace(staging, target)
        finally:
            _remove_staging(target.parent)  # this publish's own file, when it failed before the swap
    return target
