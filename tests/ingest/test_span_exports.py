"""Every bundled span mapping on a real export of its kind, through the real ingest stage.

The fixtures (tests/ingest/fixtures/) are written by hand from the formats' specifications, and
hold the same traces three ways: as the OpenTelemetry Collector's `file` exporter writes them (OTLP
JSON lines: one ExportTraceServiceRequest a line, hex ids, int64 times as decimal strings, enums as
integers), as Jaeger's `/api/traces` returns them (µs times, CHILD_OF references, processes), and as
an OTel span CSV. Trace 1: frontend -> cart (a client/server pair) and cart's redis call (a client
span without a server); trace 2: a failing checkout (error status on three spans, an internal
span); trace 3 (OTLP only) in the next hour.
"""

from __future__ import annotations

import gzip
import json
import shutil
from datetime import timedelta
from pathlib import Path

import duckdb
import pytest

from helpers import START
from tasks.ingest.formats import bundled_mappings
from tasks.ingest.stage import IngestReport, hours_in_sources, ingest_hour

FIXTURES = Path(__file__).with_name("fixtures")
T1, T2, T3 = "5b8efff798038103d269b633813fc60c", "a3c1f0e2b4d6a8c0e2f4a6b8c0d2e4f6", "0af7651916cd43dd8448eb211c80319c"
CHARGE = "oteldemo.PaymentService/Charge"
# the calls of hour 00 (traces 1 and 2), by call id:
# trace, parent, caller, callee, interface, rt_ms, server_rt_ms, is_error
HOUR_0 = {
    "eee19b7ec3c1b174": (T1, None, "USER", "frontend", "GET /api/checkout", 50.0, None, False),
    # the client span (frontend, 20 ms) and its server child (cart, 15 ms): one call, the server's name
    "0b1c2d3e4f5a6b7c": (T1, "eee19b7ec3c1b174", "frontend", "cart", "oteldemo.CartService/GetCart", 20.0, 15.0, False),
    # the server's child hangs under the merged call; a client span without a server stays a plain call
    "53995c3f42cd8ad8": (T1, "0b1c2d3e4f5a6b7c", "cart", "cart", "HGET", 2.5, None, False),
    "f1e2d3c4b5a69788": (T2, None, "USER", "frontend", "POST /api/checkout", 80.0, None, True),
    "1a2b3c4d5e6f7081": (T2, "f1e2d3c4b5a69788", "frontend", "payment", CHARGE, 60.0, 56.0, True),
    "00f067aa0ba902b7": (T2, "1a2b3c4d5e6f7081", "payment", "payment", "charge", 10.0, None, False),
}  # fmt: skip
HOUR_1 = {
    "b7ad6b7169203331": (T3, None, "USER", "frontend", "GET /api/data", 5.0, None, False),
    "c8be7c827a314442": (T3, "b7ad6b7169203331", "frontend", "ad", "oteldemo.AdService/GetAds", 3.0, 2.0, False),
}  # fmt: skip
# each bundled mapping -> the test that ingests a real export of its kind
REAL_EXPORTS = {
    "otel": "test_bundled_mapping_ingests_a_real_export[otel-otel-spans.csv|otlp-traces.jsonl]",
    "jaeger": "test_bundled_mapping_ingests_a_real_export[jaeger-jaeger-traces.json]",
    "nezha-trainticket": "tests/ingest/test_ingest.py::test_trainticket_minute_ingests_with_a_mapping_only",
}


def _source(tmp_path: Path, *fixtures: str) -> Path:
    """A flat source folder holding copies of the fixtures."""
    source = tmp_path / "incoming"
    source.mkdir(exist_ok=True)
    for name in fixtures:
        shutil.copy(FIXTURES / name, source / name)
    return source


def _ingest(settings, mapping: str, source: Path, hour=START) -> IngestReport:
    return ingest_hour(settings.with_(format="spans", span_mapping=mapping), hour, [source])


def _calls(settings) -> dict[str, tuple]:
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        rows = con.execute("""SELECT call_id, trace_id, parent_call_id, caller, callee, interface, round(rt_ms, 3),
                                     round(server_rt_ms, 3), is_error FROM calls""").fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


def _log(settings) -> dict[str, tuple]:
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        rows = con.execute("SELECT path, status, error, rows_kept FROM ingest_log").fetchall()
    return {Path(r[0]).name: tuple(r[1:]) for r in rows}


@pytest.mark.parametrize(
    "mapping,fixture",
    [("otel", "otel-spans.csv"), ("otel", "otlp-traces.jsonl"), ("jaeger", "jaeger-traces.json")],
)
def test_bundled_mapping_ingests_a_real_export(settings, tmp_path, mapping, fixture):
    report = _ingest(settings, mapping, _source(tmp_path, fixture))
    assert not report.failed_files, [f.error for f in report.failed_files]
    assert (report.rows_read, report.rows_kept, report.rows_quarantined) == (6, 6, 0), "8 spans, 2 pairs merged"
    assert _calls(settings) == HOUR_0
    assert _log(settings) == {fixture: ("ingested", None, 6)}


