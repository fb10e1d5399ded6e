"""Train one pattern's model from its exported series, log it to MLflow, decide the champion.

One MLflow run per training (experiment `rpcwatch`): params, validation metrics of the model and
each baseline side by side, artifacts (state dict, graph, normalisation, thresholds: JSON and
tensors only, nothing unpickled on load) and forecast-vs-actual PNGs of the busiest nodes. Each
version is registered as `rpcwatch-pattern-<id>`; the `champion` alias moves to it only if there
is no champion, if the champion's graph no longer matches the pattern, or if it beats the
champion on the same recent validation window. Otherwise it becomes the `challenger`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from tasks.forecast import (Prepared, Thresholds, TrainConfig, calibrate, device, make_model, metrics,
                            moving_average, poisson_floor, predict, prepare, season_period, seasonal_naive, train)
from tasks.series import PatternData, load_pattern
from tasks.settings import Settings

log = logging.getLogger(__name__)
EXPERIMENT = "rpcwatch"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
PIP_REQUIREMENTS = ["torch==2.13.0", "torch-geometric==2.8.1", "numpy", "scipy"]


def model_name(pattern_id: int) -> str:
    return f"rpcwatch-pattern-{pattern_id}"


@dataclass
class TrainOutcome:
    pattern_id: int
    pattern_version: int
    graph_hash: str
    model_version: int
    run_id: str
    decision: str  # champion | challenger
    reason: str
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    device: str = "cpu"
    trained_for: str = ""
    stale_reason: str = ""

    def line(self) -> str:
        m = self.metrics
        return (f"pattern {self.pattern_id}: v{self.model_version} {self.decision} ({self.reason}); calls MAPE "
                f"{m.get('model_mape_calls', float('nan')):.3f} vs floor {m.get('poisson_floor_calls', float('nan')):.3f}, "
                f"seasonal naive {m.get('seasonal_naive_mape_calls', float('nan')):.3f}, "
                f"no-graph {m.get('no_graph_mape_calls', float('nan')):.3f}; {self.seconds:.1f} s on {self.device}")


def setup_mlflow(settings: Settings):
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        location = None
        if settings.mlflow_tracking_uri.startswith("sqlite"):
            settings.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
            location = settings.mlflow_artifacts.resolve().as_uri()
        mlflow.create_experiment(EXPERIMENT, artifact_location=location)
    mlflow.set_experiment(EXPERIMENT)
    return mlflow


def _baselines(data: PatternData, prep: Prepared, cfg: TrainConfig) -> dict[str, np.ndarray]:
    targets = prep.targets[prep.split:]
    period = season_period(cfg, data.bucket_seconds, int(targets[0]))
    return {"seasonal_naive": seasonal_naive(data.values, targets, period),
            "moving_average": moving_average(data.values, targets, cfg.window, cfg.horizon)}, period


def evaluate(data: PatternData, prep: Prepared, cfg: TrainConfig, model, no_graph, dev) -> tuple[dict[str, float], np.ndarray, int]:
    """Validation metrics of the model, the no-graph model and the naive baselines, side by side."""
    obs = prep.y[prep.split:].numpy().astype(np.float64)
    pred = predict(model, prep, slice(prep.split, None), dev)
    out = {f"model_{k}": v for k, v in metrics(pred, obs).items()}
    out.update({f"no_graph_{k}": v for k, v in metrics(predict(no_graph, prep, slice(prep.split, None), dev), obs).items()})
    baselines, period = _baselines(data, prep, cfg)
    for name, values in baselines.items():
        out.update({f"{name}_{k}": v for k, v in metrics(values, obs).items()})
    out["poisson_floor_calls"] = poisson_floor(obs)
    out["poisson_floor_asymptotic_calls"] = poisson_floor(obs, asymptotic=True)
    out["mape_calls_over_floor"] = out["model_mape_calls"] / out["poisson_floor_calls"]
    out["mape_calls_vs_seasonal_naive"] = out["model_mape_calls"] / out["seasonal_naive_mape_calls"]
    return out, pred, period


def _plots(data: PatternData, prep: Prepared, pred: np.ndarray, thresholds: Thresholds, folder: Path, top: int = 3) -> list[Path]:
    from tasks.plots import forecast_plot

    obs = prep.y[prep.split:].numpy()
    busiest = np.argsort(-obs[:, :, 0].mean(axis=0))[:top]
    times = data.buckets[prep.targets[prep.split:]]
    paths = []
    for rank, n in enumerate(busiest, 1):
        node = data.nodes[n]
        path = folder / f"forecast-{rank}-{node.replace('|', '_').replace('/', '_')[:80]}.png"
        band = thresholds.nodes[node]["calls"]
        forecast_plot(times, obs[:, n, 0], pred[:, n, 0], band["alpha"], thresholds.alarm_p,
                      f"pattern {data.pattern_id} · {node}", path, phi=band["phi"])
        paths.append(path)
    return paths


def _artifacts(folder: Path, data: PatternData, prep: Prepared, cfg: TrainConfig, model, thresholds: Thresholds) -> dict[str, str]:
    files = {
        "state_dict": folder / "state_dict.pt",
        "config": folder / "config.json",
        "graph": folder / "graph.json",
        "normalisation": folder / "normalisation.json",
        "thresholds": folder / "thresholds.json",
    }
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, files["state_dict"])
    files["config"].write_text(json.dumps(asdict(cfg), indent=1))
    files["graph"].write_text(json.dumps({"pattern_id": data.pattern_id, "version": data.version,
                                          "graph_hash": data.graph_hash, "nodes": data.nodes,
                                          "edges": data.edges, "bucket_seconds": data.bucket_seconds}, indent=1))
    files["normalisation"].write_text(json.dumps(asdict(prep.norm), indent=1))
    files["thresholds"].write_text(json.dumps(thresholds.to_json(), indent=1))
    return {k: str(v) for k, v in files.items()}


def load_model(folder: Path, dev: torch.device | None = None):
    """A trained pattern model from its artifact folder: weights loaded with `weights_only=True`."""
    from tasks.forecast import Normaliser

    cfg = TrainConfig(**json.loads((folder / "config.json").read_text()))
    model = make_model(cfg)
    model.load_state_dict(torch.load(folder / "state_dict.pt", map_location="cpu", weights_only=True))
    graph = json.loads((folder / "graph.json").read_text())
    norm = Normaliser(**json.loads((folder / "normalisation.json").read_text()))
    thresholds = json.loads((folder / "thresholds.json").read_text())
    return model.to(dev or torch.device("cpu")), cfg, graph, norm, thresholds


def _champion(client, name: str):
    try:
        return client.get_model_version_by_alias(name, "champion")
    except Exception:  # noqa: BLE001  (MLflow raises a generic RestException when the alias is absent)
        return None


def _champion_score(mlflow, champion, prep: Prepared, dev) -> float:
    """The current champion's calls MAPE on the new validation window (same graph only)."""
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{champion.name}/{champion.version}")) / "artifacts"
    model, cfg, _, norm, _ = load_model(folder, dev)
    obs = prep.y[prep.split:].numpy().astype(np.float64)
    return metrics(predict(model, prep.with_normaliser(norm, cfg.window), slice(prep.split, None), dev), obs)["mape_calls"]


