"""What MLflow's UI needs to compare model versions, on a real sqlite registry: the experiment is
tagged as model training, every model has a signature and descriptions, runs name the Airflow task
that made them, every retrain adds a version with the same metrics, the champion/challenger
decision is an alias and the run's params, the plot is a root artifact of every run, and a home
that moved still serves its champion. What the UI shows of it: test_mlflow_compare_screenshot.py."""

from __future__ import annotations

import shutil
from pathlib import Path

from helpers import copy_home
from tasks.models.registry import (
    EXPERIMENT,
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    cached_artifacts,
    model_name,
    process_tags,
    relocate_artifacts,
    setup_mlflow,
)
from tasks.models.tracking import AIRFLOW_CONTEXT, launch_tags, move_aliases
from tasks.models.training import TRACE_METRICS
from tasks.settings import Settings


def _versions(settings: Settings, pid: int) -> dict[int, object]:
    client = setup_mlflow(settings).MlflowClient()
    return {int(v.version): v for v in client.search_model_versions(f"name = '{model_name(pid)}'")}


def test_the_experiment_is_tagged_as_model_training(trained):
    experiment = setup_mlflow(trained[0]).get_experiment_by_name(EXPERIMENT)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"


def test_an_experiment_created_before_the_kind_tag_gets_it(settings):
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    settings.mlflow_artifacts.mkdir(parents=True)
    mlflow.create_experiment(EXPERIMENT, artifact_location=settings.mlflow_artifacts.resolve().as_uri())
    assert EXPERIMENT_KIND_TAG not in mlflow.get_experiment_by_name(EXPERIMENT).tags
    experiment = setup_mlflow(settings).get_experiment_by_name(EXPERIMENT)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_the_model_has_a_signature_and_an_input_example_it_forecasts(retrained):
    settings, pid, _ = retrained
    mlflow = setup_mlflow(settings)
    uri = f"models:/{model_name(pid)}@champion"
    signature = mlflow.models.get_model_info(uri).signature
    assert signature is not None
    assert [(c.name, c.type.name) for c in signature.inputs.inputs] == [
        ("bucket_ts", "datetime"),
        ("node", "string"),
        ("calls", "long"),
        ("errors", "long"),
        ("rt_mean", "double"),
        ("rt_p95", "double"),
    ]
    assert signature.outputs.input_names() == ["node", "calls", "rt_mean", "rt_p95", "errors"]
    model = mlflow.pyfunc.load_model(uri)
    example = model.input_example
    assert example is not None and len(example) > 0
    forecast = model.predict(example)  # the signature is enforced on the way in
    assert list(forecast.columns) == signature.outputs.input_names()
    assert set(forecast["node"]) >= set(example["node"])


def test_the_model_and_each_version_are_described(retrained):
    settings, pid, outcome = retrained
    client = setup_mlflow(settings).MlflowClient()
    name = model_name(pid)
    described = client.get_registered_model(name).description
    graph = client.get_run(outcome.run_id).data.params
    assert f"pattern {pid}**" in described and f"{graph['nodes']} RPCs" in described
    assert f"{graph['edges']} call edges" in described and "Forecasts the next" in described
    first, second = (client.get_model_version(name, v).description for v in ("1", "2"))
    assert first.startswith("**champion**: first model of this pattern")
    assert second.startswith("**challenger**: champion v1 stays better")
    for text in (second,):
        assert "Trained for hour 2026-01-01 03:00 UTC; why: forced" in text
        assert "DAG `rpcwatch_hourly`" in text and "try 2" in text
        assert f"calls MAPE {outcome.metrics['model_mape_calls']:.4f}" in text and "Poisson floor" in text
    assert "launched by the `rpcwatch` CLI" in first


def test_launch_tags_name_the_airflow_task_or_the_cli(monkeypatch, airflow_env):
    for var in AIRFLOW_CONTEXT.values():
        monkeypatch.delenv(var, raising=False)
    assert launch_tags() == {"rpcwatch.launched_by": "cli"} | process_tags()
    for var, value in airflow_env.items():
        monkeypatch.setenv(var, value)
    assert (
        launch_tags()
        == {
            "airflow.dag_id": "rpcwatch_hourly",
            "airflow.run_id": "scheduled__2026-01-01T03:00:00+00:00",
            "airflow.task_id": "train",
            "airflow.try_number": "2",
            "rpcwatch.launched_by": "airflow",
        }
        | process_tags()
    )