def test_otel_csv_without_status_and_kind_columns_lands(settings, tmp_path):
    """Status and kind are optional columns: no errors then, and client/server pairs inferred."""
    source = tmp_path / "incoming"
    source.mkdir()
    lines = (FIXTURES / "otel-spans.csv").read_text().splitlines()
    (source / "spans.csv").write_text("\n".join(line.rsplit(",", 2)[0] for line in lines) + "\n")
    report = _ingest(settings, "otel", source)
    assert not report.failed_files, [f.error for f in report.failed_files]
    assert _calls(settings) == {k: (*v[:-1], False) for k, v in HOUR_0.items()}


def test_every_bundled_mapping_has_a_real_export_test():
    assert sorted(REAL_EXPORTS) == bundled_mappings()


@pytest.mark.parametrize("name", ["otlp.jsonl.gz", "otlp.json"])
def test_otlp_gzipped_and_pretty_printed_documents_land_alike(settings, tmp_path, name):
    """The file exporter's compressed output, and one request saved as an indented JSON document."""
    lines = (FIXTURES / "otlp-traces.jsonl").read_text().splitlines()[:2]
    source = tmp_path / "incoming"
    source.mkdir()
    if name.endswith(".gz"):
        (source / name).write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    else:
        merged = {"resourceSpans": [r for line in lines for r in json.loads(line)["resourceSpans"]]}
        (source / name).write_text(json.dumps(merged, indent=2))
    report = _ingest(settings, "otel", source)
    assert not report.failed_files, [f.error for f in report.failed_files]
    assert _calls(settings) == HOUR_0


def test_otlp_spans_of_another_hour_land_with_their_own_hour(settings, tmp_path):
    source = _source(tmp_path, "otlp-traces.jsonl")
    assert hours_in_sources(settings.with_(format="spans", span_mapping="otel"), [source]) == [
        START,
        START + timedelta(hours=1),
    ]
    report = _ingest(settings, "otel", source, START + timedelta(hours=1))
    assert (report.rows_read, report.rows_kept) == (2, 2), "a flat file's rows are filtered to the hour"
    assert _calls(settings) == HOUR_1
    _ingest(settings, "otel", source)
    assert _calls(settings) == HOUR_0 | HOUR_1


def test_otlp_span_outside_its_hour_partition_is_quarantined_with_file_and_span(settings, tmp_path):
    folder = tmp_path / "incoming" / "dt=2026-01-01" / "hour=00"
    folder.mkdir(parents=True)
    shutil.copy(FIXTURES / "otlp-traces.jsonl", folder / "spans.jsonl")
    report = _ingest(settings, "otel", tmp_path / "incoming")
    assert (report.rows_read, report.rows_kept, report.rows_quarantined) == (8, 6, 2)
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        quarantined = con.execute("SELECT source_file, file_row, call_id, reason FROM quarantine ORDER BY 2").fetchall()
    path = str(folder / "spans.jsonl")
    assert [(f, row, call) for f, row, call, _ in quarantined] == [
        (path, 9, "b7ad6b7169203331"),  # file_row of a JSON export: the span's place in the file
        (path, 10, "c8be7c827a314442"),
    ]
    assert all("outside hour 2026-01-01T00:00" in reason for *_, reason in quarantined)


def test_broken_json_exports_are_logged_with_file_and_line_while_good_files_land(settings, tmp_path):
    source = _source(tmp_path, "otlp-traces.jsonl")
    first, second, _ = (FIXTURES / "otlp-traces.jsonl").read_text().splitlines()
    (source / "truncated.jsonl").write_text(first + "\n" + second[:300] + "\n")  # a write cut short
    (source / "not-spans.json").write_text('{"metrics": []}')
    (source / "wrong-shape.jsonl").write_text(first + "\n" + '{"resourceSpans": [{"scopeSpans": {"spans": []}}]}\n')
    report = _ingest(settings, "otel", source)
    assert sorted(f.path.name for f in report.failed_files) == [
        "not-spans.json",
        "truncated.jsonl",
        "wrong-shape.jsonl",
    ]
    log = _log(settings)
    assert log["otlp-traces.jsonl"] == ("ingested", None, 6)
    for name, where, why in [
        ("truncated.jsonl", "line 2", "not valid JSON"),
        ("not-spans.json", "line 1", "neither an OTLP"),
        ("wrong-shape.jsonl", "line 2", "scopeSpans"),
    ]:
        status, error, _ = log[name]
        assert status == "error" and str(source / name) in error and where in error and why in error, error
        assert "\n" not in error
    assert _calls(settings) == HOUR_0


def test_jaeger_export_with_a_span_of_a_broken_reference_is_logged(settings, tmp_path):
    source = tmp_path / "incoming"
    source.mkdir()
    data = json.loads((FIXTURES / "jaeger-traces.json").read_text())
    data["data"][1]["spans"][1]["references"] = "f1e2d3c4b5a69788"  # a text where a list belongs
    (source / "bad.json").write_text(json.dumps(data))
    shutil.copy(FIXTURES / "jaeger-traces.json", source)
    report = _ingest(settings, "jaeger", source)
    errors = {f.path.name: f.error for f in report.failed_files}
    assert list(errors) == ["bad.json"]
    assert "data[1].spans[1].references" in errors["bad.json"] and "list" in errors["bad.json"]
    assert _calls(settings) == HOUR_0
