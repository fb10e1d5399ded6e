"""Benchmark: the MLflow model registry at rpcwatch's scale (1,000 pattern models), embedded and served.

Measures, for N registered pattern models, what rpcwatch does with the registry, with rpcwatch's own
functions, on (a) the embedded store (`sqlite:///<home>/mlflow.db` for tracking and registry, local
`file:` artifacts: the default of `Settings`) and/or (b) an `mlflow server` bound to 127.0.0.1 with
2 workers, `--serve-artifacts` (`mlflow-artifacts:/` URIs) and a PostgreSQL 15 backend store, as
docker-compose.yml deploys it (Postgres started in a temp folder on a free port, as user `nobody`
through `runuser` when run as root since initdb refuses root; both stopped at the end).

The model: ONE small real forecaster is trained once (`training.fit` on `helpers.synthetic_pattern`,
12 RPCs, 2 epochs; its val_loss history stretched to `--epochs` steps, 80 by default, as a real
early-stopped training logs ~50-100), with a real trace model and real forecast plots (rendered
once: their upload is measured, not matplotlib); each of the N patterns gets a copy with its own
pattern id and graph hash, so every registration writes the real artifact files (state_dict.pt
110 KB, JSON config/graph/normalisation/thresholds, trace_model.json), 3 plots (~70 KB each),
params and metrics, and a pyfunc model (models-from-code, pip_requirements, signature, input example).

Write (register), per pattern, alternately (even ids / odd ids, so both meet the same registry size):
- `register`: rpcwatch's path as it is, `training.register_fitted` (`train_pattern` after `fit`):
  start_run, params, `mlflow.pyfunc.log_model`, one batch of metrics (val_loss per epoch included:
  one call per epoch before, 544 ms a model on sqlite), 3 plots in one upload, `decide`
  (alias lookup), `version_tags` (artifact digests), `describe_registered_model`, `register_model`,
  `update_model_version` (description), `move_aliases`, `record_decision` (params and tags, one
  batch); with a per-phase breakdown.
- `register_lean`: the same registry content with fewer round trips: params, then log_model (so
  MLflow 3 has no metrics to re-read and link: it re-reads every metric's history otherwise), then
  ONE log_batch of all metrics linked to the logged model (`model_id`), plots in one log_artifacts,
  the champion looked up once (decide and the alias move share it), and the version created with
  its description and tags in ONE `create_model_version(..., model_id=...)`.
Read, over all N champions:
- `mirror_hourly`: `registry.registry_mirror(settings, known=all)`, the hourly reconciliation
  (`retrain.reconcile_models`): paged searches of registered models and versions.
- `mirror_rebuild`: `registry_mirror(settings, known=set())`: an empty/lost mirror (get_run per version).
- `champion_by_alias`: `registry.registered_champion` per pattern (what `decide`/`move_aliases` do).
- `load_cold` / `load_warm_new_process` / `load_warm_same_process`: `Detector.load` per champion as
  scoring does (`registry.cached_artifacts`: `get_model_version` for the digests once per process,
  `setup_mlflow` + `download_artifacts("models:/<name>/<v>")` of the whole model folder when the cache
  lacks or fails it, sha256 of each file), with an empty cache, a full cache in a new process (digest
  memo cleared), and a full cache in the same process.
- alternative (i) batched: `champions_batched` (one paged search_registered_models for the aliases +
  one paged search_model_versions for every version's tags: the digests) then `load_*_batched`: the
  same verified cache, the digests from that search (no per-version get_model_version), the cold
  download of only the `artifacts/` folder straight from the logged model's artifact location.
- alternative (ii) `bundle_*`: one registered model per shard (`--shard` patterns) whose single
  version holds every pattern's artifacts (`patterns/<id>/`) and per-pattern digests in its tags:
  written with one run per shard, read with one search and one download per shard.
Also: `retrain` (a second version of `--retrain` patterns through `register_fitted`: `decide` then
downloads and scores the champion: the steady-state cost) and `register_Wwriters` (`--writers`
processes registering `--writer-models` patterns each at once, as concurrent Airflow shards do:
wall time per model and the errors seen, e.g. sqlite's "database is locked").

Ends with `store op models total_s per_model_ms calls_per_model client_cpu_s` (calls: SQL statements
the client ran on sqlite, MLflow's 3 PRAGMAs per session included; HTTP requests on the server; CPU
of this process only: on a shared machine wall time minus it is waiting, on the server included), the
per-phase breakdown of `register` and of its `log_model`, and how the per-model time changed from the
first to the last tenth of the registrations (does it scale with the registry's size?).
Progress bars and MLflow telemetry are off (`MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false`, as rpcwatch's
Airflow env sets; `MLFLOW_DISABLE_TELEMETRY=true`). Needs psycopg2-binary for `--store server`.
Run it with `nice` on a shared machine: on 2 cores ~0.5 s (sqlite) to ~2 s (server) per registration.

    .venv/bin/python tests/benchmarks/bench_registry.py [--models 1000] [--store sqlite|server|both]
        [--mix interleave|rpcwatch|lean] [--epochs 80] [--retrain 20] [--writers 4] [--writer-models 10]
        [--shard 50] [--keep]

    e.g. (2 shared cores; the writes dominate, the reads take ~1 min per 1,000 models)
    nice .venv/bin/python tests/benchmarks/bench_registry.py --models 200 --store sqlite     # ~5 min
    nice .venv/bin/python tests/benchmarks/bench_registry.py --models 200 --store server     # ~10 min
    nice .venv/bin/python tests/benchmarks/bench_registry.py --models 1000 --store sqlite --epochs 2  # ~10 min
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a script: the tests' helpers are not on the path

import pg  # noqa: E402
from helpers import synthetic_pattern, tiny_traces  # noqa: E402
from tasks.models import registry, training  # noqa: E402
from tasks.models.detector import Detector  # noqa: E402
from tasks.models.forecast import TrainConfig  # noqa: E402
from tasks.models.registry import (  # noqa: E402
    ARTIFACTS_TAG,
    CHAMPION,
    MODEL_PREFIX,
    model_name,
    pattern_id_of,
    registered_champion,
    registry_mirror,
    setup_mlflow,
)
from tasks.models.trace_model import TRACE_MODEL_ARTIFACT, TraceModel  # noqa: E402
from tasks.models.tracking import (  # noqa: E402
    TRAINED_FOR_TAG,
    describe_registered_model,
    launch_tags,
    launched_by,
    model_description,
    version_description,
    version_tags,
)
from tasks.settings import Settings  # noqa: E402

TRAINED_FOR = datetime(2026, 1, 2, 10, tzinfo=UTC)
RETRAINED_FOR = datetime(2026, 1, 3, 10, tzinfo=UTC)
REASON = "benchmark"
SHARD_PREFIX = "rpcwatch-bench-shard-"
WRITER_PID_BASE = 1_000_000  # pattern ids of the concurrent writers: apart from the N measured ones
WARMUP_PID = 900_000  # two warm-up registrations (one per path), not measured


# --- what is measured and how it is printed ------------------------------------------------------


@dataclasses.dataclass
class Row:
    store: str
    op: str
    models: int
    total_s: float
    calls: int
    note: str = ""
    cpu_s: float | None = None  # this process's CPU seconds (the server's are not in it)

    @property
    def per_model_ms(self) -> float:
        return 1000 * self.total_s / max(self.models, 1)


ROWS: list[Row] = []
NOTES: list[str] = []


class Calls:
    """Round trips of this process to the store: SQL statements (sqlite) and HTTP requests (server)."""

    count = 0

    @classmethod
    def install(cls) -> None:
        import requests
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        def counted(_conn: Any, _cursor: Any, _statement: Any, _params: Any, _context: Any, _many: Any) -> None:
            cls.count += 1

        event.listen(Engine, "before_cursor_execute", counted)
        send = requests.Session.request

        @functools.wraps(send)
        def request(self: Any, *args: Any, **kwargs: Any) -> Any:
            cls.count += 1
            return send(self, *args, **kwargs)

        requests.Session.request = request  # type: ignore[method-assign]


@contextlib.contextmanager
def measured(store: str, op: str, models: int, note: str = "") -> Iterator[None]:
    calls, started, cpu = Calls.count, time.perf_counter(), time.process_time()
    yield
    row = Row(store, op, models, time.perf_counter() - started, Calls.count - calls, note, time.process_time() - cpu)
    ROWS.append(row)
    say(f"  {op:<28} {models:>6} models {row.total_s:8.1f} s {row.per_model_ms:9.1f} ms/model")


class Phases:
    """Seconds spent in named calls (the outermost timed call only: nested ones are not counted
    twice); with `within`, only calls made inside that phase of another `Phases`."""

    def __init__(self, within: tuple[Phases, str] | None = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.depth = 0
        self.current: str | None = None
        self.within = within

    def _timed(self, fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.depth or (self.within is not None and self.within[0].current != self.within[1]):
                return fn(*args, **kwargs)
            self.depth += 1
            self.current = label
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - started
                self.depth -= 1
                self.current = None

        return timed

    @contextlib.contextmanager
    def patched(self, targets: list[tuple[Any, str, str]]) -> Iterator[None]:
        originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]
        for (owner, attr, fn), (_, _, label) in zip(originals, targets):
            setattr(owner, attr, self._timed(fn, label))
        try:
            yield
        finally:
            for owner, attr, fn in reversed(originals):
                setattr(owner, attr, fn)


def register_phases(mlflow: Any) -> list[tuple[Any, str, str]]:
    """The calls of `register_fitted` timed one by one (module attributes it looks up at call time)."""
    import mlflow.pyfunc as pyfunc  # the module itself: `mlflow.pyfunc` is a lazy loader until imported
    import mlflow.tracking.fluent as fluent

    return [
        (training, "setup_mlflow", "setup_mlflow"),
        (mlflow, "start_run", "start_run"),
        (fluent, "end_run", "end_run"),
        (mlflow, "log_params", "log_params"),
        (mlflow, "log_metrics", "log_metrics+val_loss"),
        (mlflow, "log_metric", "log_metrics+val_loss"),
        (mlflow, "log_artifact", "log_artifact (plots)"),
        (training, "write_artifacts", "write_artifacts (local)"),
        (pyfunc, "log_model", LOG_MODEL),
        (training, "decide", "decide (alias lookup)"),
        (training, "version_tags", "version_tags (sha256)"),
        (training, "describe_registered_model", "describe_registered_model"),
        (mlflow, "register_model", "register_model"),
        (mlflow.MlflowClient, "update_model_version", "update_model_version"),
        (training, "move_aliases", "move_aliases"),
        (training, "record_decision", "record_decision (params + tags)"),
    ]


LOG_MODEL = "pyfunc.log_model"


def log_model_phases(mlflow: Any) -> list[tuple[Any, str, str]]:
    """What `mlflow.pyfunc.log_model` (MLflow 3's `Model.log`) spends its time on."""
    import mlflow.models.model as model_module
    import mlflow.models.utils as model_utils
    import mlflow.pyfunc as pyfunc

    client = mlflow.MlflowClient
    return [
        (model_module, "_create_logged_model", "create logged model"),
        (client, "get_run", "get_run (params; metric names)"),
        (client, "log_outputs", "log_outputs (run -> model)"),
        (client, "get_metric_history", "metric linking: get_metric_history per metric"),
        (client, "log_batch", "metric linking: log_batch"),
        (pyfunc, "save_model", "save_model (local files, requirement checks)"),
        (model_utils, "_validate_serving_input", "input example check (load + predict)"),
        (client, "log_model_artifacts", "upload the model folder"),
    ]


# --- one small real model, copied per pattern ------------------------------------------------------


@dataclasses.dataclass
class Fixture:
    base: Any  # training.Fitted
    trace: TraceModel
    plots: list[Path]
    plot_s: float  # rendering the 3 forecast plots of one training (not a registry cost)

    def fitted(self, pid: int) -> Any:
        data = dataclasses.replace(self.base.data, pattern_id=pid, graph_hash=f"bench{pid:020d}")
        return dataclasses.replace(self.base, data=data)


def make_fixture(folder: Path, epochs: int) -> Fixture:
    """The model (2 epochs trained, `epochs` of val_loss history logged), trace model and plots."""
    settings = Settings(home=folder, device="cpu")
    data = synthetic_pattern(0, np.random.default_rng(0), steps=360, nodes=12)
    base = training.fit(settings, data, TrainConfig(max_epochs=2))
    history = [float(v) for v in np.geomspace(base.result.history[0], base.result.best_val_loss, epochs)]
    base = dataclasses.replace(base, result=dataclasses.replace(base.result, epochs=epochs, history=history))
    history = tiny_traces(900, seed=1)
    trace = TraceModel(settings.trace_p).fit(history).calibrate(history, settings.trace_window_s)
    started = time.perf_counter()
    plots = training._plots(base, folder)
    return Fixture(base, trace, plots, time.perf_counter() - started)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """MLflow prints "Registered model ... already exists" (stderr) and "View run ..." (stdout, on
    a server) on every registration: dropped (`say` writes past this)."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield


def say(text: str) -> None:
    print(text, file=sys.__stdout__, flush=True)


def register_rpcwatch(settings: Settings, fx: Fixture, pid: int, trained_for: datetime = TRAINED_FOR) -> int:
    """rpcwatch's own registration of a fitted pattern; the version registered."""
    # the plots are rendered once (`Fixture.plot_s`): what is measured is their upload
    patches: dict[str, Any] = {"_plots": lambda _fitted, _folder: fx.plots}
    real = getattr(training, "register_fitted", None)
    if real is None:  # before `register_fitted` existed: `train_pattern`, reading and fitting stubbed
        patches |= {
            "load_pattern": lambda meta: dataclasses.replace(fx.base.data, pattern_id=int(Path(meta).stem)),
            "fit": lambda _s, data, _cfg: fx.fitted(data.pattern_id),
            "fit_trace_model": lambda _s, _meta: fx.trace,
        }
    saved = {k: getattr(training, k) for k in patches}
    try:
        for k, v in patches.items():
            setattr(training, k, v)
        if real is not None:
            return int(real(settings, fx.fitted(pid), fx.trace, trained_for, REASON).model_version)
        return int(training.train_pattern(settings, Path(f"{pid}.json"), trained_for, reason=REASON).model_version)
    finally:
        for k, v in saved.items():
            setattr(training, k, v)


def register_lean(settings: Settings, fx: Fixture, pid: int, trained_for: datetime = TRAINED_FOR) -> int:
    """The same run, logged model, registered version, tags, descriptions and alias as
    `register_fitted`, with fewer round trips (see the module docstring)."""
    from mlflow.entities import Metric

    fitted = fx.fitted(pid)
    data = fitted.data
    mlflow = setup_mlflow(settings)
    client = mlflow.MlflowClient()
    name = model_name(pid)
    run_tags = {
        **launch_tags(),
        TRAINED_FOR_TAG: trained_for.isoformat(),
        "rpcwatch.pattern_id": str(pid),
        "rpcwatch.stale_reason": REASON,
    }
    with (
        tempfile.TemporaryDirectory() as tmp,
        mlflow.start_run(
            run_name=f"pattern-{pid}-{trained_for:%Y%m%dT%H}",
            tags=run_tags,
            description=f"Pattern {pid} trained for {trained_for:%Y-%m-%d %H:%M} UTC "
            f"(why: {REASON}), launched by {launched_by(run_tags)}.",
        ) as run,
    ):
        folder = Path(tmp)
        mlflow.log_params(training._params(fitted, REASON))
        artifacts = training.write_artifacts(
            folder, data, fitted.prep, fitted.cfg, fitted.result.model, fitted.thresholds
        )
        artifacts[TRACE_MODEL_ARTIFACT] = str(fx.trace.save(folder / f"{TRACE_MODEL_ARTIFACT}.json"))
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(training.MODEL_CODE),
            artifacts=artifacts,
            pip_requirements=training.PIP_REQUIREMENTS,
            signature=training.signature(),
            input_example=training.input_example(data, fitted.cfg.window),
        )
        now = int(time.time() * 1000)
        run_id = run.info.run_id
        metrics = [
            Metric(k, v, now, 0, run_id=run_id, model_id=info.model_id)
            for k, v in training.run_metrics(fitted, fx.trace).items()
        ]
        metrics += [  # step 0 linked to the model as `log_model` links every step-0 metric
            Metric("val_loss", v, now, i, run_id=run_id, model_id=None if i else info.model_id)
            for i, v in enumerate(fitted.result.history)
        ]
        client.log_batch(run_id, metrics=metrics)
        plots = folder / "plots"
        plots.mkdir()
        for png in fx.plots:
            shutil.copy(png, plots / png.name)
        mlflow.log_artifacts(str(plots))  # at the root, as `_log_run`
        champion = registered_champion(client, name)  # one lookup: the decision and the alias move share it
        decision, why = _decide(mlflow, fitted, champion)
        tags = version_tags(fitted, trained_for, (decision, why), run_id, REASON, artifacts)
        describe_registered_model(client, name, model_description(data, fitted.cfg))
        description = version_description(fitted, trained_for, REASON, (decision, why), run_tags, fx.trace)
        mv = client.create_model_version(
            name, info.model_uri, run_id, tags=tags, description=description, model_id=info.model_id
        )
        version = int(mv.version)
        client.set_registered_model_alias(name, decision, str(version))
        if decision == CHAMPION and champion is not None:  # as `move_aliases`, without a second lookup
            challenger = client.get_registered_model(name).aliases.get("challenger")
            if challenger is not None and int(challenger) < version:
                client.delete_registered_model_alias(name, "challenger")
            client.set_model_version_tag(name, champion.version, "superseded_by", str(version))
        training.record_decision(client, run_id, pid, version, trained_for, (decision, why))
    return version


