"""The `rpcwatch` command line: each command ends with something a person can read."""

from __future__ import annotations

import json

from conftest import copy_home
from tasks.cli import main


def test_synth_ingest_validate_aggregate_and_summary(tmp_path, capsys):
    home, traces = tmp_path / "home", tmp_path / "traces"
    assert main(["synth", "--start", "2026-01-01T00:00", "--hours", "1", "--out", str(traces), "--spans-per-hour", "5000"]) == 0
    assert "spans/s" in capsys.readouterr().out
    assert main(["ingest", "--home", str(home), "--hour", "2026-01-01T00:00", "--source", str(traces)]) == 0
    out = capsys.readouterr().out
    assert "rows read" in out and "warehouse.duckdb" in out
    assert main(["validate", "--home", str(home), "--hour", "2026-01-01T00:00"]) == 0
    assert "0 batch failures" in capsys.readouterr().out
    assert main(["aggregate", "--home", str(home), "--hour", "2026-01-01T00:00"]) == 0
    assert main(["summary", "--home", str(home)]) == 0
    assert "2026-01-01 00:00" in capsys.readouterr().out.splitlines()[-1]


def test_bad_input_is_a_one_line_error_not_a_traceback(tmp_path, capsys):
    assert main(["ingest", "--home", str(tmp_path), "--hour", "yesterday"]) == 2
    assert "not an ISO time" in capsys.readouterr().err
    assert main(["anomalies", "--home", str(tmp_path / "nothing")]) == 2
    assert "no warehouse" in capsys.readouterr().err


def test_patterns_stale_score_and_anomalies_on_a_trained_home(trained, tmp_path, capsys):
    settings = copy_home(trained[0], tmp_path)
    home = str(settings.home)
    assert main(["patterns", "--home", home]) == 0
    assert "share %" in capsys.readouterr().out
    assert main(["stale", "--home", home]) == 0
    out = capsys.readouterr().out
    assert "nothing is stale" in out or "reasons" in out
    assert main(["score", "--home", home, "--hour", "2026-01-01T03:00"]) == 0
    assert "scored" in capsys.readouterr().out
    assert main(["anomalies", "--home", home, "--json", "--since", "2h"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), list)
