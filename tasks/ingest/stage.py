"""Ingest one hour of trace files (Parquet, CSV, CSV.gz) into the warehouse's `calls` table.

Per hour: find the files, fingerprint them, skip the hour if nothing changed since the last
ingest, else replace exactly that hour: normalised rows that pass the row checks go to `calls`,
the others to `quarantine` with their reason. Unreadable files and files missing required columns
are recorded in `ingest_log` with the error; the good files still land. Validation then fails the
batch for them (see `tasks.ingest.validate`). Empty files are recorded as `empty`; the hour goes on.

A landed hour is only replaced by a batch with rows: no files, no readable file or no row for the
hour raise `IngestError` and leave the warehouse as it was. No path, column name, setting or batch
id becomes SQL text (see `tasks.ingest.files`): they are bound, or validated numbers/datetimes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import xxhash

from tasks.clock import HOUR, hour_floor, naive_utc
from tasks.ingest.files import FileCheck, discover_files, hour_folder, inspect_file, is_trace_file, raw_select
from tasks.ingest.formats import TraceFormat, make_format, set_format_variables
from tasks.settings import KNOWN_RPC_TYPES, Settings
from tasks.warehouse import opened


@dataclass
class IngestReport:
    hour: datetime
    batch_id: str
    files: list[FileCheck] = field(default_factory=list)
    skipped_unchanged: bool = False

    @property
    def rows_read(self) -> int:
        return sum(f.rows_read for f in self.files)

    @property
    def rows_kept(self) -> int:
        return sum(f.rows_kept for f in self.files)

    @property
    def rows_quarantined(self) -> int:
        return sum(f.rows_quarantined for f in self.files)

    @property
    def failed_files(self) -> list[FileCheck]:
        """Unreadable or unusable files (recorded in ingest_log; validation fails the hour)."""
        return [f for f in self.files if f.failed]

    @property
    def empty_files(self) -> list[FileCheck]:
        """Files without rows (recorded in ingest_log as `empty`; the hour goes on)."""
        return [f for f in self.files if f.status == "empty"]


def _sql_ts(value: datetime) -> str:
    """A TIMESTAMP literal from a datetime object (digits and separators only: safe SQL text)."""
    if not isinstance(value, datetime):
        raise TypeError(f"expected a datetime, got {value!r}")
    return f"TIMESTAMP '{naive_utc(value):%Y-%m-%d %H:%M:%S}'"


def _finite(value: object, what: str) -> float:
    """A validated finite number, safe to format into SQL text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"settings.{what} must be a finite number, got {value!r}")
    return float(value)


def _reason_sql(hour: datetime, rt_max_ms: object) -> str:
    types = ", ".join(f"'{t}'" for t in KNOWN_RPC_TYPES)  # constants of tasks.settings
    rt_max = _finite(rt_max_ms, "rt_max_ms")
    return f"""CASE
        WHEN trace_id IS NULL THEN 'missing trace_id'
        WHEN call_id IS NULL THEN 'missing call_id (rpc_id / span id)'
        WHEN ts IS NULL THEN 'unparseable timestamp'
        WHEN ts < {_sql_ts(hour)} OR ts >= {_sql_ts(hour + HOUR)}
            THEN 'timestamp ' || strftime(ts, '%Y-%m-%dT%H:%M:%S') || ' outside hour {naive_utc(hour):%Y-%m-%dT%H:00}'
        WHEN rt_ms IS NULL THEN 'missing or non-numeric rt'
        WHEN rt_ms < 0 OR rt_ms > {rt_max!r} THEN 'rt ' || rt_ms || ' ms outside [0, {rt_max:g}]'
        WHEN rpc_type NOT IN ({types}) THEN 'unknown rpc_type ''' || rpc_type || ''''
    END"""