def _decide(mlflow: Any, fitted: Any, champion: Any) -> tuple[str, str]:
    """`training.decide` with the champion already looked up."""
    return training.judge(mlflow, champion, fitted)


# --- reads ----------------------------------------------------------------------------------------


def _all_pages(search: Callable[..., Any], **kwargs: Any) -> Iterator[Any]:
    token = None
    while True:
        page = search(page_token=token, **kwargs)
        yield from page
        token = page.token
        if not token:
            return


def champions_batched(client: Any) -> dict[int, Any]:
    """Every pattern's champion version (tags included: the digests) from two paged searches."""
    like = f"name LIKE '{MODEL_PREFIX}%'"
    aliased = {
        pid: int(rm.aliases[CHAMPION])
        for rm in _all_pages(client.search_registered_models, filter_string=like, max_results=1000)
        if (pid := pattern_id_of(rm.name)) is not None and CHAMPION in rm.aliases
    }
    return {
        pid: mv
        for mv in _all_pages(client.search_model_versions, filter_string=like, max_results=10_000)
        if (pid := pattern_id_of(mv.name)) is not None and aliased.get(pid) == int(mv.version)
    }


def load_batched(settings: Settings, mlflow: Any, mv: Any, cache: Path) -> Detector:
    """A champion's detector from a verified cache, digests from the batched search; a cold copy
    is downloaded from the logged model's artifact location, only its `artifacts/` folder."""
    digests = json.loads(mv.tags[ARTIFACTS_TAG])
    folder = cache / mv.name / str(mv.version)
    if registry._mismatch(folder / "artifacts", digests) is not None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        fresh = Path(tempfile.mkdtemp(prefix=f".{mv.version}-download-", dir=folder.parent))
        try:
            model_id = mv.model_id or mv.source.removeprefix("models:/")  # the store leaves model_id empty
            location = mlflow.MlflowClient().get_logged_model(model_id).artifact_location
            mlflow.artifacts.download_artifacts(artifact_uri=f"{location.rstrip('/')}/artifacts", dst_path=str(fresh))
            bad = registry._mismatch(fresh / "artifacts", digests)
            if bad is not None:
                raise RuntimeError(f"{mv.name} v{mv.version}: {bad} does not match its digest")
            if folder.exists():
                shutil.rmtree(folder)
            fresh.rename(folder)
        finally:
            shutil.rmtree(fresh, ignore_errors=True)
    return Detector(pattern_id_of(mv.name) or 0, int(mv.version), folder / "artifacts")


