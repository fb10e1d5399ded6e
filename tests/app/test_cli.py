"""The `rpcwatch` command line: each command ends with something a person can read."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from helpers import add_anomaly, copy_home
from tasks.app.cli import main
from tasks.models.registry import champions
from tasks.warehouse import opened

POINT_AT = datetime(2026, 1, 1, 3, 5)  # naive UTC, as the warehouse stores it


def test_synth_ingest_validate_aggregate_and_summary(tmp_path, capsys):
    home, traces = tmp_path / "home", tmp_path / "traces"
    assert (
        main(["synth", "--start", "2026-01-01T00:00", "--hours", "1", "--out", str(traces), "--spans-per-hour", "5000"])
        == 0
    )
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
    with opened(settings.warehouse, read_only=True) as con:
        fresh = sorted(champions(con))
    assert fresh, "training at hour 3 made champions"
    pattern = str(fresh[0])  # its champion was trained for the latest ingested hour (03:00)
    assert main(["stale", "--home", home, "--pattern", pattern]) == 0
    assert capsys.readouterr().out == (
        "nothing is stale at 2026-01-01 03:00: every critical pattern has a fresh champion\n"
    )
    assert main(["stale", "--home", home, "--pattern", pattern, "--force"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines[:1] + lines[2:]] == [["pattern", "reasons"], [pattern, "forced"]]
    assert main(["score", "--home", home, "--hour", "2026-01-01T03:00"]) == 0
    assert "scored" in capsys.readouterr().out
    assert main(["anomalies", "--home", home, "--json", "--since", "2h"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), list)


HOLDER = """
import duckdb, sys
con = duckdb.connect(sys.argv[1])         # a run's write connection: DuckDB locks the file
print("locked", flush=True)
sys.stdin.readline()
"""


def _hold(path):
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_read_commands_while_a_run_writes_say_who_holds_the_lock_or_read_the_snapshot(settings, capsys):
    from tasks.publish import publish

    add_anomaly(settings, POINT_AT)
    home = str(settings.home)
    holder = _hold(settings.warehouse)
    try:
        for command in (["anomalies", "--home", home], ["summary", "--home", home]):
            assert main(command) != 0
            err = capsys.readouterr().err
            assert err.startswith("rpcwatch: error: ") and "Traceback" not in err, err
            assert str(settings.warehouse) in err and "a run is writing" in err and f"PID {holder.pid}" in err, err
    finally:
        holder.communicate("done\n", timeout=30)
    publish(settings)
    holder = _hold(settings.warehouse)
    try:
        assert main(["anomalies", "--home", home, "--json"]) == 0, "the published snapshot never waits for a run"
        out = capsys.readouterr()
        assert [r["caller"] for r in json.loads(out.out)] == ["svc-a"]
        assert "analytics.duckdb" in out.err, "says what it read"
        assert main(["summary", "--home", home]) == 0
    finally:
        holder.communicate("done\n", timeout=30)


def test_a_bad_setting_is_a_one_line_error_with_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RPCWATCH_ALARM_P", "2")
    assert main(["summary", "--home", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "rpcwatch: error: RPCWATCH_ALARM_P=2: must be in (0, 1)\n"
    monkeypatch.delenv("RPCWATCH_ALARM_P")
    (tmp_path / "file").write_text("x")
    assert main(["summary", "--home", str(tmp_path / "file" / "home")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rpcwatch: error: RPCWATCH_HOME=") and "regular file" in err and len(err.splitlines()) == 1


def test_tables_show_control_characters_escaped(settings, capsys):
    from tasks.app.report import table

    text = table(["na\nme", "n"], [["evil\nname\x00\x1b[31m", 1], ["tab\there", 22]])
    lines = text.splitlines()
    assert len(lines) == 4 and "\x00" not in text and "\x1b" not in text and "\t" not in text
    assert lines[0].startswith("na\\nme") and "evil\\nname\\x00\\x1b[31m" in lines[2] and "tab\\there" in lines[3]
    add_anomaly(settings, POINT_AT, caller="svc\nspoofed\x00")
    assert main(["anomalies", "--home", str(settings.home)]) == 0
    out = capsys.readouterr().out
    assert "svc\\nspoofed\\x00" in out and len(out.splitlines()) == 3


def test_anomalies_pages_say_where_they_are_cut_and_take_since_all(settings, capsys):
    """`--since` is the view's: counted back from the newest scored data, `all` taken, a bad one one line
    and exit 2; a cut list says so on stderr (stdout stays the table or the JSON) with the next --offset."""
    for minutes in (0, 30, 60, 24 * 60):  # the newest at 03:05, one point a day before it
        add_anomaly(settings, POINT_AT - timedelta(minutes=minutes), caller=f"svc-{minutes}")
    home = str(settings.home)
    assert main(["anomalies", "--home", home, "--limit", "2"]) == 0
    out = capsys.readouterr()
    assert [line.split()[5] for line in out.out.splitlines()[2:]] == ["svc-0", "svc-30"], out.out
    assert "showing 1–2 of 3 irregular points in the last 6h of scored data (to 2026-01-01 03:05 UTC)" in out.err
    assert "next page: --offset 2" in out.err
    assert main(["anomalies", "--home", home, "--limit", "2", "--offset", "2", "--json"]) == 0
    out = capsys.readouterr()
    assert [r["caller"] for r in json.loads(out.out)] == ["svc-60"] and "showing 3–3 of 3" in out.err
    assert main(["anomalies", "--home", home, "--since", "all", "--json"]) == 0
    out = capsys.readouterr()
    assert len(json.loads(out.out)) == 4 and "showing" not in out.err, "a whole list says nothing more"
    assert main(["anomalies", "--home", home, "--since", "10m"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[5] == "svc-0", "10 minutes before the newest point"
    assert main(["anomalies", "--home", home, "--since", "1w"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rpcwatch: error: since '1w' is not accepted: use 30m, 6h, 2d") and "or all" in err
    assert len(err.splitlines()) == 1
