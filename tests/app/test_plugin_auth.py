"""The anomaly view sits behind Airflow's own login: checked over HTTP against a real `airflow api-server`.

One API server (1 worker, 127.0.0.1, a free port, a fresh AIRFLOW_HOME with SQLite) serves every test
in this module. SimpleAuthManager with two explicit users (admin, viewer) and no all-admins mode; it
writes their generated passwords to a file, as it does for `make airflow`. The server's whole process
group is stopped at the end and the module checks that nothing of it is left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.app.airflow_env import SIMPLE_AUTH_MANAGER, airflow_env
from tasks.settings import load_settings

httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.airflow, pytest.mark.slow]

INCIDENT = "0123456789ab"  # the one incident the server's snapshot holds (see `server`)
ROUTES = [
    "/rpcwatch/",
    "/rpcwatch/api/anomalies",
    "/rpcwatch/api/incidents",
    f"/rpcwatch/incident/{INCIDENT}",
    f"/rpcwatch/incident/{INCIDENT}/graph.png",
    f"/rpcwatch/incident/{INCIDENT}/forecast.png",
    "/rpcwatch/docs",
    "/rpcwatch/docs/swagger-ui-bundle.js",
    "/rpcwatch/docs/swagger-ui.css",
    "/rpcwatch/docs/favicon.png",
    "/rpcwatch/docs/swagger-init.js",
    "/rpcwatch/openapi.json",
    "/rpcwatch/quality",
    "/rpcwatch/quality.png",
]
# people's decisions (POST, written to the warehouse): a login with edit access to the DAG
POSTED = {
    f"/rpcwatch/incident/{INCIDENT}/ack": {"note": "on it"},
    f"/rpcwatch/incident/{INCIDENT}/mark": {"mark": "expected"},
    "/rpcwatch/silence": {"service": "svc-b", "lasting": "1h", "incident": INCIDENT},
}
START_TIMEOUT_S = 240
STOP_TIMEOUT_S = 30
HTTP_TIMEOUT_S = 30


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> set[int]:
    """Every live descendant of `pid` (Linux /proc), to check after shutdown that none survived."""
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        for children in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = {int(c) for c in children.read_text().split()}
            except OSError:
                continue
            todo.extend(kids - found)
            found |= kids
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _group_members(pgid: int) -> set[int]:
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.add(int(stat.parent.name))
    return members


def _stop(proc: subprocess.Popen) -> set[int]:
    """SIGTERM to the server's process group, SIGKILL after STOP_TIMEOUT_S; returns survivors."""
    watched = _descendants(proc.pid) | {proc.pid}
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_TIMEOUT_S)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and (_group_members(proc.pid) or any(_alive(p) for p in watched)):
        time.sleep(0.2)
    survivors = _group_members(proc.pid) | {p for p in watched if _alive(p)}
    if survivors:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)
    return survivors


def _log_tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


def _publish_one_incident(settings) -> None:
    """A published snapshot holding one incident (INCIDENT), so that its page and pictures exist."""
    from tasks.publish import publish
    from tasks.warehouse import opened

    with opened(settings.warehouse) as con:
        con.execute(
            "INSERT INTO incidents (incident_id, start_ts, end_ts, patterns, nodes, peak_score, kinds, points, "
            "culprits, evidence) VALUES (?, TIMESTAMP '2026-01-01 00:00', TIMESTAMP '2026-01-01 00:05', [1], "
            "['svc-a|svc-b|get|rpc'], 4.0, ['traffic_spike'], 5, ['svc-b'], 'traffic_spike calls: 9.0')",
            [INCIDENT],
        )
    publish(settings)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, passwords by user name) of a running API server; stopped after the module."""
    root = tmp_path_factory.mktemp("apiserver")
    settings = load_settings(env={}, home=root / "home")
    _publish_one_incident(settings)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RPCWATCH_", "AIRFLOW"))}
    passwords = root / "passwords.json"
    env = airflow_env(settings, base=clean)
    env.update(
        AIRFLOW__CORE__AUTH_MANAGER=SIMPLE_AUTH_MANAGER,
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="admin:admin,viewer:viewer",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="False",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(passwords),
        AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_hex(32),
        AIRFLOW__API__SECRET_KEY=secrets.token_hex(32),
        AIRFLOW__API__WORKERS="1",
        AIRFLOW__LOGGING__LOGGING_LEVEL="WARNING",
    )
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    airflow = str(Path(sys.executable).with_name("airflow"))
    migrate = subprocess.run([airflow, "db", "migrate"], env=env, capture_output=True, text=True, timeout=300)
    assert migrate.returncode == 0, (migrate.stdout + migrate.stderr)[-3000:]

    port = _free_port()
    log = root / "api-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [airflow, "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopped as a whole below
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"api-server exited with {proc.returncode}:\n{_log_tail(log)}")
            try:
                if httpx.get(f"{base}/api/v2/monitor/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"api-server did not answer within {START_TIMEOUT_S}s:\n{_log_tail(log)}")
            time.sleep(1)
        yield base, json.loads(passwords.read_text())
    finally:
        survivors = _stop(proc)
    assert not survivors, f"api-server processes left after SIGTERM: {sorted(survivors)}"


def _get(url: str, **kwargs) -> httpx.Response:
    return httpx.get(url, timeout=HTTP_TIMEOUT_S, follow_redirects=False, **kwargs)


def _token(base: str, user: str, password: str) -> httpx.Response:
    return httpx.post(f"{base}/auth/token", json={"username": user, "password": password}, timeout=HTTP_TIMEOUT_S)


@pytest.fixture(scope="module")
def admin_token(server) -> str:
    base, passwords = server
    reply = _token(base, "admin", passwords["admin"])
    assert reply.status_code == 201, reply.text
    return reply.json()["access_token"]


def _refused(reply: httpx.Response) -> bool:
    """401, or a redirect to Airflow's login page."""
    if reply.status_code == 401:
        return True
    return reply.is_redirect and "/login" in reply.headers.get("location", "")


