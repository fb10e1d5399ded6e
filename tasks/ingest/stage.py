"""Stage 1, ingest: one hour of trace files (Parquet, CSV, CSV.gz; for the spans format also OTLP and
Jaeger JSON exports, `tasks.ingest.exports`) into the warehouse's `calls` table.

Per hour: find the files, fingerprint them, skip the hour if nothing changed since the last
ingest, else replace exactly that hour: normalised rows that pass the row checks go to `calls`,
the others to `quarantine` with their reason (`tasks.ingest.rows`). Unreadable files and files
missing required columns are recorded in `ingest_log` with the error; the good files still land.
Validation then fails the batch for them (see `tasks.ingest.validate`). Empty files are recorded
as `empty`; the hour goes on.

A landed hour is only replaced by a batch with rows: no files, no readable file or no row for the
hour raise `IngestError` and leave the warehouse as it was; so does a batch that keeps none of its
rows (all quarantined, e.g. a mapping with a wrong unit) where the hour has landed calls, forced or
not. No path, column name, setting or batch id becomes SQL text (see `tasks.ingest.files`): they
are bound, or validated numbers/datetimes.

Reads the trace files and `ingest_log`; writes `calls`, `quarantine` and `ingest_log` (one
transaction per hour). `hours_in_sources` reads trace files only, on an in-memory DuckDB.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import xxhash

from tasks.clock import HOUR, hour_floor, naive_utc
from tasks.ingest.files import (
    FileCheck,
    define_raw_view,
    discover_files,
    hour_folder,
    inspect_file,
    is_trace_file,
    trace_suffixes,
)
from tasks.ingest.formats import TraceFormat, make_format
from tasks.ingest.rows import BatchSpec, count_per_file, define_batch, load_batch
from tasks.ingest.sql import finite_setting, scalar
from tasks.settings import Settings
from tasks.warehouse import opened

LOG_COLUMNS = (
    "hour, path, format, size_bytes, content_hash, rows_read, rows_kept, rows_quarantined, status, error, "
    "batch_id, checked_at"
)


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
    """Replace the hour's `ingest_log` rows: one per file, with its counts, status and error."""
    start = naive_utc(report.hour)
    con.execute("DELETE FROM ingest_log WHERE hour = ?", [start])
    now = naive_utc(datetime.now(UTC))
    for f in report.files:
        con.execute(
            f"INSERT INTO ingest_log ({LOG_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
    """An unchanged hour: the counts and batch id of its landed batch, from `ingest_log`."""
    rows = {
        r[0]: r[1:]
        for r in con.execute(
            "SELECT path, rows_read, rows_kept, rows_quarantined, batch_id FROM ingest_log WHERE hour = ?",
            [naive_utc(report.hour)],
        ).fetchall()
    }
    for f in report.files:
        f.rows_read, f.rows_kept, f.rows_quarantined, report.batch_id = rows[str(f.path)]


def _batch_error(con: duckdb.DuckDBPyConnection, files: list[FileCheck], spec: BatchSpec) -> str | None:
    """Read and normalise `files` without loading anything: the error that breaks them, if any."""
    try:
        define_batch(con, files, spec)
        con.execute("SELECT count(*), sum(hash(COLUMNS(*))) FROM batch").fetchall()
        return None
    except duckdb.Error as err:
        return str(err).splitlines()[0]


def _drop_breaking_files(con: duckdb.DuckDBPyConnection, files: list[FileCheck], spec: BatchSpec) -> list[FileCheck]:
    """After a failed batch: mark the files that break it (alone, or next to the files before them)
    and return the others. Slow (a read per file and per growing set), so only on failure."""
    for f in files:
        if (err := _batch_error(con, [f], spec)) is not None:
            f.mark_unreadable(err)
    usable = [f for f in files if f.ok]
    if len(usable) < 2 or _batch_error(con, usable, spec) is None:
        return usable
    together: list[FileCheck] = []
    for f in usable:  # drift between files (e.g. one column typed differently): keep the first
        if (err := _batch_error(con, together + [f], spec)) is None:
            together.append(f)
        else:
            f.mark_unreadable(err, f"cannot be read together with {len(together)} earlier file(s) as a")
    return together


def _load_good_files(con: duckdb.DuckDBPyConnection, report: IngestReport, spec: BatchSpec) -> list[FileCheck]:
    """Load the good files in one open transaction (left open for the caller to commit); if the
    batch breaks, record the files that break it and load the others."""
    good = [f for f in report.files if f.ok]
    if not good:
        return good
    con.execute("BEGIN")
    try:
        load_batch(con, good, spec, report.batch_id)
        return good
    except duckdb.Error:
        con.execute("ROLLBACK")
    good = _drop_breaking_files(con, good, spec)
    if good:
        con.execute("BEGIN")
        load_batch(con, good, spec, report.batch_id)
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
    raise `IngestError` and leave calls, quarantine and ingest_log as they were; so does a batch
    that keeps no row where the hour has landed calls (`force` included).
    """
    hour, sources = hour_floor(hour), list(sources or [settings.incoming])
    fmt = _trace_format(settings, fmt_name)
    rt_max_ms = finite_setting(settings.rt_max_ms, "rt_max_ms")
    paths, partitioned = discover_files(sources, hour, trace_suffixes(fmt))
    if not paths:
        where = f" (no partition folder {hour_folder(hour)} with trace files)" if partitioned else ""
        raise _refuse(hour, sources, f"no trace files{where}")
    spec = BatchSpec(fmt=fmt, hour=hour, partitioned=partitioned, rt_max_ms=rt_max_ms)
    with opened(settings.warehouse) as con:
        report = IngestReport(hour=hour, batch_id="", files=[inspect_file(con, p, fmt) for p in paths])
        report.batch_id = _batch_id(hour, report.files)
        if not force and _unchanged(con, hour, report.files, fmt):
            _recount_from_log(con, report)
            report.skipped_unchanged = True
            return report
        _replace_hour(con, report, spec, sources)
    return report


def _landed_calls(con: duckdb.DuckDBPyConnection, hour: datetime) -> int:
    start, end = naive_utc(hour), naive_utc(hour + HOUR)
    return int(scalar(con, "SELECT count(*) FROM calls WHERE ts >= ? AND ts < ?", [start, end]))


def _kept_nothing(con: duckdb.DuckDBPyConnection, report: IngestReport, landed: int) -> str:
    """Why a batch that keeps no row does not replace `landed` calls: its rows and their commonest reason."""
    reason = con.execute(
        "SELECT reason FROM quarantine WHERE hour = ? GROUP BY reason ORDER BY count(*) DESC, reason LIMIT 1",
        [naive_utc(report.hour)],
    ).fetchall()
    why = f", most for: {reason[0][0]}" if reason else ""
    return (
        f"the new batch keeps none of its {report.rows_read} rows ({report.rows_quarantined} quarantined{why}) "
        f"and would replace {landed} landed calls with none"
    )


def _replace_hour(con: duckdb.DuckDBPyConnection, report: IngestReport, spec: BatchSpec, sources: list[Path]) -> None:
    """Load the good files and log every file, in one transaction; refuse (rolled back) a batch without
    rows, and a batch that keeps no row where the hour has landed calls."""
    landed = _landed_calls(con, spec.hour)
    try:
        good = _load_good_files(con, report, spec)
    except duckdb.Error as err:  # the files passed one by one but not as a batch
        raise _refuse(spec.hour, sources, f"the batch cannot be loaded: {str(err).splitlines()[0]}") from err
    count_per_file(con, good, spec.hour)
    if not good or report.rows_read == 0:  # not a good batch: undo the replacement
        if good:
            con.execute("ROLLBACK")
        problems = "; ".join(f.error for f in report.files if f.error)
        why = f"no rows for this hour in {len(report.files)} file(s)" + (f" ({problems})" if problems else "")
        raise _refuse(spec.hour, sources, why)
    if report.rows_kept == 0 and landed:
        why = _kept_nothing(con, report, landed)
        con.execute("ROLLBACK")
        raise _refuse(spec.hour, sources, why)
    _write_log(con, report, spec.fmt)
    con.execute("COMMIT")


def _distinct_hours(con: duckdb.DuckDBPyConnection, checks: list[FileCheck], fmt: TraceFormat) -> set[datetime]:
    """Hours the rows of `checks` fall into; files that break the read are left for ingest to record."""
    if not checks:
        return set()
    try:
        normalised = define_raw_view(con, checks, fmt)
        rows = con.execute(
            f"SELECT DISTINCT date_trunc('hour', ts) FROM ({normalised}) WHERE ts IS NOT NULL"
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
        suffixes = trace_suffixes(fmt)
        files = [p for s in flat for p in ([s] if s.is_file() else s.rglob("*")) if is_trace_file(p, suffixes)]
        with duckdb.connect() as con:
            hours |= _distinct_hours(con, [c for c in (inspect_file(con, p, fmt) for p in files) if c.ok], fmt)
    return sorted(hours)
