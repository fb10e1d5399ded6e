"""Train one pattern's model from its exported series, log it to MLflow, decide the champion.

One MLflow run per training (experiment `rpcwatch`): params, validation metrics of the model and
each baseline side by side, artifacts (state dict, graph, normalisation, thresholds: JSON and
tensors only, nothing unpickled on load) and forecast-vs-actual PNGs of the busiest nodes. Each
version is registered as `rpcwatch-pattern-<id>`; the `champion` alias moves to it only if there
is no champion, if the champion's graph no longer matches the pattern, or if it beats the
champion on the same recent validation window. Otherwise it becomes the `challenger`.

The registry is the source of truth: each version carries its tags from the moment it exists
(graph hash, decision, and `artifacts_sha256`, the digest of every artifact file, so a cached copy
can be verified before it is trusted), and `registry_mirror` is what DuckDB's `models` table is
reconciled against (retrain.reconcile_models).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from tasks.clock import naive_utc
from tasks.failpoints import crash_point
from tasks.models.baselines import metrics, moving_average, poisson_floor, season_period, seasonal_naive
from tasks.models.forecast import Prepared, TrainConfig, device, make_model, predict, prepare, train
from tasks.models.series import PatternData, load_pattern
from tasks.models.thresholds import Thresholds, calibrate
from tasks.settings import Settings

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)
EXPERIMENT = "rpcwatch"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
PIP_REQUIREMENTS = ["torch==2.13.0", "torch-geometric==2.8.1", "numpy", "scipy"]
ARTIFACTS_TAG = "artifacts_sha256"  # model-version tag: JSON {artifact file name: sha256 hex}
MODEL_PREFIX = "rpcwatch-pattern-"


def model_name(pattern_id: int) -> str:
    return f"{MODEL_PREFIX}{pattern_id}"


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
        return (
            f"pattern {self.pattern_id}: v{self.model_version} {self.decision} ({self.reason}); calls MAPE "
            f"{m.get('model_mape_calls', float('nan')):.3f} vs floor {m.get('poisson_floor_calls', float('nan')):.3f}, "
            f"seasonal naive {m.get('seasonal_naive_mape_calls', float('nan')):.3f}, "
            f"no-graph {m.get('no_graph_mape_calls', float('nan')):.3f}; {self.seconds:.1f} s on {self.device}"
        )


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
    targets = prep.targets[prep.split :]
    period = season_period(cfg, data.bucket_seconds, int(targets[0]))
    return {
        "seasonal_naive": seasonal_naive(data.values, targets, period),
        "moving_average": moving_average(data.values, targets, cfg.window, cfg.horizon),
    }, period


def evaluate(
    data: PatternData, prep: Prepared, cfg: TrainConfig, model, no_graph, dev
) -> tuple[dict[str, float], np.ndarray, int]:
    """Validation metrics of the model, the no-graph model and the naive baselines, side by side."""
    obs = prep.y[prep.split :].numpy().astype(np.float64)
    pred = predict(model, prep, slice(prep.split, None), dev)
    out = {f"model_{k}": v for k, v in metrics(pred, obs).items()}
    out.update(
        {f"no_graph_{k}": v for k, v in metrics(predict(no_graph, prep, slice(prep.split, None), dev), obs).items()}
    )
    baselines, period = _baselines(data, prep, cfg)
    for name, values in baselines.items():
        out.update({f"{name}_{k}": v for k, v in metrics(values, obs).items()})
    out["poisson_floor_calls"] = poisson_floor(obs)
    out["poisson_floor_asymptotic_calls"] = poisson_floor(obs, asymptotic=True)
    out["mape_calls_over_floor"] = out["model_mape_calls"] / out["poisson_floor_calls"]
    out["mape_calls_vs_seasonal_naive"] = out["model_mape_calls"] / out["seasonal_naive_mape_calls"]
    return out, pred, period


def _plots(
    data: PatternData, prep: Prepared, pred: np.ndarray, thresholds: Thresholds, folder: Path, top: int = 3
) -> list[Path]:
    from tasks.app.plots import forecast_plot

    obs = prep.y[prep.split :].numpy()
    busiest = np.argsort(-obs[:, :, 0].mean(axis=0))[:top]
    times = data.buckets[prep.targets[prep.split :]]
    paths = []
    for rank, n in enumerate(busiest, 1):
        node = data.nodes[n]
        path = folder / f"forecast-{rank}-{node.replace('|', '_').replace('/', '_')[:80]}.png"
        band = thresholds.nodes[node]["calls"]
        forecast_plot(
            times,
            obs[:, n, 0],
            pred[:, n, 0],
            band["alpha"],
            thresholds.alarm_p,
            f"pattern {data.pattern_id} · {node}",
            path,
            phi=band["phi"],
        )
        paths.append(path)
    return paths


def _artifacts(
    folder: Path, data: PatternData, prep: Prepared, cfg: TrainConfig, model, thresholds: Thresholds
) -> dict[str, str]:
    files = {
        "state_dict": folder / "state_dict.pt",
        "config": folder / "config.json",
        "graph": folder / "graph.json",
        "normalisation": folder / "normalisation.json",
        "thresholds": folder / "thresholds.json",
    }
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, files["state_dict"])
    files["config"].write_text(json.dumps(asdict(cfg), indent=1))
    files["graph"].write_text(
        json.dumps(
            {
                "pattern_id": data.pattern_id,
                "version": data.version,
                "graph_hash": data.graph_hash,
                "nodes": data.nodes,
                "edges": data.edges,
                "bucket_seconds": data.bucket_seconds,
            },
            indent=1,
        )
    )
    files["normalisation"].write_text(json.dumps(asdict(prep.norm), indent=1))
    files["thresholds"].write_text(json.dumps(thresholds.to_json(), indent=1))
    return {k: str(v) for k, v in files.items()}


def load_model(folder: Path, dev: torch.device | None = None):
    """A trained pattern model from its artifact folder: weights loaded with `weights_only=True`."""
    from tasks.models.forecast import Normaliser

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
    obs = prep.y[prep.split :].numpy().astype(np.float64)
    return metrics(predict(model, prep.with_normaliser(norm, cfg.window), slice(prep.split, None), dev), obs)[
        "mape_calls"
    ]


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


def train_pattern(
    settings: Settings, meta_path: Path, trained_for: datetime, cfg: TrainConfig | None = None, reason: str = ""
) -> TrainOutcome:
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
    with (
        tempfile.TemporaryDirectory() as tmp,
        mlflow.start_run(run_name=f"pattern-{data.pattern_id}-{trained_for:%Y%m%dT%H}") as run,
    ):
        folder = Path(tmp)
        mlflow.log_params(
            {
                "pattern_id": data.pattern_id,
                "pattern_version": data.version,
                "graph_hash": data.graph_hash,
                "nodes": len(data.nodes),
                "edges": len(data.edges),
                "data_start": str(data.buckets[0]),
                "data_end": str(data.buckets[-1]),
                "bucket_seconds": data.bucket_seconds,
                "architecture": "STGCN(temporal gated conv -> GCNConv -> temporal gated conv) x blocks",
                "parameters": result.parameters,
                "epochs": result.epochs,
                "device": str(dev),
                "seasonal_period_buckets": period,
                "stale_reason": reason,
                **asdict(cfg),
            }
        )
        mlflow.log_metrics({k: v for k, v in scores.items() if np.isfinite(v)})
        for epoch, value in enumerate(result.history):
            mlflow.log_metric("val_loss", value, step=epoch)
        for png in _plots(data, prep, pred, thresholds, folder):
            mlflow.log_artifact(str(png), artifact_path="plots")
        artifacts = _artifacts(folder, data, prep, cfg, result.model, thresholds)
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(MODEL_CODE), artifacts=artifacts, pip_requirements=PIP_REQUIREMENTS
        )
        decision, why = _decide(mlflow, client, name, data, prep, scores["model_mape_calls"], dev)
        # tags in the same registry write as the version: a crash never leaves a version without them
        version = mlflow.register_model(
            info.model_uri,
            name,
            tags={
                "graph_hash": data.graph_hash,
                "pattern_version": str(data.version),
                "trained_for": trained_for.isoformat(),
                "decision": decision,
                "reason": why,
                "stale_reason": reason,
                "run_id": run.info.run_id,
                "val_mape_calls": f"{scores['model_mape_calls']:.5f}",
                ARTIFACTS_TAG: json.dumps(file_digests(Path(p) for p in artifacts.values()), sort_keys=True),
            },
        ).version
        client.set_registered_model_alias(name, decision, version)  # the alias, not the tag, makes the champion
        crash_point("registered")  # crash-safety tests: in the registry, not yet in DuckDB
        mlflow.set_tags({"decision": decision, "reason": why, "registered_version": version})
    outcome = TrainOutcome(
        data.pattern_id,
        data.version,
        data.graph_hash,
        int(version),
        run.info.run_id,
        decision,
        why,
        scores,
        result.seconds + no_graph.seconds,
        str(dev),
        trained_for.astimezone(UTC).isoformat(),
        reason,
    )
    log.info(outcome.line())
    return outcome


# --- artifacts verified against the registry ------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_digests(paths: Iterable[Path]) -> dict[str, str]:
    """{file name: sha256} of artifact files (a few small files: cheap on every load)."""
    return {p.name: _sha256(p) for p in paths}


def _mismatch(folder: Path, digests: dict[str, str]) -> str | None:
    """The first file of `digests` missing from `folder` or with other content; None when all match."""
    for name, digest in sorted(digests.items()):
        path = folder / name
        if not path.is_file() or _sha256(path) != digest:
            return name
    return None


# registered versions are immutable: their digests are looked up once per process
_DIGESTS: dict[tuple[str, str, int], dict[str, str] | None] = {}


@functools.lru_cache(maxsize=4)
def _client(tracking_uri: str) -> MlflowClient:
    """A registry client for reads (no experiment set-up: one query per version looked up)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _registered_digests(settings: Settings, name: str, version: int) -> dict[str, str] | None:
    key = (settings.mlflow_tracking_uri, name, version)
    if key not in _DIGESTS:
        tags = _client(settings.mlflow_tracking_uri).get_model_version(name, str(version)).tags
        _DIGESTS[key] = json.loads(tags[ARTIFACTS_TAG]) if ARTIFACTS_TAG in tags else None
    return _DIGESTS[key]


