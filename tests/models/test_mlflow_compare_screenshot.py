"""MLflow's real UI (`mlflow ui` on a home with two versions of a pattern) as an operator meets it:
where rpcwatch's links open the experiment, what the two compare pages show (decision, reason,
plots), and where the CLI says to look after a training. Browser checks run headless Chromium,
driven over the DevTools protocol (to click and to read the URL a page ends on); they are skipped
without Chromium (.ci/run installs it). With `RPCWATCH_DOCS_DIR=docs` the screenshots are also written
there as `mlflow-compare.png` (runs) and `mlflow-compare-versions.png` (registered versions), the
README's figures:

    RPCWATCH_DOCS_DIR=docs .venv/bin/pytest tests/models/test_mlflow_compare_screenshot.py
"""

from __future__ import annotations

import base64
import json
import os
import re
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from helpers import copy_home
from tasks.app.commands.models import mlflow_hint
from tasks.models.registry import EXPERIMENT, EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, model_name, setup_mlflow
from tasks.models.tracking import MODEL_TRAINING_VIEW, experiment_url
from tasks.settings import Settings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium for MLflow's UI (.ci/run installs it)")
pytestmark = pytest.mark.slow  # a real MLflow server and a browser
# The UI is reached under a name mapped to 127.0.0.1 (Chromium's --host-resolver-rules), as a team
# reaches its MLflow server: on a loopback address the UI opens its local-only Assistant panel over
# a third of the page. The server is told to accept that name (Host header and CORS origin).
HOST = "mlflow.rpcwatch"
WIDTH = 1600
PAGE_TIMEOUT_S = 60
# the URL the experiment page redirects to once it has picked a view: its tab and `workflowType`
LANDED = (
    r"/\/experiments\/[^/?]+\/[a-z]+/.test(location.href) && location.href.includes('workflowType=') && location.href"
)
# the plot in the runs compare's tree of common artifacts
PLOT_NODE = '[data-testid=artifact-tree-node][artifact-name="forecast.png"]'
# a section header of a compare page (the sections fold), by its title
SECTION = "(title => [...document.querySelectorAll('[aria-expanded]')].find(e => e.textContent.trim() === title))"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def mlflow_ui(settings: Settings, port: int) -> Iterator[None]:
    """`mlflow ui` on the home's store (one worker) on 127.0.0.1:port, stopped afterwards."""
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
        yield
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the worker it started, nothing else
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@dataclass(frozen=True)
class Served:
    """The retrained home served by `mlflow ui`: its pattern's two versions, by version number."""

    settings: Settings
    pid: int
    port: int
    experiment_id: str
    run_ids: dict[int, str]

    @property
    def local(self) -> str:  # as this process (and the CLI) reaches it
        return f"http://127.0.0.1:{self.port}"

    @property
    def named(self) -> str:  # as the browser reaches it, without the Assistant panel
        return f"http://{HOST}:{self.port}"


@pytest.fixture(scope="module")
def served(retrained: Any) -> Iterator[Served]:
    settings, pid, _ = retrained
    mlflow = setup_mlflow(settings)
    versions = mlflow.MlflowClient().search_model_versions(f"name = '{model_name(pid)}'")
    experiment_id = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    port = _free_port()
    with mlflow_ui(settings, port):
        yield Served(settings, pid, port, experiment_id, {int(v.version): v.run_id for v in versions})


