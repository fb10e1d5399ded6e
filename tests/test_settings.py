from pathlib import Path

import pytest

from tasks.settings import load_settings, parse_utc


def test_env_prefix_and_derived_paths():
    s = load_settings(
        env={"RPCWATCH_HOME": "/tmp/x", "RPCWATCH_BUCKET_SECONDS": "5", "RPCWATCH_TRACE_EPOCH": "2021-06-01T00:00"}
    )
    assert s.home == Path("/tmp/x") and s.bucket_seconds == 5
    assert s.warehouse == Path("/tmp/x/warehouse.duckdb") and s.airflow_home == Path("/tmp/x/airflow")
    assert s.mlflow_tracking_uri == "sqlite:////tmp/x/mlflow.db"
    assert s.trace_epoch == parse_utc("2021-06-01T00:00Z")


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RPCWATCH_BUCKET_SECONDS": "7"}, "must divide 3600"),
        ({"RPCWATCH_BUCKET_SECONDS": "ten"}, "RPCWATCH_BUCKET_SECONDS"),
        ({"RPCWATCH_FORMAT": "zipkin"}, "unknown trace format"),
        ({"RPCWATCH_TRACE_EPOCH": "yesterday"}, "not an ISO time"),
    ],
)
def test_bad_settings_are_named(env, message):
    with pytest.raises(ValueError, match=message):
        load_settings(env=env)


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("RT_MAX_MS", "-1", "must be > 0"),
        ("RT_MAX_MS", "inf", "finite"),
        ("ALARM_P", "2", r"must be in \(0, 1\)"),
        ("ALARM_P", "0", r"must be in \(0, 1\)"),
        ("MAX_DUPLICATE_RATIO", "nan", "finite"),
        ("MAX_DUPLICATE_RATIO", "1.5", r"must be in \[0, 1\]"),
        ("CRITICAL_COVERAGE", "0", r"must be in \(0, 1\]"),
        ("DEVICE", "tpu", "auto, cpu, cuda, cuda:N or mps"),
        ("DEVICE", "cuda:x", "auto, cpu, cuda, cuda:N or mps"),
        ("THRESHOLD_METHOD", "bogus", "quantile or pot"),
        ("INCIDENT_MIN_BUCKETS", "-5", "must be >= 1"),
        ("INCIDENT_GAP_BUCKETS", "0", "must be >= 1"),
        ("HDBSCAN_MIN_CLUSTER_SIZE", "1", "must be >= 2"),
        ("TRAIN_HISTORY_HOURS", "0", "must be >= 1"),
        ("MIN_TRAIN_HOURS", "-1", "must be >= 0"),
        ("TRAIN_SHARDS", "0", r"must be in \[1, 1024\]"),
        ("TRAIN_SHARDS", "2000", r"must be in \[1, 1024\]"),
        ("TRAIN_MAX_EPOCHS", "0", "must be >= 1"),
        ("BATCH_TRAINING", "maybe", "on, off or auto"),
        ("DRIFT_FACTOR", "0", "must be > 0"),
        ("FORMAT", "zipkin", "unknown trace format"),
        ("AIRFLOW_POOL", " ", "must not be empty"),
        ("ALERT_MIN_SCORE", "-1", "must be >= 0"),
        ("ALERT_MIN_SCORE", "nan", "finite"),
        ("AIRFLOW_URL", "ftp://airflow.example", r"http\(s\) URL"),
        ("AIRFLOW_URL", "airflow.example:8080", r"http\(s\) URL"),
        ("MLFLOW_URL", "http://mlflow:port", r"http\(s\) URL"),
        ("MLFLOW_URL", "http://mlflow.example/x|click", "without spaces, quotes, <, > or |"),
    ],
)
def test_every_bad_setting_is_refused_naming_its_variable(name, value, message):
    with pytest.raises(ValueError, match=message) as err:
        load_settings(env={f"RPCWATCH_{name}": value})
    assert str(err.value).startswith(f"RPCWATCH_{name}={value}"), str(err.value)


def test_an_override_is_checked_too_and_named_like_its_variable():
    with pytest.raises(ValueError, match=r"^RPCWATCH_ALARM_P=2: must be in \(0, 1\)"):
        load_settings(env={}, alarm_p=2)


def test_good_devices_and_methods_pass():
    for device in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert load_settings(env={"RPCWATCH_DEVICE": device}).device == device
    assert load_settings(env={"RPCWATCH_THRESHOLD_METHOD": "pot"}).threshold_method == "pot"