# --- (ii) one bundled model per shard --------------------------------------------------------------


def bundle_write(settings: Settings, fx: Fixture, shard: int, pids: list[int]) -> None:
    """One run and one registered version holding `pids`' artifacts, per-pattern digests in tags."""
    mlflow = setup_mlflow(settings)
    client = mlflow.MlflowClient()
    name = f"{SHARD_PREFIX}{shard}"
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_name=f"shard-{shard}") as run:
        tags = {}
        for pid in pids:
            fitted = fx.fitted(pid)
            folder = Path(tmp) / str(pid)
            folder.mkdir()
            files = training.write_artifacts(
                folder, fitted.data, fitted.prep, fitted.cfg, fitted.result.model, fitted.thresholds
            )
            files[TRACE_MODEL_ARTIFACT] = str(fx.trace.save(folder / f"{TRACE_MODEL_ARTIFACT}.json"))
            tags[f"pattern.{pid}.{ARTIFACTS_TAG}"] = json.dumps(
                registry.file_digests(Path(p) for p in files.values()), sort_keys=True
            )
        mlflow.log_artifacts(tmp, artifact_path="patterns")
        with contextlib.suppress(Exception):
            client.create_registered_model(name)
        mv = client.create_model_version(
            name, f"{run.info.artifact_uri}/patterns", run.info.run_id, tags=tags, description=f"shard {shard}"
        )
        client.set_registered_model_alias(name, CHAMPION, mv.version)


