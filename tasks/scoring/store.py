"""What scoring writes for the scored patterns of an hour: their irregular points (`anomalies`),
the forecast and non-alarm band of every scored point (`forecasts`, `tasks.scoring.forecasts`),
their calls MAPE next to the model's calibrated level (`forecast_errors`, read by the staleness
policy's drift rule) and every pattern's outcome (`score_runs`). Deletes and writes those four
tables, one statement per table (not one per pattern or row); reads none.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

import duckdb
import numpy as np
import pyarrow as pa

from tasks.clock import HOUR, naive_utc
from tasks.models.features import FEATURES


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
class ForecastRows:
    """One pattern's `forecasts` rows, a row per bucket, node and feature (in that order): `values`
    [3, S, N, F'] holds expected, lower and upper (NaN: NULL) of `buckets` [S] (datetime64[us]),
    `nodes` [N] and `features` [F'] (indices into FEATURES)."""

    pattern_id: int
    version: int
    buckets: np.ndarray
    nodes: list[str]
    features: list[int]
    values: np.ndarray


@dataclass
class Scored:
    """One pattern's scored hour, written by `store_hour`."""

    version: int
    rows: list[AnomalyRow]
    mape: float | None  # calls MAPE of the hour
    calibrated: float  # the model's calibrated calls MAPE
    forecasts: ForecastRows | None = None  # the `forecasts` rows of the hour's points


def insert_rows(con: duckdb.DuckDBPyConnection, table: str, columns: list[str], rows: list[tuple]) -> None:
    """Insert Python rows into `table` (a constant of this package) in one statement (None stays NULL)."""
    if rows:
        insert_columns(con, table, {c: list(v) for c, v in zip(columns, zip(*rows))})


def insert_columns(con: duckdb.DuckDBPyConnection, table: str, data: dict[str, list]) -> None:
    """Insert columns (name -> Python values, all of one length) into `table` (a constant of this
    package) in one statement (None stays NULL)."""
    if data:
        insert_table(con, table, pa.table({c: pa.array(v) for c, v in data.items()}))


def insert_table(con: duckdb.DuckDBPyConnection, table: str, rows: pa.Table) -> None:
    """Insert an Arrow table's rows into `table` (a constant of this package; the columns by the
    Arrow table's names, constants too) in one statement."""
    if rows.num_rows:
        columns = ", ".join(rows.column_names)
        con.register("scored_rows", rows)
        con.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM scored_rows")
        con.unregister("scored_rows")


def forecast_table(parts: list[ForecastRows]) -> pa.Table:
    """The `forecasts` rows of many patterns as one Arrow table: numpy arrays taken whole, node and
    feature names dictionary-encoded (no Python object per row: 7 M rows an hour for 5,000
    patterns), non-finite values NULL."""
    first = np.cumsum([0] + [len(p.nodes) for p in parts[:-1]])  # each pattern's first entry of all nodes
    keys = zip(*(_row_keys(p, int(at)) for p, at in zip(parts, first)))
    bucket_ts, node, feature = (np.concatenate(k) for k in keys)
    values = np.concatenate([p.values.reshape(3, -1) for p in parts], axis=1)  # expected, lower, upper
    rows = [p.values[0].size for p in parts]
    data = {
        "pattern_id": pa.array(np.repeat([p.pattern_id for p in parts], rows)),
        "bucket_ts": pa.array(bucket_ts),
        "node": pa.DictionaryArray.from_arrays(node, pa.array([n for p in parts for n in p.nodes], pa.string())),
        "feature": pa.DictionaryArray.from_arrays(feature, pa.array(FEATURES)),
        "model_version": pa.array(np.repeat([p.version for p in parts], rows)),
    }
    for c, v in zip(("expected", "lower", "upper"), values):
        data[c] = pa.array(v, mask=~np.isfinite(v))
    return pa.table({c: data[c] for c in FORECAST_COLUMNS})


def _row_keys(part: ForecastRows, first_node: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """bucket_ts, node (an index into all patterns' nodes, this one's from `first_node`) and feature
    index of each of a pattern's rows."""
    s, n, f = part.values.shape[1:]
    return (
        np.repeat(part.buckets, n * f),
        np.tile(np.repeat(np.arange(n, dtype=np.int32) + first_node, f), s),
        np.tile(np.asarray(part.features, dtype=np.int32), s * n),
    )


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
    parts = [r.forecasts for r in scored.values() if r.forecasts is not None]
    if parts:
        insert_table(con, "forecasts", forecast_table(parts))
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
