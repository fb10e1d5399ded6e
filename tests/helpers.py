"""Plain helpers the tests share (fixtures live in conftest.py): where things are, the first
synthetic hour, the shared real data, a private copy of a home."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tasks.settings import Settings

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
START = datetime(2026, 1, 1, tzinfo=UTC)


def shared_file(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real trace samples not present at {path} (the ../shared checkout)")
    return path


def copy_home(settings: Settings, tmp_path: Path) -> Settings:
    """A private copy of a home (warehouse, MLflow db; artifacts stay where the registry says)."""

    home = tmp_path / "home"
    shutil.copytree(settings.home, home)
    return settings.with_(home=home)
