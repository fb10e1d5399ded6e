"""Train one pattern's model from its exported series, log it to MLflow, decide the champion.

Reads only the pattern's exported files (`tasks.models.series`), never DuckDB; writes an MLflow
run and a registered version (names, tags and the registry's other uses: `tasks.models.registry`).

One MLflow run per training (experiment `rpcwatch`): params, validation metrics of the model and
each baseline side by side, artifacts (state dict, graph, normalisation, thresholds: JSON and
tensors only, nothing unpickled on load) and a forecast-vs-actual PNG of the busiest nodes. Each
version is registered as `rpcwatch-pattern-<id>` with its tags in the same write; the `champion`
alias moves to it only if there is no champion, if the champion's graph no longer matches the
pattern, or if it beats the champion on the same recent validation window. Otherwise it becomes
the `challenger` (alias on the newest version that did not win; removed once a newer one wins).

So that versions compare in MLflow's UI: every run logs the same metric names at the same steps
(scalars at step 0, NaN where undefined; `val_loss` per epoch), the model has a signature and an
input example, the registered model and each version have descriptions (what the pattern is; why
this version was trained, how it validated, what was decided), and each run is tagged with the
Airflow task that made it (`airflow.*`, from the `AIRFLOW_CTX_*` variables Airflow sets in a task
process) or `rpcwatch.launched_by=cli`, and the hour it was trained for (`tasks.models.tracking`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from tasks.failpoints import crash_point
from tasks.models.baselines import PROMOTION_ALPHA, bucket_calls_ape, diebold_mariano, metrics
from tasks.models.features import CALLS
from tasks.models.fitting import Fitted, fit, fit_many, train_config
from tasks.models.forecast import Normaliser, NotEnoughHistory, Prepared, TrainConfig, make_model, predict, prepare
from tasks.models.jobs import Outcome, Skipped, TrainJob, TrainOutcome
from tasks.models.registry import (
    model_name,
    registered_champion,
    setup_mlflow,
)
from tasks.models.series import PatternData, load_pattern, load_trace_calls
from tasks.models.thresholds import Thresholds
from tasks.models.trace_model import TRACE_MODEL_ARTIFACT, TraceModel
from tasks.models.tracking import (
    TRAINED_FOR_TAG,
    describe_registered_model,
    input_example,
    launch_tags,
    launched_by,
    model_description,
    move_aliases,
    record_decision,
    signature,
    version_description,
    version_tags,
)
from tasks.settings import Settings

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models.model import ModelInfo

log = logging.getLogger(__name__)
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
MIN_TRACE_MODEL_TRACES = 50  # a pattern with fewer training traces gets no trace model
PIP_REQUIREMENTS = ["torch==2.13.0", "torch-geometric==2.8.1", "numpy", "scipy"]
ARCHITECTURE = "STGCN(temporal gated conv -> GCNConv -> temporal gated conv) x blocks"
# TraceModel.calibration's keys, logged as trace_<key> by every run (NaN without a trace model)
TRACE_METRICS = ("traces", "windows", "windows_kept", "raw_rate", "rate")


class LinesToLog(io.TextIOBase):
    """A text stream whose lines go to `logger` at INFO. MLflow prints its registry news ("Created
    version '3' of model ...") to stderr, and a task log files every stderr line as an ERROR."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger, self.pending, self.busy = logger, "", False

    def write(self, text: str) -> int:
        if self.busy:  # a handler writing to the current stderr while we log: let it through, no loop
            return sys.__stderr__.write(text) if sys.__stderr__ else len(text)
        *lines, self.pending = (self.pending + text).split("\n")
        self.busy = True
        try:
            for line in lines:
                if line.strip():
                    self.logger.info(line.strip())
        finally:
            self.busy = False
        return len(text)


# --- the artifact folder of a version: written here, read by scoring, plots and the pyfunc model ----


class LoadedModel(NamedTuple):
    """A trained pattern model as its artifact folder holds it."""

    model: torch.nn.Module
    cfg: TrainConfig
    graph: dict[str, Any]  # pattern_id, version, graph_hash, nodes, edges, bucket_seconds
    norm: Normaliser
    thresholds: dict[str, Any]  # Thresholds.to_json()


def write_artifacts(
    folder: Path, data: PatternData, prep: Prepared, cfg: TrainConfig, model: torch.nn.Module, thresholds: Thresholds
) -> dict[str, str]:
    """Write a version's artifact files into `folder`; returns {artifact name: file path}."""
    files = {
        "state_dict": folder / "state_dict.pt",
        "config": folder / "config.json",
        "graph": folder / "graph.json",
        "normalisation": folder / "normalisation.json",
        "thresholds": folder / "thresholds.json",
    }
    graph = {
        "pattern_id": data.pattern_id,
        "version": data.version,
        "graph_hash": data.graph_hash,
        "nodes": data.nodes,
        "edges": data.edges,
        "bucket_seconds": data.bucket_seconds,
    }
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, files["state_dict"])
    files["config"].write_text(json.dumps(asdict(cfg), indent=1))
    files["graph"].write_text(json.dumps(graph, indent=1))
    files["normalisation"].write_text(json.dumps(asdict(prep.norm), indent=1))
    files["thresholds"].write_text(json.dumps(thresholds.to_json(), indent=1))
    return {k: str(v) for k, v in files.items()}


