"""Fixtures of the model tests: a pattern with two registered versions (champion and challenger)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from helpers import START, copy_home
from tasks.settings import Settings

# what Airflow exports into a task's process (tasks.models.training reads it, never Airflow itself)
AIRFLOW_ENV = {
    "AIRFLOW_CTX_DAG_ID": "rpcwatch_hourly",
    "AIRFLOW_CTX_DAG_RUN_ID": "scheduled__2026-01-01T03:00:00+00:00",
    "AIRFLOW_CTX_TASK_ID": "train",
    "AIRFLOW_CTX_TRY_NUMBER": "2",
}


@pytest.fixture(scope="session")
def retrained(trained: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, int, Any]:
    """A copy of the trained home whose first pattern was retrained once more (forced, a tiny
    network, from an "Airflow task": AIRFLOW_CTX_* set): v1 stays champion, v2 is the challenger.
    Returns (settings, pattern id, v2's TrainOutcome). Tests that change it copy it first."""
    from tasks.models.forecast import TrainConfig
    from tasks.models.retrain import plan_training, record_outcomes
    from tasks.models.training import train_pattern

    settings = copy_home(trained[0], tmp_path_factory.mktemp("retrained"))
    pid = trained[2][0]["pattern_id"]
    hour = START + timedelta(hours=3)
    [job] = plan_training(settings, hour, force=True, patterns=[pid])
    with pytest.MonkeyPatch.context() as env:
        for var, value in AIRFLOW_ENV.items():
            env.setenv(var, value)
        outcome = train_pattern(settings, job.meta_path, hour, TrainConfig(max_epochs=1, hidden=4), reason="forced")
    record_outcomes(settings, [outcome])
    return settings, pid, outcome


@pytest.fixture
def airflow_env() -> dict[str, str]:
    """The AIRFLOW_CTX_* variables `retrained`'s second training ran under."""
    return dict(AIRFLOW_ENV)
