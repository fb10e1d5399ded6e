"""What plan, train and record hand each other survives JSON (Airflow's XCom) unchanged."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

from tasks.models.jobs import Skipped, TrainJob, TrainOutcome, outcome_from_dict

HOUR = datetime(2026, 1, 1, 3, tzinfo=UTC)


def _through_xcom(d: dict) -> dict:
    return json.loads(json.dumps(d, allow_nan=False))  # Airflow's XCom API takes strict JSON only


def test_a_train_job_round_trips_through_json():
    job = TrainJob(7, ["no_champion", "age"], HOUR, Path("/tmp/exports/pattern-7.json"))
    d = _through_xcom(job.to_dict())
    assert d == {
        "pattern_id": 7,
        "reasons": ["no_champion", "age"],
        "hour": HOUR.isoformat(),
        "meta_path": str(job.meta_path),
    }
    assert TrainJob.from_dict(d) == job


def test_outcomes_round_trip_through_json_as_their_own_type():
    trained = TrainOutcome(7, 2, "g7", 3, "run-1", "champion", "first model", HOUR, {"model_mape_calls": 0.2}, 1.5)
    skipped = Skipped(8, "pattern 8: 30 buckets give 18 windows of 12; need at least 20")
    assert outcome_from_dict(_through_xcom(trained.to_dict())) == trained
    assert outcome_from_dict(_through_xcom(skipped.to_dict())) == skipped
    assert skipped.to_dict()["skipped"] == skipped.reason, "the CLI reads `skipped`"
    failed = Skipped(9, "pattern 9: fitting failed: ValueError: boom", "failed", HOUR, "no_champion")
    assert outcome_from_dict(_through_xcom(failed.to_dict())) == failed
    old = outcome_from_dict({"pattern_id": 8, "skipped": "too short"})  # an XCom from before decisions
    assert old == Skipped(8, "too short", "skipped", None, "")
    assert trained.to_dict()["trained_for"] == "2026-01-01T03:00:00+00:00"


def test_an_undefined_metric_travels_as_null_and_comes_back_as_nan():
    """A pattern with a short validation window has NaN metrics: strict JSON has no NaN."""
    trained = TrainOutcome(7, 2, "g7", 3, "run-1", "champion", "first", HOUR, {"mape": math.nan, "mae": 1.0})
    d = _through_xcom(trained.to_dict())
    assert d["metrics"] == {"mape": None, "mae": 1.0}
    back = outcome_from_dict(d)
    assert isinstance(back, TrainOutcome) and math.isnan(back.metrics["mape"]) and back.metrics["mae"] == 1.0
