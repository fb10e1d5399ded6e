"""The TEMP tables the patterns stage keeps on its one connection: their names, in one place.

Trace reconstruction (`traces.rebuild_hour`) creates them for the stage; the stage's assignment
step creates `ASSIGNMENT`; `traces.store_traces` reads it back. Every module refers to these
constants, never to the names as text. Columns (see the creating function's docstring):

- `SCOPE_TRACES` (trace_id, trace_hash, root_ts): the traces rooted in the hour, plus the hour
  before's traces with a late tail in it. Created by `traces.load_scope`.
- `SCOPE_CALLS`, a VIEW (rowid, then every column of `calls`): those traces' calls. Created by
  `traces.load_scope`.
- `SCOPE_REBUILT` (trace_id, root_ts, hour, shape_id, status, n_calls): each scope trace rebuilt.
  Created by `traces.rebuild_hour`.
- `ASSIGNMENT` (shape_id, pattern_id, method): the pattern of each rebuilt shape. Created by
  `assignment.write_assignment`.
- `TRACE_SHAPES`, `ORPHAN_ROWS`, `SHAPE_CALLS`: scratch tables inside `traces`.

Reads and writes no warehouse table.
"""

from __future__ import annotations

import duckdb
import numpy as np
import pyarrow as pa

SCOPE_TRACES = "scope_traces"
SCOPE_CALLS = "scope"
SCOPE_REBUILT = "scope_rebuilt"
ASSIGNMENT = "assignment"
TRACE_SHAPES = "rebuilt"
ORPHAN_ROWS = "orphan_rows"
SHAPE_CALLS = "shape_calls"


def temp_table(con: duckdb.DuckDBPyConnection, name: str, **columns: np.ndarray) -> None:
    """A TEMP table `name` (one of the constants above) from numpy columns (through Arrow, no Python lists)."""
    con.register(f"{name}_arrow", pa.table(columns))
    con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT * FROM {name}_arrow")
    con.unregister(f"{name}_arrow")