def test_each_run_names_what_launched_it_and_the_hour_it_was_trained_for(retrained):
    settings, pid, outcome = retrained
    client = setup_mlflow(settings).MlflowClient()
    versions = _versions(settings, pid)
    by_cli, by_airflow = (client.get_run(versions[v].run_id).data.tags for v in (1, 2))
    assert {k: by_airflow[k] for k in AIRFLOW_CONTEXT} == {
        "airflow.dag_id": "rpcwatch_hourly",
        "airflow.run_id": "scheduled__2026-01-01T03:00:00+00:00",
        "airflow.task_id": "train",
        "airflow.try_number": "2",
    }
    assert by_airflow["rpcwatch.launched_by"] == "airflow" and by_cli["rpcwatch.launched_by"] == "cli"
    assert not any(k.startswith("airflow.") for k in by_cli)
    for tags in (by_cli, by_airflow):
        assert tags["rpcwatch.trained_for"] == "2026-01-01T03:00:00+00:00"
        assert tags["rpcwatch.pattern_id"] == str(pid)
    assert by_airflow["mlflow.runName"] == f"pattern-{pid}-v2-20260101T03" and by_airflow["decision"] == "challenger"
    assert by_airflow["mlflow.note.content"].startswith(f"Pattern {pid} trained for 2026-01-01 03:00 UTC")


def test_every_retrain_adds_a_version_with_the_same_metrics_and_the_decision_as_alias(retrained):
    settings, pid, outcome = retrained
    client = setup_mlflow(settings).MlflowClient()
    versions = _versions(settings, pid)
    assert sorted(versions) == [1, 2] and outcome.model_version == 2
    assert client.get_registered_model(model_name(pid)).aliases == {"champion": 1, "challenger": 2}
    assert [versions[v].tags["decision"] for v in (1, 2)] == ["champion", "challenger"]
    first, second = (client.get_run(versions[v].run_id).data.metrics for v in (1, 2))
    assert set(first) == set(second), "Compare lines the versions up metric by metric"
    assert {f"trace_{k}" for k in TRACE_METRICS} <= set(first)
    for key in ("model_mape_calls", "poisson_floor_calls", "trace_rate"):
        for v in (1, 2):
            assert [m.step for m in client.get_metric_history(versions[v].run_id, key)] == [0], key
    steps = [m.step for m in client.get_metric_history(versions[2].run_id, "val_loss")]
    assert steps == list(range(len(steps))), "val_loss per epoch"


def test_each_run_holds_its_decision_as_params_and_its_plot_at_the_root(retrained):
    """The registry's version compare lists params (not tags); the runs compare lists root files."""
    settings, pid, outcome = retrained
    client = setup_mlflow(settings).MlflowClient()
    versions = _versions(settings, pid)
    for v in (1, 2):
        run_id = versions[v].run_id
        params = client.get_run(run_id).data.params
        assert params["decision"] == versions[v].tags["decision"] == ["champion", "challenger"][v - 1]
        assert params["decision_reason"] == versions[v].tags["reason"]
        assert "forecast.png" in {a.path for a in client.list_artifacts(run_id) if not a.is_dir}
    assert params["decision_reason"] == outcome.reason and outcome.reason.startswith("champion v1 stays")


def test_a_new_champion_ends_the_older_challenger_and_supersedes_the_old_champion(retrained, tmp_path):
    settings = copy_home(retrained[0], tmp_path)
    pid = retrained[1]
    mlflow = setup_mlflow(settings)
    client = mlflow.MlflowClient()
    name = model_name(pid)
    source = client.get_model_version(name, "2").source  # the same logged model, registered again
    assert int(mlflow.register_model(source, name).version) == 3
    move_aliases(client, name, 3, "champion")
    assert client.get_registered_model(name).aliases == {"champion": 3}
    assert client.get_model_version(name, "1").tags["superseded_by"] == "3"
    assert int(mlflow.register_model(source, name).version) == 4
    move_aliases(client, name, 4, "challenger")
    assert client.get_registered_model(name).aliases == {"champion": 3, "challenger": 4}


def test_a_moved_home_re_addresses_its_artifacts_and_still_serves_its_champion(retrained, tmp_path):
    settings, pid, _ = retrained
    original = setup_mlflow(settings).get_experiment_by_name(EXPERIMENT).artifact_location
    copied = copy_home(settings, tmp_path / "a")
    moved = copied.with_(home=tmp_path / "b" / "home")
    moved.home.parent.mkdir()
    shutil.move(copied.home, moved.home)  # nothing is left where the copy was

    assert relocate_artifacts(moved) > 0, "re-addressed (as before serving it with `mlflow server`)"
    assert relocate_artifacts(moved) == 0, "once"
    mlflow = setup_mlflow(moved)
    here = moved.mlflow_artifacts.resolve().as_uri()
    assert mlflow.get_experiment_by_name(EXPERIMENT).artifact_location == here
    client = mlflow.MlflowClient()
    for version in _versions(moved, pid).values():
        assert client.get_run(version.run_id).info.artifact_uri.startswith(here + "/")
    model = mlflow.pyfunc.load_model(f"models:/{model_name(pid)}@champion")
    assert len(model.predict(model.input_example)) > 0
    folder = cached_artifacts(moved, pid, 2)
    assert Path(folder, "state_dict.pt").is_file() and folder.is_relative_to(moved.home)
    assert setup_mlflow(settings).get_experiment_by_name(EXPERIMENT).artifact_location == original, "source untouched"
