"""SQL helpers of the ingest stage: one-value reads, and the only values formatted into SQL text.

Values from outside (paths, column names, mapping values) are bound or quoted elsewhere; the two
kinds of value formatted here are validated first: a datetime object and a finite number.
Reads and writes no table itself.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

import duckdb

from tasks.clock import naive_utc


def scalar(con: duckdb.DuckDBPyConnection, query: str, parameters: object = None) -> Any:
    """The first value of the query's first row (for queries that always yield a row: counts, sums)."""
    row = con.execute(query, parameters).fetchone()
    if row is None:
        raise LookupError(f"query returned no row: {query}")
    return row[0]


def sql_timestamp(value: datetime) -> str:
    """A TIMESTAMP literal from a datetime object (digits and separators only: safe SQL text)."""
    if not isinstance(value, datetime):
        raise TypeError(f"expected a datetime, got {value!r}")
    return f"TIMESTAMP '{naive_utc(value):%Y-%m-%d %H:%M:%S}'"


def finite_setting(value: object, what: str) -> float:
    """A validated finite number from `settings.<what>`, safe to format into SQL text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"settings.{what} must be a finite number, got {value!r}")
    return float(value)
