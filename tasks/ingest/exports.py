"""Span exports in JSON, flattened to rows: OTLP (the OpenTelemetry Collector's `file` exporter) and Jaeger.

A file is JSON lines (one document a line, as the Collector's `file` exporter writes) or one JSON
document, indented or not (as Jaeger's `/api/traces` and its UI's download give it); a `.gz` file
is read decompressed. Each document is recognised by its structure:
- OTLP (ExportTraceServiceRequest / TracesData in the protobuf JSON mapping): `resourceSpans[]` with
  the service in `resource.attributes` (`service.name`), spans in `scopeSpans[].spans[]` (or the
  older `instrumentationLibrarySpans`): hex `traceId`/`spanId`/`parentSpanId`, `kind` as an enum
  number or name, `startTimeUnixNano`/`endTimeUnixNano` as decimal strings, `status.code`;
- Jaeger: `data[]` traces with `spans[]` (`references`: the first CHILD_OF, else the first
  reference, is the parent; `startTime`/`duration` in µs; `tags`) and `processes` (the service).
A file holds one kind. Its spans become rows of texts, with the columns the bundled mappings `otel`
(OTLP_COLUMNS) and `jaeger` (JAEGER_COLUMNS) name, plus `EXPORT_ROW`: the span's place in the file
(1-based; the `file_row` of its quarantine rows).

A file that cannot be read, is not JSON, or is neither kind raises `ExportError`, one line naming
the line of the file and where in the document. Reads one file; writes nothing. JSON is parsed with
the standard library, one line at a time for JSON lines (a whole document is read at once).
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa

EXPORT_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
EXPORT_ROW = "rpcwatch_export_row"  # the span's place in its file (a column of the table, not of the export)
OTLP_COLUMNS = (
    "trace_id",
    "span_id",
    "parent_span_id",
    "service_name",
    "name",
    "start_time_unix_nano",
    "end_time_unix_nano",
    "status_code",
    "kind",
)
JAEGER_COLUMNS = (
    "traceID",
    "spanID",
    "parentSpanID",
    "serviceName",
    "operationName",
    "startTime",
    "duration",
    "error",
    "span.kind",
)
Row = tuple[str | None, ...]


class ExportError(ValueError):
    """A JSON file that is not a readable span export; the message names the line."""


def _what(value: object) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return "null" if value is None else "a text" if isinstance(value, str) else "a number or boolean"


def _at(where: str, key: str) -> str:
    """A place in the document, e.g. `data[1].spans[0].references` (`where` empty: the top)."""
    return f"{where}.{key}" if where else key


def _get(obj: dict[str, Any], key: str, kind: type, where: str, default: Any = None) -> Any:
    """`obj[key]` when it is of `kind` (absent or null: `default`); ExportError naming the place otherwise."""
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, kind):
        want = "a list" if kind is list else "an object"
        raise ExportError(f"{_at(where, key)} must be {want}, got {_what(value)}")
    return value


def _items(obj: dict[str, Any], key: str, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The objects of the list `obj[key]` (absent: none), each with its place in the document."""
    for i, item in enumerate(_get(obj, key, list, where, [])):
        if not isinstance(item, dict):
            raise ExportError(f"{_at(where, key)}[{i}] must be an object, got {_what(item)}")
        yield f"{_at(where, key)}[{i}]", item