def load_model(folder: Path, dev: torch.device | None = None) -> LoadedModel:
    """A trained pattern model from its artifact folder: weights loaded with `weights_only=True`."""
    cfg = TrainConfig(**json.loads((folder / "config.json").read_text()))
    model = make_model(cfg)
    model.load_state_dict(torch.load(folder / "state_dict.pt", map_location="cpu", weights_only=True))
    graph = json.loads((folder / "graph.json").read_text())
    norm = Normaliser(**json.loads((folder / "normalisation.json").read_text()))
    thresholds = json.loads((folder / "thresholds.json").read_text())
    return LoadedModel(model.to(dev or torch.device("cpu")), cfg, graph, norm, thresholds)


def _plots(fitted: Fitted, folder: Path, top: int = 3) -> list[Path]:
    """Forecast vs actual over the validation window of the `top` busiest nodes, one PNG."""
    from tasks.app.plots import ForecastPanel, forecast_panels

    data, prep = fitted.data, fitted.prep
    obs = prep.y[prep.split :].numpy()
    busiest = np.argsort(-obs[:, :, CALLS].mean(axis=0))[:top]
    times = data.buckets[prep.targets[prep.split :]]
    panels = []
    for n in busiest:
        node, alarm_p = data.nodes[n], fitted.thresholds.alarm_p
        band = fitted.thresholds.nodes[node].calls
        title = f"pattern {data.pattern_id} · {node}"
        panels.append(
            ForecastPanel(
                times,
                obs[:, n, CALLS],
                fitted.pred[:, n, CALLS],
                band.alpha,
                alarm_p,
                title,
                phi=band.phi,
                ceiling=band.ceiling,
                normal=band.mean,
            )
        )
    return [forecast_panels(panels, folder / "forecast.png")]


# --- the champion policy ---------------------------------------------------------------------------


def _champion_forecast(mlflow: ModuleType, champion: ModelVersion, prep: Prepared, dev: torch.device) -> np.ndarray:
    """The current champion's forecasts of the new validation window (same graph only)."""
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{champion.name}/{champion.version}")) / "artifacts"
    loaded = load_model(folder, dev)
    rescaled = prep.with_normaliser(loaded.norm, loaded.cfg.window)
    return predict(loaded.model, rescaled, slice(prep.split, None), dev)


def decide(mlflow: ModuleType, client: MlflowClient, fitted: Fitted) -> tuple[str, str]:
    """(champion | challenger, why) for a new version of the pattern's model (`judge`)."""
    return judge(mlflow, registered_champion(client, model_name(fitted.data.pattern_id)), fitted)


def judge(mlflow: ModuleType, champion: ModelVersion | None, fitted: Fitted) -> tuple[str, str]:
    """(champion | challenger, why) for a new version against the current champion. A retrained version
    replaces a champion of the same graph only when its calls forecasts on the same validation
    window are better by more than validation noise: a one-sided Diebold-Mariano test on the two
    models' per-bucket calls MAPE at PROMOTION_ALPHA. A small gain on a short window is noise, and a
    forced retrain must not become the champion by it."""
    if champion is None:
        return "champion", "first model of this pattern"
    if champion.tags.get("graph_hash") != fitted.data.graph_hash:
        return "champion", f"champion v{champion.version} was trained on another graph"
    obs = fitted.prep.y[fitted.prep.split :].numpy().astype(np.float64)
    old_pred = _champion_forecast(mlflow, champion, fitted.prep, fitted.dev)
    score, old = fitted.scores["model_mape_calls"], metrics(old_pred, obs)["mape_calls"]
    if math.isnan(old):  # no busy node on this window (a quiet pattern): nothing to compare on
        # the newer model, trained on the recent data, takes over: a champion that cannot be beaten
        # would keep an aged pattern stale, retrained every hour
        return "champion", f"champion v{champion.version} has no calls MAPE on this window (no busy node)"
    p = diebold_mariano(bucket_calls_ape(fitted.pred, obs), bucket_calls_ape(old_pred, obs))
    mape = f"calls MAPE {score:.4f} vs {old:.4f}"
    if p < PROMOTION_ALPHA:
        return "champion", f"beats champion v{champion.version}: {mape}, Diebold-Mariano p = {p:.3g}"
    if score < old:
        why = "too few validation buckets to tell" if math.isnan(p) else f"within validation noise (p = {p:.3g})"
        return "challenger", f"champion v{champion.version} stays: {mape} is {why}"
    return "challenger", f"champion v{champion.version} stays better: {mape}"


