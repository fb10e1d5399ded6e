"""Names and lookups of pattern models, one place for each: the MLflow registry and its DuckDB mirror.

A pattern's model is registered in MLflow as `rpcwatch-pattern-<id>` (experiment `rpcwatch`); its
current champion is the version the registry's `champion` alias points to. The registry is the
source of truth: each version carries its tags from the moment it exists (graph hash, decision,
and `artifacts_sha256`, the digest of every artifact file, so a cached copy can be verified before
it is trusted).

- `champions(con)` / `first_champion_at(con)`: read DuckDB's `models` mirror. Everything that asks
  "which model judges pattern p?" asks here.
- `cached_artifacts`: a version's artifact folder under `<home>/model-cache`, verified against the
  registry (reads the registry, writes only the cache folder).
- `registry_mirror`: the registry as `models` rows (reads the registry; `tasks.models.retrain`
  writes them into `models` when it reconciles the mirror).
- `setup_mlflow`: the experiment, tagged as model training (`mlflow.experimentKind`; MLflow 3.17's UI
  picks its view from the link instead: `tasks.models.tracking.experiment_url`); on the embedded store
  it first makes the store ready where a crash cannot leave it half-built (`tasks.models.store`)
  and re-addresses the artifacts of a home that was moved or copied (`relocate_artifacts`); once
  per process it fails the runs a dead process left open (`close_orphaned_runs`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import duckdb

from tasks.clock import naive_utc
from tasks.models.store import ensure_store, sqlite_file
from tasks.settings import Settings

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

log = logging.getLogger(__name__)
EXPERIMENT = "rpcwatch"
MODEL_PREFIX = "rpcwatch-pattern-"
CHAMPION = "champion"
CHALLENGER = "challenger"  # alias: the newest version that did not beat the champion (none once a newer one wins)
# the experiment's kind: the key and value MLflow's UI writes for a "Machine learning" experiment.
# MLflow 3.17's UI does not read it to pick a view (the link does, `tracking.MODEL_TRAINING_VIEW`);
# kept for what does read it: other MLflow versions, search (`tags."mlflow.experimentKind"`)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
ARTIFACTS_TAG = "artifacts_sha256"  # model-version tag: JSON {artifact file name: sha256 hex}


def model_name(pattern_id: int) -> str:
    return f"{MODEL_PREFIX}{pattern_id}"


def pattern_id_of(name: str) -> int | None:
    """The pattern id of a registered model name; None for a model that is not a pattern's."""
    suffix = name.removeprefix(MODEL_PREFIX)
    return int(suffix) if name.startswith(MODEL_PREFIX) and suffix.isdigit() else None


# --- the champion lookup on DuckDB's `models` mirror ------------------------------------------------


@dataclass(frozen=True)
class ChampionRow:
    """A pattern's current champion as DuckDB's `models` mirror records it."""

    pattern_id: int
    model_version: int
    run_id: str
    graph_hash: str
    trained_for: datetime
    calibrated_mape_calls: float | None


CHAMPIONS_SQL = """
SELECT pattern_id, max(model_version), arg_max(run_id, model_version), arg_max(graph_hash, model_version),
       arg_max(trained_for, model_version), arg_max(calibrated_mape_calls, model_version)
FROM models WHERE decision = 'champion' GROUP BY pattern_id ORDER BY pattern_id
"""


def champions(con: duckdb.DuckDBPyConnection) -> dict[int, ChampionRow]:
    """Every pattern's current champion (the newest version whose decision is `champion`)."""
    return {
        int(r[0]): ChampionRow(int(r[0]), int(r[1]), r[2], r[3], r[4], r[5])
        for r in con.execute(CHAMPIONS_SQL).fetchall()
    }


def first_champion_at(con: duckdb.DuckDBPyConnection) -> datetime | None:
    """When the first champion of any pattern was trained (before it, nothing could be scored)."""
    row = con.execute("SELECT min(trained_for) FROM models WHERE decision = 'champion'").fetchone()
    return row[0] if row else None


# --- MLflow ----------------------------------------------------------------------------------------


def tracking_uri(settings: Settings) -> str:
    uri = settings.mlflow_tracking_uri
    if uri is None:  # Settings.__post_init__ always sets it; this narrows the type
        raise ValueError("settings without an MLflow tracking URI")
    return uri


