"""Named crash points for the crash-safety tests (the `fail-rs` / FoundationDB idea).

`crash_point("score")` does nothing unless `RPCWATCH_CRASH_AT` names that point: then the process
kills itself with SIGKILL, exactly as `kill -9` or the OOM killer would, with no cleanup, no
`finally` and no flush. The tests set the variable on a `rpcwatch run` subprocess and check that
the rerun heals. Production runs never set it.
"""

from __future__ import annotations

import os
import signal

VARIABLE = "RPCWATCH_CRASH_AT"
POINTS = ("ingest", "patterns", "registered", "score", "publish")


def crash_point(name: str) -> None:
    assert name in POINTS, f"unknown crash point {name!r}"
    if os.environ.get(VARIABLE) == name:
        os.kill(os.getpid(), signal.SIGKILL)