# --- one training, logged and registered -----------------------------------------------------------


def _params(fitted: Fitted, reason: str) -> dict[str, object]:
    data, result = fitted.data, fitted.result
    return {
        "pattern_id": data.pattern_id,
        "pattern_version": data.version,
        "graph_hash": data.graph_hash,
        "nodes": len(data.nodes),
        "edges": len(data.edges),
        "data_start": str(data.buckets[0]),
        "data_end": str(data.buckets[-1]),
        "bucket_seconds": data.bucket_seconds,
        "architecture": ARCHITECTURE,
        "parameters": result.parameters,
        "epochs": result.epochs,
        "device": str(fitted.dev),
        "seasonal_period_buckets": fitted.period,
        "stale_reason": reason,
        **asdict(fitted.cfg),
    }


def fit_trace_model(settings: Settings, meta_path: Path) -> TraceModel | None:
    """The pattern's trace model from its exported training traces (None with too few of them)."""
    calls = load_trace_calls(meta_path)
    if calls is None or calls["trace_id"].nunique() < MIN_TRACE_MODEL_TRACES:
        return None
    return TraceModel(settings.trace_p).fit(calls).calibrate(calls, settings.trace_window_s)


def run_metrics(fitted: Fitted, trace: TraceModel | None) -> dict[str, float]:
    """The scalar metrics of a run: the same names every time (NaN where one is undefined: no
    validation point for it, no trace model), so any two versions compare metric by metric."""
    calibration = trace.calibration if trace is not None else {}
    out = {k: float(v) for k, v in fitted.scores.items()}
    out.update({f"trace_{k}": float(calibration.get(k, math.nan)) for k in TRACE_METRICS})
    return {k: v if math.isfinite(v) else math.nan for k, v in out.items()}


def _log_run(
    mlflow: ModuleType,
    fitted: Fitted,
    folder: Path,
    reason: str,
    trace: TraceModel | None = None,
    warm_source: str = "no champion",
) -> tuple[ModelInfo, dict[str, str]]:
    """Params, the pyfunc model (signature, input example), metrics and plots into the active run
    (the trace model beside the forecaster, same version); (the logged model, artifact files).
    Calls are few: a registry's cost is its round trips (one per metric call, hundreds per model
    before; tests/benchmarks/bench_registry.py), so metrics go in one batch after the model (which
    would otherwise re-read them to link them), plots in one upload, at the run's root: MLflow's
    runs-compare page shows only the root files common to the runs compared."""
    mlflow.log_params(_params(fitted, reason) | {"warm_start": warm_source})
    plots = folder / "plots"
    plots.mkdir()
    _plots(fitted, plots)
    artifacts = write_artifacts(folder, fitted.data, fitted.prep, fitted.cfg, fitted.result.model, fitted.thresholds)
    if trace is not None:
        artifacts[TRACE_MODEL_ARTIFACT] = str(trace.save(folder / f"{TRACE_MODEL_ARTIFACT}.json"))
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(MODEL_CODE),
        artifacts=artifacts,
        pip_requirements=PIP_REQUIREMENTS,
        signature=signature(),
        input_example=input_example(fitted.data, fitted.cfg.window),
    )
    mlflow.MlflowClient().log_batch(info.run_id, metrics=_metric_batch(fitted, trace, info.model_id))
    mlflow.log_artifacts(str(plots))
    return info, artifacts


