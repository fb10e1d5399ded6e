"""Row checks of an hour's batch, and the hour's replacement in `calls` and `quarantine`.

Reads the trace files (through `raw`), `calls` and `quarantine`; writes `calls` and `quarantine`
(`load_batch` deletes the hour and inserts it again, inside the caller's open transaction).

The steps share temporary objects on the caller's connection, by name:
- `raw` (TEMP VIEW, `tasks.ingest.files.define_raw_view`): the files' raw rows;
- `batch` (TEMP VIEW, `define_batch`): the hour's normalised rows (`formats.NORMALISED`) with
  `reason`, NULL when the row passes every row check;
- `dups` (TEMP TABLE, `_find_duplicates`): the rows of `batch` repeating an earlier row;
- `files.CSV_REJECTS_TABLE` / `files.CSV_SCANS_TABLE`: the CSV lines DuckDB could not parse.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import duckdb

from tasks.clock import HOUR, naive_utc
from tasks.ingest.files import CSV_REJECTS_TABLE, CSV_SCANS_TABLE, FileCheck, define_raw_view
from tasks.ingest.formats import TraceFormat
from tasks.ingest.sql import scalar, sql_timestamp
from tasks.settings import KNOWN_RPC_TYPES

CALL_COLUMNS = (
    "ts, trace_id, call_id, parent_call_id, caller, callee, interface, rpc_type, rt_ms, is_error, source_file, "
    "batch_id, server_rt_ms, fan_out, self_ms"
)
QUARANTINE_COLUMNS = (
    "hour, source_file, file_row, reason, ts, trace_id, call_id, parent_call_id, caller, callee, interface, "
    "rpc_type, rt_ms, is_error, batch_id"
)
# the values of QUARANTINE_COLUMNS for a row `b` of `batch`; binds hour and batch id
QUARANTINED = """?, b.source_file, b.file_row, {reason}, ts, trace_id, call_id, parent_call_id, caller,
    callee, interface, rpc_type, rt_ms, is_error, ?"""


@dataclass(frozen=True)
class BatchSpec:
    """What shapes an hour's batch besides its files."""

    fmt: TraceFormat
    hour: datetime
    partitioned: bool  # from hour partitions: every row of the files is the hour's
    rt_max_ms: float  # validated finite (`tasks.ingest.sql.finite_setting`): it becomes SQL text


def _reason_sql(hour: datetime, rt_max: float) -> str:
    """The first row check a normalised row fails, as text; NULL when it passes them all."""
    types = ", ".join(f"'{t}'" for t in KNOWN_RPC_TYPES)  # constants of tasks.settings
    return f"""CASE
        WHEN trace_id IS NULL THEN 'missing trace_id'
        WHEN call_id IS NULL THEN 'missing call_id (rpc_id / span id)'
        WHEN ts IS NULL THEN 'unparseable timestamp'
        WHEN ts < {sql_timestamp(hour)} OR ts >= {sql_timestamp(hour + HOUR)}
            THEN 'timestamp ' || strftime(ts, '%Y-%m-%dT%H:%M:%S') || ' outside hour {naive_utc(hour):%Y-%m-%dT%H:00}'
        WHEN rt_ms IS NULL THEN 'missing or non-numeric rt'
        WHEN rt_ms < 0 OR rt_ms > {rt_max!r} THEN 'rt ' || rt_ms || ' ms outside [0, {rt_max:g}]'
        WHEN rpc_type NOT IN ({types}) THEN 'unknown rpc_type ''' || rpc_type || ''''
    END"""


def define_batch(con: duckdb.DuckDBPyConnection, files: list[FileCheck], spec: BatchSpec) -> None:
    """TEMP VIEW `batch`: the hour's normalised rows of `files`, each with its `reason` (NULL when
    the row passes every row check). Drops the CSV reject tables of an earlier read first."""
    con.execute(f"DROP TABLE IF EXISTS {CSV_REJECTS_TABLE}; DROP TABLE IF EXISTS {CSV_SCANS_TABLE};")
    normalised = define_raw_view(con, files, spec.fmt)
    in_hour = "true"
    if not spec.partitioned:  # flat sources: this hour's rows; unparseable ones go to the first hour
        start, end = sql_timestamp(spec.hour), sql_timestamp(spec.hour + HOUR)
        in_hour = (
            f"(ts >= {start} AND ts < {end}) OR (ts IS NULL AND date_trunc('hour', (SELECT min(ts) FROM n)) = {start})"
        )
    con.execute(f"""CREATE OR REPLACE TEMP VIEW batch AS
        WITH n AS ({normalised})
        SELECT *, {_reason_sql(spec.hour, spec.rt_max_ms)} AS reason FROM n WHERE {in_hour}""")


def _find_duplicates(con: duckdb.DuckDBPyConnection) -> int:
    """TEMP TABLE `dups`: rows repeating an earlier row (same call, every raw value equal).

    Cheap for clean data: only (trace_id, call_id) pairs seen twice are looked at closely.
    """
    key = "trace_id, call_id, raw_hash"
    con.execute(f"""CREATE OR REPLACE TEMP TABLE dups AS
        WITH candidates AS (
            SELECT hash(trace_id, call_id) AS h FROM batch GROUP BY 1 HAVING count(*) > 1),
        suspects AS (
            SELECT source_file, file_row, {key} FROM batch
            WHERE hash(trace_id, call_id) IN (SELECT h FROM candidates))
        SELECT source_file, file_row, first_value(file_row) OVER w AS first_row,
               first_value(source_file) OVER w AS first_file, row_number() OVER w AS k
        FROM suspects WINDOW w AS (PARTITION BY {key} ORDER BY source_file, file_row)
        QUALIFY k > 1""")
    return _count(con, "dups")