def setup_mlflow(settings: Settings) -> ModuleType:
    """The `mlflow` module pointed at the settings' tracking server, experiment `rpcwatch` created
    (artifacts under the home when the tracking store is sqlite), tagged as model training, and set.
    A home that was moved or copied has its artifacts re-addressed first (`relocate_artifacts`)."""
    import mlflow

    uri = tracking_uri(settings)
    ensure_store(uri)  # before MLflow opens it: MLflow would create or migrate it in place
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        location = None
        if uri.startswith("sqlite"):
            settings.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
            location = settings.mlflow_artifacts.resolve().as_uri()
        experiment_id = mlflow.create_experiment(
            EXPERIMENT, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        )
    else:
        experiment_id = experiment.experiment_id
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # created before the tag existed
            mlflow.MlflowClient().set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        relocate_artifacts(settings, experiment.artifact_location)
    mlflow.set_experiment(EXPERIMENT)
    if uri not in _SWEPT:
        close_orphaned_runs(mlflow.MlflowClient(), experiment_id)
        _SWEPT.add(uri)
    return mlflow


# Where the embedded store (sqlite) records artifact URIs. MLflow resolves a local artifact location
# to an absolute `file://` URI when it creates the experiment, and copies it into every run, logged
# model and model version (a relative location would be resolved against the working directory,
# and `mlflow-artifacts:` URIs need a tracking *server*). So the home's URIs are absolute and are
# re-addressed when the home is found elsewhere. The team deployment's `mlflow server
# --artifacts-destination` records `mlflow-artifacts:/...` URIs instead: portable as they are.
_ARTIFACT_URI_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
    ("model_versions", "source"),
)


def _home_database(settings: Settings) -> Path | None:
    """The sqlite file of the embedded store when it lives in the home (None: another store)."""
    db = sqlite_file(tracking_uri(settings))
    return db if db is not None and db.parent == settings.home.resolve() else None


def relocate_artifacts(settings: Settings, recorded: str | None = None) -> int:
    """Re-address the artifact URIs of a home that was moved or copied: every URI under the
    experiment's `recorded` artifact root (`file://<old home>/mlartifacts`; read from the store when
    not given) is rewritten under this home's `mlartifacts`, in one sqlite transaction (idempotent:
    a second process finds nothing to rewrite). Only for the embedded store in the home, and only
    when the root is such a folder. `setup_mlflow` calls it; call it before serving a moved home's
    store with `mlflow server`/`mlflow ui` (it makes the store ready first, `ensure_store`: the
    server would otherwise create or migrate it in place). Returns the URIs rewritten."""
    ensure_store(tracking_uri(settings))
    db = _home_database(settings)
    if db is None or not db.exists():
        return 0
    if recorded is None:
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as con:
            try:
                row = con.execute("SELECT artifact_location FROM experiments WHERE name = ?", [EXPERIMENT]).fetchone()
            except sqlite3.OperationalError:  # an empty database: nothing recorded yet
                return 0
        if row is None or row[0] is None:
            return 0
        recorded = str(row[0])
    here = settings.mlflow_artifacts.resolve().as_uri()
    if recorded == here or not recorded.startswith("file:") or not recorded.endswith("/mlartifacts"):
        return 0
    changed = 0
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as con, con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        for table, column in _ARTIFACT_URI_COLUMNS:
            if table in tables:  # names from the constant above, never from input
                changed += con.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                    f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                    [here, len(recorded) + 1, recorded, len(recorded) + 1, recorded + "/"],
                ).rowcount
    log.warning("the home moved: %s artifact URIs re-addressed from %s to %s", changed, recorded, here)
    return changed


# --- runs a dead process left open ----------------------------------------------------------------

# run tags naming the process that holds a run open (`tasks.models.tracking.launch_tags` sets them)
HOST_TAG = "rpcwatch.host"
PID_NAMESPACE_TAG = "rpcwatch.pid_namespace"  # containers on one host may reuse host names and pids
PID_TAG = "rpcwatch.pid"
FAILED_REASON_TAG = "rpcwatch.failed_reason"  # why `close_orphaned_runs` failed a run
# a run is open only while a fitted model is logged and registered (seconds to minutes); one open
# for longer than twice the DAG's `train` timeout (60 min) has lost its process, wherever it ran
ORPHANED_AFTER = timedelta(hours=2)
_SWEPT: set[str] = set()  # tracking URIs whose open runs this process checked


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:  # no /proc (not Linux): the host name alone tells hosts apart
        return ""


