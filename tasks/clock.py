"""Time as rpcwatch counts it: UTC everywhere, hours as the unit of work.

Aware datetimes at the edges (CLI, Airflow's data intervals); DuckDB stores `TIMESTAMP` without a
zone, always UTC, so values cross into SQL through `naive_utc`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

HOUR = timedelta(hours=1)


def hour_floor(value: datetime) -> datetime:
    """The start of `value`'s hour, as an aware UTC datetime (naive input counts as UTC)."""
    value = value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return value.replace(minute=0, second=0, microsecond=0)


def naive_utc(value: datetime) -> datetime:
    """`value` in UTC without its zone: what a DuckDB `TIMESTAMP` holds."""
    return value.astimezone(UTC).replace(tzinfo=None)
