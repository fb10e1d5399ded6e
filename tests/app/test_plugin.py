"""The Airflow UI view of anomalies: Airflow loads the plugin; the page reads the published snapshot."""

from __future__ import annotations

import html
import importlib.util
import json
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from helpers import REPO, START, add_anomaly, copy_home
from tasks.app.airflow_env import airflow_cli, airflow_env
from tasks.keys import node_key, split_node_key
from tasks.publish import publish
from tasks.scoring.score import score_hour


def _module():
    spec = importlib.util.spec_from_file_location("rpcwatch_anomalies", REPO / "plugins" / "rpcwatch_anomalies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_airflow_loads_the_plugin(settings):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RPCWATCH_", "AIRFLOW"))}
    env = airflow_env(settings, base=clean)
    out = airflow_cli(env, "plugins", "--output", "json").stdout
    plugins = json.loads(out[out.index("[") :])
    [ours] = [p for p in plugins if p["name"] == "rpcwatch"]
    assert "rpcwatch anomalies" in json.dumps(ours)


def _client(module):
    from fastapi.testclient import TestClient

    # Airflow's real login is checked over HTTP in test_plugin_auth.py; here the access check is
    # replaced so that the pages themselves can be tested without an API server.
    module.app.dependency_overrides[module.require_read_access] = lambda: None
    return TestClient(module.app, raise_server_exceptions=False)


def test_the_page_and_api_show_published_anomalies(trained, tmp_path, monkeypatch):
    settings = copy_home(trained[0], tmp_path)
    score_hour(settings, START + timedelta(hours=3))
    # a known irregular point after whatever scoring found: the newest row the page and the API show
    add_anomaly(settings, START.replace(tzinfo=None) + timedelta(hours=3, minutes=59), caller="svc-known")
    publish(settings)
    monkeypatch.setenv("RPCWATCH_HOME", str(settings.home))
    client = _client(_module())
    page = client.get("/", params={"since": "all"})  # the synthetic hours lie in 2026-01-01, not now
    assert page.status_code == 200 and "Incidents" in page.text and "Irregular points" in page.text
    assert "svc-known" in page.text
    assert "<th>culprit</th>" in page.text, "points name their culprit (incidents: see the hand-made tests below)"
    rows = client.get("/api/anomalies", params={"since": "all"}).json()
    assert isinstance(rows, list) and rows, "the known point is published"
    assert all({"bucket", "kind", "score", "threshold", "culprit"} <= set(r) for r in rows)
    assert (rows[0]["bucket"], rows[0]["caller"], rows[0]["kind"]) == ("2026-01-01 03:59", "svc-known", "traffic_spike")
    for route in ("/", "/api/anomalies", "/api/incidents"):
        for limit in (-1, 0):
            reply = client.get(route, params={"limit": limit})
            assert reply.status_code == 422, (route, limit, reply.status_code, reply.text[:200])


# --- the view on a small hand-made snapshot: times relative to now, a hostile service name ----------

HOSTILE = '<script>alert("x")</script>$\\frac{1}{0}$|svc'  # HTML, matplotlib math and the key separator
NOW = datetime.now(UTC).replace(tzinfo=None, second=0, microsecond=0)
ENTRY, CALL, DB = (
    node_key("USER", "svc-front", "/api/pay", "http"),
    node_key("svc-front", HOSTILE, "pay", "rpc"),
    node_key(HOSTILE, "db-pay", "insert", "db"),
)
NOVEL = ("svc-cart", "svc-secrets", "dumpKeys")


def _point(ts, pattern, node, caller, callee, interface, kind, observed, expected, threshold, culprit):
    score = abs(observed - expected) / max(abs(threshold - expected), 1)
    direction = "up" if observed > expected else "down"
    model = (f"rpcwatch-pattern-{pattern}", 3) if pattern is not None else (None, None)
    return (
        ts,
        pattern,
        node,
        caller,
        callee,
        interface,
        "calls",
        observed,
        expected,
        threshold,
        score,
        direction,
        kind,
        *model,
        culprit,
    )


