"""Ingest one hour of trace files (Parquet, CSV, CSV.gz) into the warehouse's `calls` table.

Per hour: find the files, fingerprint them, skip the hour if nothing changed since the last
ingest, else replace exactly that hour: normalised rows that pass the row checks go to `calls`,
the others to `quarantine` with their reason. Unreadable files and files missing required columns
are recorded in `ingest_log` with the error; the good files still land. Validation then fails the
batch for them (see `tasks.validate`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import xxhash

from tasks.formats import TraceFormat, make_format
from tasks.settings import KNOWN_RPC_TYPES, Settings
from tasks.warehouse import opened

TRACE_SUFFIXES = (".parquet", ".csv", ".csv.gz")
HOUR = timedelta(hours=1)


@dataclass
class FileCheck:
    path: Path
    kind: str  # parquet | csv
    size_bytes: int
    content_hash: str
    columns: tuple[str, ...] = ()
    rows_in_file: int | None = None  # known up front for Parquet (footer metadata)
    status: str = "ok"  # ok | error | schema_error | empty
    error: str | None = None
    rows_read: int = 0
    rows_kept: int = 0
    rows_quarantined: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


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
        return [f for f in self.files if not f.ok]


def hour_floor(value: datetime) -> datetime:
    value = value.astimezone(timezone.utc) if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return value.replace(minute=0, second=0, microsecond=0)


def naive_utc(value: datetime) -> datetime:
    return value.astimezone(timezone.utc).replace(tzinfo=None)


def _is_trace_file(path: Path) -> bool:
    return path.is_file() and path.name.endswith(TRACE_SUFFIXES) and not path.name.startswith(".")


def discover_files(sources: list[Path], hour: datetime) -> tuple[list[Path], bool]:
    """Files for `hour` and whether they come from hour partitions (`dt=YYYY-MM-DD/hour=HH`).

    A source is a file, or a folder: hive-partitioned (only that hour's folder is read) or flat
    (every trace file under it is read and rows are filtered to the hour).
    """
    files: list[Path] = []
    partitioned = False
    for source in sources:
        if source.is_file():
            files.append(source)
            continue
        if not source.is_dir():
            raise FileNotFoundError(f"trace source {source} does not exist")
        if any(source.glob("dt=*")):
            partitioned = True
            folder = source / f"dt={hour:%Y-%m-%d}" / f"hour={hour:%H}"
            files.extend(sorted(p for p in folder.rglob("*") if _is_trace_file(p)) if folder.is_dir() else [])
        else:
            files.extend(sorted(p for p in source.rglob("*") if _is_trace_file(p)))
    return files, partitioned


def fingerprint(path: Path) -> str:
    digest = xxhash.xxh3_128()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _csv_reader(path: Path, extra: str = "") -> str:
    return f"read_csv('{path}', all_varchar=true, header=true{extra})"


def inspect_file(con: duckdb.DuckDBPyConnection, path: Path, fmt: TraceFormat) -> FileCheck:
    """Size, content hash and columns of one file; a bad file is recorded, never raised."""
    kind = "parquet" if path.name.endswith(".parquet") else "csv"
    check = FileCheck(path=path, kind=kind, size_bytes=path.stat().st_size, content_hash=fingerprint(path))
    try:
        if kind == "parquet":
            rows = con.execute(f"SELECT name FROM parquet_schema('{path}') WHERE num_children IS NULL OR num_children = 0").fetchall()
            check.columns = tuple(r[0] for r in rows)
            n = con.execute(f"SELECT sum(num_rows) FROM parquet_file_metadata('{path}')").fetchone()[0]
            check.rows_in_file = int(n or 0)
        else:
            # store_rejects keeps the sniffer from reading a malformed line as the header
            rows = con.execute(f"DESCRIBE SELECT * FROM {_csv_reader(path, ', store_rejects=true')}").fetchall()
            check.columns = tuple(r[0] for r in rows)
            n = None
    except duckdb.Error as err:
        check.status, check.error = "error", f"{path}: unreadable {kind} file: {err}".splitlines()[0]
        return check
    missing = [c for c in fmt.required if c not in check.columns]
    if missing:
        check.status = "schema_error"
        check.error = (f"{path}: missing column(s) {', '.join(repr(c) for c in missing)} required by "
                       f"format {fmt.name} (found: {', '.join(check.columns)})")
    elif n == 0 or check.size_bytes == 0:
        check.status, check.error = "empty", f"{path}: file has no rows"
    return check


def _raw_select(files: list[FileCheck], fmt: TraceFormat) -> str:
    """One relation over all good files: the format's columns, `source_file`, `file_row` (1-based)."""
    wanted = list(fmt.required) + [c for c in fmt.optional if any(c in f.columns for f in files)]
    every = sorted({c for f in files for c in f.columns})
    cols = ", ".join('"' + c + '"' for c in wanted)
    cols += ", hash(" + ", ".join('"' + c + '"' for c in every) + ") AS raw_hash"
    parts = []
    parquet = [f for f in files if f.kind == "parquet"]
    if parquet:
        paths = ", ".join(f"'{f.path}'" for f in parquet)
        parts.append(f"SELECT {cols}, filename AS source_file, file_row_number + 1 AS file_row "
                     f"FROM read_parquet([{paths}], union_by_name=true, filename=true, file_row_number=true)")
    for f in (f for f in files if f.kind == "csv"):
        reader = _csv_reader(f.path, ", store_rejects=true, rejects_table='csv_rejects', rejects_scan='csv_scans'")
        parts.append(f"SELECT {cols}, '{f.path}' AS source_file, row_number() OVER () AS file_row FROM {reader}")
    return " UNION ALL BY NAME ".join(parts)


def _reason_sql(hour: datetime, rt_max_ms: float) -> str:
    types = ", ".join(f"'{t}'" for t in KNOWN_RPC_TYPES)
    start, end = naive_utc(hour), naive_utc(hour + HOUR)
    return f"""CASE
        WHEN trace_id IS NULL THEN 'missing trace_id'
        WHEN call_id IS NULL THEN 'missing call_id (rpc_id / span id)'
        WHEN ts IS NULL THEN 'unparseable timestamp'
        WHEN ts < TIMESTAMP '{start}' OR ts >= TIMESTAMP '{end}'
            THEN 'timestamp ' || strftime(ts, '%Y-%m-%dT%H:%M:%S') || ' outside hour {start:%Y-%m-%dT%H:00}'
        WHEN rt_ms IS NULL THEN 'missing or non-numeric rt'
        WHEN rt_ms < 0 OR rt_ms > {rt_max_ms} THEN 'rt ' || rt_ms || ' ms outside [0, {rt_max_ms:g}]'
        WHEN rpc_type NOT IN ({types}) THEN 'unknown rpc_type ''' || rpc_type || ''''
    END"""


def _define_batch(con: duckdb.DuckDBPyConnection, files: list[FileCheck], fmt: TraceFormat,
                  hour: datetime, partitioned: bool, settings: Settings) -> None:
    """TEMP VIEW `batch`: the hour's normalised rows of all good files, each with its `reason`
    (NULL when the row passes every row check)."""
    con.execute("DROP TABLE IF EXISTS csv_rejects; DROP TABLE IF EXISTS csv_scans;")
    columns = {c for f in files for c in f.columns}
    con.execute(f"CREATE OR REPLACE TEMP VIEW raw AS {_raw_select(files, fmt)}")
    in_hour = "true"
    if not partitioned:  # flat sources: this hour's rows; unparseable ones go to the first hour
        start, end = naive_utc(hour), naive_utc(hour + HOUR)
        in_hour = (f"(ts >= TIMESTAMP '{start}' AND ts < TIMESTAMP '{end}') OR (ts IS NULL AND "
                   f"date_trunc('hour', (SELECT min(ts) FROM n)) = TIMESTAMP '{start}')")
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
    return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def _all_rows_accounted(files: list[FileCheck], partitioned: bool, landed: int) -> bool:
    """True when every row of the files already landed in calls or as a duplicate (Parquet footers
    give the row count), so the pass that looks for rows failing a check can be skipped."""
    known = [f.rows_in_file for f in files]
    return partitioned and None not in known and landed == sum(known)


def _load(con: duckdb.DuckDBPyConnection, files: list[FileCheck], fmt: TraceFormat, hour: datetime,
          partitioned: bool, settings: Settings, batch_id: str) -> None:
    """Replace the hour: passing rows to `calls`, the others to `quarantine` with their reason."""
    _define_batch(con, files, fmt, hour, partitioned, settings)
    has_dups = _find_duplicates(con) > 0
    _clear_hour(con, hour)
    start = naive_utc(hour)
    not_dup = "AND (source_file, file_row) NOT IN (SELECT (source_file, file_row) FROM dups)" if has_dups else ""
    kept = con.execute(f"""INSERT INTO calls SELECT ts, trace_id, call_id, parent_call_id, caller, callee,
        interface, rpc_type, rt_ms, is_error, source_file, '{batch_id}' FROM batch WHERE reason IS NULL {not_dup}""").fetchone()[0]
    quarantined = f"""TIMESTAMP '{start}', b.source_file, b.file_row, {{reason}}, ts, trace_id, call_id,
        parent_call_id, caller, callee, interface, rpc_type, rt_ms, is_error, '{batch_id}'"""
    if not _all_rows_accounted(files, partitioned, kept + _count(con, "dups")):
        con.execute(f"INSERT INTO quarantine SELECT {quarantined.format(reason='reason')} FROM batch b WHERE reason IS NOT NULL")
    if has_dups:
        con.execute(f"""INSERT INTO quarantine SELECT {quarantined.format(reason="'duplicate of row ' || d.first_row || ' in ' || d.first_file")}
            FROM batch b JOIN dups d USING (source_file, file_row) WHERE b.reason IS NULL""")
    for path, line, reason in _csv_reject_rows(con):
        con.execute("INSERT INTO quarantine (hour, source_file, file_row, reason, batch_id) VALUES (?, ?, ?, ?, ?)",
                    [start, path, line, reason, batch_id])


def _csv_reject_rows(con: duckdb.DuckDBPyConnection) -> list[tuple[str, int, str]]:
    if not con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'csv_rejects'").fetchone()[0]:
        return []
    return con.execute("""SELECT s.file_path, e.line, 'unparseable CSV line: ' || min(e.error_message)
                          FROM csv_rejects e JOIN csv_scans s USING (scan_id, file_id)
                          GROUP BY 1, 2 ORDER BY 1, 2""").fetchall()


def _count_per_file(con: duckdb.DuckDBPyConnection, files: list[FileCheck], hour: datetime) -> None:
    start, end = naive_utc(hour), naive_utc(hour + HOUR)
    kept = dict(con.execute("SELECT source_file, count(*) FROM calls WHERE ts >= ? AND ts < ? GROUP BY 1",
                            [start, end]).fetchall())
    bad = dict(con.execute("SELECT source_file, count(*) FROM quarantine WHERE hour = ? GROUP BY 1", [start]).fetchall())
    for f in files:
        f.rows_kept, f.rows_quarantined = kept.get(str(f.path), 0), bad.get(str(f.path), 0)
        f.rows_read = f.rows_kept + f.rows_quarantined


def _batch_id(hour: datetime, files: list[FileCheck]) -> str:
    digest = xxhash.xxh3_64("".join(sorted(f"{f.path}:{f.content_hash}" for f in files)).encode()).hexdigest()
    return f"{hour:%Y%m%dT%H}-{digest[:10]}"


def _unchanged(con: duckdb.DuckDBPyConnection, hour: datetime, files: list[FileCheck], fmt: TraceFormat) -> bool:
    seen = con.execute("SELECT path, content_hash, status, format FROM ingest_log WHERE hour = ?",
                       [naive_utc(hour)]).fetchall()
    now = {(str(f.path), f.content_hash, "ingested", fmt.name) for f in files}
    return bool(files) and all(f.ok for f in files) and set(seen) == now


def _write_log(con: duckdb.DuckDBPyConnection, report: IngestReport, fmt: TraceFormat) -> None:
    start = naive_utc(report.hour)
    con.execute("DELETE FROM ingest_log WHERE hour = ?", [start])
    now = naive_utc(datetime.now(timezone.utc))
    for f in report.files:
        con.execute("INSERT INTO ingest_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [start, str(f.path), fmt.name, f.size_bytes, f.content_hash, f.rows_read, f.rows_kept,
                     f.rows_quarantined, "ingested" if f.ok else f.status, f.error, report.batch_id, now])