def process_tags() -> dict[str, str]:
    """This process as run tags: host, pid namespace, pid."""
    return {HOST_TAG: socket.gethostname(), PID_NAMESPACE_TAG: _pid_namespace(), PID_TAG: str(os.getpid())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def why_orphaned(tags: Mapping[str, str], started_ms: int, now_ms: int) -> str | None:
    """Why a RUNNING run has no live process (None: it may have one). Safe with parallel trainings:
    a run is judged by its process only on the host (and pid namespace) that started it, where a
    pid that no longer exists is proof; elsewhere only by its age (`ORPHANED_AFTER`). A reused pid
    reads as alive: the run waits for the age rule."""
    here, pid = process_tags(), tags.get(PID_TAG, "")
    same_host = all(tags.get(k) == here[k] for k in (HOST_TAG, PID_NAMESPACE_TAG))
    if same_host and pid.isdigit() and int(pid) > 0 and not _alive(int(pid)):
        return f"its process {pid} on {here[HOST_TAG]} is gone (killed while the run was open)"
    hours = (now_ms - started_ms) / 3_600_000
    if hours > ORPHANED_AFTER.total_seconds() / 3600:
        return f"open for {hours:.1f} h, longer than any training holds a run ({ORPHANED_AFTER})"
    return None


def close_orphaned_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Fail the experiment's runs a dead process left RUNNING (`why_orphaned`), each tagged
    `rpcwatch.failed_reason`. A run with a registered version keeps everything (the registry points
    at its model); one without has its logged models and artifacts deleted: nothing can ever use
    them, and each such crash left a full model behind. Returns the runs failed."""
    search = functools.partial(client.search_runs, [experiment_id])
    now = int(time.time() * 1000)
    closed = []
    for run in _pages(search, "attributes.status = 'RUNNING'"):
        why = why_orphaned(run.data.tags, run.info.start_time, now)
        if why is None:
            continue
        run_id = run.info.run_id
        versions = [f"{v.name} v{v.version}" for v in client.search_model_versions(f"run_id = '{run_id}'")]
        if versions:
            why += f"; kept, registered as {', '.join(versions)}"
        else:
            why += f"; {_delete_unregistered(client, experiment_id, run)}"
        client.set_tag(run_id, FAILED_REASON_TAG, why)  # artifacts first, then the status: a rerun finishes it
        client.set_terminated(run_id, "FAILED")
        log.warning("MLflow run %s (%s) marked FAILED: %s", run_id, run.info.run_name, why)
        closed.append(run_id)
    return closed


def _delete_unregistered(client: MlflowClient, experiment_id: str, run: Run) -> str:
    """Delete a never-registered run's logged models and artifacts; what was done, for its reason tag."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    run_id = run.info.run_id
    models = list(client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'"))
    locations = [m.artifact_location for m in models] + [run.info.artifact_uri]
    try:
        for location in locations:
            get_artifact_repository(location).delete_artifacts()
        for m in models:
            client.delete_logged_model(m.model_id)
    except (MlflowException, OSError) as err:  # a store that refuses deletes: listed instead
        log.warning("run %s: its unregistered artifacts could not be deleted (%s): %s", run_id, err, locations)
        return f"never registered; its artifacts could not be deleted ({err}), left at {', '.join(locations)}"
    names = ", ".join(m.model_id for m in models) or "none"
    return f"never registered: its logged models ({names}) and artifacts deleted"


def registered_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    """The version the `champion` alias of registered model `name` points to; None without one."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except Exception:  # noqa: BLE001  (MLflow raises a generic RestException when the alias is absent)
        return None


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
def _client(uri: str) -> MlflowClient:
    """A registry client for reads (no experiment set-up: one query per version looked up)."""
    from mlflow import MlflowClient

    ensure_store(uri)
    return MlflowClient(tracking_uri=uri)


def _registered_digests(settings: Settings, name: str, version: int) -> dict[str, str] | None:
    key = (tracking_uri(settings), name, version)
    if key not in _DIGESTS:
        tags = _client(key[0]).get_model_version(name, str(version)).tags
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
    _DIGESTS[(tracking_uri(settings), name, version)] = _download(settings, name, version, folder, digests)
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


@dataclass(frozen=True)
class ModelRow:
    """One row of DuckDB's `models` table: a registered version as staleness and scoring read it."""

    pattern_id: int
    model_name: str
    model_version: int
    run_id: str | None
    graph_hash: str | None
    pattern_version: int | None
    trained_for: datetime
    decision: str  # champion | challenger | demoted | unpromoted
    reason: str
    stale_reason: str
    val_mape_calls: float | None
    poisson_floor_calls: float | None
    seasonal_naive_mape_calls: float | None
    moving_average_mape_calls: float | None
    no_graph_mape_calls: float | None
    calibrated_mape_calls: float | None
    seconds: float | None
    device: str | None
    recorded_at: datetime


@dataclass(frozen=True)
class RegistryMirror:
    """What DuckDB's `models` must agree with: per registered pattern the version its `champion`
    alias points to (None: no alias), and the rows of registered versions the mirror lacks."""

    champions: dict[int, int | None]
    missing: list[ModelRow]


def _pages(search: Callable[..., Any], filter_string: str) -> Iterator[Any]:
    """Every result of a paged MLflow search."""
    token = None
    while True:
        page = search(filter_string=filter_string, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def registry_mirror(settings: Settings, known: set[tuple[int, int]]) -> RegistryMirror | None:
    """The registry as DuckDB's `models` mirrors it, with a row for every registered (pattern,
    version) not in `known`. None when no registry exists yet."""
    db = sqlite_file(tracking_uri(settings))
    if db is not None and not db.exists():
        return None  # nothing was ever registered: do not create a registry just to read it
    client = setup_mlflow(settings).MlflowClient()
    like = f"name LIKE '{MODEL_PREFIX}%'"
    aliased: dict[int, int | None] = {}
    for registered in _pages(client.search_registered_models, like):
        alias = registered.aliases.get(CHAMPION)
        if (pid := pattern_id_of(registered.name)) is not None:
            aliased[pid] = int(alias) if alias is not None else None
    rows = [
        _mirrored_row(client, pid, mv, aliased[pid])
        for mv in _pages(client.search_model_versions, like)
        if (pid := pattern_id_of(mv.name)) is not None and pid in aliased and (pid, int(mv.version)) not in known
    ]
    return RegistryMirror(aliased, rows)


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


def _trained_for(mv: ModelVersion) -> datetime:
    """The hour a version was trained for (its tag), else when it was registered."""
    if "trained_for" in mv.tags:
        return naive_utc(datetime.fromisoformat(mv.tags["trained_for"]))
    return naive_utc(datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC))


def _mirrored_row(client: MlflowClient, pattern_id: int, mv: ModelVersion, champion: int | None) -> ModelRow:
    """A `models` row rebuilt from a version's tags and its run (metrics, params)."""
    from mlflow.exceptions import MlflowException

    tags, version = mv.tags, int(mv.version)
    try:
        run = client.get_run(mv.run_id) if mv.run_id else None
    except MlflowException:  # run purged: the tags still say enough
        run = None
    m, params = (run.data.metrics, run.data.params) if run else ({}, {})
    decision = _mirrored_decision(version, tags.get("decision"), champion)
    val = m.get("model_mape_calls", float(tags["val_mape_calls"]) if "val_mape_calls" in tags else None)
    reason = tags.get("reason", "")
    if decision != tags.get("decision"):
        reason = f"registered as {tags.get('decision', '?')} but the champion alias is on v{champion}; {reason}"
    pattern_version = tags.get("pattern_version", params.get("pattern_version"))
    return ModelRow(
        pattern_id=pattern_id,
        model_name=mv.name,
        model_version=version,
        run_id=mv.run_id,
        graph_hash=tags.get("graph_hash", params.get("graph_hash")),
        pattern_version=int(pattern_version) if pattern_version else None,
        trained_for=_trained_for(mv),
        decision=decision,
        reason=reason,
        stale_reason=tags.get("stale_reason", ""),
        val_mape_calls=val,
        poisson_floor_calls=m.get("poisson_floor_calls"),
        seasonal_naive_mape_calls=m.get("seasonal_naive_mape_calls"),
        moving_average_mape_calls=m.get("moving_average_mape_calls"),
        no_graph_mape_calls=m.get("no_graph_mape_calls"),
        calibrated_mape_calls=val,
        seconds=None,
        device=params.get("device"),
        recorded_at=naive_utc(datetime.now(UTC)),
    )
