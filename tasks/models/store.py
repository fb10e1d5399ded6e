"""The embedded MLflow store (a sqlite file, `<home>/mlflow.db` by default), made ready before MLflow
opens it, where a crash cannot leave it half-built.

MLflow creates a store, and upgrades an older one, in place: dozens of statements, not one
transaction (alembic rebuilds a sqlite table by copying it into `_alembic_tmp_<table>`, dropping it
and renaming the copy). A `kill -9` in between leaves a file every later run fails on ("table
_alembic_tmp_... already exists", "duplicate column"). `ensure_store` instead:

- creates a new store in a temporary file next to the real one, lets MLflow migrate it there (what
  `mlflow db upgrade` does), and renames it into place: only a fully migrated file is ever there;
- upgrades a store of an older schema on a copy, swapped in by a rename; the original is kept as
  `<name>.before-upgrade-<UTC time>` (MLflow: "take a backup of your database" first);
- rebuilds a store a killed migration left half-done when it holds no row (it was being created),
  repairs one with data on a copy (the leftover `_alembic_tmp_` copies dropped, the upgrade rerun),
  and when a leftover holds the only copy of a table's rows, touches nothing and raises a one-line
  error saying what to do.

Once per process and file, under a lock on the file's folder; tracking servers (`http://...`) and
other databases migrate their own store. Uses the functions of MLflow's `mlflow db upgrade`
(`mlflow.store.db.utils`, private: the pinned MLflow version is what tests/models/test_mlflow_store.py
runs against).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

LEFTOVER_PREFIX = "_alembic_tmp_"  # alembic's copy of a sqlite table being rebuilt
_LEFTOVER = re.compile(r"_alembic_tmp_[A-Za-z0-9_]+")
_READY: set[Path] = set()  # stores this process found ready: checked once, not on every call


def sqlite_file(uri: str) -> Path | None:
    """The file of a `sqlite:///` tracking URI; None for a server, another database or `:memory:`."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path).resolve() if path and path != ":memory:" else None


