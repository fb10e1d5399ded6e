"""Readable tables for people: what each command did, and per-hour summaries from the warehouse.

Reads (read-only, from the published snapshot when there is one, else the warehouse) `ingest_log`,
`validation_runs`, `rpc_series`, `reconstruction`, `clustering_runs` (the hour summary), `models`
and `anomalies`; writes nothing."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from tasks.settings import Lake, Settings

if TYPE_CHECKING:
    from tasks.app.view import Filters, Listing

# C0/C1 controls, and the Unicode line separators and bidi overrides that reorder what a terminal shows
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def shown(text: str) -> str:
    """`text` with control characters escaped (`\\n`, `\\x00`, `\\u202e`): names come from trace
    files, and a newline, NUL or terminal escape must not break or forge a table row."""

    def escape(m: re.Match) -> str:
        c = m.group()
        return _ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")

    return _CONTROL.sub(escape, text)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with right-aligned numbers; every cell is escaped here, in one place."""

    def cell(v: object) -> str:
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else ("" if v is None else shown(str(v)))

    headers = [shown(h) for h in headers]
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    numeric = [bool(rows) and all(isinstance(r[i], (int, float)) for r in rows) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def read_source(settings: Settings) -> Path | Lake:
    """What the read commands read: the published snapshot when there is one (it never waits for,
    nor blocks, a run), else the warehouse (the file, or the lake)."""
    from tasks.publish import analytics_path

    snapshot = analytics_path(settings)
    return snapshot if snapshot.exists() else settings.warehouse


@contextmanager
def reading(settings: Settings) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only, sandboxed connection on `read_source` (tasks.warehouse.open_sandboxed_reader). The
    warehouse locked by a run, with no snapshot published yet, is a RuntimeError naming the process
    that holds it, not DuckDB's traceback."""
    from tasks.warehouse import CannotOpen, open_sandboxed_reader, opened

    path = read_source(settings)
    if isinstance(path, Lake):  # never locked by a run: opened read-only like the file
        with opened(path, read_only=True) as con:
            yield con
        return
    if not path.exists():
        raise FileNotFoundError(f"no warehouse at {path}: run `rpcwatch ingest` first")
    try:
        con = open_sandboxed_reader(path)
    except CannotOpen as err:
        if err.holder is None or path != settings.warehouse:
            raise
        raise RuntimeError(
            f"cannot read {path}: a run is writing it (DuckDB lets no other process open it meanwhile; held by "
            f"{err.holder}) and no snapshot is published yet: retry when the run has finished"
        ) from err
    try:
        yield con
    finally:
        con.close()


def table_of(settings: Settings, sql: str) -> tuple[list[str], list[tuple]]:
    """Headers and rows of a fixed query (never text from input) on `read_source`."""
    with reading(settings) as con:
        cursor = con.execute(sql)
        return [d[0] for d in cursor.description], cursor.fetchall()


HOUR_SUMMARY_SQL = """
WITH files AS (
    SELECT hour, count(*) AS files, sum(rows_read) AS rows_read, sum(rows_kept) AS rows_kept,
           sum(rows_quarantined) AS quarantined, count(*) FILTER (WHERE status <> 'ingested') AS bad_files
    FROM ingest_log GROUP BY hour),
checks AS (
    SELECT hour, count(*) FILTER (WHERE severity = 'batch' AND NOT success) AS failed_checks
    FROM validation_runs GROUP BY hour),
series AS (
    SELECT date_trunc('hour', bucket_ts) AS hour, count(*) AS series_rows,
           count(DISTINCT (caller, callee, interface, rpc_type)) AS rpcs
    FROM rpc_series GROUP BY 1)
SELECT strftime(f.hour, '%Y-%m-%d %H:00') AS hour, f.files, f.bad_files, f.rows_read, f.rows_kept,
       f.quarantined, coalesce(c.failed_checks, 0) AS failed_checks, coalesce(s.rpcs, 0) AS rpcs,
       coalesce(s.series_rows, 0) AS series_rows, coalesce(r.traces, 0) AS traces,
       CASE WHEN r.traces > 0 THEN printf('%.1f%%', 100 * r.full_traces / r.traces) ELSE '' END AS full_rebuilt,
       CASE WHEN k.hour IS NULL THEN '' WHEN k.reclustered THEN 're-clustered' ELSE 'assigned' END AS patterns,
       CASE WHEN k.hour IS NULL THEN '' ELSE printf('%.1f%%', 100 * k.critical_share) END AS in_critical
FROM files f LEFT JOIN checks c USING (hour) LEFT JOIN series s USING (hour)
LEFT JOIN reconstruction r USING (hour) LEFT JOIN clustering_runs k USING (hour)
ORDER BY f.hour
"""


def hour_summary(settings: Settings) -> tuple[list[str], list[tuple]]:
    return table_of(settings, HOUR_SUMMARY_SQL)


MODELS_SQL = """
SELECT m.pattern_id AS pattern, m.model_version AS version, m.decision AS alias,
       round(m.val_mape_calls, 3) AS calls_mape, round(m.val_mape_calls / m.poisson_floor_calls, 2) AS x_poisson_floor,
       round(m.val_mape_calls / m.seasonal_naive_mape_calls, 2) AS x_seasonal_naive,
       round(m.val_mape_calls / m.moving_average_mape_calls, 2) AS x_moving_avg,
       round(m.val_mape_calls / m.no_graph_mape_calls, 2) AS x_no_graph, m.stale_reason AS trained_because,
       strftime(m.trained_for, '%Y-%m-%d %H:00') AS trained_at_hour
FROM models m ORDER BY m.pattern_id, m.model_version
"""


def model_table(settings: Settings) -> tuple[list[str], list[tuple]]:
    """Every trained model version with its validation calls MAPE against the floor and baselines."""
    return table_of(settings, MODELS_SQL)


ANOMALY_COLUMNS = """
SELECT strftime(bucket_ts, '%Y-%m-%d %H:%M') AS bucket, pattern_id AS pattern, kind, direction AS dir,
       caller, callee, interface, feature, round(observed, 1) AS observed, round(expected, 1) AS expected,
       round(threshold, 1) AS threshold, round(score, 2) AS score, model_version AS model
FROM anomalies"""


def anomaly_rows(settings: Settings, filters: Filters) -> tuple[list[str], Listing[tuple], datetime | None]:
    """Irregular points in the window `filters.since` (counted back from the newest scored data, the
    view's one meaning: tasks.app.view.parse_since), newest and strongest first, `filters.limit` from
    `filters.offset`: headers, the page of rows with how many match in all, and the newest scored data."""
    from tasks.app.view import PAGE, POINT_ORDER, POINT_WHERE, Listing, newest_scored, total_rows

    with reading(settings) as con:
        newest = newest_scored(con)
        window = filters.window(newest)
        cursor = con.execute(
            ANOMALY_COLUMNS + POINT_WHERE + POINT_ORDER + PAGE,
            {**window, "limit": filters.limit, "offset": filters.offset},
        )
        headers, rows = [d[0] for d in cursor.description], cursor.fetchall()
        total = total_rows(con, "anomalies", POINT_WHERE, window, rows, filters.offset, filters.limit)
    return headers, Listing(rows, total, filters.offset, filters.limit), newest
