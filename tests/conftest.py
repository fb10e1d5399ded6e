"""Shared fixtures: a fresh rpcwatch home per test, small synthetic hours, the shared real data."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from tasks.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
START = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings on a fresh home, ignoring the caller's RPCWATCH_* environment."""
    return load_settings(env={}, home=tmp_path / "home")


@pytest.fixture(scope="session")
def synth_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Two synthetic hours (small), generated once per session; returns (folder, manifest)."""
    import json

    from tasks.synth import generate

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


def shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real trace samples not present at {path} (the ../shared checkout)")
    return path


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """Five synthetic hours; hours 0-3 through patterns, then the stale (critical) models trained
    at hour 3 under a real MLflow sqlite registry. Returns (settings, source, outcomes)."""
    from datetime import timedelta

    from tasks.aggregate import aggregate_hour
    from tasks.ingest import ingest_hour
    from tasks.patterns import patterns_hour
    from tasks.retrain import train_stale
    from tasks.synth import generate

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


def copy_home(settings: Settings, tmp_path: Path) -> Settings:
    """A private copy of a home (warehouse, MLflow db; artifacts stay where the registry says)."""
    import shutil

    home = tmp_path / "home"
    shutil.copytree(settings.home, home)
    return settings.with_(home=home)
