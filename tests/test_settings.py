from pathlib import Path

import pytest

from tasks.settings import load_settings, parse_utc


def test_env_prefix_and_derived_paths():
    s = load_settings(env={"RPCWATCH_HOME": "/tmp/x", "RPCWATCH_BUCKET_SECONDS": "5",
                           "RPCWATCH_TRACE_EPOCH": "2021-06-01T00:00"})
    assert s.home == Path("/tmp/x") and s.bucket_seconds == 5
    assert s.warehouse == Path("/tmp/x/warehouse.duckdb") and s.airflow_home == Path("/tmp/x/airflow")
    assert s.mlflow_tracking_uri == "sqlite:////tmp/x/mlflow.db"
    assert s.trace_epoch == parse_utc("2021-06-01T00:00Z")


@pytest.mark.parametrize("env, message", [
    ({"RPCWATCH_BUCKET_SECONDS": "7"}, "must divide 3600"),
    ({"RPCWATCH_BUCKET_SECONDS": "ten"}, "RPCWATCH_BUCKET_SECONDS"),
    ({"RPCWATCH_FORMAT": "zipkin"}, "unknown trace format"),
    ({"RPCWATCH_TRACE_EPOCH": "yesterday"}, "not an ISO time"),
])
def test_bad_settings_are_named(env, message):
    with pytest.raises(ValueError, match=message):
        load_settings(env=env)