def _decide(mlflow, client, name: str, data: PatternData, prep: Prepared, score: float, dev) -> tuple[str, str]:
    champion = _champion(client, name)
    if champion is None:
        return "champion", "first model of this pattern"
    if champion.tags.get("graph_hash") != data.graph_hash:
        return "champion", f"champion v{champion.version} was trained on another graph"
    old = _champion_score(mlflow, champion, prep, dev)
    if score < old:
        return "champion", f"beats champion v{champion.version}: calls MAPE {score:.4f} < {old:.4f}"
    return "challenger", f"champion v{champion.version} stays better: calls MAPE {old:.4f} <= {score:.4f}"


def train_pattern(settings: Settings, meta_path: Path, trained_for: datetime, cfg: TrainConfig | None = None,
                  reason: str = "") -> TrainOutcome:
    """Everything for one pattern: train, evaluate against baselines, calibrate, log, register."""
    cfg = cfg or TrainConfig()
    dev = device(settings.device)
    data = load_pattern(meta_path)
    prep = prepare(data, cfg)
    result = train(prep, cfg, dev)
    no_graph = train(prep, cfg, dev, use_graph=False)
    scores, pred, period = evaluate(data, prep, cfg, result.model, no_graph.model, dev)
    thresholds = calibrate(data, prep, pred, settings.alarm_p, settings.threshold_method)
    mlflow = setup_mlflow(settings)
    client = mlflow.MlflowClient()
    name = model_name(data.pattern_id)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_name=f"pattern-{data.pattern_id}-{trained_for:%Y%m%dT%H}") as run:
        folder = Path(tmp)
        mlflow.log_params({
            "pattern_id": data.pattern_id, "pattern_version": data.version, "graph_hash": data.graph_hash,
            "nodes": len(data.nodes), "edges": len(data.edges), "data_start": str(data.buckets[0]),
            "data_end": str(data.buckets[-1]), "bucket_seconds": data.bucket_seconds,
            "architecture": "STGCN(temporal gated conv -> GCNConv -> temporal gated conv) x blocks",
            "parameters": result.parameters, "epochs": result.epochs, "device": str(dev),
            "seasonal_period_buckets": period, "stale_reason": reason, **asdict(cfg)})
        mlflow.log_metrics({k: v for k, v in scores.items() if np.isfinite(v)})
        for epoch, value in enumerate(result.history):
            mlflow.log_metric("val_loss", value, step=epoch)
        for png in _plots(data, prep, pred, thresholds, folder):
            mlflow.log_artifact(str(png), artifact_path="plots")
        info = mlflow.pyfunc.log_model(name="model", python_model=str(MODEL_CODE),
                                       artifacts=_artifacts(folder, data, prep, cfg, result.model, thresholds),
                                       pip_requirements=PIP_REQUIREMENTS)
        decision, why = _decide(mlflow, client, name, data, prep, scores["model_mape_calls"], dev)
        version = mlflow.register_model(info.model_uri, name).version
        for key, value in {"graph_hash": data.graph_hash, "pattern_version": str(data.version),
                           "trained_for": trained_for.isoformat(), "decision": decision, "reason": why,
                           "stale_reason": reason, "run_id": run.info.run_id,
                           "val_mape_calls": f"{scores['model_mape_calls']:.5f}"}.items():
            client.set_model_version_tag(name, version, key, value)
        client.set_registered_model_alias(name, decision, version)
        mlflow.set_tags({"decision": decision, "reason": why, "registered_version": version})
    outcome = TrainOutcome(data.pattern_id, data.version, data.graph_hash, int(version), run.info.run_id,
                           decision, why, scores, result.seconds + no_graph.seconds, str(dev),
                           trained_for.astimezone(timezone.utc).isoformat(), reason)
    log.info(outcome.line())
    return outcome
