"""`rpcwatch incidents` on a real warehouse file: the list (text and JSON), and ack, mark and
silence recorded with who and when, shown by the list, honoured by the alert step and by what a
retrain reads; the list itself never changes the file."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta

import pytest

from tasks.app.cli import main
from tasks.models.series import excluded_stretches
from tasks.warehouse import opened

T0 = datetime(2026, 1, 1, 8, 0)  # naive UTC
NODE = "svc-a|svc-b|get|rpc"


@pytest.fixture
def home(settings):
    with opened(settings.warehouse) as con:
        for n, (incident_id, pattern, peak) in enumerate([("aaaaaa01", 3, 9.0), ("aaaaaa02", 4, 4.0)]):
            start = T0 + timedelta(minutes=30 * n)
            con.execute(
                "INSERT INTO incidents (incident_id, start_ts, end_ts, patterns, nodes, peak_score, kinds, points, "
                "culprits, evidence, incident_group, aliases) VALUES (?, ?, ?, [?], [?], ?, ['traffic_spike'], 5, "
                "['svc-b'], 'e', ?, ['old00001'])",
                [incident_id, start, start + timedelta(minutes=5), pattern, NODE, peak, str(pattern)],
            )
        con.execute(
            "INSERT INTO anomalies (bucket_ts, pattern_id, node, kind, score) VALUES (?, 3, ?, 'traffic_spike', 9)",
            [T0 + timedelta(minutes=34), NODE],
        )
    return settings


def _cli(home, capsys, *args: str) -> tuple[int, str, str]:
    code = main([*args, "--home", str(home.home)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _listed(home, capsys) -> dict[str, dict]:
    code, out, _ = _cli(home, capsys, "incidents", "--since", "all", "--json")
    assert code == 0
    return {r["id"]: r for r in json.loads(out)}


def test_the_list_has_the_promised_keys_and_never_changes_the_file(home, capsys):
    before = hashlib.sha256(home.warehouse.read_bytes()).hexdigest()
    rows = _listed(home, capsys)
    assert set(rows) == {"aaaaaa01", "aaaaaa02"}
    assert {"id", "start", "end", "culprits", "peak_score", "acked", "mark"} <= set(rows["aaaaaa01"])
    assert rows["aaaaaa01"]["start"] == "2026-01-01T08:00:00Z" and rows["aaaaaa01"]["culprits"] == ["svc-b"]
    assert rows["aaaaaa01"]["acked"] is False and rows["aaaaaa01"]["mark"] is None
    code, out, _ = _cli(home, capsys, "incidents", "--since", "all", "--pattern", "4")
    assert code == 0 and "aaaaaa02" in out and "aaaaaa01" not in out
    assert hashlib.sha256(home.warehouse.read_bytes()).hexdigest() == before


def test_ack_and_mark_are_recorded_with_who_and_shown_by_the_list(home, capsys):
    assert _cli(home, capsys, "incidents", "ack", "aaaaaa01", "--by", "ana")[0] == 0
    code, out, _ = _cli(
        home, capsys, "incidents", "mark", "old00001", "false_positive", "--note", "load test", "--by", "bo"
    )
    assert code == 0 and "incident aaaaaa01 marked false_positive by bo" in out, "an absorbed id finds its incident"
    rows = _listed(home, capsys)
    assert (rows["aaaaaa01"]["acked"], rows["aaaaaa01"]["mark"], rows["aaaaaa01"]["note"]) == (
        True,
        "false_positive",
        "load test",
    )
    assert rows["aaaaaa02"]["mark"] is None
    with opened(home.warehouse, read_only=True) as con:
        actions = con.execute(
            "SELECT incident_id, action, mark, actor FROM incident_actions ORDER BY acted_at"
        ).fetchall()
        assert actions == [("aaaaaa01", "ack", None, "ana"), ("aaaaaa01", "mark", "false_positive", "bo")]
        con.execute("SELECT 1")
    with opened(home.warehouse) as con:  # the incident is rescored away: its marked period stays out of training
        con.execute("DELETE FROM incidents")
        stretches = excluded_stretches(con, 3, [NODE], T0 - timedelta(hours=1), T0 + timedelta(hours=2))
    assert stretches == [(T0, T0 + timedelta(minutes=5))]


def test_bad_actions_are_one_line_errors(home, capsys):
    code, _, err = _cli(home, capsys, "incidents", "ack", "ffffffff")
    assert code == 2 and "no incident 'ffffffff'" in err
    with pytest.raises(SystemExit):
        _cli(home, capsys, "incidents", "mark", "aaaaaa01", "fine")
    code, _, err = _cli(home, capsys, "incidents", "silence", "--rpc", "svc-a", "--for", "2h")
    assert code == 2 and "CALLER:CALLEE" in err
    code, _, err = _cli(home, capsys, "incidents", "silence", "--service", "svc-a", "--for", "90d")
    assert code == 2 and "at most 30 days" in err


def test_a_silence_is_stored_until_its_expiry(home, capsys):
    code, out, _ = _cli(home, capsys, "incidents", "silence", "--rpc", "svc-a:svc-b", "--for", "2h", "--by", "cy")
    assert code == 0 and "silenced RPC svc-a:svc-b until" in out
    from tasks.scoring.incidents import Incident
    from tasks.triage.actions import active_silences

    with opened(home.warehouse, read_only=True) as con:
        [silence] = active_silences(con)
        assert active_silences(con, datetime.now() + timedelta(hours=3)) == []
    incident = Incident("x", T0, T0, [3], [NODE], 5.0, ["traffic_spike"], 1, ["svc-b"])
    other = Incident("y", T0, T0, [3], ["svc-c|svc-b|get|rpc"], 5.0, ["traffic_spike"], 1, ["svc-b"])
    assert silence.actor == "cy" and silence.covers(incident) and not silence.covers(other)