def test_a_home_that_is_or_lies_under_a_regular_file_is_named(tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("not a folder")
    with pytest.raises(ValueError, match=r"RPCWATCH_HOME=.*plain: .*not a directory"):
        load_settings(env={"RPCWATCH_HOME": str(plain)})
    with pytest.raises(ValueError, match=r"RPCWATCH_HOME=.*plain/home: .*plain is a regular file"):
        load_settings(env={"RPCWATCH_HOME": str(plain / "home")})
    assert load_settings(env={"RPCWATCH_HOME": str(tmp_path / "new" / "home")}).home == tmp_path / "new" / "home"


def test_the_mlflow_uri_is_a_setting_read_from_the_given_env_only(monkeypatch, tmp_path):
    monkeypatch.setenv("RPCWATCH_MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    s = load_settings(env={"RPCWATCH_HOME": str(tmp_path)})
    assert s.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}", "os.environ must not leak in"
    s = load_settings(env={"RPCWATCH_HOME": str(tmp_path), "RPCWATCH_MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert s.mlflow_tracking_uri == "http://mlflow:5000"
    assert s.with_(home=tmp_path / "b").mlflow_tracking_uri == "http://mlflow:5000", "an explicit uri stays"
    moved = load_settings(env={"RPCWATCH_HOME": str(tmp_path)}).with_(home=tmp_path / "copy")
    assert moved.mlflow_tracking_uri == f"sqlite:///{tmp_path / 'copy' / 'mlflow.db'}", "the default follows the home"


def test_every_numeric_setting_has_a_range():
    from dataclasses import fields

    from tasks.settings import RANGES, Settings

    numeric = {f.name for f in fields(Settings) if str(f.type).startswith(("int", "float"))}
    assert numeric == set(RANGES)


def test_alerts_are_off_by_default_and_read_from_the_env():
    s = load_settings(env={})
    assert s.alert_webhook is None and s.alert_min_score == 3.0
    assert (s.airflow_url, s.mlflow_url) == ("http://127.0.0.1:8080", "http://127.0.0.1:5000")
    assert load_settings(env={"RPCWATCH_ALERT_WEBHOOK": ""}).alert_webhook is None, "empty: off"
    s = load_settings(
        env={
            "RPCWATCH_ALERT_WEBHOOK": "https://hooks.slack.com/services/T0/B0/s3cret",
            "RPCWATCH_ALERT_MIN_SCORE": "5",
            "RPCWATCH_AIRFLOW_URL": "https://airflow.example.com",
            "RPCWATCH_MLFLOW_URL": "https://mlflow.example.com:5443/",
        }
    )
    assert s.alert_webhook == "https://hooks.slack.com/services/T0/B0/s3cret" and s.alert_min_score == 5.0
    assert (s.airflow_url, s.mlflow_url) == ("https://airflow.example.com", "https://mlflow.example.com:5443/")
    assert "s3cret" not in repr(s), "the webhook is a secret: not in repr"


@pytest.mark.parametrize(
    "url",
    ["file:///etc/passwd?token=s3cret", "javascript:alert('s3cret')", "hooks.example/s3cret", "https://h/s3cret x"],
)
def test_a_bad_webhook_is_refused_without_showing_it(url):
    with pytest.raises(ValueError, match=r"^RPCWATCH_ALERT_WEBHOOK=\(hidden\): must be an http\(s\) URL") as err:
        load_settings(env={"RPCWATCH_ALERT_WEBHOOK": url})
    assert "s3cret" not in str(err.value)


@pytest.mark.parametrize(
    "typo, meant",
    [("RPCWATCH_ALARMP", "RPCWATCH_ALARM_P"), ("RPCWATCH_WEBHOOK", "RPCWATCH_ALERT_WEBHOOK")],
)
def test_a_misspelled_setting_is_warned_about_with_the_name_it_resembles(caplog, typo, meant):
    with caplog.at_level("WARNING", logger="tasks.settings"):
        load_settings(env={typo: "https://hooks.example/s3cret"})
    warned = [r.getMessage() for r in caplog.records if typo in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert f"did you mean {meant}?" in warned[0] and "ignored" in warned[0]
    assert "s3cret" not in caplog.text, "a warning names the variable, never its value"


def test_known_variables_that_are_not_settings_are_not_warned_about(caplog):
    with caplog.at_level("WARNING", logger="tasks.settings"):
        load_settings(env={"RPCWATCH_CRASH_AT": "score", "RPCWATCH_ALARM_P": "0.001", "OTHER_THING": "x"})
    assert caplog.records == []


@pytest.mark.parametrize(
    "uri",
    [
        "sqlite:////tmp/x/mlflow.db",
        "http://127.0.0.1:5000",
        "https://mlflow.example",
        "file:///tmp/mlruns",
        "postgresql://u:p@db:5432/mlflow",
        "postgresql+psycopg2://db/mlflow",
        "mysql+pymysql://db/m",
        "/tmp/mlruns",
    ],
)
def test_tracking_uris_mlflow_takes_pass(uri):
    assert load_settings(env={"RPCWATCH_MLFLOW_TRACKING_URI": uri}).mlflow_tracking_uri == uri


@pytest.mark.parametrize(
    "uri", ["bogus://x", "sqlite://", "http://", "relative/mlruns", "postgresql://u:pw0rd@db:port/m"]
)
def test_a_tracking_uri_mlflow_cannot_use_is_refused_without_its_password(uri):
    with pytest.raises(ValueError, match=r"^RPCWATCH_MLFLOW_TRACKING_URI=.*: ") as err:
        load_settings(env={"RPCWATCH_MLFLOW_TRACKING_URI": uri})
    assert "pw0rd" not in str(err.value)