class Page:
    """One headless Chromium tab driven over the DevTools protocol."""

    def __init__(self, ws: Any) -> None:
        self.ws, self.last_id = ws, 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.last_id += 1
        self.ws.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:  # events arrive between the answers: skipped
            message = json.loads(self.ws.recv(timeout=PAGE_TIMEOUT_S))
            if message.get("id") == self.last_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message["result"])

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str) -> Any:
        """The value of `expression` once truthy (the UI renders asynchronously)."""
        deadline = time.monotonic() + PAGE_TIMEOUT_S
        while not (value := self.evaluate(expression)):
            assert time.monotonic() < deadline, f"{what}: not there after {PAGE_TIMEOUT_S} s at {self.url()}"
            time.sleep(0.5)
        return value

    def open(self, url: str, text: str) -> str:
        """Go to `url` and wait until the page shows `text`; the page's text."""
        self.call("Page.navigate", url=url)
        self.wait_for(f"document.body && document.body.innerText.includes({json.dumps(text)})", text)
        return self.text()

    def url(self) -> str:
        return str(self.evaluate("location.href"))

    def text(self) -> str:
        return str(self.evaluate("document.body.innerText"))

    def screenshot(self, path: Path, height: int) -> None:
        self.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=height, deviceScaleFactor=1, mobile=False)
        time.sleep(1)  # the layout follows the new height
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    """A fresh headless Chromium (new profile: no view chosen before, as a new user's browser)."""
    from websockets.sync.client import connect  # in the lock (Airflow's API server uses it)

    assert CHROMIUM is not None
    profile = tmp_path_factory.mktemp("chromium")
    browser = subprocess.Popen(
        [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
        + [f"--host-resolver-rules=MAP {HOST} 127.0.0.1", f"--user-data-dir={profile}", f"--window-size={WIDTH},1600"]
        + ["--remote-debugging-port=0", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert browser.poll() is None and time.monotonic() < deadline, "Chromium did not start"
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            tab = next(t for t in json.load(answer) if t["type"] == "page")
        with connect(tab["webSocketDebuggerUrl"], max_size=None) as ws:
            yield Page(ws)
    finally:
        os.killpg(browser.pid, signal.SIGTERM)
        browser.wait(timeout=20)


def _docs(png: Path) -> None:
    if docs := os.environ.get("RPCWATCH_DOCS_DIR"):
        Path(docs).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, Path(docs) / png.name)


def _a_picture(png: Path, size: tuple[int, int]) -> None:
    """A rendered page of that size with content (text and plots), not a blank or an error page."""
    import numpy as np
    from PIL import Image

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.size == size
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005


# --- where the links open ---------------------------------------------------------------------------


@needs_chromium
def test_rpcwatch_links_open_the_experiment_on_its_training_runs(served, page):
    """MLflow 3.17 opens an experiment in GenAI's Overview unless the link names the view: the tag
    `mlflow.experimentKind` is not read. The links the CLI prints after a training name it."""
    experiment = setup_mlflow(served.settings).get_experiment_by_name(EXPERIMENT)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    page.call("Page.navigate", url=f"{served.named}/#/experiments/{served.experiment_id}")
    landed = page.wait_for(LANDED, "the experiment page picked its view")
    assert "/overview" in landed and "workflowType=genai" in landed, "a bare link: GenAI's view despite the tag"

    hint = mlflow_hint(served.settings.with_(mlflow_url=served.local), [served.pid])
    [runs] = re.findall(r"runs: +(\S+)", hint)
    assert runs == experiment_url(served.local, served.experiment_id)
    text = page.open(runs.replace(served.local, served.named), f"pattern-{served.pid}-v2-")
    landed = page.wait_for(LANDED, "the experiment page picked its view")
    assert f"/#/experiments/{served.experiment_id}/runs?" in landed and "workflowType=machine_learning" in landed
    assert f"pattern-{served.pid}-v1-" in text and "Token Usage" not in text

    [model] = re.findall(rf"pattern {served.pid}: +(\S+)", hint)
    text = page.open(model.replace(served.local, served.named), "Version 2")
    assert "Model registry" in text, "the model-training sidebar (GenAI's has no registry entry)"
    assert re.search(r"@\s*champion", text) and re.search(r"@\s*challenger", text), "the aliases"


# --- what the compare pages show --------------------------------------------------------------------


def compare_runs_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    """The page Experiments -> tick runs -> Compare opens."""
    query = {"runs": json.dumps(run_ids), "experiments": json.dumps([experiment_id])}
    return f"{base}/#/compare-runs?{urllib.parse.urlencode(query)}&{MODEL_TRAINING_VIEW}"


def compare_versions_url(base: str, name: str, run_ids: dict[int, str]) -> str:
    """The page Model registry -> a model -> tick versions -> Compare opens."""
    query = {"name": json.dumps(name), "runs": json.dumps({str(v): r for v, r in run_ids.items()})}
    return f"{base}/#/compare-model-versions?{urllib.parse.urlencode(query)}&{MODEL_TRAINING_VIEW}"


@needs_chromium
def test_the_runs_compare_page_shows_the_decision_and_both_forecast_plots(served, page, tmp_path):
    client = setup_mlflow(served.settings).MlflowClient()
    decided = {v: client.get_run(r).data.params for v, r in served.run_ids.items()}
    url = compare_runs_url(served.named, served.experiment_id, [served.run_ids[v] for v in (1, 2)])
    page.open(url, "decision_reason")  # the runs' params are in
    # the artifact lists load after the page ("No common artifacts" until then): the plot is a root
    # file of both runs once they are in
    page.wait_for(f"!!document.querySelector('{PLOT_NODE}')", "forecast.png listed as common to both runs")
    text = page.text()
    assert "No common artifacts" not in text
    for v in (1, 2):
        assert f"pattern-{served.pid}-v{v}-" in text
        assert decided[v]["decision"] in text and decided[v]["decision_reason"] in text
    assert re.search(r"decision\s+champion\s+challenger\s", text), "the decision row: v1 champion, v2 challenger"

    page.evaluate(f"{SECTION}('Visualizations').click()")  # folded: the plots come up into the picture
    page.evaluate(f"document.querySelector('{PLOT_NODE}').click()")
    shown = page.wait_for(
        "new Set([...document.images].filter(i => i.src.startsWith('blob:') && i.complete && i.naturalWidth > 0)"
        ".map(i => i.src)).size === 2"
        " && Math.max(...[...document.images].map(i => i.getBoundingClientRect().bottom))",
        "both runs' forecast.png rendered side by side",
    )
    png = tmp_path / "mlflow-compare.png"
    height = int(shown) + 60
    page.screenshot(png, height)
    _a_picture(png, (WIDTH, height))
    _docs(png)


@needs_chromium
def test_the_registry_compares_two_versions_with_their_decision(served, page, tmp_path):
    url = compare_versions_url(served.named, model_name(served.pid), served.run_ids)
    text = page.open(url, "decision_reason")  # the runs' params are in
    assert "Comparing 2 Versions" in text
    client = setup_mlflow(served.settings).MlflowClient()
    for v in (1, 2):
        params = client.get_run(served.run_ids[v]).data.params
        assert params["decision"] in text and params["decision_reason"] in text
    assert re.search(r"decision\s+\"?champion\"?\s+\"?challenger", text), "one row: v1 champion, v2 challenger"
    png = tmp_path / "mlflow-compare-versions.png"
    page.screenshot(png, 1300)
    _a_picture(png, (WIDTH, 1300))
    _docs(png)


# --- where the CLI says to look ---------------------------------------------------------------------


def test_the_cli_names_the_server_that_serves_this_home(served):
    hint = mlflow_hint(served.settings.with_(mlflow_url=served.local), [served.pid])
    assert hint.startswith(f"compare versions in MLflow: {served.local} serves this home's runs")
    assert "mlflow ui" not in hint, "no second server suggested"
    assert experiment_url(served.local, served.experiment_id) in hint
    assert f"{served.local}/#/models/{model_name(served.pid)}?workflowType=machine_learning" in hint


def test_the_cli_says_how_to_start_a_ui_when_none_serves_this_home(served):
    nobody = f"http://127.0.0.1:{_free_port()}"
    hint = mlflow_hint(served.settings.with_(mlflow_url=nobody), [served.pid])
    assert f"no MLflow UI for this home at {nobody}: nothing answers there" in hint
    _starts_a_ui_on_a_free_port(hint, served.settings)


def test_rpcwatch_train_on_another_home_does_not_send_it_to_this_server(served, tmp_path, monkeypatch, capsys):
    """`rpcwatch train` itself, on a copy of the served home (same experiment id, other artifact
    location) with RPCWATCH_MLFLOW_URL at the server: that server is not this home's."""
    from tasks.app.cli import main

    copy = copy_home(served.settings, tmp_path)
    for var in [v for v in os.environ if v.startswith("RPCWATCH_")]:
        monkeypatch.delenv(var)
    env = {"MLFLOW_URL": served.local, "CRITICAL_COVERAGE": "0.5", "MIN_TRAIN_HOURS": "3", "TRAIN_MAX_EPOCHS": "1"}
    for var, value in env.items():  # as the `trained` home was built
        monkeypatch.setenv(f"RPCWATCH_{var}", value)
    argv = ["train", "--home", str(copy.home), "--force", "--pattern", str(served.pid), "--hour", "2026-01-01T03:00"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"no MLflow UI for this home at {served.local}: it serves another store" in out
    _starts_a_ui_on_a_free_port(out, copy)
    assert f"pattern {served.pid}:  http://127.0.0.1:" in out


def _starts_a_ui_on_a_free_port(hint: str, settings: Settings) -> None:
    [port] = re.findall(
        rf"mlflow ui --backend-store-uri {re.escape(str(settings.mlflow_tracking_uri))} --port (\d+)", hint
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", int(port)))  # nothing listens there
    assert f"runs:       http://127.0.0.1:{port}/#/experiments/" in hint