def _count(con: duckdb.DuckDBPyConnection, table: str) -> int:
    if table not in ("dups", "batch"):  # internal names only: this one is SQL text
        raise ValueError(f"not an ingest table: {table!r}")
    return int(scalar(con, f"SELECT count(*) FROM {table}"))


def _all_rows_accounted(files: list[FileCheck], partitioned: bool, landed: int) -> bool:
    """True when every row of the files already landed in calls or as a duplicate (Parquet footers
    give the row count), so the pass that looks for rows failing a check can be skipped."""
    known = [f.rows_in_file for f in files if f.rows_in_file is not None]
    return partitioned and len(known) == len(files) and landed == sum(known)


def _clear_hour(con: duckdb.DuckDBPyConnection, hour: datetime) -> None:
    start, end = naive_utc(hour), naive_utc(hour + HOUR)
    con.execute("DELETE FROM calls WHERE ts >= ? AND ts < ?", [start, end])
    con.execute("DELETE FROM quarantine WHERE hour = ?", [start])


def _insert_calls_sql(not_dup: str) -> str:
    """INSERT of the batch's passing rows into `calls`, with per call (on the kept rows of the
    batch, same trace): `fan_out`, its number of child calls, and `self_ms`, its rt minus the sum of
    its children's rt, floored at 0 (children running in parallel make it an under-estimate).
    Children in another hour's batch are not counted. Binds the batch id."""
    return f"""INSERT INTO calls ({CALL_COLUMNS})
        WITH kept AS MATERIALIZED (SELECT * FROM batch WHERE reason IS NULL {not_dup}),
        kids AS (SELECT trace_id, parent_call_id AS call_id, count(*) AS fan_out, sum(rt_ms) AS kids_ms
                 FROM kept WHERE parent_call_id IS NOT NULL GROUP BY ALL)
        SELECT k.ts, k.trace_id, k.call_id, k.parent_call_id, k.caller, k.callee, k.interface, k.rpc_type,
               k.rt_ms, k.is_error, k.source_file, ?, k.server_rt_ms, coalesce(c.fan_out, 0),
               greatest(k.rt_ms - coalesce(c.kids_ms, 0), 0)
        FROM kept k LEFT JOIN kids c ON c.trace_id = k.trace_id AND c.call_id = k.call_id"""


def load_batch(con: duckdb.DuckDBPyConnection, files: list[FileCheck], spec: BatchSpec, batch_id: str) -> None:
    """Replace the hour: passing rows to `calls`, the others to `quarantine` with their reason."""
    define_batch(con, files, spec)
    has_dups = _find_duplicates(con) > 0
    _clear_hour(con, spec.hour)
    start = naive_utc(spec.hour)
    not_dup = "AND (source_file, file_row) NOT IN (SELECT (source_file, file_row) FROM dups)" if has_dups else ""
    kept = scalar(con, _insert_calls_sql(not_dup), [batch_id])
    if not _all_rows_accounted(files, spec.partitioned, kept + _count(con, "dups")):
        con.execute(
            f"INSERT INTO quarantine ({QUARANTINE_COLUMNS}) SELECT {QUARANTINED.format(reason='reason')} "
            "FROM batch b WHERE reason IS NOT NULL",
            [start, batch_id],
        )
    if has_dups:
        reason = "'duplicate of row ' || d.first_row || ' in ' || d.first_file"
        con.execute(
            f"""INSERT INTO quarantine ({QUARANTINE_COLUMNS}) SELECT {QUARANTINED.format(reason=reason)}
            FROM batch b JOIN dups d USING (source_file, file_row) WHERE b.reason IS NULL""",
            [start, batch_id],
        )
    _quarantine_csv_rejects(con, start, batch_id)


def _quarantine_csv_rejects(con: duckdb.DuckDBPyConnection, hour: datetime, batch_id: str) -> None:
    """One quarantine row per CSV line DuckDB could not parse (file, line number, first error)."""
    exists = "SELECT count(*) FROM duckdb_tables() WHERE table_name = ?"
    if not scalar(con, exists, [CSV_REJECTS_TABLE]):
        return
    con.execute(
        f"""INSERT INTO quarantine (hour, source_file, file_row, reason, batch_id)
            SELECT ?, s.file_path, e.line, 'unparseable CSV line: ' || min(e.error_message), ?
            FROM {CSV_REJECTS_TABLE} e JOIN {CSV_SCANS_TABLE} s USING (scan_id, file_id)
            GROUP BY s.file_path, e.line ORDER BY s.file_path, e.line""",
        [hour, batch_id],
    )


def count_per_file(con: duckdb.DuckDBPyConnection, files: list[FileCheck], hour: datetime) -> None:
    """Set each file's rows kept (in `calls`), quarantined and read for `hour`."""
    start, end = naive_utc(hour), naive_utc(hour + HOUR)
    kept = dict(
        con.execute(
            "SELECT source_file, count(*) FROM calls WHERE ts >= ? AND ts < ? GROUP BY 1", [start, end]
        ).fetchall()
    )
    bad = dict(
        con.execute("SELECT source_file, count(*) FROM quarantine WHERE hour = ? GROUP BY 1", [start]).fetchall()
    )
    for f in files:
        f.rows_kept, f.rows_quarantined = kept.get(str(f.path), 0), bad.get(str(f.path), 0)
        f.rows_read = f.rows_kept + f.rows_quarantined
