"""What the Airflow view's buttons do (plugins/rpcwatch_anomalies.py): acknowledge, mark or silence
an incident (tasks.triage.actions), written to the warehouse, and the state the view shows.

The rest of the view reads the published snapshot only; a decision cannot wait for the next
publish, so these read and write the warehouse itself, briefly. A write waits at most
`WRITE_WAIT_S` for a run that holds the warehouse's lock (DuckDB allows one writer) and then says
so (`Busy`), so the person can press again; nothing is half-written. The state shown is read from
the warehouse when no run holds it, else from the snapshot (`fresh` says which).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the plugin imports this module when Airflow loads plugins
    import duckdb

    from tasks.triage.actions import Triage

WRITE_WAIT_S = 15.0
SILENCE_CHOICES = {"1h": timedelta(hours=1), "4h": timedelta(hours=4), "24h": timedelta(hours=24)}


class Busy(RuntimeError):
    """A run holds the warehouse: the action was not recorded; try again in a minute."""


@dataclass(frozen=True)
class Decisions:
    """What people decided about some incidents, and whether it is current (read from the warehouse)
    or as of the last publish (a run holds the warehouse)."""

    states: dict[str, Triage]
    fresh: bool


@contextmanager
def _writing() -> Iterator[duckdb.DuckDBPyConnection]:
    from tasks.settings import load_settings
    from tasks.warehouse import CannotOpen, opened

    try:
        with opened(load_settings().warehouse, lock_wait_s=WRITE_WAIT_S) as con:
            yield con
    except CannotOpen as held:
        raise Busy(f"not recorded: {held}") from None


def acknowledge(incident_id: str, actor: str, note: str | None = None) -> str:
    """Record an acknowledgement; returns what the view says."""
    from tasks.triage.actions import ACK, record

    with _writing() as con:
        record(con, incident_id, ACK, actor, note=note)
    return f"acknowledged by {actor}: no alert will be posted about it"


def mark(incident_id: str, what: str, actor: str, note: str | None = None) -> str:
    from tasks.triage.actions import MARK, QUIET_MARKS, record

    with _writing() as con:
        incident = record(con, incident_id, MARK, actor, mark=what, note=note)
    quiet = "no alert will be posted about it; " if what in QUIET_MARKS else ""
    return (
        f"marked {what} by {actor}: {quiet}retraining leaves {incident.start_ts:%Y-%m-%d %H:%M}–"
        f"{incident.end_ts:%H:%M} UTC out"
    )


def silence(actor: str, lasting: str, service: str | None = None, rpc: str | None = None) -> str:
    from tasks.triage.actions import add_silence

    if lasting not in SILENCE_CHOICES:
        raise ValueError(f"silence for one of {', '.join(SILENCE_CHOICES)}")
    with _writing() as con:
        s = add_silence(con, actor, SILENCE_CHOICES[lasting], service=service, rpc=rpc, note="from the Airflow view")
    return f"{s.what} silenced by {actor} until {s.ends_at:%Y-%m-%d %H:%M} UTC"


def decisions(snapshot: duckdb.DuckDBPyConnection | None, incident_ids: list[str]) -> Decisions:
    """The decisions about these incidents: from the warehouse when no run holds it, else from the
    snapshot (which may predate the tables: then none)."""
    from tasks.settings import load_settings
    from tasks.triage.actions import states
    from tasks.triage.quality import has_quality_tables
    from tasks.warehouse import CannotOpen, opened

    if not incident_ids:
        return Decisions({}, True)
    try:
        with opened(load_settings().warehouse, read_only=True) as con:
            return Decisions(states(con, incident_ids), True)
    except (CannotOpen, FileNotFoundError):
        pass
    if snapshot is None or not has_quality_tables(snapshot):
        return Decisions({}, False)
    return Decisions(states(snapshot, incident_ids), False)