def cached_artifacts(settings: Settings, pattern_id: int, version: int) -> Path:
    """A registered version's artifact folder, cached under the home and verified against the
    registry's `artifacts_sha256` tag on every call: a cached file that differs (edited, truncated)
    is downloaded again with a warning naming it. A version without the tag (registered before
    digests) is downloaded once per process and then verified against that download's digests."""
    name = model_name(pattern_id)
    folder = settings.home / "model-cache" / name / str(version)
    digests = _registered_digests(settings, name, version)
    if digests is not None:
        bad = _mismatch(folder / "artifacts", digests)
        if bad is None:
            return folder / "artifacts"
        if (folder / "artifacts").exists():
            log.warning(
                "%s v%s: cached %s differs from the registered artifact: downloading it again", name, version, bad
            )
    elif (folder / "artifacts").exists():
        log.info(
            "%s v%s has no %s tag: checking the cached artifacts against a fresh download", name, version, ARTIFACTS_TAG
        )
    _DIGESTS[(settings.mlflow_tracking_uri, name, version)] = _download(settings, name, version, folder, digests)
    return folder / "artifacts"


def _download(
    settings: Settings, name: str, version: int, folder: Path, digests: dict[str, str] | None
) -> dict[str, str]:
    """Download a version next to `folder`, check it against `digests` (when known) and swap it in
    with renames, so a reader never sees a half-written folder. Returns the files' digests."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{version}-download-", dir=folder.parent))
    try:
        setup_mlflow(settings).artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(fresh))
        got = file_digests(p for p in (fresh / "artifacts").iterdir() if p.is_file())
        bad = _mismatch(fresh / "artifacts", digests) if digests is not None else None
        if bad is not None:
            raise RuntimeError(f"{name} v{version}: the registry's {bad} does not match its {ARTIFACTS_TAG} tag")
        if digests is None and folder.exists():
            bad = _mismatch(folder / "artifacts", got)
            if bad is not None:
                log.warning("%s v%s: cached %s differs from the registered artifact: replaced", name, version, bad)
        old = fresh.with_name(f"{fresh.name}-old")
        if folder.exists():
            folder.rename(old)
        fresh.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
        return digests if digests is not None else got
    finally:
        shutil.rmtree(fresh, ignore_errors=True)


# --- the registry as DuckDB's `models` table mirrors it --------------------------------------------


def _pages(search: Callable, filter_string: str) -> Iterator:
    """Every result of a paged MLflow search."""
    token = None
    while True:
        page = search(filter_string=filter_string, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _pattern_id(name: str) -> int | None:
    suffix = name.removeprefix(MODEL_PREFIX)
    return int(suffix) if name.startswith(MODEL_PREFIX) and suffix.isdigit() else None


def registry_mirror(settings: Settings, known: set[tuple[int, int]]) -> tuple[dict[int, int | None], list[dict]] | None:
    """The registry as DuckDB's `models` mirrors it: per registered pattern the version its
    `champion` alias points to (None: no alias), and a `models` row (column -> value) for every
    registered (pattern, version) not in `known`. None when no registry exists yet."""
    uri = settings.mlflow_tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return None  # nothing was ever registered: do not create a registry just to read it
    client = setup_mlflow(settings).MlflowClient()
    like = f"name LIKE '{MODEL_PREFIX}%'"
    champions = {}
    for registered in _pages(client.search_registered_models, like):
        alias = registered.aliases.get("champion")
        if (pid := _pattern_id(registered.name)) is not None:
            champions[pid] = int(alias) if alias is not None else None
    rows = [
        _mirrored_row(client, pid, mv, champions[pid])
        for mv in _pages(client.search_model_versions, like)
        if (pid := _pattern_id(mv.name)) in champions and (pid, int(mv.version)) not in known
    ]
    return champions, rows


def _mirrored_decision(version: int, tagged: str | None, champion: int | None) -> str:
    """What a version is, judged by the alias: the aliased one is the champion; one tagged champion
    below it was a champion before it (history, as `record` leaves it); one tagged champion without
    the alias reaching it was registered by a run killed before it moved the alias: `unpromoted`,
    never served, so its pattern stays stale and is retrained."""
    if version == champion:
        return "champion"
    if tagged == "champion":
        return "champion" if champion is not None and version < champion else "unpromoted"
    return "challenger" if tagged == "challenger" else "unpromoted"


def _mirrored_row(client: MlflowClient, pattern_id: int, mv: ModelVersion, champion: int | None) -> dict[str, object]:
    """A `models` row rebuilt from a version's tags and its run (metrics, params)."""
    from mlflow.exceptions import MlflowException

    tags, version = mv.tags, int(mv.version)
    try:
        run = client.get_run(mv.run_id) if mv.run_id else None
    except MlflowException:  # run purged: the tags still say enough
        run = None
    m, params = (run.data.metrics, run.data.params) if run else ({}, {})
    decision = _mirrored_decision(version, tags.get("decision"), champion)
    trained_for = (
        naive_utc(datetime.fromisoformat(tags["trained_for"]))
        if "trained_for" in tags
        else naive_utc(datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC))
    )
    val = m.get("model_mape_calls", float(tags["val_mape_calls"]) if "val_mape_calls" in tags else None)
    reason = tags.get("reason", "")
    if decision != tags.get("decision"):
        reason = f"registered as {tags.get('decision', '?')} but the champion alias is on v{champion}; {reason}"
    return {
        "pattern_id": pattern_id,
        "model_name": mv.name,
        "model_version": version,
        "run_id": mv.run_id,
        "graph_hash": tags.get("graph_hash", params.get("graph_hash")),
        "pattern_version": int(pv) if (pv := tags.get("pattern_version", params.get("pattern_version"))) else None,
        "trained_for": trained_for,
        "decision": decision,
        "reason": reason,
        "stale_reason": tags.get("stale_reason", ""),
        "val_mape_calls": val,
        "poisson_floor_calls": m.get("poisson_floor_calls"),
        "seasonal_naive_mape_calls": m.get("seasonal_naive_mape_calls"),
        "moving_average_mape_calls": m.get("moving_average_mape_calls"),
        "no_graph_mape_calls": m.get("no_graph_mape_calls"),
        "calibrated_mape_calls": val,
        "seconds": None,
        "device": params.get("device"),
        "recorded_at": naive_utc(datetime.now(UTC)),
    }