def _metric_batch(fitted: Fitted, trace: TraceModel | None, model_id: str) -> list[Metric]:
    """The run's scalars at step 0 (linked to the logged model) and `val_loss` per epoch."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    scalars = [Metric(k, v, now, 0, model_id=model_id) for k, v in run_metrics(fitted, trace).items()]
    return scalars + [Metric("val_loss", v, now, epoch) for epoch, v in enumerate(fitted.result.history)]


# the fields that shape a model's weights: a champion of another architecture cannot start a retrain
ARCHITECTURE_FIELDS = ("window", "horizon", "hidden", "kernel_size", "blocks")


def warm_start(settings: Settings, client: MlflowClient, pattern_id: int, cfg: TrainConfig) -> WarmStart:
    """The champion's weights to fine-tune (`settings.warm_start`), or None with the reason. Any graph
    will do: no weight depends on the node count, so a changed call tree starts from them too."""
    if not settings.warm_start:
        return WarmStart(None, "off (RPCWATCH_WARM_START=false)")
    champion = registered_champion(client, model_name(pattern_id))
    if champion is None:
        return WarmStart(None, "no champion")
    import mlflow

    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{champion.name}/{champion.version}")) / "artifacts"
    loaded = load_model(folder)
    if any(getattr(loaded.cfg, f) != getattr(cfg, f) for f in ARCHITECTURE_FIELDS):
        return WarmStart(None, f"champion v{champion.version} has another architecture")
    return WarmStart(loaded.model.state_dict(), f"champion v{champion.version}")


class WarmStart(NamedTuple):
    state: dict[str, torch.Tensor] | None
    source: str  # where the weights came from, or why there are none (logged as the param `warm_start`)


def train_pattern(
    settings: Settings, meta_path: Path, trained_for: datetime, cfg: TrainConfig | None = None, reason: str = ""
) -> TrainOutcome:
    """Everything for one pattern: train, evaluate against baselines, calibrate, log, register."""
    cfg = cfg or train_config(settings)
    data = load_pattern(meta_path)
    start = warm_start(settings, setup_mlflow(settings).MlflowClient(), data.pattern_id, cfg)
    fitted = fit(settings, data, cfg, start.state)
    trace = fit_trace_model(settings, meta_path)
    return register_fitted(settings, fitted, trace, trained_for, reason, start.source)


PreparedJob = tuple[TrainJob, PatternData, Prepared]  # a job, its loaded series and training windows


def train_patterns(settings: Settings, jobs: list[TrainJob], cfg: TrainConfig | None = None) -> list[Outcome]:
    """`train_pattern` for a shard's jobs, their forecasters fitted together (`fit_many`: stacked on
    a GPU), each then logged and registered on its own. A job with too little history is `Skipped`;
    one whose loading, fitting or registering raises is `Skipped` as `failed` (the step and the
    error) while the others go on: one odd pattern must stop neither its shard nor the hour's
    scoring. Outcomes in the order of `jobs`."""
    from tasks.progress import progress as progress_bar

    cfg = cfg or train_config(settings)
    outcomes: dict[int, Outcome] = {}
    prepared: list[PreparedJob] = []
    for job in jobs:
        try:
            data = load_pattern(job.meta_path)
            prepared.append((job, data, prepare(data, cfg)))
        except NotEnoughHistory as err:
            log.warning("pattern %s skipped: %s", job.pattern_id, err)
            outcomes[job.pattern_id] = Skipped(job.pattern_id, str(err), "skipped", job.hour, ",".join(job.reasons))
        except Exception as err:  # noqa: BLE001  this pattern's failure: its outcome
            outcomes[job.pattern_id] = failed(job, "loading its export", err)
    ready, starts = _warm_started(settings, prepared, cfg, outcomes)
    fits = _fit_each(settings, [(data, prep) for _, data, prep in ready], cfg, [s.state for s in starts])
    for (job, _, _), start, fitted in progress_bar(
        list(zip(ready, starts, fits, strict=True)), "registering", unit="pattern"
    ):
        if isinstance(fitted, Exception):
            outcomes[job.pattern_id] = failed(job, "fitting", fitted)
            continue
        try:
            trace = fit_trace_model(settings, job.meta_path)
            reason = ",".join(job.reasons)
            outcomes[job.pattern_id] = register_fitted(settings, fitted, trace, job.hour, reason, start.source)
        except Exception as err:  # noqa: BLE001  (its MLflow run ends FAILED)
            outcomes[job.pattern_id] = failed(job, "logging and registering", err)
    return [outcomes[job.pattern_id] for job in jobs]


def _warm_started(
    settings: Settings, prepared: list[PreparedJob], cfg: TrainConfig, outcomes: dict[int, Outcome]
) -> tuple[list[PreparedJob], list[WarmStart]]:
    """The prepared jobs whose champion weights (or none) were found, with them; the others failed
    into `outcomes` (a registry that cannot be read fails every one, with its error)."""
    ready: list[PreparedJob] = []
    starts: list[WarmStart] = []
    if not prepared:
        return ready, starts
    try:
        client = setup_mlflow(settings).MlflowClient()
    except Exception as err:  # noqa: BLE001
        for job, _, _ in prepared:
            outcomes[job.pattern_id] = failed(job, "opening the model registry", err)
        return [], []
    for job, data, prep in prepared:
        try:
            starts.append(warm_start(settings, client, job.pattern_id, cfg))
            ready.append((job, data, prep))
        except Exception as err:  # noqa: BLE001
            outcomes[job.pattern_id] = failed(job, "loading its champion's weights", err)
    return ready, starts


def _fit_each(
    settings: Settings,
    ready: list[tuple[PatternData, Prepared]],
    cfg: TrainConfig,
    inits: list[dict[str, torch.Tensor] | None],
) -> list[Fitted | Exception]:
    """`fit_many`, or where it raises (stacked, one pattern fails them all) each pattern fitted on
    its own: its `Fitted`, or the exception that is its failure."""
    if not ready:
        return []
    try:
        return list(fit_many(settings, ready, cfg, inits))
    except Exception as err:  # noqa: BLE001
        if len(ready) == 1:
            return [err]
        log.warning("fitting %d patterns together failed (%s): fitting them one by one", len(ready), err)
    out: list[Fitted | Exception] = []
    for item, init in zip(ready, inits, strict=True):
        try:
            out.append(fit_many(settings, [item], cfg, [init])[0])
        except Exception as err:  # noqa: BLE001
            out.append(err)
    return out


def failed(job: TrainJob, step: str, err: BaseException) -> Skipped:
    """A job whose `step` raised `err`: logged with its traceback, reported as `failed` with the
    error's first line (the pattern stays stale and is tried again next hour)."""
    log.error("pattern %s: %s failed", job.pattern_id, step, exc_info=err)
    message = (str(err).strip().splitlines() or [""])[0][:300]
    reason = f"pattern {job.pattern_id}: {step} failed: {type(err).__name__}: {message}"
    return Skipped(job.pattern_id, reason, "failed", job.hour, ",".join(job.reasons))


