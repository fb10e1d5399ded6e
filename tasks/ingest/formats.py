"""Trace formats: which raw columns each needs, and the SQL that normalises raw rows into calls.

Every `normalise_sql` reads a relation named `raw` (the format's columns as text or native types,
plus `source_file`, `file_row` and `raw_hash`, a hash of all the row's raw values) and yields the
columns of `NORMALISED`. Nothing is filtered here: rows that cannot be normalised keep NULLs and
are quarantined by the row checks (`tasks.ingest.rows`).

No text from outside (column names, mapping values) becomes SQL text: column names go through
`quote_identifier`, the one quoting helper; mapping values are DuckDB variables bound as
parameters (`set_format_variables`, read back with `getvariable`), because the SQL ends up in
views, which cannot hold prepared parameters.

A span mapping file is checked against `MAPPING_KEYS` when loaded (unknown keys, wrong types and
values are one-line ValueErrors naming the file and the key).

Reads and writes no table: it only builds SQL (and reads the bundled span mappings, `mappings/`).
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tasks.settings import KNOWN_RPC_TYPES

NORMALISED = (
    "ts",
    "trace_id",
    "call_id",
    "parent_call_id",
    "caller",
    "callee",
    "interface",
    "rpc_type",
    "rt_ms",
    "server_rt_ms",
    "is_error",
    "source_file",
    "file_row",
    "raw_hash",
)
MISSING_MARKERS = "('', 'UNKNOWN', 'UNAVAILABLE', 'NAN', 'nan', 'None', 'NULL', '(?)')"
MAPPINGS = Path(__file__).with_name("mappings")
UNITS_TO_MS = {"ns": 1e-6, "us": 1e-3, "ms": 1.0, "s": 1e3}
# ms since the Unix epoch that make a valid timestamp (years 1..9999): outside it a value is
# unparseable, and (value + epoch) * 1000 cannot overflow INT64
MIN_MS, MAX_MS = -62_135_596_800_000, 253_402_300_799_999


class Executes(Protocol):
    def execute(self, query: str, parameters: object = ...) -> Any: ...


def quote_identifier(name: str) -> str:
    """The one quoting helper for identifiers from outside (file headers, mapping columns)."""
    return '"' + str(name).replace('"', '""') + '"'


def _int(value: object, what: str) -> int:
    """A validated int, safe to format into SQL text (rejects text and floats)."""
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def set_format_variables(con: Executes, fmt: TraceFormat) -> None:
    """Bind the format's outside values as the DuckDB variables its `normalise_sql` reads."""
    for name, value in fmt.variables().items():
        con.execute(f"SET VARIABLE {name} = ?", [value])  # name: a constant of this module


def _service(column: str) -> str:
    """A service name with Alibaba's missing markers made one canonical `UNKNOWN`."""
    return f"CASE WHEN {column} IS NULL OR {column} IN {MISSING_MARKERS} THEN 'UNKNOWN' ELSE {column} END"


def _text_or_null(column: str) -> str:
    return f"CASE WHEN {column} IN {MISSING_MARKERS} THEN NULL ELSE {column} END"


def _parent_rpc_id(column: str) -> str:
    """Alibaba rpc ids: the parent of `0.1.2` is `0.1`; `0` and `0.1`-style roots keep `0`."""
    return f"CASE WHEN contains({column}, '.') THEN regexp_replace({column}, '\\.[^.]*$', '') END"


def _epoch_ts(ms_column: str, epoch_ms: int) -> str:
    """Epoch + ms as a timestamp; NULL (unparseable) outside years 1..9999 instead of an overflow."""
    epoch = _int(epoch_ms, "epoch_ms")
    ms = f"TRY_CAST({ms_column} AS BIGINT)"
    return (
        f"CASE WHEN {ms} BETWEEN {MIN_MS - epoch} AND {MAX_MS - epoch} THEN make_timestamp(({ms} + {epoch}) * 1000) END"
    )


