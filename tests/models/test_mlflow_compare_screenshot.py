"""MLflow's UI comparing two versions (runs) of one pattern, screenshotted with headless Chromium.

Skipped without Chromium (CI has none). With `RPCWATCH_DOCS_DIR=docs` the screenshot is also
written there as `mlflow-compare.png`, the README's figure:

    RPCWATCH_DOCS_DIR=docs .venv/bin/pytest tests/models/test_mlflow_compare_screenshot.py
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tasks.models.registry import EXPERIMENT, model_name, setup_mlflow
from tasks.settings import Settings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Chromium to screenshot MLflow's UI (CI has no Chromium)"
)
# The UI is reached under a name mapped to 127.0.0.1 (Chromium's --host-resolver-rules), as a team
# reaches its MLflow server: on a loopback address the UI opens its local-only Assistant panel over
# a third of the page. The server is told to accept that name (Host header and CORS origin).
HOST = "mlflow.rpcwatch"
WINDOW = "1600,2800"  # tall enough for run details, parameters, metrics and the tags (Airflow, decision)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def mlflow_ui(settings: Settings, port: int) -> Iterator[str]:
    """`mlflow ui` on the home's store (one worker), stopped afterwards; yields its base URL."""
    origin = f"{HOST}:{port}"
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", str(settings.mlflow_tracking_uri)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--allowed-hosts", f"{origin},127.0.0.1:{port}", "--cors-allowed-origins", f"http://{origin}"]
    log = (settings.home / "mlflow-ui.log").open("wb")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow ui did not start: see {log.name}") from None
                time.sleep(0.5)
        yield f"http://{origin}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the worker it started, nothing else
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def chromium(url: str, profile: Path, *args: str) -> str:
    """Headless Chromium on a client-side page, given virtual time to render it; its stdout."""
    assert CHROMIUM is not None
    return subprocess.run(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--host-resolver-rules=MAP {HOST} 127.0.0.1",
            f"--user-data-dir={profile}",
            f"--window-size={WINDOW}",
            "--virtual-time-budget=15000",
            *args,
            url,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=180,
    ).stdout


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    """MLflow 3's runs-compare page, in its model-training view."""
    query = urllib.parse.urlencode(
        {"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id]), "workflowType": "machine_learning"}
    )
    return f"{base}/#/compare-runs?{query}"


def test_the_mlflow_ui_compares_two_versions_of_a_pattern(retrained, tmp_path):
    import numpy as np
    from PIL import Image

    settings, pid, _ = retrained
    mlflow = setup_mlflow(settings)
    client = mlflow.MlflowClient()
    versions = sorted(client.search_model_versions(f"name = '{model_name(pid)}'"), key=lambda v: int(v.version))
    run_ids = [v.run_id for v in versions[-2:]]
    experiment_id = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    png = tmp_path / "mlflow-compare.png"
    port = _free_port()
    with mlflow_ui(settings, port) as base:
        url = compare_url(base, experiment_id, run_ids)
        page = chromium(url, tmp_path / "profile-dom", "--dump-dom")
        chromium(url, tmp_path / "profile-png", f"--screenshot={png}")

    assert "Comparing 2 Runs" in page, "the compare page rendered (not an error or a login)"
    for v in versions[-2:]:
        assert f"pattern-{pid}-v{v.version}-" in page and v.tags["decision"] in page

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000
    with Image.open(png) as image:
        assert image.size == tuple(int(x) for x in WINDOW.split(","))
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.std() > 10, "a page with content, not a blank one"
    assert (pixels < 128).mean() > 0.005, "text and plots on it"
    if docs := os.environ.get("RPCWATCH_DOCS_DIR"):
        Path(docs).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, Path(docs) / "mlflow-compare.png")
