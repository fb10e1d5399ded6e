"""Named crash points for the crash-safety tests (the `fail-rs` / FoundationDB idea).

`crash_point("score")` does nothing unless `RPCWATCH_CRASH_AT` names that point: then the process
kills itself with SIGKILL, exactly as `kill -9` or the OOM killer would, with no cleanup, no
`finally` and no flush. The tests set the variable on a `rpcwatch run` subprocess and check that
the rerun heals. Production runs never set it.

`RPCWATCH_CRASH_AT=migrating` kills inside MLflow's own schema migration (`crash_in_migration`),
where no line of ours runs: a SQLAlchemy hook fires on the migration's statements instead.
"""

from __future__ import annotations

import os
import signal
from typing import Any

VARIABLE = "RPCWATCH_CRASH_AT"
POINTS = ("ingest", "patterns", "logged", "registered", "score", "publish")
MIGRATING = "migrating"
# alembic migrates a sqlite table by copying it into `_alembic_tmp_<table>`, dropping the original
# and renaming the copy: a kill after the copy is created leaves the store half-migrated
_MIGRATION_COPY = "CREATE TABLE _ALEMBIC_TMP_"


def crash_point(name: str) -> None:
    assert name in POINTS, f"unknown crash point {name!r}"
    if os.environ.get(VARIABLE) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _kill_after_migration_copy(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
    if statement.lstrip().upper().startswith(_MIGRATION_COPY):
        os.kill(os.getpid(), signal.SIGKILL)


def crash_in_migration() -> None:
    """With `RPCWATCH_CRASH_AT=migrating`: SIGKILL this process right after the MLflow schema
    migration it is about to run creates its first `_alembic_tmp_` table (the moment of the
    report: killed while "Updating database tables"). Call it before the migration starts."""
    if os.environ.get(VARIABLE) != MIGRATING:
        return
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if not event.contains(Engine, "after_cursor_execute", _kill_after_migration_copy):
        event.listen(Engine, "after_cursor_execute", _kill_after_migration_copy)
