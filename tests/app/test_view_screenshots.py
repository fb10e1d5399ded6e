"""Screenshots of the Airflow view in headless Chromium: the incidents list and one incident's page.

The view's FastAPI app is served in-process by uvicorn on 127.0.0.1 and a free port. Its login check
is overridden HERE ONLY, to take pictures without an Airflow API server: that every route needs a
login is tested in test_plugin.py and, against a real API server, in test_plugin_auth.py.

Data: by default the `trained` home with a flooded RPC and a new RPC scored and published; with
RPCWATCH_SCREENSHOT_HOME set, a copy of that home's published `analytics.duckdb` (read only once,
never written; e.g. the demo's `.rpcwatch`). The PNGs go to the test's tmp folder and, when
RPCWATCH_DOCS_DIR is set, to that folder too as view-incidents.png, view-incident.png and
view-quality.png (the home's incidents acknowledged and marked first, as people would):

    RPCWATCH_SCREENSHOT_HOME=.rpcwatch RPCWATCH_DOCS_DIR=docs \\
        .venv/bin/pytest tests/app/test_view_screenshots.py

Skipped where Chromium is not installed (.ci/run installs Debian's chromium, so CI takes them).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from helpers import REPO, START, copy_home, flood_user_rpc
from tasks.keys import split_node_key

CHROMIUM = next((c for c in (shutil.which("chromium"), "/usr/bin/chromium") if c and Path(c).exists()), None)
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no headless Chromium installed: no screenshots taken"),
    pytest.mark.slow,
]
WINDOW = "1400,1000"
SHOT_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _serving(app) -> Iterator[str]:
    """The app served by uvicorn in a thread of this process; stopped on exit."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def _view_app():
    spec = importlib.util.spec_from_file_location("rpcwatch_anomalies", REPO / "plugins" / "rpcwatch_anomalies.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Screenshots only: the login check is replaced so Chromium can load the pages without an
    # Airflow API server. Nowhere else is it overridden but in test_plugin.py's page tests.
    module.app.dependency_overrides[module.require_read_access] = lambda: None
    return module.app


def _published_home(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A home with a published snapshot holding incidents (see the module's docstring)."""
    given = os.environ.get("RPCWATCH_SCREENSHOT_HOME")
    if given:
        home = tmp_path / "home"
        home.mkdir()
        shutil.copyfile(Path(given) / "analytics.duckdb", home / "analytics.duckdb")
        _with_evidence(home / "analytics.duckdb")
        return home
    import duckdb

    from tasks.publish import publish
    from tasks.scoring.score import score_hour

    trained = request.getfixturevalue("trained")
    settings = copy_home(trained[0], tmp_path)
    hour = START + timedelta(hours=3)
    flooded = hour + timedelta(minutes=20)
    rpc = split_node_key(flood_user_rpc(settings, trained[2][0]["pattern_id"], flooded))
    lo, hi = flooded.replace(tzinfo=None), (flooded + timedelta(minutes=10)).replace(tzinfo=None)
    at = (hour + timedelta(minutes=40)).replace(tzinfo=None)
    with duckdb.connect(str(settings.warehouse)) as con:
        # the RPC's own series shows the flood too (the view draws it where pattern_series is not published)
        con.execute(
            "UPDATE rpc_series SET calls = calls * 6 WHERE caller = ? AND callee = ? AND interface = ? "
            "AND rpc_type = ? AND bucket_ts >= ? AND bucket_ts < ?",
            [*rpc, lo, hi],
        )
        con.execute("INSERT INTO novel_rpcs VALUES (?, 'svc-cart', 'svc-secrets', 'dumpKeys', 'rpc', 40, ?)", [at, at])
    score_hour(settings, hour)
    publish(settings)
    return settings.home


def _with_evidence(snapshot: Path) -> None:
    """A copied snapshot published before incidents said their evidence (an older demo home) gets
    its incidents rebuilt by today's rule from its own anomalies, default settings (the copy only)."""
    import duckdb

    from tasks.scoring.incidents import INCIDENT_COLUMNS, INCIDENTS_SQL, rule_params
    from tasks.settings import load_settings

    s = load_settings(env={})
    with duckdb.connect(str(snapshot)) as con:
        if con.execute("SELECT count(*) FROM information_schema.columns WHERE column_name = 'evidence'").fetchone()[0]:
            return
        con.execute("ALTER TABLE incidents ADD COLUMN evidence VARCHAR")
        con.execute("DELETE FROM incidents")
        [(lo, hi)] = con.execute("SELECT min(bucket_ts), max(bucket_ts) + INTERVAL 1 DAY FROM anomalies").fetchall()
        params = {"lo": lo, "hi": hi, **rule_params(s.incident_gap_buckets, s.incident_min_buckets, s.bucket_seconds)}
        con.execute(f"INSERT INTO incidents ({INCIDENT_COLUMNS}) " + INCIDENTS_SQL, params)


def _shot(url: str, out: Path, profile: Path) -> Path:
    command = [
        str(CHROMIUM),
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--screenshot={out}",
        f"--window-size={WINDOW}",
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=SHOT_TIMEOUT_S)
    assert done.returncode == 0 and out.exists(), (done.returncode, done.stderr[-2000:])
    return out


def _decide(home: Path, incidents: list[dict], chosen: str) -> bool:
    """What people would have decided (tasks.triage.actions, in the home's warehouse when it has one):
    the shown incident acknowledged and marked expected, the others marked, then published again so
    that the quality page counts them."""
    from tasks.publish import publish
    from tasks.settings import load_settings
    from tasks.triage.actions import ACK, MARK, MARKS, record
    from tasks.warehouse import opened

    settings = load_settings(env={}, home=home)
    if not settings.warehouse.exists():
        return False  # a copied snapshot alone: nothing to decide on
    with opened(settings.warehouse) as con:
        record(con, chosen, ACK, "ana", note="looking")
        record(con, chosen, MARK, "ana", mark="expected", note="load test at 03:20")
        others = [i["incident_id"] for i in incidents if i["incident_id"] != chosen]
        for n, incident_id in enumerate(others):
            record(con, incident_id, MARK, "bo", mark=MARKS[n % len(MARKS)])
    publish(settings)
    return True


def _looks_like_a_page(png: Path) -> None:
    """A real screenshot: a PNG, not tiny, not one flat colour."""
    import matplotlib.image as mpimg

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000, png
    pixels = mpimg.imread(png)
    assert pixels.shape[1] >= 1000 and pixels.std() > 0.05, (png, pixels.shape, pixels.std())


def test_screenshots_of_the_incidents_and_an_incident(request, tmp_path, monkeypatch):
    import httpx

    home = _published_home(request, tmp_path)
    monkeypatch.setenv("RPCWATCH_HOME", str(home))
    docs = os.environ.get("RPCWATCH_DOCS_DIR")
    with _serving(_view_app()) as base:
        incidents = httpx.get(f"{base}/api/incidents", params={"since": "all", "limit": 1000}, timeout=60).json()
        assert incidents, "the published home holds incidents"
        # the page to show: the forecast-kind incident with the most points (a band to see), else any
        forecast = [i for i in incidents if {"traffic_spike", "traffic_drop", "errors"} & set(i["kinds"])]
        chosen = max(forecast or incidents, key=lambda i: (i["points"], i["incident_id"]))
        page = f"{base}/incident/{chosen['incident_id']}?since=all"
        for route in (page, f"{page.split('?')[0]}/graph.png", f"{page.split('?')[0]}/forecast.png"):
            assert httpx.get(route, timeout=120).status_code == 200, route  # pictures drawn before the shot
        if _decide(home, incidents, chosen["incident_id"]):
            assert "acked by ana" in httpx.get(page, timeout=60).text, "the page shows the decisions"
        shots = {
            "view-incidents.png": f"{base}/?since=all",
            "view-incident.png": page,
            "view-quality.png": f"{base}/quality",
        }
        for name, url in shots.items():
            png = _shot(url, tmp_path / name, tmp_path / "chromium-profile")
            _looks_like_a_page(png)
            if docs:
                Path(docs).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(png, Path(docs) / name)
