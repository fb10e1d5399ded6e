"""The embedded MLflow store (sqlite in the home) is created and upgraded where a crash cannot leave
it half-built. MLflow creates and migrates a store in place, in many statements: a `kill -9` in the
middle of its migration ("Updating database tables") left a home in which every later run failed.
Here the kill is real: `RPCWATCH_CRASH_AT=migrating` (tasks/failpoints.py) makes the process
SIGKILL itself right after the migration created its first `_alembic_tmp_` table."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.models import store
from tasks.models.registry import EXPERIMENT, model_name, setup_mlflow
from tasks.settings import Settings

# the pipeline's first touch of the registry (training calls it before its run)
PIPELINE_SETUP = "from tasks.settings import load_settings; from tasks.models.registry import setup_mlflow; " + (
    "setup_mlflow(load_settings())"
)
# what an older rpcwatch (or `mlflow server` / `mlflow db upgrade`) did: MLflow migrating in place
MLFLOW_IN_PLACE = "import sys, mlflow.db; from tasks.failpoints import crash_in_migration; crash_in_migration(); " + (
    "mlflow.db.upgrade.callback(sys.argv[1])"
)


def _killed_while_migrating(home: Path, code: str, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RPCWATCH_")}
    env |= {"RPCWATCH_HOME": str(home), "RPCWATCH_CRASH_AT": "migrating"}
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, f"not killed mid-migration ({done.returncode}): {done.stderr[-2000:]}"


def _tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as con:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _revision(db: Path) -> str | None:
    with sqlite3.connect(db) as con:
        row = con.execute("SELECT version_num FROM alembic_version").fetchone()
    return row[0] if row else None


def _register_a_model(settings: Settings) -> int:
    """A run with an artifact, registered as a model version: the registry is usable."""
    mlflow = setup_mlflow(settings)
    client = mlflow.MlflowClient()
    with mlflow.start_run() as run:
        mlflow.log_text("weights", "model/weights.txt")
    client.create_registered_model(model_name(1))
    version = client.create_model_version(model_name(1), f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    return int(version.version)


def _head() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def _older_store(db: Path, revision: str) -> None:
    """A store as an older MLflow left it: migrated up to `revision` only, with an experiment and a tag."""
    import sqlalchemy
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

    db.parent.mkdir(parents=True, exist_ok=True)
    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    InitialBase.metadata.create_all(engine)
    config = _get_alembic_config(f"sqlite:///{db}")
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    engine.dispose()
    with sqlite3.connect(db) as con:
        con.execute(
            "INSERT INTO experiments (experiment_id, name, artifact_location, lifecycle_stage, creation_time, "
            "last_update_time) VALUES (7, 'kept', 'file:///nowhere', 'active', 0, 0)"
        )
        con.execute("INSERT INTO experiment_tags (key, value, experiment_id) VALUES ('owner', 'ops', 7)")


# the revision before "increase experiment tag value limit": its upgrade rebuilds `experiment_tags`
# through `_alembic_tmp_experiment_tags` (alembic's batch mode on sqlite)
BEFORE_BATCH_MIGRATION = "1971f2d9a75b"


@pytest.fixture(autouse=True)
def _fresh_process_cache(monkeypatch):
    """Each test starts as a new process would: no store checked yet."""
    monkeypatch.setattr(store, "_READY", set())


def test_a_kill_while_mlflow_migrates_a_fresh_store_leaves_the_home_usable(settings):
    """The report's sequence: a fresh home, the pipeline creating the store, kill -9 mid-migration,
    then the next run in the same home."""
    _killed_while_migrating(settings.home, PIPELINE_SETUP)
    db = settings.home / "mlflow.db"
    half_built = db.exists() and any(t.startswith("_alembic_tmp_") for t in _tables(db))
    assert _register_a_model(settings) == 1
    assert not half_built, "only a fully migrated store is ever at the real path"
    assert _revision(db) == _head()
    leftovers = [p.name for p in settings.home.iterdir() if p.name.startswith(".mlflow.db")]
    assert leftovers == [], "the killed process's temporary store is cleaned up"


def test_a_store_an_older_rpcwatch_left_half_migrated_is_rebuilt(settings, caplog):
    """Homes broken before the fix: MLflow was killed while creating the store in place. Such a
    store holds no run, experiment or model (its migration never finished): it is rebuilt."""
    db = settings.home / "mlflow.db"
    settings.home.mkdir(parents=True)
    _killed_while_migrating(settings.home, MLFLOW_IN_PLACE, f"sqlite:///{db}")
    assert any(t.startswith("_alembic_tmp_") for t in _tables(db)), "the kill left MLflow's half-built store"
    assert _register_a_model(settings) == 1
    assert not any(t.startswith("_alembic_tmp_") for t in _tables(db))
    assert "rebuilt" in caplog.text


def test_an_older_schema_is_upgraded_on_a_copy_and_the_original_kept(settings):
    """A home from an older MLflow: upgraded on a copy, swapped in; its data kept; the original
    file kept beside it (MLflow: "take a backup of your database, then run mlflow db upgrade")."""
    db = settings.home / "mlflow.db"
    _older_store(db, BEFORE_BATCH_MIGRATION)
    mlflow = setup_mlflow(settings)
    assert _revision(db) == _head()
    assert mlflow.get_experiment_by_name("kept").tags == {"owner": "ops"}
    assert mlflow.get_experiment_by_name(EXPERIMENT) is not None
    [backup] = settings.home.glob("mlflow.db.before-upgrade-*")
    assert _revision(backup) == BEFORE_BATCH_MIGRATION


def test_an_upgrade_killed_mid_migration_is_repaired_on_a_copy(settings):
    """`mlflow db upgrade` (or an older rpcwatch) killed while rebuilding a table: the store holds
    data and a leftover `_alembic_tmp_experiment_tags`, and MLflow's own upgrade now fails with
    "table _alembic_tmp_experiment_tags already exists". The leftover is a partial copy (the
    original table is still there): dropped on a copy, the upgrade rerun, the result swapped in."""
    db = settings.home / "mlflow.db"
    _older_store(db, BEFORE_BATCH_MIGRATION)
    _killed_while_migrating(settings.home, MLFLOW_IN_PLACE, f"sqlite:///{db}")
    assert "_alembic_tmp_experiment_tags" in _tables(db)
    mlflow = setup_mlflow(settings)
    assert _revision(db) == _head() and not any(t.startswith("_alembic_tmp_") for t in _tables(db))
    assert mlflow.get_experiment_by_name("kept").tags == {"owner": "ops"}


def test_a_half_migrated_store_whose_rows_only_the_leftover_holds_is_named_in_a_one_line_error(settings):
    """Killed between dropping a table and renaming its rebuilt copy: the rows exist only in the
    leftover. Nothing is touched; the error names the file, the table and what to do."""
    db = settings.home / "mlflow.db"
    _older_store(db, BEFORE_BATCH_MIGRATION)
    with sqlite3.connect(db) as con:  # the state between alembic's DROP and RENAME
        con.execute("CREATE TABLE _alembic_tmp_experiment_tags AS SELECT * FROM experiment_tags")
        con.execute("DROP TABLE experiment_tags")
    before = db.read_bytes()
    with pytest.raises(RuntimeError) as err:
        setup_mlflow(settings)
    message = str(err.value)
    assert "\n" not in message and str(db) in message and "_alembic_tmp_experiment_tags" in message
    assert "restore" in message
    assert db.read_bytes() == before, "the store is left as it was"
