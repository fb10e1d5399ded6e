"""Per-pattern training under a real MLflow sqlite registry, the champion policy, retraining only stale."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from helpers import START, add_downstream_call, copy_home
from tasks.ingest.aggregate import aggregate_hour
from tasks.ingest.stage import ingest_hour
from tasks.models.forecast import TrainConfig
from tasks.models.registry import model_name, setup_mlflow
from tasks.models.retrain import plan_training, record_outcomes, train_stale
from tasks.models.staleness import stale_patterns
from tasks.models.training import load_model, train_pattern
from tasks.patterns.stage import patterns_hour
from tasks.warehouse import opened

H3 = START + timedelta(hours=3)


def test_stale_patterns_train_log_to_mlflow_and_become_champions(trained):
    settings, _, outcomes = trained
    assert len(outcomes) >= 2 and all(o["decision"] == "champion" for o in outcomes)
    mlflow = setup_mlflow(settings)
    client = mlflow.MlflowClient()
    for o in outcomes:
        name = model_name(o["pattern_id"])
        champion = client.get_model_version_by_alias(name, "champion")
        assert int(champion.version) == 1 and champion.tags["graph_hash"] == o["graph_hash"]
        run = client.get_run(o["run_id"])
        for key in (
            "model_mape_calls",
            "no_graph_mape_calls",
            "seasonal_naive_mape_calls",
            "moving_average_mape_calls",
            "poisson_floor_calls",
            "model_mape_rt_p95",
        ):
            assert key in run.data.metrics, key
        assert run.data.params["graph_hash"] == o["graph_hash"]
        assert "forecast.png" in [a.path for a in client.list_artifacts(o["run_id"])]
        folder = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion")) / "artifacts"
        model, cfg, graph, norm, thresholds = load_model(folder)  # weights_only: nothing unpickled
        assert graph["graph_hash"] == o["graph_hash"] and set(thresholds["nodes"]) == set(graph["nodes"])
        assert o["metrics"]["mape_calls_over_floor"] < 2.0
    with opened(settings.warehouse, read_only=True) as con:
        assert con.execute("SELECT count(*) FROM models WHERE decision = 'champion'").fetchone()[0] == len(outcomes)


def test_the_next_hour_with_unchanged_data_trains_nothing(trained):
    settings, _, _ = trained
    assert plan_training(settings, H3) == []
    assert train_stale(settings, H3) == []


def test_a_forced_retrain_that_is_worse_keeps_the_old_champion(trained, tmp_path):
    settings = copy_home(trained[0], tmp_path)
    pid = trained[2][0]["pattern_id"]
    [job] = plan_training(settings, H3, force=True, patterns=[pid])
    assert job.reasons == ["forced"]
    worse = train_pattern(settings, job.meta_path, H3, TrainConfig(max_epochs=1, hidden=4), reason="forced")
    assert worse.decision == "challenger" and "stays better" in worse.reason
    client = setup_mlflow(settings).MlflowClient()
    assert client.get_model_version_by_alias(model_name(pid), "champion").version == 1
    assert client.get_model_version_by_alias(model_name(pid), "challenger").version == worse.model_version
    record_outcomes(settings, [worse])
    with opened(settings.warehouse, read_only=True) as con:
        assert stale_patterns(con, settings, H3) == [], "a challenger does not make the pattern stale"


def test_a_changed_request_graph_makes_exactly_its_pattern_stale(trained, tmp_path):
    settings = copy_home(trained[0], tmp_path)
    source = tmp_path / "traces"
    shutil.copytree(trained[1], source)
    truth = pq.read_table(source / "truth" / "trace_templates.parquet").to_pandas()
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        owner = con.execute("SELECT trace_id, pattern_id FROM trace_patterns WHERE pattern_id IS NOT NULL").df()
        champions = {r[0] for r in con.execute("SELECT pattern_id FROM models WHERE decision = 'champion'").fetchall()}
    owner = owner.merge(truth, left_on="trace_id", right_on="traceid")
    busiest = owner.groupby("request_type").size().idxmax()
    target = int(owner[owner.request_type == busiest].pattern_id.mode()[0])
    assert target in champions
    hour4 = START + timedelta(hours=4)
    assert add_downstream_call(source, busiest, hour="04") > 0
    ingest_hour(settings, hour4, [source])
    aggregate_hour(settings, hour4)
    report = patterns_hour(settings, hour4, force=True)
    assert report.changes.changed == [target]
    with opened(settings.warehouse, read_only=True) as con:
        stale = {s.pattern_id: s.reasons for s in stale_patterns(con, settings, hour4)}
    assert stale == {target: ["graph_changed"]}


def test_a_retrain_fine_tunes_the_champion_and_skips_the_twin(trained, tmp_path):
    """A stale pattern's retrain starts from its champion's weights (`warm_start`, logged as a param),
    stops after `warm_patience` epochs without improvement and trains no no-graph twin (NaN metric);
    with RPCWATCH_WARM_START=false it starts from scratch and trains the twin."""
    import math

    from tasks.settings import load_settings

    settings = copy_home(trained[0], tmp_path)
    pid = trained[2][0]["pattern_id"]
    # planned for the next hour: a retrain reads history up to the hour it runs for (the champion's data)
    [job] = plan_training(settings, H3 + timedelta(hours=1), force=True, patterns=[pid])
    warm = train_pattern(settings, job.meta_path, H3, reason="forced")
    client = setup_mlflow(settings).MlflowClient()
    run = client.get_run(warm.run_id)
    assert run.data.params["warm_start"] == "champion v1"
    assert math.isnan(run.data.metrics["no_graph_mape_calls"])
    assert math.isfinite(run.data.metrics["model_mape_calls"])
    epochs = int(run.data.params["epochs"])
    assert epochs < int(run.data.params["patience"]), "fine-tuning stops sooner than training from scratch can"

    cold_settings = load_settings(env={"RPCWATCH_WARM_START": "false"}, home=settings.home)
    cold = train_pattern(cold_settings, job.meta_path, H3, reason="forced")
    cold_run = client.get_run(cold.run_id)
    assert cold_run.data.params["warm_start"].startswith("off")
    assert math.isfinite(cold_run.data.metrics["no_graph_mape_calls"])


def test_mlflow_s_registry_news_goes_to_the_log_at_info_not_to_stderr(caplog) -> None:
    """MLflow prints "Created version ..." to stderr, which a task log files as ERROR: while a
    version is registered, stderr's lines go to rpcwatch's log at INFO (partial lines kept until
    their end; a handler that itself writes to stderr meanwhile does not loop)."""
    import contextlib
    import logging
    import sys

    from tasks.models.training import LinesToLog

    logger = logging.getLogger("tasks.models.training.test")

    class ToStderr(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            sys.stderr.write(f"echo {record.getMessage()}\n")

    echo = ToStderr()
    logger.addHandler(echo)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name), contextlib.redirect_stderr(LinesToLog(logger)):
            print("Registered model 'rpcwatch-pattern-1' already exists.", file=sys.stderr)
            sys.stderr.write("Created version '2' of ")
            sys.stderr.write("model 'rpcwatch-pattern-1'.\n")
    finally:
        logger.removeHandler(echo)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "Registered model 'rpcwatch-pattern-1' already exists."),
        ("INFO", "Created version '2' of model 'rpcwatch-pattern-1'."),
    ]