def _define_batch(
    con: duckdb.DuckDBPyConnection,
    files: list[FileCheck],
    fmt: TraceFormat,
    hour: datetime,
    partitioned: bool,
    settings: Settings,
) -> None:
    """TEMP VIEW `batch`: the hour's normalised rows of all good files, each with its `reason`
    (NULL when the row passes every row check)."""
    con.execute("DROP TABLE IF EXISTS csv_rejects; DROP TABLE IF EXISTS csv_scans;")
    columns = {c for f in files for c in f.columns}
    set_format_variables(con, fmt)
    con.execute(f"CREATE OR REPLACE TEMP VIEW raw AS {raw_select(con, files, fmt)}")
    in_hour = "true"
    if not partitioned:  # flat sources: this hour's rows; unparseable ones go to the first hour
        start, end = _sql_ts(hour), _sql_ts(hour + HOUR)
        in_hour = (
            f"(ts >= {start} AND ts < {end}) OR (ts IS NULL AND date_trunc('hour', (SELECT min(ts) FROM n)) = {start})"
        )
    con.execute(f"""CREATE OR REPLACE TEMP VIEW batch AS
        WITH n AS ({fmt.normalise_sql(columns)})
        SELECT *, {_reason_sql(hour, settings.rt_max_ms)} AS reason FROM n WHERE {in_hour}""")


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
    return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def _all_rows_accounted(files: list[FileCheck], partitioned: bool, landed: int) -> bool:
    """True when every row of the files already landed in calls or as a duplicate (Parquet footers
    give the row count), so the pass that looks for rows failing a check can be skipped."""
    known = [f.rows_in_file for f in files]
    return partitioned and None not in known and landed == sum(known)


QUARANTINED = """?, b.source_file, b.file_row, {reason}, ts, trace_id, call_id, parent_call_id, caller,
    callee, interface, rpc_type, rt_ms, is_error, ?"""


def _load(
    con: duckdb.DuckDBPyConnection,
    files: list[FileCheck],
    fmt: TraceFormat,
    hour: datetime,
    partitioned: bool,
    settings: Settings,
    batch_id: str,
) -> None:
    """Replace the hour: passing rows to `calls`, the others to `quarantine` with their reason."""
    _define_batch(con, files, fmt, hour, partitioned, settings)
    has_dups = _find_duplicates(con) > 0
    _clear_hour(con, hour)
    start = naive_utc(hour)
    not_dup = "AND (source_file, file_row) NOT IN (SELECT (source_file, file_row) FROM dups)" if has_dups else ""
    kept = con.execute(
        f"""INSERT INTO calls SELECT ts, trace_id, call_id, parent_call_id, caller, callee,
        interface, rpc_type, rt_ms, is_error, source_file, ? FROM batch WHERE reason IS NULL {not_dup}""",
        [batch_id],
    ).fetchone()[0]
    if not _all_rows_accounted(files, partitioned, kept + _count(con, "dups")):
        con.execute(
            f"INSERT INTO quarantine SELECT {QUARANTINED.format(reason='reason')} FROM batch b "
            "WHERE reason IS NOT NULL",
            [start, batch_id],
        )
    if has_dups:
        reason = "'duplicate of row ' || d.first_row || ' in ' || d.first_file"
        con.execute(
            f"""INSERT INTO quarantine SELECT {QUARANTINED.format(reason=reason)}
            FROM batch b JOIN dups d USING (source_file, file_row) WHERE b.reason IS NULL""",
            [start, batch_id],
        )
    for path, line, why in _csv_reject_rows(con):
        con.execute(
            "INSERT INTO quarantine (hour, source_file, file_row, reason, batch_id) VALUES (?, ?, ?, ?, ?)",
            [start, path, line, why, batch_id],
        )


def _csv_reject_rows(con: duckdb.DuckDBPyConnection) -> list[tuple[str, int, str]]:
    if not con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'csv_rejects'").fetchone()[0]:
        return []
    return con.execute("""SELECT s.file_path, e.line, 'unparseable CSV line: ' || min(e.error_message)
                          FROM csv_rejects e JOIN csv_scans s USING (scan_id, file_id)
                          GROUP BY 1, 2 ORDER BY 1, 2""").fetchall()


def _count_per_file(con: duckdb.DuckDBPyConnection, files: list[FileCheck], hour: datetime) -> None:
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


def _batch_id(hour: datetime, files: list[FileCheck]) -> str:
    digest = xxhash.xxh3_64("".join(sorted(f"{f.path}:{f.content_hash}" for f in files)).encode()).hexdigest()
    return f"{hour:%Y%m%dT%H}-{digest[:10]}"


def _log_status(f: FileCheck) -> str:
    return "ingested" if f.ok else f.status