@dataclass(frozen=True)
class AlibabaV2022:
    """Alibaba cluster-trace v2022 CallGraph (plus rpcwatch's optional `error` column)."""

    epoch_ms: int = 0
    name: str = "alibaba-v2022"
    required: tuple[str, ...] = ("timestamp", "traceid", "rpc_id", "rpctype", "um", "dm", "interface", "rt")
    optional: tuple[str, ...] = ("error",)

    def variables(self) -> dict[str, object]:
        return {}

    def normalise_sql(self, columns: set[str]) -> str:
        error = "coalesce(TRY_CAST(error AS INTEGER), 0) <> 0" if "error" in columns else "false"
        return f"""
        SELECT {_epoch_ts('"timestamp"', self.epoch_ms)} AS ts,
               nullif(traceid, '') AS trace_id,
               nullif(rpc_id, '') AS call_id,
               {_parent_rpc_id("rpc_id")} AS parent_call_id,
               {_service("um")} AS caller, {_service("dm")} AS callee,
               {_text_or_null("interface")} AS interface,
               CASE WHEN rpctype IS NULL OR rpctype IN {MISSING_MARKERS} THEN 'UNKNOWN' ELSE rpctype END AS rpc_type,
               TRY_CAST(rt AS DOUBLE) AS rt_ms, NULL::DOUBLE AS server_rt_ms, {error} AS is_error,
               source_file, file_row, raw_hash
        FROM raw"""


@dataclass(frozen=True)
class AlibabaV2021:
    """Alibaba cluster-trace v2021 MSCallGraph: relative timestamps, caller+callee double rows.

    An RPC appears as the caller's row (rt >= 0) and the callee's row (rt < 0) under one rpcid;
    the k-th caller row of a (trace, rpcid, um, dm, interface, type) group is merged with its k-th
    callee row. A callee row without a caller row still counts as one call (rt = |rt|).
    """

    epoch_ms: int = 0
    name: str = "alibaba-v2021"
    required: tuple[str, ...] = ("traceid", "timestamp", "rpcid", "um", "rpctype", "dm", "interface", "rt")
    optional: tuple[str, ...] = ()

    def variables(self) -> dict[str, object]:
        return {}

    def normalise_sql(self, columns: set[str]) -> str:
        keys = "traceid, rpcid, rpctype, um, dm, interface"
        return f"""
        WITH typed AS (
            SELECT {keys}, TRY_CAST("timestamp" AS BIGINT) AS t_ms, TRY_CAST(rt AS DOUBLE) AS rt_v,
                   source_file, file_row, raw_hash FROM raw),
        paired AS (
            SELECT *, row_number() OVER (
                PARTITION BY {keys}, rt_v < 0 ORDER BY t_ms, source_file, file_row) AS k
            FROM typed),
        merged AS (
            SELECT {keys}, min(t_ms) AS t_ms,
                   coalesce(max(rt_v) FILTER (WHERE rt_v >= 0), -min(rt_v)) AS rt_v,
                   min(source_file) AS source_file, min(file_row) AS file_row,
                   hash(list_sort(list(raw_hash))) AS raw_hash
            FROM paired GROUP BY {keys}, k)
        SELECT {_epoch_ts("t_ms", self.epoch_ms)} AS ts,
               nullif(traceid, '') AS trace_id, nullif(rpcid, '') AS call_id,
               {_parent_rpc_id("rpcid")} AS parent_call_id,
               {_service("um")} AS caller, {_service("dm")} AS callee,
               {_text_or_null("interface")} AS interface,
               CASE WHEN rpctype IS NULL OR rpctype IN {MISSING_MARKERS} THEN 'UNKNOWN' ELSE rpctype END AS rpc_type,
               rt_v AS rt_ms, NULL::DOUBLE AS server_rt_ms, false AS is_error, source_file, file_row, raw_hash
        FROM merged"""


@dataclass(frozen=True)
class SpanMapping:
    """Which columns of a span export hold what (OpenTelemetry/Jaeger/Zipkin-style exports)."""

    trace_id: str
    span_id: str
    parent_id: str
    service: str
    operation: str
    start: str
    start_unit: str = "ns"
    end: str | None = None
    end_unit: str = "ns"
    duration: str | None = None
    duration_unit: str = "us"
    status: str | None = None
    error_values: tuple[str, ...] = ("ERROR", "STATUS_CODE_ERROR", "2")
    root_parent_values: tuple[str, ...] = ("", "root", "0", "0000000000000000")
    service_regex: str | None = None  # first group = service (e.g. strip a pod-name suffix)
    rpc_type: str = "span"
    kind: str | None = None  # span kind column (client/server, OTel SPAN_KIND_*, Zipkin CLIENT/SERVER)

    @classmethod
    def load(cls, name_or_path: str) -> SpanMapping:
        """A mapping from a JSON file, or a bundled one by name; checked against `MAPPING_KEYS`
        (ValueError in one line naming the file and the key)."""
        path = Path(name_or_path)
        if not (path.suffix == ".json" and path.is_file()):
            path = MAPPINGS / f"{name_or_path}.json"
            if not path.is_file():
                raise ValueError(
                    f"span mapping {name_or_path!r} is neither a JSON file nor a bundled mapping "
                    f"({', '.join(bundled_mappings())})"
                )
        return cls(**_checked_mapping(path))


