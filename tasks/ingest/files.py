"""An hour's trace files: find them, fingerprint them, inspect them, and read them as one relation.

Paths and column names come from outside and never become SQL text: a path reaches DuckDB as a
bound parameter, or as a DuckDB variable set with a bound parameter (`SET VARIABLE v = ?`, read
back with `getvariable('v')`) where the SQL ends up in a view, which cannot hold parameters;
a column name only through `quote_identifier`.

Temporary objects it defines on the caller's connection: the TEMP VIEW `raw` (`define_raw_view`), the
DuckDB variables holding the batch's paths, the Arrow tables of its JSON span exports (registered as
`EXPORT_TABLE`; parsed once, by `inspect_file`, with `tasks.ingest.exports`) and, while DuckDB reads
CSV files, the reject tables `CSV_REJECTS_TABLE` / `CSV_SCANS_TABLE` (unparseable lines;
`tasks.ingest.rows` quarantines them). Reads trace files only; writes no warehouse table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import xxhash

from tasks.ingest.exports import EXPORT_ROW, EXPORT_SUFFIXES, ExportError, read_span_export
from tasks.ingest.formats import Spans, TraceFormat, quote_identifier, set_format_variables
from tasks.ingest.sql import scalar

TRACE_SUFFIXES = (".parquet", ".csv", ".csv.gz")  # JSON span exports too, for the spans format
# store_rejects keeps the sniffer from reading a malformed line as the header
CSV_OPTIONS = "all_varchar=true, header=true, store_rejects=true"
CSV_REJECTS_TABLE, CSV_SCANS_TABLE = "csv_rejects", "csv_scans"  # filled by read_csv(store_rejects)
REJECTS = f", rejects_table='{CSV_REJECTS_TABLE}', rejects_scan='{CSV_SCANS_TABLE}'"
PARQUET_FILES = "rpcwatch_parquet_files"  # DuckDB variable: the batch's Parquet paths
EXPORT_TABLE = "rpcwatch_export_{}"  # the n-th JSON export's spans, an Arrow table registered on the connection


@dataclass
class FileCheck:
    path: Path
    kind: str  # parquet | csv | json
    size_bytes: int
    content_hash: str
    columns: tuple[str, ...] = ()
    rows_in_file: int | None = None  # known up front for Parquet (footer metadata) and JSON exports
    status: str = "ok"  # ok | error | schema_error | empty
    error: str | None = None
    rows_read: int = 0
    rows_kept: int = 0
    rows_quarantined: int = 0
    spans: pa.Table | None = field(default=None, repr=False, compare=False)  # a JSON export, read once

    @property
    def ok(self) -> bool:
        """Loadable: read with the batch."""
        return self.status == "ok"

    @property
    def failed(self) -> bool:
        """Unreadable or unusable (an empty file is recorded, not failed)."""
        return self.status not in ("ok", "empty")

    def mark_unreadable(self, err: Exception | str, why: str = "unreadable") -> None:
        self.status, self.error = "error", f"{self.path}: {why} {self.kind} file: {err}".splitlines()[0]


def trace_suffixes(fmt: TraceFormat) -> tuple[str, ...]:
    """The file endings `fmt` reads: JSON span exports only for the spans format (a stray JSON
    file next to Alibaba traces is no trace file)."""
    return TRACE_SUFFIXES + (EXPORT_SUFFIXES if isinstance(fmt, Spans) else ())


def is_trace_file(path: Path, suffixes: tuple[str, ...] = TRACE_SUFFIXES) -> bool:
    return path.is_file() and path.name.endswith(suffixes) and not path.name.startswith(".")


def file_kind(path: Path) -> str:
    if path.name.endswith(".parquet"):
        return "parquet"
    return "json" if path.name.endswith(EXPORT_SUFFIXES) else "csv"


def hour_folder(hour: datetime) -> str:
    return f"dt={hour:%Y-%m-%d}/hour={hour:%H}"


def discover_files(
    sources: list[Path], hour: datetime, suffixes: tuple[str, ...] = TRACE_SUFFIXES
) -> tuple[list[Path], bool]:
    """Files for `hour` and whether they come from hour partitions (`dt=YYYY-MM-DD/hour=HH`).

    A source is a file, or a folder: hive-partitioned (only that hour's folder is read) or flat
    (every trace file under it, by `suffixes`, is read and rows are filtered to the hour).
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
            folder = source / hour_folder(hour)
            found = sorted(p for p in folder.rglob("*") if is_trace_file(p, suffixes)) if folder.is_dir() else []
            files.extend(found)
        else:
            files.extend(sorted(p for p in source.rglob("*") if is_trace_file(p, suffixes)))
    return files, partitioned


def fingerprint(path: Path) -> str:
    digest = xxhash.xxh3_128()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _columns_and_rows(con: duckdb.DuckDBPyConnection, check: FileCheck) -> tuple[tuple[str, ...], int | None]:
    path, kind = check.path, check.kind
    if kind == "json":  # parsed here, once: the batch reads the table (`raw_select`)
        check.spans = read_span_export(path)
        return tuple(c for c in check.spans.column_names if c != EXPORT_ROW), check.spans.num_rows
    if kind == "parquet":
        rows = con.execute(
            "SELECT name FROM parquet_schema(?) WHERE num_children IS NULL OR num_children = 0", [str(path)]
        ).fetchall()
        n = scalar(con, "SELECT sum(num_rows) FROM parquet_file_metadata(?)", [str(path)])
        return tuple(r[0] for r in rows), int(n or 0)
    rows = con.execute(f"DESCRIBE SELECT * FROM read_csv(?, {CSV_OPTIONS})", [str(path)]).fetchall()
    return tuple(r[0] for r in rows), None


def inspect_file(con: duckdb.DuckDBPyConnection, path: Path, fmt: TraceFormat) -> FileCheck:
    """Size, content hash and columns of one file; a bad file is recorded, never raised."""
    check = FileCheck(path=path, kind=file_kind(path), size_bytes=path.stat().st_size, content_hash=fingerprint(path))
    if check.size_bytes == 0:  # nothing to read: recorded as empty, not as broken
        check.status, check.error = "empty", f"{path}: file has no rows (0 bytes)"
        return check
    try:
        check.columns, check.rows_in_file = _columns_and_rows(con, check)
    except (duckdb.Error, ExportError) as err:
        check.mark_unreadable(err)
        return check
    missing = [c for c in fmt.required if c not in check.columns]
    if missing:
        check.status = "schema_error"
        check.error = (
            f"{path}: missing column(s) {', '.join(repr(c) for c in missing)} required by "
            f"format {fmt.name} (found: {', '.join(check.columns)})"
        )
    elif check.rows_in_file == 0:
        check.status, check.error = "empty", f"{path}: file has no rows"
    return check


def _select_list(wanted: list[str], every: list[str], have: set[str]) -> str:
    """The format's columns (NULL where this file lacks an optional one) and the row's raw hash
    over every column of the batch (NULL where this file lacks it), all names quoted."""

    def value(c: str) -> str:
        return quote_identifier(c) if c in have else "NULL"

    cols = [quote_identifier(c) if c in have else f"NULL AS {quote_identifier(c)}" for c in wanted]
    return ", ".join(cols) + ", hash(" + ", ".join(value(c) for c in every) + ") AS raw_hash"


def raw_select(con: duckdb.DuckDBPyConnection, files: list[FileCheck], fmt: TraceFormat) -> str:
    """One relation over `files`: the format's columns, `source_file`, `file_row` (1-based).

    Sets the DuckDB variables holding the paths on `con`: the SQL is only valid on it.
    """
    wanted = list(fmt.required) + [c for c in fmt.optional if any(c in f.columns for f in files)]
    every = sorted({c for f in files for c in f.columns})
    parts = []
    parquet = [f for f in files if f.kind == "parquet"]
    if parquet:
        con.execute(f"SET VARIABLE {PARQUET_FILES} = ?", [[str(f.path) for f in parquet]])
        have = {c for f in parquet for c in f.columns}
        parts.append(
            f"SELECT {_select_list(wanted, every, have)}, filename AS source_file, "
            f"file_row_number + 1 AS file_row FROM read_parquet(getvariable('{PARQUET_FILES}'), "
            f"union_by_name=true, filename=true, file_row_number=true)"
        )
    for i, f in enumerate(f for f in files if f.kind == "csv"):
        var = f"rpcwatch_csv_{int(i)}"  # a variable per CSV file: its path, bound
        con.execute(f"SET VARIABLE {var} = ?", [str(f.path)])
        parts.append(
            f"SELECT {_select_list(wanted, every, set(f.columns))}, getvariable('{var}') AS source_file, "
            f"row_number() OVER () AS file_row FROM read_csv(getvariable('{var}'), {CSV_OPTIONS}{REJECTS})"
        )
    for i, f in enumerate(f for f in files if f.kind == "json"):
        var, table = f"rpcwatch_json_{int(i)}", EXPORT_TABLE.format(int(i))
        con.execute(f"SET VARIABLE {var} = ?", [str(f.path)])
        con.register(table, f.spans if f.spans is not None else read_span_export(f.path))
        parts.append(
            f"SELECT {_select_list(wanted, every, set(f.columns))}, getvariable('{var}') AS source_file, "
            f"{EXPORT_ROW} AS file_row FROM {table}"
        )
    return " UNION ALL BY NAME ".join(parts)


def define_raw_view(con: duckdb.DuckDBPyConnection, files: list[FileCheck], fmt: TraceFormat) -> str:
    """TEMP VIEW `raw` over `files` (see `raw_select`) and the format's variables bound on `con`;
    returns the format's SQL normalising `raw` (valid on `con` only)."""
    set_format_variables(con, fmt)
    con.execute(f"CREATE OR REPLACE TEMP VIEW raw AS {raw_select(con, files, fmt)}")
    return fmt.normalise_sql({c for f in files for c in f.columns})