def _unchanged(con: duckdb.DuckDBPyConnection, hour: datetime, files: list[FileCheck], fmt: TraceFormat) -> bool:
    """Same files, same content, same format as the landed batch, and none of them failed."""
    seen = con.execute(
        "SELECT path, content_hash, status, format FROM ingest_log WHERE hour = ?", [naive_utc(hour)]
    ).fetchall()
    now = {(str(f.path), f.content_hash, _log_status(f), fmt.name) for f in files}
    return bool(files) and not any(f.failed for f in files) and set(seen) == now


def _write_log(con: duckdb.DuckDBPyConnection, report: IngestReport, fmt: TraceFormat) -> None:
    start = naive_utc(report.hour)
    con.execute("DELETE FROM ingest_log WHERE hour = ?", [start])
    now = naive_utc(datetime.now(UTC))
    for f in report.files:
        con.execute(
            "INSERT INTO ingest_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                start,
                str(f.path),
                fmt.name,
                f.size_bytes,
                f.content_hash,
                f.rows_read,
                f.rows_kept,
                f.rows_quarantined,
                _log_status(f),
                f.error,
                report.batch_id,
                now,
            ],
        )


def _recount_from_log(con: duckdb.DuckDBPyConnection, report: IngestReport) -> None:
    rows = {
        r[0]: r[1:]
        for r in con.execute(
            "SELECT path, rows_read, rows_kept, rows_quarantined, batch_id FROM ingest_log WHERE hour = ?",
            [naive_utc(report.hour)],
        ).fetchall()
    }
    for f in report.files:
        f.rows_read, f.rows_kept, f.rows_quarantined, report.batch_id = rows[str(f.path)]


def _batch_error(
    con: duckdb.DuckDBPyConnection,
    files: list[FileCheck],
    fmt: TraceFormat,
    hour: datetime,
    partitioned: bool,
    settings: Settings,
) -> str | None:
    """Read and normalise `files` without loading anything: the error that breaks them, if any."""
    try:
        _define_batch(con, files, fmt, hour, partitioned, settings)
        con.execute("SELECT count(*), sum(hash(COLUMNS(*))) FROM batch").fetchall()
        return None
    except duckdb.Error as err:
        return str(err).splitlines()[0]


def _drop_breaking_files(
    con: duckdb.DuckDBPyConnection,
    files: list[FileCheck],
    fmt: TraceFormat,
    hour: datetime,
    partitioned: bool,
    settings: Settings,
) -> list[FileCheck]:
    """After a failed batch: mark the files that break it (alone, or next to the files before them)
    and return the others. Slow (a read per file and per growing set), so only on failure."""
    args = (fmt, hour, partitioned, settings)
    for f in files:
        if (err := _batch_error(con, [f], *args)) is not None:
            f.mark_unreadable(err)
    usable = [f for f in files if f.ok]
    if len(usable) < 2 or _batch_error(con, usable, *args) is None:
        return usable
    together: list[FileCheck] = []
    for f in usable:  # drift between files (e.g. one column typed differently): keep the first
        if (err := _batch_error(con, together + [f], *args)) is None:
            together.append(f)
        else:
            f.mark_unreadable(err, f"cannot be read together with {len(together)} earlier file(s) as a")
    return together


def _load_good_files(
    con: duckdb.DuckDBPyConnection, report: IngestReport, fmt: TraceFormat, partitioned: bool, settings: Settings
) -> list[FileCheck]:
    """Load the good files in one open transaction (left open for the caller to commit); if the
    batch breaks, record the files that break it and load the others."""
    good = [f for f in report.files if f.ok]
    if not good:
        return good
    con.execute("BEGIN")
    try:
        _load(con, good, fmt, report.hour, partitioned, settings, report.batch_id)
        return good
    except duckdb.Error:
        con.execute("ROLLBACK")
    good = _drop_breaking_files(con, good, fmt, report.hour, partitioned, settings)
    if good:
        con.execute("BEGIN")
        _load(con, good, fmt, report.hour, partitioned, settings, report.batch_id)
    return good


class IngestError(RuntimeError):
    """An hour that cannot be ingested: the warehouse keeps what it had for that hour."""


def _refuse(hour: datetime, sources: list[Path], why: str) -> IngestError:
    return IngestError(
        f"hour {hour:%Y-%m-%dT%H:00} not ingested from {', '.join(map(str, sources))}: {why}; "
        f"the warehouse keeps what it had for this hour"
    )


