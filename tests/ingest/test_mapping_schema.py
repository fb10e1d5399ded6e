"""A span mapping file is checked against its schema: one-line errors naming the file and the key."""

from __future__ import annotations

import json

import pytest

from tasks.app.cli import main
from tasks.ingest.formats import MAPPINGS, SpanMapping, bundled_mappings

OTEL = json.loads((MAPPINGS / "otel.json").read_text())


def _write(tmp_path, data: object, name: str = "mine.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.mark.parametrize(
    "change,message",
    [
        ({"kind": ["a", "b"]}, "key 'kind' must be a text or null, got a list"),
        ({"trace_id": None}, "key 'trace_id' must be a text, got null"),
        ({"span_id": 7}, "key 'span_id' must be a text, got a number"),
        ({"service": ""}, "key 'service' must not be empty"),
        ({"error_values": "ERROR"}, "key 'error_values' must be a list of texts, got a text"),
        ({"root_parent_values": ["", {"x": 1}]}, "key 'root_parent_values' must be a list of texts, got a list"),
        ({"start_unit": "days"}, "key 'start_unit' must be one of ns, us, ms, s, got 'days'"),
        ({"rpc_type": "carrier-pigeon"}, "key 'rpc_type' must be one of rpc, http"),
        ({"service_regex": 3}, "key 'service_regex' must be a text or null"),
        ({"sevice": "svc"}, "unknown key 'sevice'"),
        ({"operation": None, "end": None}, "key 'operation' must be a text, got null"),
    ],
)
def test_bad_mapping_is_a_one_line_error_naming_file_and_key(tmp_path, change, message):
    path = _write(tmp_path, OTEL | change)
    with pytest.raises(ValueError) as failure:
        SpanMapping.load(str(path))
    text = str(failure.value)
    assert str(path) in text and message in text and "\n" not in text, text


@pytest.mark.parametrize(
    "data,message",
    [
        ({k: v for k, v in OTEL.items() if k != "service"}, "missing key 'service'"),
        ({k: v for k, v in OTEL.items() if k != "end"}, "needs `end` or `duration`"),
        (["trace_id"], "must be a JSON object, got a list"),
        ('{"trace_id": "t",\n  "span_id": }', "not valid JSON: line 2 column"),
    ],
)
def test_malformed_mapping_file_is_named(tmp_path, data, message):
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match="span mapping") as failure:
        SpanMapping.load(str(path))
    assert str(path) in str(failure.value) and message in str(failure.value), str(failure.value)


def test_every_bundled_mapping_passes_its_schema():
    for name in bundled_mappings():
        SpanMapping.load(name)


def test_cli_ingest_with_a_list_where_a_text_belongs_prints_one_line_and_exits_2(tmp_path, monkeypatch, capsys):
    path = _write(tmp_path, OTEL | {"kind": ["a", "b"]})
    (tmp_path / "incoming").mkdir()
    (tmp_path / "incoming" / "spans.csv").write_text(",".join(OTEL[k] for k in ("trace_id", "span_id")) + "\n")
    monkeypatch.setenv("RPCWATCH_FORMAT", "spans")
    monkeypatch.setenv("RPCWATCH_SPAN_MAPPING", str(path))
    code = main(
        [
            "ingest",
            "--home",
            str(tmp_path / "home"),
            "--hour",
            "2026-01-01T00:00",
            "--source",
            str(tmp_path / "incoming"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("rpcwatch: error: ") and err.count("\n") == 1 and "'kind'" in err and str(path) in err
