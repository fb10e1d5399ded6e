"""Alerts against a real HTTP receiver (ThreadingHTTPServer on 127.0.0.1) and a real DuckDB
warehouse: which incidents are posted and in what order, what a message says and links to, that
text from data cannot add markup, links or mentions, errors that name the host and never the
secret URL, and the Airflow failure notifier."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest

from helpers import REPO
from tasks.alerts.messages import EVIDENCE_CHARS, MAX_LISTED, incidents_payload
from tasks.alerts.webhook import WebhookError, alert_new_incidents, post_json
from tasks.scoring.incidents import Incident
from tasks.settings import load_settings
from tasks.warehouse import opened

HOUR = datetime(2026, 1, 1, 8, tzinfo=UTC)  # the hour alerted: 08:00-09:00
SECRET_PATH = "/services/T0001/B0002/s3cretT0ken"
AIRFLOW = "http://airflow.example:8080/"
MLFLOW = "http://mlflow.example:5000"
HOSTILE = "evil<https://phish.example|click here> <!channel> `rm` [x](https://phish.example) *b*\n\u202eB"


def _at(minute: int) -> datetime:
    return datetime(2026, 1, 1, 8) + timedelta(minutes=minute)  # naive UTC, as DuckDB stores it


INCIDENTS = [  # id, start minute (from 08:00), peak, patterns, culprits, evidence
    ("i-mid", 40, 4.8, [4, 9], ["svc-auth"], "errors calls: 30.0 (expected 2.0, threshold 9.0) on svc-auth"),
    ("i-strong", 12, 46.6, [3], [HOSTILE, "svc-b"], "traces traces: 63.0 (expected 2.0, threshold 7.0) on USER:a:/x"),
    ("i-novel", 5, 24.0, [], ["svc-user"], "novel_rpc calls: 5.0 " + "y" * 10_000),
    ("i-equal", 50, 3.0, [7], [], None),  # exactly the minimum: posted
    ("i-weak", 30, 2.9, [3], ["svc-weak"], "weak"),  # below the minimum
    ("i-before", -5, 50.0, [3], ["svc-before"], "before"),  # started in the hour before
    ("i-after", 60, 40.0, [3], ["svc-after"], "after"),  # starts when the hour ends
]
MODELS = [  # pattern, version, decision
    (3, 1, "champion"),
    (3, 2, "champion"),  # the newest champion: linked
    (3, 3, "challenger"),
    (4, 5, "demoted"),  # no champion: no model link
    (9, 1, "champion"),
]


@pytest.fixture
def warehouse(settings):
    """A warehouse holding INCIDENTS and MODELS; returns its settings."""
    with opened(settings.warehouse) as con:
        for incident_id, minute, peak, patterns, culprits, evidence in INCIDENTS:
            con.execute(
                "INSERT INTO incidents (incident_id, start_ts, end_ts, patterns, nodes, peak_score, kinds, points, "
                "culprits, evidence) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [incident_id, _at(minute), _at(minute + 4), patterns, ["n1", "n2"], peak, ["traces"], 9]
                + [culprits, evidence],
            )
        con.executemany("INSERT INTO models (pattern_id, model_version, decision) VALUES (?, ?, ?)", MODELS)
    return settings


def _alerting(settings, url: str):
    """The settings, alerting to `url` (checked like RPCWATCH_* values)."""
    return load_settings(env={}, home=settings.home, alert_webhook=url, airflow_url=AIRFLOW, mlflow_url=MLFLOW)


def _outside_code_spans(text: str) -> str:
    """What a message says outside its code spans: only our own words and links may be there."""
    return re.sub(r"`[^`\n]*`", "", text)


def test_the_hours_incidents_above_the_minimum_are_posted_strongest_first_with_links(warehouse, receiver):
    said: list[str] = []
    posted = alert_new_incidents(_alerting(warehouse, receiver.url()), HOUR, say=said.append)

    assert posted == 4
    [request] = receiver.requests
    assert request["method"] == "POST" and request["path"] == SECRET_PATH
    assert request["type"].startswith("application/json")
    payload = request["json"]
    sections = [b["text"]["text"] for b in payload["blocks"] if b["type"] == "section"]
    ids = [re.findall(r"rpcwatch/incident/([\w-]+)", s) for s in sections]
    assert ids == [["i-strong"], ["i-novel"], ["i-mid"], ["i-equal"]], "the hour's, >= the minimum, strongest first"
    assert [s.split(" · ")[1] for s in sections] == [f"peak score {p}" for p in ("46.6", "24.0", "4.8", "3.0")]
    text = payload["text"]
    assert text.index("i-strong") < text.index("i-novel") < text.index("i-mid") < text.index("i-equal")
    for absent in ("i-weak", "i-before", "i-after", "svc-weak", "svc-before", "svc-after"):
        assert absent not in text and absent not in json.dumps(payload["blocks"])

    strong, novel, mid, equal = sections
    assert "2026-01-01 08:12–08:16 UTC" in strong and "pattern 3" in strong and "2 node(s)" in strong
    assert "culprit `evil" in strong, "the first culprit is named"
    assert "evidence `traces traces: 63.0 (expected 2.0, threshold 7.0) on USER:a:/x`" in strong
    assert f"<{AIRFLOW}rpcwatch/incident/i-strong|view in Airflow>" in strong
    assert f"<{MLFLOW}/#/models/rpcwatch-pattern-3/versions/2|pattern 3 model v2>" in strong
    assert "versions/3" not in strong and "versions/1" not in strong, "the newest champion only"
    assert "· patterns 4, 9 ·" in mid and "rpcwatch-pattern-9/versions/1" in mid and "rpcwatch-pattern-4" not in mid, (
        "pattern 4 has no champion"
    )
    assert "new RPC" in novel and "culprit `svc-user`" in novel
    assert "culprit unknown" in equal and "evidence `-`" in equal
    assert f"view in Airflow: {AIRFLOW}rpcwatch/incident/i-strong" in text, "Teams reads the bare link"
    [evidence] = re.findall(r"evidence `([^`]*)`", novel)
    assert len(evidence) == EVIDENCE_CHARS and evidence.endswith("y…"), "a long evidence text is cut"
    assert said == ["posted 4 new incident(s) to the webhook at " + f"127.0.0.1:{receiver.port}"]


def test_text_from_data_cannot_add_markup_links_or_mentions(warehouse, receiver):
    alert_new_incidents(_alerting(warehouse, receiver.url()), HOUR)
    [payload] = receiver.posted
    text = payload["text"]
    sections = [b["text"] for b in payload["blocks"] if b["type"] == "section"]

    assert "phish" in text and "phish" in sections[0]["text"], "the hostile name is shown ..."
    for shown in [text, *(s["text"] for s in sections)]:
        outside = _outside_code_spans(shown)
        assert "phish" not in outside and "channel" not in outside, "... but only inside a code span"
        assert "\u202e" not in shown and "<!" not in shown and "<https://phish" not in shown
        # the only Slack links are ours
        assert all(u.startswith((AIRFLOW, MLFLOW)) for u in re.findall(r"<([^|>]*)\|", shown))
    assert "<" not in text and "|" not in text, "the markdown text holds no Slack syntax at all"
    assert all(s["verbatim"] is True for s in sections), "Slack auto-links nothing"
    assert all(len(s["text"]) <= 3000 for s in sections)


def test_a_message_lists_at_most_max_listed_and_counts_the_rest():
    incidents = [
        Incident(f"id{i}", _at(i), _at(i + 1), [1], ["n"], 10.0 - i / 10, ["traces"], 3, ["svc"], "e")
        for i in range(MAX_LISTED + 3)
    ]
    payload = incidents_payload(
        incidents, {1: 4}, hour=(HOUR, HOUR + timedelta(hours=1)), min_score=3, airflow_url=AIRFLOW, mlflow_url=MLFLOW
    )
    sections = [b["text"]["text"] for b in payload["blocks"] if b["type"] == "section"]
    assert len(sections) == MAX_LISTED + 1 and len(payload["blocks"]) <= 50
    assert sections[-1].startswith("… and 3 more") and f"<{AIRFLOW}rpcwatch/|all incidents>" in sections[-1]
    assert payload["blocks"][0]["text"]["text"].startswith("rpcwatch: 13 new incident(s) with peak score ≥ 3")


def test_no_webhook_posts_nothing_and_says_so(settings, receiver):
    said: list[str] = []
    assert settings.alert_webhook is None and not settings.warehouse.exists()
    assert alert_new_incidents(settings, HOUR, say=said.append) == 0, "no warehouse needed either"
    assert receiver.requests == []
    assert said == ["alerts are off (RPCWATCH_ALERT_WEBHOOK is not set): nothing posted"]


def test_an_hour_without_new_incidents_posts_nothing(warehouse, receiver):
    said: list[str] = []
    assert alert_new_incidents(_alerting(warehouse, receiver.url()), HOUR + timedelta(hours=3), say=said.append) == 0
    assert receiver.requests == []
    assert said == ["no new incident at 2026-01-01 11:00 UTC with peak score >= 3"]


def _posted_ids(receiver) -> list[list[str]]:
    return [sorted(set(re.findall(r"rpcwatch/incident/([\w-]+)", p["text"]))) for p in receiver.posted]


def test_a_rerun_posts_nothing_twice_and_a_later_crossing_is_posted_once(warehouse, receiver):
    settings = _alerting(warehouse, receiver.url())
    assert alert_new_incidents(settings, HOUR) == 4
    said: list[str] = []
    assert alert_new_incidents(settings, HOUR, say=said.append) == 0, "the rerun of the hour"
    assert said == ["no new incident at 2026-01-01 08:00 UTC with peak score >= 3"]
    with opened(settings.warehouse) as con:  # i-weak is rescored: it grows into 09:00 and crosses the level
        con.execute("UPDATE incidents SET end_ts = ?, peak_score = 7.5 WHERE incident_id = 'i-weak'", [_at(65)])
        sent = con.execute("SELECT incident_id, hour, destination FROM alerts_sent ORDER BY 1").fetchall()
    assert sent == [
        (i, datetime(2026, 1, 1, 8), f"127.0.0.1:{receiver.port}")
        for i in sorted(["i-strong", "i-novel", "i-mid", "i-equal"])
    ]
    assert alert_new_incidents(settings, HOUR + timedelta(hours=1)) == 2, "i-weak now, and i-after's own hour"
    assert alert_new_incidents(settings, HOUR + timedelta(hours=1)) == 0
    assert alert_new_incidents(settings, HOUR) == 0
    assert _posted_ids(receiver) == [sorted(["i-strong", "i-novel", "i-mid", "i-equal"]), ["i-after", "i-weak"]]


def test_acknowledged_marked_or_silenced_incidents_are_not_posted_and_the_log_says_why(warehouse, receiver):
    from tasks.triage.actions import ACK, MARK, add_silence, record

    with opened(warehouse.warehouse) as con:
        record(con, "i-strong", MARK, "ana", mark="false_positive", note="load test")
        record(con, "i-mid", ACK, "bo")
        record(con, "i-equal", MARK, "bo", mark="true_positive")  # a real one is still posted
        add_silence(con, "cy", timedelta(hours=2), service="svc-user")
        add_silence(con, "cy", timedelta(hours=2), service="svc-nobody")
    said: list[str] = []
    assert alert_new_incidents(_alerting(warehouse, receiver.url()), HOUR, say=said.append) == 1
    assert _posted_ids(receiver) == [["i-equal"]]
    assert said[0] == "not posting incident i-strong: marked false_positive by ana"
    assert said[1].startswith("not posting incident i-novel: service svc-user silenced by cy until 2")
    assert said[2] == "not posting incident i-mid: acknowledged by bo"


def test_a_failing_receiver_is_a_clear_error_naming_the_host_never_the_url(warehouse, receiver):
    receiver.status = 500
    with pytest.raises(WebhookError) as err:
        alert_new_incidents(_alerting(warehouse, receiver.url()), HOUR)
    message = str(err.value)
    assert message.startswith(f"webhook at 127.0.0.1:{receiver.port} answered HTTP 500")
    assert "s3cret" not in message and "services" not in message
    assert err.value.__cause__ is None and err.value.__suppress_context__, "no chained error carrying the URL"


def test_a_redirect_is_an_error_not_a_silent_get(receiver):
    receiver.status, receiver.location = 302, receiver.url("/elsewhere")
    with pytest.raises(WebhookError, match=r"answered HTTP 302"):
        post_json(receiver.url(), {"text": "hi"})
    assert [r["method"] for r in receiver.requests] == ["POST"]


def test_an_unreachable_webhook_names_the_host_only():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(WebhookError, match=rf"^webhook at 127\.0\.0\.1:{port} could not be reached") as err:
        post_json(f"http://127.0.0.1:{port}{SECRET_PATH}", {"text": "hi"}, timeout_s=2)
    assert "s3cret" not in str(err.value)


def test_a_non_http_url_is_refused_without_showing_it():
    with pytest.raises(WebhookError, match=r"not an http\(s\) URL") as err:
        post_json("file:///etc/passwd?token=s3cret", {"text": "hi"})
    assert "s3cret" not in str(err.value) and "passwd" not in str(err.value)


def test_model_links_use_the_registrys_model_names():
    from tasks.alerts.messages import MODEL_PREFIX
    from tasks.models.registry import model_name

    assert model_name(3) == f"{MODEL_PREFIX}3"


# --- the Airflow failure notifier --------------------------------------------------------------------


def _notifier_module():
    spec = importlib.util.spec_from_file_location("rpcwatch_alerts", REPO / "dags" / "rpcwatch_alerts.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def rpcwatch_env(monkeypatch, tmp_path):
    """os.environ with no RPCWATCH_* but a home (the notifier reads the worker's settings)."""
    for name in [n for n in os.environ if n.startswith("RPCWATCH_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("RPCWATCH_HOME", str(tmp_path / "home"))
    return monkeypatch


# These call the notifier as Airflow does (`notifier(context)`), with a plain dict context; a real
# task failure is exercised end to end by the lead's scheduler test.
def test_the_failure_notifier_posts_dag_task_run_hour_and_exception(rpcwatch_env, receiver):
    rpcwatch_env.setenv("RPCWATCH_ALERT_WEBHOOK", receiver.url())
    notifier = _notifier_module().RpcwatchFailureNotifier()
    context = {
        "dag_id": "rpcwatch_hourly",
        "run_id": "scheduled__2026-01-01T08:00:00+00:00",
        "task_id": "score",
        "data_interval_start": HOUR,
        "exception": ValueError("boom <!channel> in `svc`\nTraceback: " + "z" * 5000),
    }
    notifier(context)

    [payload] = receiver.posted
    [section] = [b["text"]["text"] for b in payload["blocks"] if b["type"] == "section"]
    for shown in (payload["text"], section):
        assert "task `score` of DAG `rpcwatch_hourly` failed" in shown
        assert "run `scheduled__2026-01-01T08:00:00+00:00`" in shown and "hour 2026-01-01 08:00 UTC" in shown
        assert "`ValueError: boom !channel in svc Traceback: zzz" in shown
        assert "<!channel>" not in shown and "z" * 1500 not in shown, "cleaned and truncated"
    assert receiver.requests[0]["path"] == SECRET_PATH


def test_the_failure_notifier_reads_an_airflow_task_instance(rpcwatch_env, receiver):
    rpcwatch_env.setenv("RPCWATCH_ALERT_WEBHOOK", receiver.url())
    rpcwatch_env.setenv("RPCWATCH_ALARM_P", "2")  # a bad setting: the failure is still posted
    log_url = "http://airflow.example:8080/dags/rpcwatch_hourly/runs/r1/tasks/train/mapped/2?try_number=1"
    ti = SimpleNamespace(dag_id="rpcwatch_hourly", task_id="train", run_id="r1", map_index=2, log_url=log_url)
    _notifier_module().RpcwatchFailureNotifier()({"ti": ti, "data_interval_start": HOUR, "exception": "gone"})

    [payload] = receiver.posted
    assert "task `train[2]` of DAG `rpcwatch_hourly` failed · run `r1`" in payload["text"]
    assert f"<{log_url}|task log>" in payload["blocks"][1]["text"]["text"]


def test_the_failure_notifier_without_a_webhook_posts_nothing(rpcwatch_env, receiver):
    _notifier_module().RpcwatchFailureNotifier()({"dag_id": "d", "task_id": "t", "exception": RuntimeError("x")})
    assert receiver.requests == []


def test_the_notifier_file_is_cheap_to_parse_and_defines_no_dag():
    probe = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("rpcwatch_alerts", r"{REPO / "dags" / "rpcwatch_alerts.py"}")
module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)
from airflow.sdk import DAG
heavy = ("torch", "mlflow", "pandas", "duckdb", "pyarrow", "tasks")
print(json.dumps({{"heavy": sorted(m for m in heavy if m in sys.modules),
                  "dags": [n for n, v in vars(module).items() if isinstance(v, DAG)]}}))
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"heavy": [], "dags": []}


def _dripping_receiver(gap_s: float, drips: int) -> tuple[socket.socket, threading.Thread]:
    """A receiver that takes the POST, then answers one header byte every `gap_s` (a slow-loris
    answer: each socket read gets a byte well within any per-read timeout)."""
    server = socket.create_server(("127.0.0.1", 0))

    def drip() -> None:
        conn, _ = server.accept()
        with conn:
            conn.recv(65536)
            for byte in (b"HTTP/1.1 200 OK\r\nX-Slow: " + b"x" * drips)[:drips]:
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return  # the client gave up: what the test wants
                time.sleep(gap_s)

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    return server, thread


def test_one_deadline_holds_for_the_whole_post_even_when_the_answer_drips():
    server, thread = _dripping_receiver(gap_s=0.25, drips=40)  # 10 s of dripping, 0.25 s per read
    port = server.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(WebhookError, match=rf"^webhook at 127\.0\.0\.1:{port} gave no full answer within 1 s") as err:
        post_json(f"http://127.0.0.1:{port}{SECRET_PATH}", {"text": "hi"}, timeout_s=1)
    took = time.monotonic() - started
    server.close()
    thread.join(timeout=15)
    assert took < 3, f"the post took {took:.1f} s against a deadline of 1 s"
    assert "s3cret" not in str(err.value)
