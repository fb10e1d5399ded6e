"""What scoring writes for the scored patterns of an hour: their irregular points (`anomalies`),
the forecast and non-alarm band of every scored point (`forecasts`, `tasks.scoring.forecasts`),
their calls MAPE next to the model's calibrated level (`forecast_errors`, read by the staleness
policy's drift rule) and every pattern's outcome (`score_runs`). Deletes and writes those four
tables, one statement per table (not one per pattern or row); reads none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

import duckdb
import pyarrow as pa

from tasks.clock import HOUR, naive_utc


class AnomalyRow(NamedTuple):
    """An `anomalies` row, its fields in the table's column order."""

    bucket_ts: datetime
    pattern_id: int | None
    node: str
    caller: str
    callee: str
    interface: str | None
    feature: str
    observed: float
    expected: float
    threshold: float
    score: float
    direction: str
    kind: str
    model_name: str | None
    model_version: int | None
    run_id: str | None
    scored_at: datetime
    culprit: str | None  # the service most likely behind it


ANOMALY_COLUMNS = list(AnomalyRow._fields)
FORECAST_ERROR_COLUMNS = ["pattern_id", "hour", "model_version", "mape_calls", "calibrated_mape_calls"]
FORECAST_COLUMNS = ["pattern_id", "bucket_ts", "node", "feature", "expected", "lower", "upper", "model_version"]
SCORE_RUN_COLUMNS = ["hour", "pattern_id", "status", "reason", "model_version", "flagged", "mape_calls"]


@dataclass
class Scored:
    """One pattern's scored hour, written by `store_hour`."""

    version: int
    rows: list[AnomalyRow]
    mape: float | None  # calls MAPE of the hour
    calibrated: float  # the model's calibrated calls MAPE
    forecasts: dict[str, list] = field(default_factory=dict)  # `forecasts` columns of the hour's points


def insert_rows(con: duckdb.DuckDBPyConnection, table: str, columns: list[str], rows: list[tuple]) -> None:
    """Insert Python rows into `table` (a constant of this package) in one statement (None stays NULL)."""
    if rows:
        insert_columns(con, table, {c: list(v) for c, v in zip(columns, zip(*rows))})


def insert_columns(con: duckdb.DuckDBPyConnection, table: str, data: dict[str, list]) -> None:
    """Insert columns (name -> Python values, all of one length) into `table` (a constant of this
    package) in one statement (None stays NULL)."""
    if data and len(next(iter(data.values()))):
        con.register("scored_rows", pa.table({c: pa.array(v) for c, v in data.items()}))
        con.execute(f"INSERT INTO {table} ({', '.join(data)}) SELECT {', '.join(data)} FROM scored_rows")
        con.unregister("scored_rows")


def store_hour(
    con: duckdb.DuckDBPyConnection, hour: datetime, scored: dict[int, Scored], skipped: dict[int, str]
) -> None:
    """Replace the hour's anomalies, forecasts and forecast errors of the scored patterns and write
    every pattern's score_runs row."""
    start, end = naive_utc(hour), naive_utc(hour + HOUR)
    ids = sorted(scored)
    con.execute(
        "DELETE FROM anomalies WHERE list_contains(?, pattern_id) AND bucket_ts >= ? AND bucket_ts < ?",
        [ids, start, end],
    )
    insert_rows(con, "anomalies", ANOMALY_COLUMNS, [row for r in scored.values() for row in r.rows])
    con.execute(
        "DELETE FROM forecasts WHERE list_contains(?, pattern_id) AND bucket_ts >= ? AND bucket_ts < ?",
        [ids, start, end],
    )
    parts = [r.forecasts for r in scored.values() if r.forecasts]
    insert_columns(con, "forecasts", {c: [v for part in parts for v in part[c]] for c in FORECAST_COLUMNS})
    con.execute("DELETE FROM forecast_errors WHERE hour = ? AND list_contains(?, pattern_id)", [start, ids])
    insert_rows(
        con,
        "forecast_errors",
        FORECAST_ERROR_COLUMNS,
        [(pid, start, r.version, r.mape, r.calibrated) for pid, r in scored.items()],
    )
    insert_rows(
        con,
        "score_runs",
        SCORE_RUN_COLUMNS,
        [(start, pid, "scored", None, r.version, len(r.rows), r.mape) for pid, r in scored.items()]
        + [(start, pid, "skipped", why, None, 0, None) for pid, why in skipped.items()],
    )