def _trace_format(settings: Settings, fmt_name: str | None) -> TraceFormat:
    epoch = settings.trace_epoch
    return make_format(
        fmt_name or settings.format, int(epoch.timestamp() * 1000) if epoch else None, settings.span_mapping
    )


def ingest_hour(
    settings: Settings,
    hour: datetime,
    sources: list[Path] | None = None,
    fmt_name: str | None = None,
    force: bool = False,
) -> IngestReport:
    """Replace the warehouse's rows for `hour` with what the trace files hold (idempotent).

    Only a batch with rows replaces the hour: no files, no readable file or no row in the hour
    raise `IngestError` and leave calls, quarantine and ingest_log as they were.
    """
    hour, sources = hour_floor(hour), list(sources or [settings.incoming])
    fmt = _trace_format(settings, fmt_name)
    _finite(settings.rt_max_ms, "rt_max_ms")
    paths, partitioned = discover_files(sources, hour)
    if not paths:
        where = f" (no partition folder {hour_folder(hour)} with trace files)" if partitioned else ""
        raise _refuse(hour, sources, f"no trace files{where}")
    with opened(settings.warehouse) as con:
        report = IngestReport(hour=hour, batch_id="", files=[inspect_file(con, p, fmt) for p in paths])
        report.batch_id = _batch_id(hour, report.files)
        if not force and _unchanged(con, hour, report.files, fmt):
            _recount_from_log(con, report)
            report.skipped_unchanged = True
            return report
        try:
            good = _load_good_files(con, report, fmt, partitioned, settings)
        except duckdb.Error as err:  # the files passed one by one but not as a batch
            raise _refuse(hour, sources, f"the batch cannot be loaded: {str(err).splitlines()[0]}") from err
        _count_per_file(con, good, hour)
        if not good or report.rows_read == 0:  # not a good batch: undo the replacement
            if good:
                con.execute("ROLLBACK")
            problems = "; ".join(f.error for f in report.files if f.error)
            raise _refuse(
                hour, sources, f"no rows for this hour in {len(paths)} file(s)" + (f" ({problems})" if problems else "")
            )
        _write_log(con, report, fmt)
        con.execute("COMMIT")
    return report


def _clear_hour(con: duckdb.DuckDBPyConnection, hour: datetime) -> None:
    start, end = naive_utc(hour), naive_utc(hour + HOUR)
    con.execute("DELETE FROM calls WHERE ts >= ? AND ts < ?", [start, end])
    con.execute("DELETE FROM quarantine WHERE hour = ?", [start])


def _distinct_hours(con: duckdb.DuckDBPyConnection, checks: list[FileCheck], fmt: TraceFormat) -> set[datetime]:
    """Hours the rows of `checks` fall into; files that break the read are left for ingest to record."""
    if not checks:
        return set()
    try:
        set_format_variables(con, fmt)
        con.execute(f"CREATE OR REPLACE TEMP VIEW raw AS {raw_select(con, checks, fmt)}")
        columns = {c for f in checks for c in f.columns}
        rows = con.execute(
            f"SELECT DISTINCT date_trunc('hour', ts) FROM ({fmt.normalise_sql(columns)}) WHERE ts IS NOT NULL"
        ).fetchall()
        return {r[0].replace(tzinfo=UTC) for r in rows}
    except duckdb.Error:
        if len(checks) == 1:
            return set()
        return set().union(*(_distinct_hours(con, [c], fmt) for c in checks))


def hours_in_sources(settings: Settings, sources: list[Path], fmt_name: str | None = None) -> list[datetime]:
    """Every hour that rows in flat sources fall into (for ingesting a whole sample at once)."""
    hive = re.compile(r"dt=(\d{4}-\d{2}-\d{2})/hour=(\d{2})")
    hours: set[datetime] = set()
    flat: list[Path] = []
    for source in sources:
        parts = [hive.search(str(p)) for p in source.rglob("*")] if source.is_dir() else []
        found = {datetime.fromisoformat(f"{m[1]}T{m[2]}:00+00:00") for m in parts if m}
        hours |= found
        if not found:
            flat.append(source)
    if flat:
        fmt = _trace_format(settings, fmt_name)
        files = [p for s in flat for p in ([s] if s.is_file() else s.rglob("*")) if is_trace_file(p)]
        with duckdb.connect() as con:
            hours |= _distinct_hours(con, [c for c in (inspect_file(con, p, fmt) for p in files) if c.ok], fmt)
    return sorted(hours)