def bundle_read(settings: Settings, cache: Path) -> int:
    """Every shard's champion found with one search each kind, downloaded once, each pattern
    verified and loaded; returns the detectors loaded."""
    mlflow = setup_mlflow(settings)
    client = mlflow.MlflowClient()
    like = f"name LIKE '{SHARD_PREFIX}%'"
    aliased = {
        rm.name: int(rm.aliases[CHAMPION])
        for rm in _all_pages(client.search_registered_models, filter_string=like, max_results=1000)
    }
    loaded = 0
    for mv in _all_pages(client.search_model_versions, filter_string=like, max_results=10_000):
        if aliased.get(mv.name) != int(mv.version):
            continue
        folder = cache / mv.name / str(mv.version)
        wanted = {k.split(".")[1]: json.loads(v) for k, v in mv.tags.items() if k.startswith("pattern.")}
        if any(registry._mismatch(folder / pid, d) is not None for pid, d in wanted.items()):
            shutil.rmtree(folder, ignore_errors=True)
            folder.parent.mkdir(parents=True, exist_ok=True)
            mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(folder))
            if (folder / "patterns").is_dir():  # local copies keep the folder's own name
                for child in (folder / "patterns").iterdir():
                    child.rename(folder / child.name)
        for pid, digests in wanted.items():
            if registry._mismatch(folder / pid, digests) is not None:
                raise RuntimeError(f"{mv.name}: pattern {pid} does not match its digests")
            Detector(int(pid), int(mv.version), folder / pid)
            loaded += 1
    return loaded