# what a span mapping's keys hold: (kind, required); a "column" names a column of the export, a
# "unit" is one of UNITS_TO_MS, "rpc_type" one of KNOWN_RPC_TYPES, "texts" a list of texts
MAPPING_KEYS: dict[str, tuple[str, bool]] = {
    "trace_id": ("column", True),
    "span_id": ("column", True),
    "parent_id": ("column", True),
    "service": ("column", True),
    "operation": ("column", True),
    "start": ("column", True),
    "start_unit": ("unit", False),
    "end": ("column or null", False),
    "end_unit": ("unit", False),
    "duration": ("column or null", False),
    "duration_unit": ("unit", False),
    "status": ("column or null", False),
    "error_values": ("texts", False),
    "root_parent_values": ("texts", False),
    "service_regex": ("text or null", False),
    "rpc_type": ("rpc_type", False),
    "kind": ("column or null", False),
}


def _what(value: object) -> str:
    """The JSON type of a value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a text"
    return "a list" if isinstance(value, list) else "an object"


def _key_problem(kind: str, value: object) -> str | None:
    """Why `value` cannot be a mapping key of `kind` (see MAPPING_KEYS); None when it can."""
    choices = {"unit": tuple(UNITS_TO_MS), "rpc_type": KNOWN_RPC_TYPES}.get(kind)
    if choices is not None:
        ok = isinstance(value, str) and value in choices
        return None if ok else f"must be one of {', '.join(choices)}, got {value!r}"
    want = {"column": "a text", "texts": "a list of texts"}.get(kind, "a text or null")
    if value is None:
        return None if kind.endswith("or null") else f"must be {want}, got null"
    if kind == "texts":
        if not isinstance(value, list):
            return f"must be {want}, got {_what(value)}"
        odd = [v for v in value if not isinstance(v, str)]
        return f"must be {want}, got a list holding {_what(odd[0])}" if odd else None
    if not isinstance(value, str):
        return f"must be {want}, got {_what(value)}"
    if kind.startswith("column") and not value.strip():
        return "must not be empty (it names a column)"
    return None


def _checked_mapping(path: Path) -> dict[str, Any]:
    """The mapping file's keys, checked against MAPPING_KEYS, as SpanMapping's arguments."""
    where = f"span mapping {path}"
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON: line {err.lineno} column {err.colno}: {err.msg}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{where}: cannot be read: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: must be a JSON object, got {_what(data)}")
    if unknown := [k for k in data if k not in MAPPING_KEYS]:
        raise ValueError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(MAPPING_KEYS)})"
        )
    for key, (kind, required) in MAPPING_KEYS.items():
        if key not in data:
            if required:
                needed = ", ".join(k for k, (_, req) in MAPPING_KEYS.items() if req)
                raise ValueError(f"{where}: missing key {key!r} (required: {needed})")
        elif problem := _key_problem(kind, data[key]):
            raise ValueError(f"{where}: key {key!r} {problem}")
    if data.get("end") is None and data.get("duration") is None:
        raise ValueError(f"{where} needs `end` or `duration` (a column each)")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def bundled_mappings() -> list[str]:
    return sorted(p.stem for p in MAPPINGS.glob("*.json"))


# span kind values (lower-cased) that name a client / server span; any other non-empty value is
# another kind (internal, producer, consumer), which never pairs
CLIENT_KINDS = ("client", "span_kind_client", "3")
SERVER_KINDS = ("server", "span_kind_server", "2")
NO_KIND = ("", "unspecified", "span_kind_unspecified", "0")


@dataclass(frozen=True)
class Spans:
    """Spans: one call per span, except that a client span and its server child are ONE call.

    A span's caller is its parent span's service (`USER` at roots). A client span C paired with its
    server child S becomes one call: id and parent of C, caller = C's service, callee = S's service,
    interface = S's operation (C's when S has none), rt_ms = C's latency (network + queueing +
    callee), server_rt_ms = S's latency (NULL for unpaired calls); S's children hang under C's id.
    The pair, where the mapping has a `kind` column: C has kind client and exactly one child of
    kind server. Where C's kind is unknown (no column, or empty), it is inferred: C's parent has
    the same service as C, C has exactly one child, and that child (kind unknown or server) is in
    another service. A client span without its server child stays a plain call.

    A span id that occurs several times in a trace: every row stays a call of its own (with its own
    parent id); as a parent, and as the server side of a pair, the id stands for its first row (by
    source file, then row): that row's service is its children's caller, and only that row merges
    into the client's call (the id's other rows stay calls of their own, under the client's id).
    Deduplicating ids before the joins keeps each join one-to-one: linear in the spans.
    """

    mapping: SpanMapping
    name: str = "spans"

    @property
    def required(self) -> tuple[str, ...]:
        m = self.mapping
        wanted = [m.trace_id, m.span_id, m.parent_id, m.service, m.operation, m.start, m.end, m.duration]
        return tuple(c for c in wanted if c is not None)

    @property
    def optional(self) -> tuple[str, ...]:
        """Status and kind: a file without them has no errors and infers client/server pairs."""
        return tuple(c for c in (self.mapping.status, self.mapping.kind) if c is not None)

    def variables(self) -> dict[str, object]:
        """Mapping values (from a JSON file: outside text), bound as DuckDB variables."""
        m = self.mapping
        return {
            "rpcwatch_span_regex": m.service_regex,
            "rpcwatch_span_roots": [str(v) for v in m.root_parent_values],
            "rpcwatch_span_errors": [str(v) for v in m.error_values],
            "rpcwatch_span_rpc_type": str(m.rpc_type),
        }

    def _timestamp(self) -> str:
        """Start as a timestamp; NULL (unparseable) when it does not fit, instead of an overflow."""
        per_us = _to_ms(self.mapping.start_unit) * 1000
        us = f"TRY_CAST(TRY_CAST({quote_identifier(self.mapping.start)} AS HUGEINT) * {per_us!r} AS BIGINT)"
        return f"CASE WHEN {us} BETWEEN {MIN_MS * 1000} AND {MAX_MS * 1000} THEN make_timestamp({us}) END"

    def _rt_ms(self) -> str:
        m = self.mapping
        if m.duration is not None:
            return f"TRY_CAST({quote_identifier(m.duration)} AS DOUBLE) * {_to_ms(m.duration_unit)!r}"
        if m.end is None:  # `SpanMapping.load` refuses such a mapping; a hand-built one may not
            raise ValueError("span mapping needs `end` or `duration`")
        start_ms = f"TRY_CAST({quote_identifier(m.start)} AS HUGEINT) * {_to_ms(m.start_unit)!r}"
        end_ms = f"TRY_CAST({quote_identifier(m.end)} AS HUGEINT) * {_to_ms(m.end_unit)!r}"
        return f"CAST({end_ms} - {start_ms} AS DOUBLE)"

    def _kind(self, columns: set[str]) -> str:
        """'client', 'server', 'other' or NULL (unknown: no kind column, or an empty value)."""
        if self.mapping.kind is None or self.mapping.kind not in columns:
            return "CAST(NULL AS VARCHAR)"
        k = f"lower(trim(CAST({quote_identifier(self.mapping.kind)} AS VARCHAR)))"
        return f"""CASE WHEN {k} IN {CLIENT_KINDS} THEN 'client' WHEN {k} IN {SERVER_KINDS} THEN 'server'
                    WHEN {k} IS NULL OR {k} IN {NO_KIND} THEN NULL ELSE 'other' END"""

    def _spans_sql(self, columns: set[str]) -> str:
        """One row per raw span: the mapping's columns typed, service extracted, kind normalised."""
        m = self.mapping
        service = quote_identifier(m.service)
        if m.service_regex:
            service = (
                f"coalesce(nullif(regexp_extract({service}, getvariable('rpcwatch_span_regex'), 1), ''), {service})"
            )
        parent = quote_identifier(m.parent_id)
        error = "false"
        if m.status is not None and m.status in columns:
            error = (
                f"coalesce(list_contains(getvariable('rpcwatch_span_errors')::VARCHAR[], "
                f"CAST({quote_identifier(m.status)} AS VARCHAR)), false)"
            )
        return f"""
            SELECT {self._timestamp()} AS ts,
                   nullif(trim(CAST({quote_identifier(m.trace_id)} AS VARCHAR)), '') AS trace_id,
                   nullif(trim(CAST({quote_identifier(m.span_id)} AS VARCHAR)), '') AS call_id,
                   CASE WHEN {parent} IS NULL OR list_contains(getvariable('rpcwatch_span_roots')::VARCHAR[],
                                                               trim(CAST({parent} AS VARCHAR))) THEN NULL
                        ELSE CAST({parent} AS VARCHAR) END AS parent_call_id,
                   {service} AS service, nullif(CAST({quote_identifier(m.operation)} AS VARCHAR), '') AS interface,
                   {self._kind(columns)} AS kind,
                   {self._rt_ms()} AS rt_ms, {error} AS is_error, source_file, file_row, raw_hash
            FROM raw"""

    def normalise_sql(self, columns: set[str]) -> str:
        """Needs `set_format_variables` on the connection first (the mapping's values)."""
        return f"""
        WITH s AS ({self._spans_sql(columns)}),
        firsts AS (SELECT trace_id, call_id, arg_min({{'parent_call_id': parent_call_id, 'service': service,
                                                     'kind': kind}}, (source_file, file_row)) AS first_row
                   FROM s WHERE trace_id IS NOT NULL AND call_id IS NOT NULL GROUP BY ALL),
        ids AS (SELECT trace_id, call_id, first_row.* FROM firsts),
        kids AS (SELECT trace_id, parent_call_id AS call_id, count(*) AS n_kids,
                        count(*) FILTER (WHERE kind = 'server') AS n_server,
                        any_value(call_id) FILTER (WHERE kind = 'server') AS server_kid,
                        any_value(call_id) AS kid, any_value(service) AS kid_service, any_value(kind) AS kid_kind
                 FROM ids WHERE parent_call_id IS NOT NULL GROUP BY ALL),
        pairs AS (
            SELECT x.trace_id, x.call_id AS client_id,
                   CASE WHEN x.kind = 'client' THEN k.server_kid ELSE k.kid END AS server_id
            FROM ids x JOIN kids k USING (trace_id, call_id)
            LEFT JOIN ids p ON p.trace_id = x.trace_id AND p.call_id = x.parent_call_id
            WHERE (x.kind = 'client' AND k.n_server = 1)
               OR (x.kind IS NULL AND k.n_kids = 1 AND coalesce(k.kid_kind, 'server') = 'server'
                   AND p.service = x.service AND k.kid_service <> x.service)),
        srv AS (
            SELECT s.*, pr.client_id FROM s JOIN pairs pr ON pr.trace_id = s.trace_id AND pr.server_id = s.call_id
            QUALIFY row_number() OVER (PARTITION BY s.trace_id, s.call_id ORDER BY s.source_file, s.file_row) = 1),
        kept AS (SELECT * FROM s ANTI JOIN srv USING (source_file, file_row))
        SELECT x.ts, x.trace_id, x.call_id, coalesce(up.client_id, x.parent_call_id) AS parent_call_id,
               CASE WHEN v.call_id IS NOT NULL THEN coalesce(x.service, 'UNKNOWN')
                    WHEN x.parent_call_id IS NULL THEN 'USER' ELSE coalesce(p.service, 'UNKNOWN') END AS caller,
               coalesce(CASE WHEN v.call_id IS NOT NULL THEN v.service ELSE x.service END, 'UNKNOWN') AS callee,
               coalesce(v.interface, x.interface) AS interface,
               CAST(getvariable('rpcwatch_span_rpc_type') AS VARCHAR) AS rpc_type,
               x.rt_ms, v.rt_ms AS server_rt_ms, x.is_error OR coalesce(v.is_error, false) AS is_error,
               x.source_file, x.file_row,
               CASE WHEN v.call_id IS NULL THEN x.raw_hash ELSE hash(x.raw_hash, v.raw_hash) END AS raw_hash
        FROM kept x
        LEFT JOIN ids p ON p.trace_id = x.trace_id AND p.call_id = x.parent_call_id
        LEFT JOIN srv v ON v.trace_id = x.trace_id AND v.client_id = x.call_id
        LEFT JOIN pairs up ON up.trace_id = x.trace_id AND up.server_id = x.parent_call_id"""


def _to_ms(unit: str) -> float:
    if unit not in UNITS_TO_MS:
        raise ValueError(f"unknown time unit {unit!r} in span mapping; use one of {', '.join(UNITS_TO_MS)}")
    return UNITS_TO_MS[unit]


TraceFormat = AlibabaV2022 | AlibabaV2021 | Spans


def make_format(name: str, epoch_ms: int | None = None, span_mapping: str = "otel") -> TraceFormat:
    if name == "alibaba-v2022":
        return AlibabaV2022(epoch_ms=epoch_ms or 0)
    if name == "alibaba-v2021":
        if epoch_ms is None:
            raise ValueError(
                "alibaba-v2021 timestamps are milliseconds since the capture started: set "
                "RPCWATCH_TRACE_EPOCH (or --epoch) to the capture's start, e.g. 2021-06-01T00:00"
            )
        return AlibabaV2021(epoch_ms=epoch_ms)
    if name == "spans":
        return Spans(SpanMapping.load(span_mapping))
    raise ValueError(f"unknown trace format {name!r}")
