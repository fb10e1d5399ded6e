"""Names and lookups of pattern models, one place for each.

A pattern's model is registered in MLflow as `rpcwatch-pattern-<id>`; its current champion is the
version the registry's `champion` alias points to, mirrored in DuckDB's `models` table (see
`tasks.models.retrain.reconcile_models`). Everything that asks "which model judges pattern p?"
asks here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import duckdb

EXPERIMENT = "rpcwatch"
MODEL_PREFIX = "rpcwatch-pattern-"
CHAMPION = "champion"


def model_name(pattern_id: int) -> str:
    return f"{MODEL_PREFIX}{pattern_id}"


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
    return con.execute("SELECT min(trained_for) FROM models WHERE decision = 'champion'").fetchone()[0]
