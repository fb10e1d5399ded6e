"""Shared fixtures: a fresh rpcwatch home per test, small synthetic hours, a trained home.
Plain helpers (paths, the start hour, copying a home) live in `helpers.py`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import START, Receiver
from tasks.settings import Settings, load_settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings on a fresh home, ignoring the caller's RPCWATCH_* environment."""
    return load_settings(env={}, home=tmp_path / "home")


@pytest.fixture(scope="session")
def synth_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Two synthetic hours (small), generated once per session; returns (folder, manifest)."""
    import json

    from tasks.synth.generate import generate

    out = tmp_path_factory.mktemp("synth")
    generate(START, 2, out, seed=11, spans_per_hour=20_000)
    return out, json.loads((out / "manifest.json").read_text())


@pytest.fixture
def synth_copy(synth_source: tuple[Path, dict], tmp_path: Path) -> tuple[Path, dict]:
    """A private copy of the synthetic hours that a test may damage."""
    import shutil

    src, manifest = synth_source
    dst = tmp_path / "incoming"
    shutil.copytree(src, dst)
    return dst, manifest


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Five synthetic hours; hours 0-3 through patterns, then the stale (critical) models trained
    at hour 3 under a real MLflow sqlite registry. Returns (settings, source, outcomes)."""
    from datetime import timedelta

    from tasks.ingest.aggregate import aggregate_hour
    from tasks.ingest.stage import ingest_hour
    from tasks.models.retrain import train_stale
    from tasks.patterns.stage import patterns_hour
    from tasks.synth.generate import generate

    root = tmp_path_factory.mktemp("training")
    source = root / "traces"
    generate(START, 5, source, seed=3, spans_per_hour=60_000)
    settings = load_settings(env={}, home=root / "home", critical_coverage=0.5, min_train_hours=3.0)
    for i in range(4):
        hour = START + timedelta(hours=i)
        ingest_hour(settings, hour, [source])
        aggregate_hour(settings, hour)
        patterns_hour(settings, hour)
    outcomes = train_stale(settings, START + timedelta(hours=3))
    return settings, source, outcomes


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver on 127.0.0.1 (a real HTTP server in a thread)."""
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