def test_every_route_of_the_view_is_in_routes():
    """A route added to the view must join ROUTES, so that the tests here check it needs a login."""
    import importlib.util

    from helpers import REPO

    spec = importlib.util.spec_from_file_location("rpcwatch_anomalies", REPO / "plugins" / "rpcwatch_anomalies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paths = {"/rpcwatch" + r.path for r in module.app.routes}
    assert paths <= {r.replace(INCIDENT, "{incident_id}") for r in (*ROUTES, *POSTED)}, paths


def test_airflow_itself_needs_a_login(server):
    base, _ = server
    assert _get(f"{base}/api/v2/dags").status_code == 401


@pytest.mark.parametrize("route", ROUTES)
def test_anonymous_requests_are_refused(server, route):
    base, _ = server
    reply = _get(f"{base}{route}")
    assert _refused(reply), (route, reply.status_code, reply.text[:300])


@pytest.mark.parametrize("route", ROUTES)
def test_a_bad_or_foreign_token_is_refused(server, route):
    base, _ = server
    forged = "eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhZG1pbiIsInJvbGUiOiJhZG1pbiJ9.bm90LXNpZ25lZA"
    for headers, cookies in (({"Authorization": f"Bearer {forged}"}, None), ({}, {"_token": forged})):
        reply = _get(f"{base}{route}", headers=headers, cookies=cookies)
        assert reply.status_code in (401, 403) or _refused(reply), (route, reply.status_code, reply.text[:300])


def test_a_browser_is_sent_to_the_login_page(server):
    base, _ = server
    reply = _get(f"{base}/rpcwatch/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert reply.is_redirect, (reply.status_code, reply.headers)
    location = reply.headers["location"]
    assert location.startswith("/auth/login?next=") and "rpcwatch" in location, location
    assert _get(f"{base}{location}").status_code == 200  # the login page itself is public


def test_wrong_password_gets_no_token(server):
    base, passwords = server
    assert _token(base, "admin", passwords["admin"] + "x").status_code == 401


@pytest.mark.parametrize("route", ROUTES)
def test_a_bearer_token_opens_every_route(server, admin_token, route):
    base, _ = server
    reply = _get(f"{base}{route}", headers={"Authorization": f"Bearer {admin_token}"})
    assert reply.status_code == 200, (route, reply.status_code, reply.text[:300])
    if route.endswith(("/api/anomalies", "/api/incidents")):
        assert isinstance(reply.json(), list)
    if route.endswith("/api/incidents"):
        every = _get(f"{base}{route}", params={"since": "all"}, headers={"Authorization": f"Bearer {admin_token}"})
        assert [i["incident_id"] for i in every.json()] == [INCIDENT]
    if route.endswith(".png"):
        assert reply.headers["content-type"] == "image/png" and reply.content[:4] == b"\x89PNG"
    if route.endswith("/openapi.json"):
        assert {"/api/anomalies", "/api/incidents", "/incident/{incident_id}/graph.png"} <= set(reply.json()["paths"])
    if route == "/rpcwatch/":
        assert "Incidents" in reply.text
    if route.endswith(f"/incident/{INCIDENT}"):
        assert f"/rpcwatch/incident/{INCIDENT}/graph.png" in reply.text, "links are built on the mount point"
    if route.endswith("/docs"):
        assert "/rpcwatch/openapi.json" in reply.text


def test_the_ui_login_cookie_opens_the_page(server, admin_token):
    """The Airflow UI logs in by setting the `_token` cookie; the view is shown in the UI with it."""
    base, _ = server
    reply = _get(f"{base}/rpcwatch/", cookies={"_token": admin_token})
    assert reply.status_code == 200 and "Incidents" in reply.text


def test_a_viewer_may_read_the_anomalies(server):
    base, passwords = server
    reply = _token(base, "viewer", passwords["viewer"])
    assert reply.status_code == 201, reply.text
    headers = {"Authorization": f"Bearer {reply.json()['access_token']}"}
    assert _get(f"{base}/rpcwatch/api/anomalies", headers=headers).status_code == 200


@pytest.mark.parametrize("route", ["/rpcwatch/", "/rpcwatch/api/anomalies", "/rpcwatch/api/incidents"])
@pytest.mark.parametrize("limit", ["-1", "0"])
def test_limit_below_one_is_a_client_error(server, admin_token, route, limit):
    base, _ = server
    reply = _get(f"{base}{route}", params={"limit": limit}, headers={"Authorization": f"Bearer {admin_token}"})
    assert reply.status_code == 422, (route, limit, reply.status_code, reply.text[:300])


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_sends_the_security_headers(server, admin_token, route):
    """Logged in or refused, every answer of the view forbids sniffing, referrers, foreign framing and
    anything the page does not load itself (tests/app/test_plugin.py checks each directive)."""
    base, _ = server
    for headers in ({"Authorization": f"Bearer {admin_token}"}, {}):
        reply = _get(f"{base}{route}", headers=headers)
        assert reply.status_code == (200 if headers else 401), (route, reply.status_code)
        assert reply.headers.get("x-content-type-options") == "nosniff", (route, reply.headers)
        assert reply.headers.get("referrer-policy") == "no-referrer", (route, reply.headers)
        policy = reply.headers.get("content-security-policy", "")
        assert "default-src 'none'" in policy and "frame-ancestors 'self'" in policy, (route, policy)


def test_a_bad_parameter_is_explained_after_the_login(server, admin_token):
    """Logged in, a browser's bad `since` is a 422 page saying what is accepted; not logged in, it is
    the login first (the parameters of an anonymous request are never looked at)."""
    base, _ = server
    browser = {"Accept": "text/html,application/xhtml+xml"}
    reply = _get(
        f"{base}/rpcwatch/", params={"since": "1w"}, headers={**browser, "Authorization": f"Bearer {admin_token}"}
    )
    assert reply.status_code == 422 and reply.headers["content-type"].startswith("text/html"), reply.text[:300]
    assert "<b>since</b>" in reply.text and 'href="/rpcwatch/"' in reply.text, "links built on the mount point"
    assert _refused(_get(f"{base}/rpcwatch/", params={"since": "1w"}, headers=browser))


@pytest.mark.parametrize("route", sorted(POSTED))
def test_deciding_needs_a_login_with_edit_access(server, admin_token, route):
    """Anonymous: 401; a viewer (reads the DAG, may not edit it): 403; the admin's decision is
    recorded under the admin's name; a form posted from another origin is refused even for the admin."""
    base, passwords = server
    form = POSTED[route]
    assert httpx.post(f"{base}{route}", data=form, timeout=30).status_code == 401
    viewer = _token(base, "viewer", passwords["viewer"]).json()["access_token"]
    refused = httpx.post(f"{base}{route}", data=form, headers={"Authorization": f"Bearer {viewer}"}, timeout=30)
    assert refused.status_code == 403, (refused.status_code, refused.text[:300])
    admin = {"Authorization": f"Bearer {admin_token}"}
    foreign = httpx.post(f"{base}{route}", data=form, headers=admin | {"Origin": "http://evil.example"}, timeout=30)
    assert foreign.status_code == 403, (foreign.status_code, foreign.text[:300])
    done = httpx.post(f"{base}{route}", data=form, headers=admin, timeout=30)
    assert done.status_code == 200 and "by admin" in done.json()["said"], (done.status_code, done.text[:300])