def register_fitted(
    settings: Settings,
    fitted: Fitted,
    trace: TraceModel | None,
    trained_for: datetime,
    reason: str = "",
    warm_source: str = "no champion",
) -> TrainOutcome:
    """Log a fitted pattern (and its trace model) to MLflow, register the version, decide the champion."""
    data = fitted.data
    mlflow = setup_mlflow(settings)
    client = mlflow.MlflowClient()
    name = model_name(data.pattern_id)
    run_tags = {
        **launch_tags(),
        TRAINED_FOR_TAG: trained_for.isoformat(),
        "rpcwatch.pattern_id": str(data.pattern_id),
        "rpcwatch.stale_reason": reason,
    }
    with (
        tempfile.TemporaryDirectory() as tmp,
        mlflow.start_run(
            run_name=f"pattern-{data.pattern_id}-{trained_for:%Y%m%dT%H}",
            tags=run_tags,
            description=f"Pattern {data.pattern_id} trained for {trained_for:%Y-%m-%d %H:%M} UTC "
            f"(why: {reason or 'not given'}), launched by {launched_by(run_tags)}.",
        ) as run,
    ):
        info, artifacts = _log_run(mlflow, fitted, Path(tmp), reason, trace, warm_source)
        crash_point("logged")  # crash-safety tests: the model is logged in its run, nothing registered yet
        decision, why = decide(mlflow, client, fitted)
        tags = version_tags(fitted, trained_for, (decision, why), run.info.run_id, reason, artifacts)
        describe_registered_model(client, name, model_description(data, fitted.cfg))
        with contextlib.redirect_stderr(LinesToLog(log)):  # MLflow's registry news, not errors
            version = mlflow.register_model(info.model_uri, name, tags=tags).version  # links the logged model too
        description = version_description(fitted, trained_for, reason, (decision, why), run_tags, trace)
        client.update_model_version(name, version, description=description)
        move_aliases(client, name, int(version), decision)
        crash_point("registered")  # crash-safety tests: in the registry, not yet in DuckDB
        record_decision(client, run.info.run_id, data.pattern_id, int(version), trained_for, (decision, why))
    outcome = TrainOutcome(
        pattern_id=data.pattern_id,
        pattern_version=data.version,
        graph_hash=data.graph_hash,
        model_version=int(version),
        run_id=run.info.run_id,
        decision=decision,
        reason=why,
        trained_for=trained_for,
        metrics=fitted.scores,
        seconds=fitted.result.seconds + (fitted.no_graph.seconds if fitted.no_graph else 0.0),
        device=str(fitted.dev),
        stale_reason=reason,
    )
    log.info(outcome.line())
    return outcome