def _recount_from_log(con: duckdb.DuckDBPyConnection, report: IngestReport) -> None:
    rows = {r[0]: r[1:] for r in con.execute(
        "SELECT path, rows_read, rows_kept, rows_quarantined, batch_id FROM ingest_log WHERE hour = ?",
        [naive_utc(report.hour)]).fetchall()}
    for f in report.files:
        f.rows_read, f.rows_kept, f.rows_quarantined, report.batch_id = rows[str(f.path)]


def _probe(con: duckdb.DuckDBPyConnection, f: FileCheck) -> None:
    """Read a whole file once, to find which file broke a batch read."""
    reader = f"read_parquet('{f.path}')" if f.kind == "parquet" else _csv_reader(f.path, ", store_rejects=true")
    try:
        con.execute(f"SELECT count(*), sum(hash(COLUMNS(*))) FROM {reader}").fetchall()
    except duckdb.Error as err:
        f.status, f.error = "error", f"{f.path}: unreadable {f.kind} file: {err}".splitlines()[0]


def _load_good_files(con: duckdb.DuckDBPyConnection, report: IngestReport, fmt: TraceFormat,
                     partitioned: bool, settings: Settings) -> list[FileCheck]:
    """Load all good files in one open transaction; if a file breaks the read, drop it and retry."""
    good = [f for f in report.files if f.ok]
    con.execute("BEGIN")
    if not good:
        return good
    try:
        _load(con, good, fmt, report.hour, partitioned, settings, report.batch_id)
        return good
    except duckdb.Error:
        con.execute("ROLLBACK")
    for f in good:
        _probe(con, f)
    good = [f for f in good if f.ok]
    con.execute("BEGIN")
    if good:
        _load(con, good, fmt, report.hour, partitioned, settings, report.batch_id)
    return good


