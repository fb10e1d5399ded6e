"""Publish the user-facing tables to a separate DuckDB file that analysts read.

DuckDB allows one writing process per file, so an analyst's open shell on the warehouse would block
the next hourly run. Instead, after each run the tables people query are copied into a new file
that then replaces `<home>/analytics.duckdb` atomically (`os.replace`): an open reader keeps the
file it opened (POSIX semantics) and never blocks or breaks a run; the next `connect` sees the new
snapshot. Readers open it read-only.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from tasks.settings import Settings
from tasks.warehouse import opened

PUBLISHED = ("anomalies", "incidents", "patterns", "pattern_nodes", "pattern_edges", "pattern_history",
             "models", "score_runs", "reconstruction", "rpc_series", "validation_runs", "ingest_log")


def analytics_path(settings: Settings) -> Path:
    return settings.home / "analytics.duckdb"


def publish(settings: Settings) -> Path:
    """Write a fresh snapshot file and swap it in; returns the published path."""
    target = analytics_path(settings)
    now = datetime.now(timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%S%f")
    staging = target.with_name(f".analytics-{stamp}.duckdb")
    with opened(settings.warehouse) as con:
        con.execute(f"ATTACH '{staging}' AS snapshot")
        for table in PUBLISHED:
            con.execute(f"CREATE TABLE snapshot.{table} AS SELECT * FROM main.{table}")
        con.execute("""CREATE VIEW snapshot.recent_anomalies AS SELECT * FROM anomalies
                        WHERE bucket_ts >= (SELECT max(bucket_ts) FROM anomalies) - INTERVAL 6 HOUR
                        ORDER BY bucket_ts DESC, score DESC""")
        con.execute("CREATE TABLE snapshot.published AS SELECT ?::TIMESTAMP AS published_at", [now.replace(tzinfo=None)])
        con.execute("DETACH snapshot")
    os.replace(staging, target)
    return target