def _hand_made_home(tmp_path, monkeypatch, shift=timedelta(0), scored_after=None):
    """A published home: pattern 1 (entry -> the hostile service -> its db) with a 6-minute spike on
    the hostile RPC ending 20 min before now, a new RPC 10 min before now, a drop in pattern 2 three
    days ago (all moved back by `shift`). Incidents made by the product's rule. `scored_after`: one
    scored bucket (a `forecasts` row, nothing irregular) that long after the new RPC. Returns the settings."""
    from tasks.scoring.incidents import INCIDENT_COLUMNS, INCIDENTS_SQL, rule_params
    from tasks.settings import load_settings
    from tasks.warehouse import opened

    settings = load_settings(env={}, home=tmp_path / "home")
    now = NOW - shift
    spike = [now - timedelta(minutes=26 - i) for i in range(6)]
    points = [
        _point(t, 1, CALL, "svc-front", HOSTILE, "pay", "traffic_spike", 90.0, 20.0, 40.0, HOSTILE) for t in spike
    ]
    points += [
        _point(now - timedelta(minutes=10), None, node_key(*NOVEL, "rpc"), *NOVEL, "novel_rpc", 40.0, 0, 0, "svc-cart")
    ]
    old = now - timedelta(days=3)
    points += [
        _point(
            old + timedelta(minutes=i),
            2,
            node_key("USER", "svc-b", "/b", "http"),
            "USER",
            "svc-b",
            "/b",
            "traffic_drop",
            1.0,
            30.0,
            10.0,
            "svc-b",
        )
        for i in range(4)
    ]
    columns = (
        "bucket_ts, pattern_id, node, caller, callee, interface, feature, observed, expected, threshold, "
        "score, direction, kind, model_name, model_version, culprit"
    )
    series = [
        (now - timedelta(minutes=m), "svc-front", HOSTILE, "pay", "rpc", 90 if 21 <= m <= 26 else 20, 0, 60)
        for m in range(1, 90)
    ]
    with opened(settings.warehouse) as con:
        con.executemany(f"INSERT INTO anomalies ({columns}) VALUES ({', '.join('?' * 16)})", points)
        con.executemany(
            "INSERT INTO rpc_series (bucket_ts, caller, callee, interface, rpc_type, calls, errors, "
            "bucket_seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            series,
        )
        for node in (ENTRY, CALL, DB):
            caller, callee, interface, rpc_type = split_node_key(node)
            con.execute(
                "INSERT INTO pattern_nodes VALUES (1, 1, ?, ?, ?, ?, ?, 1.0, 100)",
                [node, caller, callee, interface, rpc_type],
            )
        con.executemany("INSERT INTO pattern_edges VALUES (1, 1, ?, ?, 100)", [(ENTRY, CALL), (CALL, DB)])
        con.execute(
            "INSERT INTO models (pattern_id, model_name, model_version, pattern_version, decision, "
            "recorded_at) VALUES (1, 'rpcwatch-pattern-1', 3, 1, 'champion', ?)",
            [now],
        )
        params = {"lo": old - timedelta(hours=1), "hi": NOW + timedelta(hours=1), **rule_params(3, 3, 60)}
        con.execute(f"INSERT INTO incidents ({INCIDENT_COLUMNS}) " + INCIDENTS_SQL, params)
        if scored_after is not None:
            scored = now - timedelta(minutes=10) + scored_after
            con.execute("INSERT INTO forecasts VALUES (1, ?, ?, 'calls', 20.0, 8.0, 40.0, 3)", [scored, CALL])
    publish(settings)
    monkeypatch.setenv("RPCWATCH_HOME", str(settings.home))
    return settings


def _incidents(client, **params):
    reply = client.get("/api/incidents", params={"since": "all", **params})
    assert reply.status_code == 200, reply.text[:300]
    return reply.json()


def test_incidents_name_culprits_rpcs_evidence_and_link_their_page(tmp_path, monkeypatch):
    _hand_made_home(tmp_path, monkeypatch)
    client = _client(_module())
    incidents = _incidents(client)
    assert len(incidents) == 3, incidents
    spike = next(i for i in incidents if i["patterns"] == [1])
    assert spike["culprits"] == [HOSTILE] and spike["rpcs"] == [f"svc-front → {HOSTILE} : pay"]
    assert spike["evidence"].startswith("traffic_spike calls: 90.0 (expected 20.0, threshold 40.0) on svc-front →")
    novel = next(i for i in incidents if "novel_rpc" in i["kinds"])
    assert novel["summary"] == "new RPC svc-cart → svc-secrets : dumpKeys (in no pattern's graph)"
    page = client.get("/", params={"since": "all"})
    assert page.status_code == 200
    text = page.text
    assert "new RPC svc-cart → svc-secrets : dumpKeys" in text
    assert f"/incident/{spike['incident_id']}?since=all" in text and f"/incident/{novel['incident_id']}" in text
    assert "<script>" not in text and html.escape(HOSTILE) in text, "data is escaped, never markup"
    assert text.count(html.escape(HOSTILE)) >= 3, "as culprit, in the RPCs, in the points"


