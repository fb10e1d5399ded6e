"""The Airflow UI view of anomalies: Airflow loads the plugin; the page reads the published snapshot."""

from __future__ import annotations

import html
import importlib.util
import json
import os
import re
from datetime import UTC, datetime, timedelta

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


def _hand_made_home(tmp_path, monkeypatch, shift=timedelta(0)):
    """A published home: pattern 1 (entry -> the hostile service -> its db) with a 6-minute spike on
    the hostile RPC ending 20 min before now, a new RPC 10 min before now, a drop in pattern 2 three
    days ago (all moved back by `shift`). Incidents made by the product's rule. Returns the settings."""
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


def test_the_window_counts_from_now_and_old_data_says_so(tmp_path, monkeypatch):
    """The newest data is 5 days old: the last 2 days hold nothing, the page says so and offers all."""
    _hand_made_home(tmp_path, monkeypatch, shift=timedelta(days=5))
    client = _client(_module())
    assert _incidents(client, since="2d") == [] and len(_incidents(client)) == 3
    page = client.get("/", params={"since": "2d"}).text
    assert "older than the window" in page and "Show all" in page and "since=all" in page
    assert "older than the window" not in client.get("/", params={"since": "all"}).text
    assert "older than the window" in client.get("/").text, "the default window (24h) counts from now too"


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
    "/openapi.json",
)


def test_every_route_requires_a_login():
    """Without a token (header or the UI's `_token` cookie) every route, docs included, answers 401."""
    from fastapi.testclient import TestClient

    client = TestClient(_module().app, raise_server_exceptions=False)
    for route in (*PROTECTED, "/redoc", "/docs/oauth2-redirect"):
        reply = client.get(route, follow_redirects=False)
        assert reply.status_code in (401, 404), (route, reply.status_code, reply.text[:200])
        if route in PROTECTED:
            assert reply.status_code == 401, (route, reply.status_code)


def test_every_route_of_the_app_is_in_the_login_checks():
    """A new route must join PROTECTED here and ROUTES in test_plugin_auth.py."""
    paths = {getattr(r, "path", "") for r in _module().app.routes}
    listed = {re.sub(r"0123456789ab", "{incident_id}", p) for p in PROTECTED}
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
    [script] = re.findall(r"<script>(.*?)</script>", docs.text, flags=re.S)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in _policy(docs)["script-src"], "the docs' inline start-up script, by its hash"

    from fastapi.testclient import TestClient

    refused = TestClient(_module().app, raise_server_exceptions=False).get("/", follow_redirects=False)
    assert refused.status_code == 401
    _assert_guarded(refused, "/ without a login")