def ingest_hour(settings: Settings, hour: datetime, sources: list[Path] | None = None,
                fmt_name: str | None = None, force: bool = False) -> IngestReport:
    """Replace the warehouse's rows for `hour` with what the trace files hold (idempotent)."""
    hour = hour_floor(hour)
    epoch = settings.trace_epoch
    fmt = make_format(fmt_name or settings.format, int(epoch.timestamp() * 1000) if epoch else None,
                      settings.span_mapping)
    paths, partitioned = discover_files(sources or [settings.incoming], hour)
    with opened(settings.warehouse) as con:
        report = IngestReport(hour=hour, batch_id="", files=[inspect_file(con, p, fmt) for p in paths])
        report.batch_id = _batch_id(hour, report.files)
        if not force and _unchanged(con, hour, report.files, fmt):
            _recount_from_log(con, report)
            report.skipped_unchanged = True
            return report
        good = _load_good_files(con, report, fmt, partitioned, settings)
        if not good:
            _clear_hour(con, hour)
        _count_per_file(con, good, hour)
        _write_log(con, report, fmt)
        con.execute("COMMIT")
    return report


def _clear_hour(con: duckdb.DuckDBPyConnection, hour: datetime) -> None:
    start, end = naive_utc(hour), naive_utc(hour + HOUR)
    con.execute("DELETE FROM calls WHERE ts >= ? AND ts < ?", [start, end])
    con.execute("DELETE FROM quarantine WHERE hour = ?", [start])


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
        epoch = settings.trace_epoch
        fmt = make_format(fmt_name or settings.format, int(epoch.timestamp() * 1000) if epoch else None,
                          settings.span_mapping)
        files = [p for s in flat for p in ([s] if s.is_file() else s.rglob("*")) if _is_trace_file(p)]
        con = duckdb.connect()
        checks = [c for c in (inspect_file(con, p, fmt) for p in files) if c.ok]
        if checks:
            con.execute(f"CREATE TEMP VIEW raw AS {_raw_select(checks, fmt)}")
            rows = con.execute(f"SELECT DISTINCT date_trunc('hour', ts) FROM ({fmt.normalise_sql({c for f in checks for c in f.columns})}) WHERE ts IS NOT NULL").fetchall()
            hours |= {r[0].replace(tzinfo=timezone.utc) for r in rows}
        con.close()
    return sorted(hours)