def test_filters_leave_fewer_rows(tmp_path, monkeypatch):
    _hand_made_home(tmp_path, monkeypatch)
    client = _client(_module())
    every = _incidents(client)
    assert len(_incidents(client, since="6h")) == len(every) - 1, "the 3-day-old drop is outside 6 hours"
    assert [i["patterns"] for i in _incidents(client, pattern=1)] == [[1]]
    assert [i["kinds"] for i in _incidents(client, kind="novel_rpc")] == [["novel_rpc"]]
    points = client.get("/api/anomalies", params={"since": "all"}).json()
    drops = client.get("/api/anomalies", params={"since": "all", "kind": "traffic_drop"}).json()
    recent = client.get("/api/anomalies", params={"since": "2d"}).json()
    assert len(points) == 11 and len(drops) == 4 and len(recent) == 7
    assert {p["kind"] for p in drops} == {"traffic_drop"}
    assert len(client.get("/api/anomalies", params={"since": "all", "limit": 2}).json()) == 2
    page_all = client.get("/", params={"since": "all"}).text
    page_two = client.get("/", params={"since": "all", "pattern": 2}).text
    assert page_two.count("details →") == 1 < page_all.count("details →") == 3
    for bad in ({"since": "5x"}, {"since": "-1h"}, {"kind": "DROP TABLE"}, {"pattern": 0}, {"since": "0m"}):
        for route in ("/", "/api/incidents", "/api/anomalies"):
            assert client.get(route, params=bad).status_code == 422, (route, bad)