def _text(value: object, where: str) -> str | None:
    """A scalar as text (JSON true/false stay `true`/`false`); null stays None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    raise ExportError(f"{where} must be a text or a number, got {_what(value)}")


def _otlp_value(value: object, where: str) -> str | None:
    """An OTLP AnyValue (`{"stringValue": "x"}`, `{"intValue": "3"}`, ...) as text."""
    if not isinstance(value, dict):
        return _text(value, where)
    scalar = next((v for k, v in value.items() if k.endswith("Value") and not isinstance(v, dict | list)), None)
    return _text(scalar, where)


def _otlp_rows(doc: dict[str, Any]) -> Iterator[Row]:
    for where, resource_spans in _items(doc, "resourceSpans", ""):
        resource = _get(resource_spans, "resource", dict, where, {})
        service = None
        for at, attribute in _items(resource, "attributes", f"{where}.resource"):
            if attribute.get("key") == "service.name":
                service = _otlp_value(attribute.get("value"), f"{at}.value")
        scopes = "scopeSpans" if "scopeSpans" in resource_spans else "instrumentationLibrarySpans"
        for scope_at, scope in _items(resource_spans, scopes, where):
            for at, span in _items(scope, "spans", scope_at):
                status = _get(span, "status", dict, at, {})
                yield (
                    _text(span.get("traceId"), f"{at}.traceId"),
                    _text(span.get("spanId"), f"{at}.spanId"),
                    _text(span.get("parentSpanId"), f"{at}.parentSpanId"),
                    service,
                    _text(span.get("name"), f"{at}.name"),
                    _text(span.get("startTimeUnixNano"), f"{at}.startTimeUnixNano"),
                    _text(span.get("endTimeUnixNano"), f"{at}.endTimeUnixNano"),
                    _text(status.get("code"), f"{at}.status.code"),
                    _text(span.get("kind"), f"{at}.kind"),
                )


def _jaeger_parent(span: dict[str, Any], where: str) -> str | None:
    """The first CHILD_OF reference, else the first reference, else an older export's `parentSpanID`."""
    references = [r for _, r in _items(span, "references", where)]
    chosen = next((r for r in references if r.get("refType") == "CHILD_OF"), references[0] if references else None)
    if chosen is None:
        return _text(span.get("parentSpanID"), f"{where}.parentSpanID")
    return _text(chosen.get("spanID"), f"{where}.references.spanID")


def _jaeger_rows(doc: dict[str, Any]) -> Iterator[Row]:
    for where, trace in _items(doc, "data", ""):
        processes = _get(trace, "processes", dict, where, {})
        for at, span in _items(trace, "spans", where):
            tags = {t.get("key"): t.get("value") for _, t in _items(span, "tags", at)}
            process = span.get("process") or processes.get(str(span.get("processID")))
            service = process.get("serviceName") if isinstance(process, dict) else None
            yield (
                _text(span.get("traceID", trace.get("traceID")), f"{at}.traceID"),
                _text(span.get("spanID"), f"{at}.spanID"),
                _jaeger_parent(span, at),
                _text(service, f"{at}.process.serviceName"),
                _text(span.get("operationName"), f"{at}.operationName"),
                _text(span.get("startTime"), f"{at}.startTime"),
                _text(span.get("duration"), f"{at}.duration"),
                _text(tags.get("error"), f"{at}.tags.error"),
                _text(tags.get("span.kind"), f"{at}.tags.span.kind"),
            )


def _rows(doc: object) -> tuple[str, Iterator[Row]]:
    """The document's kind (otlp | jaeger) and its spans as rows."""
    if isinstance(doc, dict) and "resourceSpans" in doc:
        return "otlp", _otlp_rows(doc)
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        return "jaeger", _jaeger_rows(doc)
    raise ExportError(
        f"neither an OTLP span export (an object with resourceSpans) nor a Jaeger one (data[].spans), got {_what(doc)}"
    )


def _open(path: Path) -> IO[str]:
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else path.open(encoding="utf-8")


def _documents(path: Path) -> Iterator[tuple[str, object]]:
    """Each JSON document of the file with the line it is on: one a line (JSON lines), or, when the
    first line is not a whole document, the file as one document."""
    with _open(path) as handle:
        parsed = False
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as err:
                if not parsed:
                    break  # one document over several lines: read whole, below
                raise ExportError(f"line {number} column {err.colno}: not valid JSON: {err.msg}") from None
            parsed = True
            yield f"line {number}", doc
        else:
            return
    with _open(path) as handle:
        text = handle.read()
    try:
        yield "line 1", json.loads(text)
    except json.JSONDecodeError as err:
        raise ExportError(f"line {err.lineno} column {err.colno}: not valid JSON: {err.msg}") from None


def read_span_export(path: Path) -> pa.Table:
    """The file's spans as a table of texts (OTLP_COLUMNS or JAEGER_COLUMNS) plus EXPORT_ROW."""
    rows: list[Row] = []
    first: str | None = None
    try:
        for where, doc in _documents(path):
            try:
                kind, spans = _rows(doc)
                if first not in (None, kind):
                    raise ExportError(f"a {kind} document in a file of {first} documents (one kind a file)")
                first = kind
                rows.extend(spans)
            except ExportError as err:
                raise ExportError(f"{where}: {err}") from None
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as err:
        raise ExportError(f"cannot be read: {err}") from None
    columns = JAEGER_COLUMNS if first == "jaeger" else OTLP_COLUMNS
    table = {name: pa.array([r[i] for r in rows], pa.string()) for i, name in enumerate(columns)}
    return pa.table(table | {EXPORT_ROW: pa.array(range(1, len(rows) + 1), pa.int64())})