def ensure_store(uri: str) -> None:
    """The sqlite store at `uri` created, upgraded or repaired (see the module), before MLflow opens it."""
    db = sqlite_file(uri)
    if db is None or (db in _READY and db.exists()):
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with _locked(db.parent):
        _discard_temporaries(db)
        if not db.exists() or db.stat().st_size == 0:
            _create(db)
        else:
            _make_current(db, _inspect(db))
    _READY.add(db)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One process at a time creates or upgrades the stores of `folder` (released when it dies)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _temporary(db: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{db.name}.", suffix=".tmp", dir=db.parent)
    os.close(fd)
    return Path(name)


def _discard_temporaries(db: Path) -> None:
    """Temporary stores (and their journals) of processes killed while building one: under the lock,
    nobody else can be writing them."""
    for path in db.parent.glob(f".{db.name}.*.tmp*"):
        path.unlink(missing_ok=True)


def _swap_in(built: Path, db: Path) -> None:
    """Rename a fully built store over `db`, durably (its data, then the folder entry, on disk)."""
    with open(built, "rb") as f:
        os.fsync(f.fileno())
    os.replace(built, db)
    fd = os.open(db.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create(db: Path) -> None:
    fresh = _temporary(db)
    try:
        _migrate(fresh)
        _swap_in(fresh, db)
    finally:
        fresh.unlink(missing_ok=True)


def _migrate(path: Path) -> None:
    """What `mlflow db upgrade` does, on `path`: an empty file gets every table, an older one is
    upgraded; then the schema is checked at MLflow's head with every column its models use."""
    import sqlalchemy
    from mlflow.store.db import utils as db_utils

    from tasks.failpoints import crash_in_migration

    crash_in_migration()  # crash-safety tests: killed in the middle of MLflow's migration
    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    try:
        if db_utils._is_empty_database(engine):
            db_utils._initialize_tables(engine)
        else:
            db_utils._upgrade_db(engine)
        db_utils._verify_schema(engine)
    finally:
        engine.dispose()
    missing = _missing_columns(path)
    if missing:
        raise RuntimeError(f"the migrated schema lacks {', '.join(missing[:5])}")


def _missing_columns(path: Path) -> list[str]:
    """`table.column`s MLflow's models use that the store at `path` lacks."""
    from mlflow.store.db.base_sql_model import Base

    with contextlib.closing(sqlite3.connect(path)) as con:
        missing = []
        for table in Base.metadata.sorted_tables:
            have = {r[0] for r in con.execute("SELECT name FROM pragma_table_xinfo(?)", [table.name])}
            missing += [f"{table.name}.{c.name}" for c in table.columns if c.name not in have]
    return missing


@dataclass(frozen=True)
class StoreState:
    """What a store's file says about its schema."""

    revision: str | None  # alembic's version; None: a migration never finished one
    leftovers: list[str]  # `_alembic_tmp_<table>` tables a killed migration left
    orphaned: list[str]  # leftovers whose original table is gone: they hold its only rows
    holds_rows: bool  # any row outside alembic's bookkeeping


def _inspect(db: Path) -> StoreState:
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        row = con.execute("SELECT version_num FROM alembic_version").fetchone() if "alembic_version" in tables else None
        leftovers = sorted(t for t in tables if _LEFTOVER.fullmatch(t))
        holds_rows = any(
            con.execute(f'SELECT 1 FROM "{t}" LIMIT 1').fetchone()  # catalog names, quoted; never input
            for t in sorted(tables)
            if t != "alembic_version" and not t.startswith("sqlite_") and '"' not in t
        )
    orphaned = [t for t in leftovers if t.removeprefix(LEFTOVER_PREFIX) not in tables]
    return StoreState(row[0] if row else None, leftovers, orphaned, holds_rows)


def _head() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return _get_latest_schema_revision()


def _known(revision: str) -> bool:
    """Whether this MLflow's migrations know `revision` (a store a newer MLflow wrote: they do not)."""
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    try:
        return ScriptDirectory.from_config(_get_alembic_config("")).get_revision(revision) is not None
    except Exception:  # noqa: BLE001  (alembic raises several kinds for an unknown revision)
        return False


def _make_current(db: Path, state: StoreState) -> None:
    head = _head()
    if state.revision == head and not state.leftovers:
        return  # the usual case: ready
    if state.revision is not None and not _known(state.revision):
        raise RuntimeError(
            f"{db}: MLflow schema {state.revision} is not one this MLflow knows (head {head}; written by a newer "
            "MLflow?): use the MLflow version that wrote it, or point RPCWATCH_MLFLOW_TRACKING_URI at another store"
        )
    if not state.holds_rows:  # being created when its process died (or never used): nothing to keep
        log.warning(
            "%s: schema %s, leftover tables %s, and no run or model in it: rebuilt at schema %s",
            db,
            state.revision,
            ", ".join(state.leftovers) or "none",
            head,
        )
        _create(db)
        return
    if state.orphaned:
        raise RuntimeError(
            f"{db}: a killed MLflow schema migration left the only copy of some rows in {', '.join(state.orphaned)}; "
            f"nothing was changed: restore the store from a backup (a {db.name}.before-upgrade-* file beside it, if "
            "any), or move it aside to start an empty registry (the next run retrains every model)"
        )
    _upgrade(db, state, head)


def _upgrade(db: Path, state: StoreState, head: str) -> None:
    """Upgrade (and repair) a copy of `db`, then swap it in, the original kept beside it."""
    copy = _temporary(db)
    try:
        _copy_without_leftovers(db, copy, state.leftovers)
        try:
            _migrate(copy)
        except Exception as err:  # noqa: BLE001  (any failure: the store stays as it was, said in one line)
            first = (str(err).strip() or type(err).__name__).splitlines()[0]
            raise RuntimeError(
                f"{db}: upgrading the MLflow store from schema {state.revision} to {head} failed on a copy ({first}); "
                "the store is unchanged: restore it from a backup, or move it aside to start an empty registry"
            ) from err
        kept = db.with_name(f"{db.name}.before-upgrade-{datetime.now(UTC):%Y%m%dT%H%M%S}")
        os.link(db, kept)  # the original file itself stays as the backup: nothing copied, nothing lost if killed
        _swap_in(copy, db)
    finally:
        copy.unlink(missing_ok=True)
    dropped = f" (leftover tables {', '.join(state.leftovers)} dropped)" if state.leftovers else ""
    log.warning(
        "%s: MLflow store upgraded from schema %s to %s%s; the original is kept as %s",
        db,
        state.revision,
        head,
        dropped,
        kept.name,
    )


def _copy_without_leftovers(db: Path, copy: Path, leftovers: list[str]) -> None:
    """A consistent copy of `db` (sqlite's backup: even of a file another reader has open), without
    the leftover partial table copies (their original tables are still there)."""
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as src, contextlib.closing(sqlite3.connect(copy)) as dst:
        src.backup(dst)
        for table in leftovers:  # names that matched _LEFTOVER (letters, digits, _), quoted; never input
            dst.execute(f'DROP TABLE "{table}"')
        dst.commit()