# --- concurrent writers ---------------------------------------------------------------------------


def _writer(settings: Settings, epochs: int, pids: list[int], start: Any, out: Any) -> None:
    """One concurrent writer process: its own fixture, then rpcwatch's registration of `pids`."""
    import mlflow

    logging.getLogger(mlflow.__name__).setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        fx = make_fixture(Path(tmp), epochs)
        with quiet():  # this process's first registration (imports): before the start, not measured
            register_rpcwatch(settings, fx, pids[0] + WARMUP_PID)
        start.wait()
        errors: list[str] = []
        done = 0
        with quiet():
            for pid in pids:
                try:
                    register_rpcwatch(settings, fx, pid)
                    done += 1
                except Exception as err:  # noqa: BLE001  counted and reported: the point of the test
                    errors.append(f"{type(err).__name__}: {str(err)[:160]}")
        out.put((done, errors, time.perf_counter()))


def concurrent_writers(store: str, settings: Settings, epochs: int, writers: int, each: int) -> None:
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(writers + 1), ctx.Queue()
    procs = [
        ctx.Process(
            target=_writer,
            args=(
                settings,
                epochs,
                list(range(WRITER_PID_BASE + w * each, WRITER_PID_BASE + (w + 1) * each)),
                start,
                out,
            ),
        )
        for w in range(writers)
    ]
    for p in procs:
        p.start()
    try:
        start.wait(timeout=300)
        began = time.perf_counter()
        results = [out.get(timeout=1800) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    done = sum(r[0] for r in results)
    errors = [e for r in results for e in r[1]]
    wall = max(r[2] for r in results) - began
    kinds = sorted({e.split(":")[0] + ": " + e.split(":", 1)[1].strip()[:70] for e in errors})
    note = f"{len(errors)} failed" + (f" ({'; '.join(kinds[:3])})" if errors else "")
    row = Row(store, f"register_{writers}writers", done, wall, 0, note)
    ROWS.append(row)
    print(f"  {row.op:<28} {done:>6} models {wall:8.1f} s {row.per_model_ms:9.1f} ms/model  {note}", flush=True)


# --- the stores -----------------------------------------------------------------------------------


def _wait_http(url: str, seconds: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as reply:
            if reply.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server not up after {seconds} s: {log.read_text()[-2000:]}")


@contextlib.contextmanager
def postgres(keep: bool) -> Iterator[str]:
    """A throwaway PostgreSQL 15 server (tests/pg.py) with an `mlflow` database; its SQLAlchemy URI."""
    with pg.postgres(keep, prefix="bench-registry-pg-") as server:
        server.create_database("mlflow")
        print(f"  postgres {pg.PG_BIN.parent.name} on {server.host}:{server.port} in {server.folder}", flush=True)
        yield f"postgresql+psycopg2://{server.user}@{server.host}:{server.port}/mlflow"


@contextlib.contextmanager
def mlflow_server(folder: Path, backend: str, workers: int = 2) -> Iterator[str]:
    """`mlflow server` on a free loopback port, proxying artifacts in `folder`; its URL."""
    port = pg.free_port()
    log = folder / "mlflow-server.log"
    cmd = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--backend-store-uri",
        backend,
        "--serve-artifacts",
        "--artifacts-destination",
        str(folder / "mlartifacts"),
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", 180, proc, log)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: its own process group
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextlib.contextmanager
def store_settings(store: str, folder: Path, keep: bool) -> Iterator[Settings]:
    home = folder / "home"
    home.mkdir(parents=True)
    if store == "sqlite":
        yield Settings(home=home, device="cpu")
        return
    with postgres(keep) as backend, mlflow_server(folder, backend) as url:
        yield Settings(home=home, device="cpu", mlflow_tracking_uri=url)


# --- one store, all the measurements ----------------------------------------------------------------


def bench_store(store: str, args: argparse.Namespace, fx: Fixture, folder: Path) -> None:
    print(f"\n== {store}: {args.models} models ==", flush=True)
    with store_settings(store, folder, args.keep) as settings:
        mlflow = setup_mlflow(settings)  # creates the database and the experiment: not measured
        client = mlflow.MlflowClient()
        with quiet():  # first calls of each path (imports, the server's workers warming up): not measured
            register_rpcwatch(settings, fx, WARMUP_PID)
            register_lean(settings, fx, WARMUP_PID + 1)
            for pid in (WARMUP_PID, WARMUP_PID + 1):  # out of the registry again: the reads see N models
                client.delete_registered_model(model_name(pid))
        # --- (1) write
        ids = {"rpcwatch": [], "lean": []}  # type: dict[str, list[int]]
        times = {"rpcwatch": [], "lean": []}  # type: dict[str, list[float]]
        calls = {"rpcwatch": 0, "lean": 0}
        cpu = {"rpcwatch": 0.0, "lean": 0.0}
        phases = Phases()
        inner = Phases(within=(phases, LOG_MODEL))
        versions: dict[int, int] = {}
        began = time.perf_counter()
        with quiet(), phases.patched(register_phases(mlflow)), inner.patched(log_model_phases(mlflow)):
            for pid in range(args.models):
                kind = {"interleave": ("rpcwatch", "lean")[pid % 2], "rpcwatch": "rpcwatch", "lean": "lean"}[args.mix]
                register = register_rpcwatch if kind == "rpcwatch" else register_lean
                if kind == "lean":  # time only rpcwatch's own calls in the breakdown
                    phases.depth += 1
                c, t, u = Calls.count, time.perf_counter(), time.process_time()
                versions[pid] = register(settings, fx, pid)
                times[kind].append(time.perf_counter() - t)
                calls[kind] += Calls.count - c
                cpu[kind] += time.process_time() - u
                ids[kind].append(pid)
                if kind == "lean":
                    phases.depth -= 1
                if (pid + 1) % max(args.models // 10, 1) == 0:
                    say(f"  registered {pid + 1}/{args.models} ({time.perf_counter() - began:.0f} s)")
        for kind, op in (("rpcwatch", "register"), ("lean", "register_lean")):
            if took := times[kind]:
                tenth = max(len(took) // 10, 1)
                first, last = (1000 * statistics.mean(part) for part in (took[:tenth], took[-tenth:]))
                growth = f"first/last tenth {first:.0f}/{last:.0f} ms"
                ROWS.append(Row(store, op, len(took), sum(took), calls[kind], growth, cpu[kind]))
        registered = sum(len(t) for t in times.values())
        if times["rpcwatch"]:
            total = sum(times["rpcwatch"])
            shown = sorted(phases.seconds.items(), key=lambda kv: -kv[1])
            other = total - sum(phases.seconds.values())
            n = len(times["rpcwatch"])
            NOTES.append(
                f"{store} register (rpcwatch's register_fitted, {n} models) per model: "
                + ", ".join(f"{k} {1000 * v / n:.0f} ms" for k, v in shown)
                + f", other {1000 * other / n:.0f} ms"
            )
            shown = sorted(inner.seconds.items(), key=lambda kv: -kv[1])
            rest = phases.seconds[LOG_MODEL] - sum(inner.seconds.values())
            NOTES.append(
                f"{store} inside {LOG_MODEL} per model: "
                + ", ".join(f"{k} {1000 * v / n:.0f} ms" for k, v in shown)
                + f", other {1000 * rest / n:.0f} ms"
            )
        known = set(versions.items())
        # --- (2) look up the champions
        with measured(store, "mirror_hourly", registered):
            mirror = registry_mirror(settings, known)
        assert mirror is not None and sum(v is not None for v in mirror.champions.values()) == registered
        with measured(store, "mirror_rebuild", registered):
            mirror = registry_mirror(settings, set())
        assert mirror is not None and len(mirror.missing) == registered
        with measured(store, "champion_by_alias", registered):
            for pid in versions:
                assert registered_champion(client, model_name(pid)) is not None
        with measured(store, "champions_batched", registered):
            batched = champions_batched(client)
        assert len(batched) == registered
        # --- (3) load the champions' artifacts (scoring: Detector.load -> registry.cached_artifacts)
        shutil.rmtree(settings.home / "model-cache", ignore_errors=True)
        registry._DIGESTS.clear()
        with measured(store, "load_cold", registered):
            for pid, v in versions.items():
                Detector.load(settings, pid, v)
        registry._DIGESTS.clear()
        with measured(store, "load_warm_new_process", registered):
            for pid, v in versions.items():
                Detector.load(settings, pid, v)
        with measured(store, "load_warm_same_process", registered):
            for pid, v in versions.items():
                Detector.load(settings, pid, v)
        cache = settings.home / "model-cache-batched"
        with measured(store, "load_cold_batched", registered, "incl. the batched search"):
            mlflow = setup_mlflow(settings)
            for mv in champions_batched(client).values():
                load_batched(settings, mlflow, mv, cache)
        with measured(store, "load_warm_batched", registered, "incl. the batched search"):
            for mv in champions_batched(client).values():
                load_batched(settings, mlflow, mv, cache)
        # --- (ii) one bundled model per shard
        shards = [list(range(s, min(s + args.shard, args.models))) for s in range(0, args.models, args.shard)]
        with quiet(), measured(store, f"bundle_write_{args.shard}", args.models, f"{len(shards)} shard versions"):
            for k, pids in enumerate(shards):
                bundle_write(settings, fx, k, pids)
        bundles = settings.home / "bundle-cache"
        with measured(store, "bundle_load_cold", args.models):
            assert bundle_read(settings, bundles) == args.models
        with measured(store, "bundle_load_warm", args.models):
            assert bundle_read(settings, bundles) == args.models
        # --- steady state: a second version of some patterns (decide downloads and scores the champion)
        if args.retrain:
            some = ids["rpcwatch"][: args.retrain] or list(versions)[: args.retrain]
            with quiet(), measured(store, "retrain", len(some), "v2: decide scores the champion"):
                for pid in some:
                    register_rpcwatch(settings, fx, pid, RETRAINED_FOR)
        # --- concurrent writers (Airflow shards training at once)
        if args.writers > 1:
            concurrent_writers(store, settings, args.epochs, args.writers, args.writer_models)
        size = sum(f.stat().st_size for f in (folder / "home").rglob("*") if f.is_file())
        NOTES.append(f"{store}: home folder {size / 1e6:.0f} MB after the run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=1000, help="pattern models registered (and read)")
    parser.add_argument("--store", choices=("sqlite", "server", "both"), default="both")
    parser.add_argument(
        "--mix",
        choices=("interleave", "rpcwatch", "lean"),
        default="interleave",
        help="how the N are registered: alternately rpcwatch's path and the lean one (default), or all one way",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=80,
        help="val_loss steps each run logs (epochs: a 48-hour, 22-RPC pattern early-stopped after 87 here)",
    )
    parser.add_argument("--retrain", type=int, default=20, help="patterns given a second version (0: none)")
    parser.add_argument(
        "--writers", type=int, default=4, help="concurrent writer processes (<2: skip); RPCWATCH_TRAIN_SHARDS is 4"
    )
    parser.add_argument("--writer-models", type=int, default=10, help="models each concurrent writer registers")
    parser.add_argument("--shard", type=int, default=50, help="patterns per bundled model (alternative ii)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folders (stores, artifacts)")
    args = parser.parse_args()
    import mlflow  # first: its import sets its loggers' level

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger(mlflow.__name__).setLevel(logging.ERROR)  # "Validating input example ..." per model
    Calls.install()
    stores = ("sqlite", "server") if args.store == "both" else (args.store,)
    root = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    started = time.perf_counter()
    try:
        fx = make_fixture(root / "fixture", args.epochs)
        sizes = {p.name: p.stat().st_size for p in (root / "fixture").glob("*.png")}
        print(f"fixture: one model fitted, plots {sorted(sizes.values())} bytes, rendered in {fx.plot_s:.2f} s")
        NOTES.append(
            f"not in any figure above: rendering a training's 3 forecast plots ({fx.plot_s:.2f} s once here); "
            "the plots are uploaded pre-rendered"
        )
        for store in stores:
            bench_store(store, args, fx, root / store)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\nall done in {time.perf_counter() - started:.0f} s")
    print(
        f"\n{'store':<7} {'op':<28} {'models':>6} {'total_s':>9} {'per_model_ms':>12} "
        f"{'calls_per_model':>15} {'client_cpu_s':>12}  note"
    )
    for r in ROWS:
        per_call = f"{r.calls / max(r.models, 1):.1f}" if r.calls else "-"
        cpu = f"{r.cpu_s:.1f}" if r.cpu_s is not None else "-"
        print(
            f"{r.store:<7} {r.op:<28} {r.models:>6} {r.total_s:>9.1f} {r.per_model_ms:>12.1f} "
            f"{per_call:>15} {cpu:>12}  {r.note}"
        )
    for note in NOTES:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