def test_the_window_counts_from_the_newest_scored_data_everywhere(tmp_path, monkeypatch, capsys):
    """The newest data is 5 days old: windows count back from it, not from now, and the page says how
    old it is. The newest scored bucket (a forecast, nothing irregular in it) comes 5 h 50 min after the
    new RPC: `since=6h` then reaches back to the new RPC and no further, in the JSON API, on the page, in
    `rpcwatch anomalies --since 6h` and in the snapshot's view `recent_anomalies` alike."""
    from tasks.app.cli import main

    settings = _hand_made_home(
        tmp_path, monkeypatch, shift=timedelta(days=5), scored_after=timedelta(hours=5, minutes=50)
    )
    client = _client(_module())
    assert len(_incidents(client, since="2d")) == 2 and len(_incidents(client)) == 3, "the drop is 3 days older"
    assert [i["kinds"] for i in _incidents(client, since="6h")] == [["novel_rpc"]], "the spike ended before the window"
    assert _incidents(client, since="1h") == [], "an hour of scored data with nothing irregular"
    api = client.get("/api/anomalies", params={"since": "6h"}).json()
    assert [(p["caller"], p["kind"]) for p in api] == [("svc-cart", "novel_rpc")]
    newest = (NOW - timedelta(days=5, minutes=10) + timedelta(hours=5, minutes=50)).strftime("%Y-%m-%d %H:%M")
    page = client.get("/", params={"since": "6h"}).text
    assert f"the last 6h of scored data (to {newest} UTC)" in page
    assert f"The newest scored data is from {newest} UTC, 5 days ago" in page, "old data says how old"
    capsys.readouterr()  # what the app printed (warnings): the command's stdout alone is read below
    assert main(["anomalies", "--home", str(settings.home), "--since", "6h", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert [(r["caller"], r["kind"]) for r in cli] == [("svc-cart", "novel_rpc")]
    with _open_snapshot_of(settings) as con:
        recent = con.execute("SELECT caller, kind FROM recent_anomalies").fetchall()
    assert recent == [("svc-cart", "novel_rpc")], "the view recent_anomalies is since=6h"
    assert main(["anomalies", "--home", str(settings.home), "--since", "all", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 11, "`all` is taken by the command line too"
    _hand_made_home(tmp_path / "current", monkeypatch)
    assert "The newest scored data" not in _client(_module()).get("/").text, "current data needs no note"


def _open_snapshot_of(settings):
    from tasks.app.view import open_snapshot
    from tasks.publish import analytics_path

    return open_snapshot(analytics_path(settings))


def test_lists_that_are_cut_say_so_and_link_the_next_page(tmp_path, monkeypatch):
    """11 irregular points and 3 incidents: a page of 4 says `showing 1–4 of 11` and its next-page link
    leads on; the JSON routes keep a plain list and give the total in X-Total-Count and the pages in Link."""
    _hand_made_home(tmp_path, monkeypatch)
    client = _client(_module())
    every = client.get("/api/anomalies", params={"since": "all"})
    assert every.headers["x-total-count"] == "11" and "link" not in every.headers, "a whole list has no next page"
    pages, reply = [], client.get("/api/anomalies", params={"since": "all", "limit": 4})
    while True:
        assert reply.status_code == 200 and reply.headers["x-total-count"] == "11"
        pages.append(reply.json())
        found = re.search(r'<([^>]+)>; rel="next"', reply.headers.get("link", ""))
        if not found:
            break
        reply = client.get(found.group(1))
    assert [len(p) for p in pages] == [4, 4, 3] and sum(pages, []) == every.json(), "the pages make the whole list"
    assert 'rel="prev"' in reply.headers["link"] and "offset=4" in reply.headers["link"]
    incidents = client.get("/api/incidents", params={"since": "all", "limit": 2, "offset": 2})
    assert incidents.headers["x-total-count"] == "3" and len(incidents.json()) == 1
    page = client.get("/", params={"since": "all", "limit": 4})
    assert "showing 1–4 of 11 irregular points" in page.text and "showing 1–3 of 3" not in page.text
    assert page.text.count("next page →") == 2, "above and below the points; the 3 incidents are whole"
    [after] = {html.unescape(h) for h in re.findall(r'<a href="([^"]*offset=4[^"]*)">next page', page.text)}
    second = client.get(after)
    assert second.status_code == 200 and "showing 5–8 of 11 irregular points" in second.text
    assert "since=all" in after and "limit=4" in after and "← previous page" in second.text
    few = client.get("/", params={"since": "all", "limit": 2}).text
    assert "showing 1–2 of 3 incidents" in few and "incident_offset=2" in few


def test_a_bad_parameter_says_which_and_what_is_accepted(tmp_path, monkeypatch):
    """A browser gets a page in the view's style (422) naming the parameter, the value and what is
    accepted; an API client gets JSON with `detail` in words; hostile values are escaped; a number too
    large for the database is refused, not a server error."""
    _hand_made_home(tmp_path, monkeypatch)
    module = _module()
    client = _client(module)
    browser = {"Accept": "text/html,application/xhtml+xml"}
    reply = client.get("/", params={"since": "1w", "kind": "novel_rpc"}, headers=browser)
    assert reply.status_code == 422 and reply.headers["content-type"].startswith("text/html")
    text = reply.text
    assert "<b>since</b>" in text and "<code>1w</code>" in text and "30m, 6h, 2d" in text and "or all" in text
    assert "string_pattern_mismatch" not in text and "^(all" not in text, "no pydantic or regex in sight"
    assert 'href="/?kind=novel_rpc"' in text, "a link to the page without the wrong parameter"
    _assert_guarded(reply, "422 page")
    assert _policy(reply)["style-src"] == _policy(client.get("/"))["style-src"], "the view's own style"
    hostile = client.get("/api/anomalies", params={"pattern": "<script>x</script>"}, headers=browser)
    assert hostile.status_code == 422 and "<script>" not in hostile.text and "&lt;script&gt;" in hostile.text
    api = client.get("/api/anomalies", params={"pattern": "abc"})
    assert api.status_code == 422 and api.headers["content-type"] == "application/json"
    body = api.json()
    assert (
        isinstance(body["detail"], str)
        and body["detail"].startswith("pattern='abc': ")
        and "pattern id" in body["detail"]
    )
    assert [(e["name"], e["value"]) for e in body["errors"]] == [("pattern", "abc")]
    page = client.get("/incident/not-an-id", headers=browser)
    assert page.status_code == 422 and "6 to 32 hex digits" in page.text
    for bad in ({"pattern": str(2**64)}, {"offset": str(2**64)}, {"offset": "-1"}, {"incident_offset": "x"}):
        for route in ("/", "/api/anomalies"):
            reply = client.get(route, params=bad)
            if route == "/api/anomalies" and "incident_offset" in bad:
                assert reply.status_code == 200, "a parameter the route does not take is ignored"
                continue
            assert reply.status_code == 422, (route, bad, reply.status_code, reply.text[:200])
    from fastapi.testclient import TestClient

    anonymous = TestClient(_module().app, raise_server_exceptions=False)
    assert anonymous.get("/", params={"since": "1w"}, headers=browser).status_code == 401, "the login comes first"


def test_an_incident_page_with_its_graph_forecast_and_model_link(tmp_path, monkeypatch):
    monkeypatch.setenv("RPCWATCH_MLFLOW_URL", "http://mlflow.example:5000/")
    _hand_made_home(tmp_path, monkeypatch)
    client = _client(_module())
    spike = next(i for i in _incidents(client) if i["patterns"] == [1])
    page = client.get(f"/incident/{spike['incident_id']}")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    text = page.text
    assert "http://mlflow.example:5000/#/models/rpcwatch-pattern-1/versions/3" in text and "champion" in text
    assert f"/incident/{spike['incident_id']}/graph.png" in text and "/forecast.png" in text
    assert "<script>" not in text and html.escape(HOSTILE) in text
    for picture in ("graph.png", "forecast.png"):
        reply = client.get(f"/incident/{spike['incident_id']}/{picture}")
        assert reply.status_code == 200 and reply.headers["content-type"] == "image/png", picture
        assert reply.content[:8] == b"\x89PNG\r\n\x1a\n" and len(reply.content) > 15_000, (picture, len(reply.content))
    novel = next(i for i in _incidents(client) if "novel_rpc" in i["kinds"])
    page = client.get(f"/incident/{novel['incident_id']}").text
    assert "new RPC svc-cart → svc-secrets : dumpKeys" in page and "without a model" in page
    for picture in ("graph.png", "forecast.png"):
        assert client.get(f"/incident/{novel['incident_id']}/{picture}").headers["content-type"] == "image/png"
    assert client.get("/incident/0123456789ab").status_code == 404
    assert client.get("/incident/0123456789ab/graph.png").status_code == 404
    assert client.get("/incident/not-an-id").status_code == 422
    assert client.get("/incident/%3Cscript%3E/forecast.png").status_code == 422


def test_the_forecast_picture_draws_the_band_of_every_bucket_from_forecasts(tmp_path, monkeypatch):
    from tasks.app import plots
    from tasks.warehouse import opened

    settings = _hand_made_home(tmp_path, monkeypatch)
    drawn = []
    band = plots._band
    monkeypatch.setattr(plots, "_band", lambda ax, b, bucket: drawn.append(b) or band(ax, b, bucket))
    client = _client(_module())
    spike = next(i for i in _incidents(client) if i["patterns"] == [1])
    route = f"/incident/{spike['incident_id']}/forecast.png"
    assert client.get(route).status_code == 200 and not drawn, "no forecasts rows: the flagged buckets' band"
    buckets = [NOW - timedelta(minutes=m) for m in range(1, 60)]
    with opened(settings.warehouse) as con:
        con.executemany(
            "INSERT INTO forecasts VALUES (1, ?, ?, 'calls', 20.0, 8.0, 40.0, 3)", [(t, CALL) for t in buckets]
        )
    publish(settings)
    reply = client.get(route)
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
    assert reply.content[:8] == b"\x89PNG\r\n\x1a\n" and len(reply.content) > 15_000
    [shown] = drawn
    assert len(shown.times) >= 50 and set(shown.lower) == {8.0} and set(shown.upper) == {40.0}


def test_nothing_published_yet(settings, monkeypatch):
    monkeypatch.setenv("RPCWATCH_HOME", str(settings.home))
    client = _client(_module())
    assert "Nothing published yet" in client.get("/").text
    assert client.get("/api/incidents").json() == [] and client.get("/api/anomalies").json() == []
    assert client.get("/incident/0123456789ab").status_code == 404


PROTECTED = (
    "/",
    "/api/anomalies",
    "/api/incidents",
    "/incident/0123456789ab",
    "/incident/0123456789ab/graph.png",
    "/incident/0123456789ab/forecast.png",
    "/docs",
    "/docs/swagger-ui-bundle.js",
    "/docs/swagger-ui.css",
    "/docs/favicon.png",
    "/docs/swagger-init.js",
    "/openapi.json",
    "/quality",
    "/quality.png",
)
POSTED = ("/incident/0123456789ab/ack", "/incident/0123456789ab/mark", "/silence")  # people's decisions


def test_every_route_requires_a_login():
    """Without a token (header or the UI's `_token` cookie) every route, docs included, answers 401."""
    from fastapi.testclient import TestClient

    client = TestClient(_module().app, raise_server_exceptions=False)
    for route in (*PROTECTED, "/redoc", "/docs/oauth2-redirect"):
        reply = client.get(route, follow_redirects=False)
        assert reply.status_code in (401, 404), (route, reply.status_code, reply.text[:200])
        if route in PROTECTED:
            assert reply.status_code == 401, (route, reply.status_code)
    for route in POSTED:
        reply = client.post(route, data={"mark": "false_positive", "service": "svc", "lasting": "1h"})
        assert reply.status_code == 401, (route, reply.status_code, reply.text[:200])


def test_every_route_of_the_app_is_in_the_login_checks():
    """A new route must join PROTECTED here and ROUTES in test_plugin_auth.py."""
    paths = {getattr(r, "path", "") for r in _module().app.routes}
    listed = {re.sub(r"0123456789ab", "{incident_id}", p) for p in (*PROTECTED, *POSTED)}
    assert paths <= listed, paths - listed


def test_access_is_checked_on_the_pipeline_dag():
    """Read access to the anomalies is read access to the DAG that produces them."""
    module = _module()
    dag_ids = set(
        re.findall(r"""dag_id\s*=\s*["']([^"']+)["']""", (REPO / "dags").joinpath("rpcwatch_hourly.py").read_text())
    )
    assert module.DAG_ID in dag_ids


def test_airflow_home_outside_the_rpcwatch_home(settings, tmp_path):
    """An explicitly set AIRFLOW_HOME elsewhere is used for everything Airflow keeps (db, passwords)."""
    from tasks.app.airflow_env import prepare_airflow

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RPCWATCH_", "AIRFLOW"))}
    elsewhere = tmp_path / "elsewhere" / "airflow"
    env = airflow_env(settings, base={**clean, "AIRFLOW_HOME": str(elsewhere)})
    assert env["AIRFLOW_HOME"] == str(elsewhere)
    assert str(elsewhere) in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    prepare_airflow(env, settings.airflow_pool)
    assert (elsewhere / "airflow.db").exists()
    assert not settings.airflow_home.exists()


def test_relative_airflow_home_is_made_absolute(settings, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = airflow_env(settings, base={"AIRFLOW_HOME": "af"})
    assert env["AIRFLOW_HOME"] == str(tmp_path / "af")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == f"sqlite:///{tmp_path / 'af' / 'airflow.db'}"


def test_local_airflow_is_bound_to_localhost_with_a_login(settings):
    """`rpcwatch airflow standalone`: 127.0.0.1, one API worker, a real login (no all-admins)."""
    env = airflow_env(settings, base={})
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1"
    assert env["AIRFLOW__API__WORKERS"] == "1"
    assert int(env["AIRFLOW__CORE__PARALLELISM"]) <= 4
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] == "False"
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] == "admin:admin"
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"].startswith(env["AIRFLOW_HOME"])


def test_make_airflow_says_how_to_log_in(settings, tmp_path, capsys):
    """prepare_airflow (run by `rpcwatch airflow ...`) prints the user name and the password file."""
    from tasks.app.airflow_env import prepare_airflow

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RPCWATCH_", "AIRFLOW"))}
    env = airflow_env(settings, base=clean)
    prepare_airflow(env, settings.airflow_pool)
    out = capsys.readouterr()
    said = out.out + out.err
    assert "admin" in said and env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] in said
    assert "http://127.0.0.1:8080" in said


# --- security headers on every answer (issue 22) -------------------------------------------------------


def _policy(reply) -> dict[str, list[str]]:
    """The reply's Content-Security-Policy as directive -> sources."""
    text = reply.headers.get("content-security-policy", "")
    return {d.split()[0]: d.split()[1:] for d in (part.strip() for part in text.split(";")) if d}


def _assert_guarded(reply, route: str) -> dict[str, list[str]]:
    assert reply.headers.get("x-content-type-options") == "nosniff", route
    assert reply.headers.get("referrer-policy") == "no-referrer", route
    policy = _policy(reply)
    assert policy.get("default-src") == ["'none'"], (route, policy)
    assert policy.get("frame-ancestors") == ["'self'"] and policy.get("base-uri") == ["'none'"], (route, policy)
    assert not any("'unsafe-eval'" in sources for sources in policy.values()), (route, policy)
    return policy


def test_every_answer_carries_the_security_headers(tmp_path, monkeypatch):
    import base64
    import hashlib

    _hand_made_home(tmp_path, monkeypatch)
    module = _module()
    client = _client(module)
    spike = next(i for i in _incidents(client) if i["patterns"] == [1])["incident_id"]
    routes = {
        "/": 200,
        "/api/incidents": 200,
        "/api/anomalies": 200,
        f"/incident/{spike}": 200,
        f"/incident/{spike}/graph.png": 200,
        f"/incident/{spike}/forecast.png": 200,
        "/openapi.json": 200,
        "/docs": 200,
        "/incident/0123456789ab": 404,
        "/incident/0123456789ab/graph.png": 404,
        "/incident/not-an-id": 422,
        "/nothing-here": 404,
    }
    for route, status in routes.items():
        reply = client.get(route, params={"since": "all"})
        assert reply.status_code == status, (route, reply.status_code)
        policy = _assert_guarded(reply, route)
        if route != "/docs":
            assert "script-src" not in policy, "no route but the API docs runs a script"
            assert not any("'unsafe-inline'" in sources for sources in policy.values()), (route, policy)
    for route in ("/", f"/incident/{spike}"):
        reply = client.get(route, params={"since": "all"})
        policy = _policy(reply)
        assert "<script" not in reply.text.lower(), "no script on the view's pages"
        assert not re.search(r"<[^>]*\s(on\w+|style)\s*=", reply.text), "no event handler or style attribute"
        [style] = re.findall(r"<style>(.*?)</style>", reply.text, flags=re.S)
        digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
        assert policy["style-src"] == [f"'sha256-{digest}'"], "the page's one inline style is allowed by its hash"
        assert policy["img-src"] == ["'self'"] and policy["form-action"] == ["'self'"]
    docs = client.get("/docs")
    assert not re.findall(r"<script[^>]*>[^<]", docs.text), "no inline script on the docs page"
    assert _policy(docs)["script-src"] == ["'self'"], "the docs run the view's own script files only"

    from fastapi.testclient import TestClient

    refused = TestClient(_module().app, raise_server_exceptions=False).get("/", follow_redirects=False)
    assert refused.status_code == 401
    _assert_guarded(refused, "/ without a login")


def test_the_api_docs_work_offline(settings, monkeypatch):
    """/docs loads Swagger UI from the view itself (behind the same login): every file the page names
    is served here with its type, none names another origin, and the policy allows only 'self'."""
    from fastapi.testclient import TestClient

    monkeypatch.setenv("RPCWATCH_HOME", str(settings.home))
    module = _module()
    module.app.dependency_overrides[module.require_read_access] = lambda: None
    client = TestClient(module.app, root_path="/rpcwatch", raise_server_exceptions=False)
    page = client.get("/docs")
    assert page.status_code == 200
    assert 'data-openapi="/rpcwatch/openapi.json"' in page.text
    named = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    assert sorted(named) == sorted(
        f"/rpcwatch/docs/{name}"
        for name in ("swagger-ui.css", "favicon.png", "swagger-ui-bundle.js", "swagger-init.js")
    ), named
    assert not re.search(r"https?:|//", page.text.replace("<!DOCTYPE html>", "")), "no other origin on the page"
    types = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
    files = {}
    for url in named:
        reply = client.get(url.removeprefix("/rpcwatch"))
        assert reply.status_code == 200, (url, reply.status_code, reply.text[:200])
        assert reply.headers["content-type"].startswith(types[Path(url).suffix]), (url, reply.headers["content-type"])
        files[Path(url).name] = reply.content
    assert len(files["swagger-ui-bundle.js"]) > 500_000 and b"SwaggerUIBundle" in files["swagger-ui-bundle.js"]
    assert b"swagger-ui" in files["swagger-ui.css"] and files["favicon.png"][:4] == b"\x89PNG"
    css_loads = re.findall(rb"""url\(\s*["']?([^"')\s]*)""", files["swagger-ui.css"])
    assert css_loads and all(u.startswith(b"data:") for u in css_loads), "the stylesheet's pictures are inline"
    assert b"@import" not in files["swagger-ui.css"] and not re.search(rb"https?:|//", files["swagger-init.js"])
    assert not re.search(rb"sourceMappingURL=\S*https?:|cdn\.jsdelivr|unpkg\.com", files["swagger-ui-bundle.js"])
    policy = _assert_guarded(page, "/docs")
    sources = {source for values in policy.values() for source in values}
    assert sources <= {"'none'", "'self'", "data:"}, policy
    assert client.get("/openapi.json").json()["servers"] == [{"url": "/rpcwatch"}]
    assert client.get("/docs/swagger-ui.css").headers["x-content-type-options"] == "nosniff"


class _Person:
    """The logged-in user Airflow's security dependency would give (its login is tested over HTTP in
    test_plugin_auth.py)."""

    def get_name(self) -> str:
        return "ana"


def _deciding_client(module):
    from airflow.api_fastapi.core_api.security import get_user

    client = _client(module)
    module.app.dependency_overrides[module.require_edit_access] = lambda: None
    module.app.dependency_overrides[get_user] = _Person
    return client


BROWSER = {"Accept": "text/html"}


def test_people_acknowledge_mark_and_silence_from_the_view(tmp_path, monkeypatch):
    """The buttons of an incident's page write the warehouse at once (who and when), the page and
    the list show the decision, and the quality page counts it once published."""
    import duckdb

    settings = _hand_made_home(tmp_path, monkeypatch)
    client = _deciding_client(_module())
    spike = next(i for i in _incidents(client) if i["patterns"] == [1])
    page = f"/incident/{spike['incident_id']}"
    assert "nobody has acknowledged or marked it yet" in client.get(page).text
    assert f'<form method="post" action="{page}/ack">' in client.get(page).text, "the page's buttons post to it"

    reply = client.post(f"{page}/ack", data={"note": "looking"}, headers=BROWSER, follow_redirects=False)
    assert reply.status_code == 303 and reply.headers["location"] == f"{page}?done=ack"
    reply = client.post(f"{page}/mark", data={"mark": "false_positive", "note": "<b>load</b> test"}, headers=BROWSER)
    text = reply.text
    assert reply.status_code == 200 and "Marked. Retraining leaves this period out." in text
    assert "acked by ana" in text and "false positive (ana)" in text and "&lt;b&gt;load&lt;/b&gt; test" in text
    assert "acked by ana" in client.get("/", params={"since": "all"}).text, "the list shows the decision"
    said = client.post(f"{page}/mark", data={"mark": "true_positive"}).json()  # an API client gets JSON
    assert said["done"] == "mark" and "marked true_positive by ana" in said["said"]
    reply = client.post("/silence", data={"service": HOSTILE, "lasting": "4h", "incident": spike["incident_id"]})
    assert reply.status_code == 200 and "silenced by ana" in reply.json()["said"]
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        actions = con.execute("SELECT action, mark, note, actor FROM incident_actions ORDER BY acted_at").fetchall()
        silences = con.execute("SELECT service, actor, ends_at - starts_at FROM silences").fetchall()
    assert actions == [
        ("ack", None, "looking", "ana"),
        ("mark", "false_positive", "<b>load</b> test", "ana"),
        ("mark", "true_positive", None, "ana"),
    ]
    assert silences == [(HOSTILE, "ana", timedelta(hours=4))]

    publish(settings)
    quality = client.get("/quality")
    assert quality.status_code == 200 and "detection quality" in quality.text and "/quality.png" in quality.text
    assert re.search(r"<td>1</td><td class=num>1</td><td class=num>0</td><td class=num>0%</td>", quality.text)
    png = client.get("/quality.png")
    assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"


def test_bad_or_foreign_decisions_are_refused_and_a_busy_warehouse_says_so(tmp_path, monkeypatch):
    import subprocess
    import sys

    settings = _hand_made_home(tmp_path, monkeypatch)
    module = _module()
    client = _deciding_client(module)
    spike = next(i for i in _incidents(client) if i["patterns"] == [1])
    page = f"/incident/{spike['incident_id']}"
    foreign = client.post(f"{page}/ack", headers={"Origin": "http://evil.example"})
    assert foreign.status_code == 403, "a form posted from another site"
    assert client.post("/incident/0123456789ab/ack").status_code == 404
    assert client.post(f"{page}/mark", data={"mark": "fine"}).status_code == 422
    assert (
        client.post("/silence", data={"service": HOSTILE, "lasting": "9y", "incident": "0123456789ab"}).status_code
        == 422
    )

    monkeypatch.setattr("tasks.app.view_actions.WRITE_WAIT_S", 0.5)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb, time; c = duckdb.connect({str(settings.warehouse)!r}); "
            "print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = client.post(f"{page}/ack")
        assert busy.status_code == 503 and "press again" in busy.text
        assert "as of the last publish" in client.get(page).text, "the page still shows, from the snapshot"
    finally:
        holder.kill()
        holder.wait()
