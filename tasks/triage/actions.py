"""People's decisions about incidents, in the warehouse: `incident_actions` (append-only: every
acknowledgement and mark with who, when, a note, and the incident's period and RPCs as they were
then) and `silences` (a service or an RPC, from a start to an expiry).

An incident's state is whether anyone acknowledged it and its latest mark. Actions follow the
incident: recorded under an id it held before (tasks.scoring.incidents keeps ids stable and lists
absorbed ones as `aliases`), they still apply. A marked period keeps its recorded time and RPCs,
so it is honoured even where a rescoring later clears the incident.

Writers: `rpcwatch incidents ack|mark|silence` and the Airflow view's buttons (a write connection,
briefly). Readers: the alert step, training's export, the view, `rpcwatch incidents`. Values cross
into SQL as bound parameters only.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import duckdb

from tasks.clock import naive_utc
from tasks.keys import rpc_label, split_node_key
from tasks.scoring.incidents import INCIDENT_COLUMNS, Incident

ACK = "ack"
MARK = "mark"
MARKS = ("false_positive", "expected", "true_positive")
# marks that say "no need to tell anyone": the alert step posts nothing about such an incident
QUIET_MARKS = ("false_positive", "expected")
LONGEST_SILENCE = timedelta(days=30)  # a silence nobody remembers should not hide incidents for ever

FIND_SQL = f"""SELECT {INCIDENT_COLUMNS} FROM incidents
WHERE incident_id = $id OR list_contains(coalesce(aliases, []), $id) ORDER BY start_ts LIMIT 1"""
RECORD_SQL = """INSERT INTO incident_actions (action_id, incident_id, action, mark, note, actor, acted_at,
    start_ts, end_ts, patterns, nodes) VALUES ($action_id, $incident_id, $action, $mark, $note, $actor, $at,
    $start, $end, $patterns, $nodes)"""
# every action on these incidents (or on an id one of them absorbed), oldest first
ACTIONS_SQL = """
SELECT i.incident_id, a.action, a.mark, a.note, a.actor, a.acted_at
FROM incidents i JOIN incident_actions a
  ON a.incident_id = i.incident_id OR list_contains(coalesce(i.aliases, []), a.incident_id)
WHERE list_contains($ids, i.incident_id) ORDER BY a.acted_at, a.action_id"""
SILENCE_SQL = """INSERT INTO silences (silence_id, service, rpc, starts_at, ends_at, note, actor, created_at)
VALUES ($id, $service, $rpc, $starts, $ends, $note, $actor, $now)"""
ACTIVE_SILENCES_SQL = """SELECT silence_id, service, rpc, starts_at, ends_at, note, actor FROM silences
WHERE starts_at <= $at AND ends_at > $at ORDER BY ends_at DESC, silence_id"""


class UnknownIncident(ValueError):
    """No incident (nor an id one absorbed) has this id."""


@dataclass(frozen=True)
class Triage:
    """What people decided about one incident."""

    acked_by: str | None = None
    acked_at: datetime | None = None
    mark: str | None = None  # the latest mark
    marked_by: str | None = None
    marked_at: datetime | None = None
    note: str | None = None  # the latest note given with an action

    @property
    def acked(self) -> bool:
        return self.acked_by is not None


@dataclass(frozen=True)
class Silence:
    silence_id: str
    service: str | None
    rpc: str | None  # `caller:callee[:interface]`, as `rpcwatch plot --node` names an RPC
    starts_at: datetime
    ends_at: datetime
    note: str | None
    actor: str

    @property
    def what(self) -> str:
        return f"service {self.service}" if self.service else f"RPC {self.rpc}"

    def covers(self, incident: Incident) -> bool:
        """The incident involves the silenced service (a culprit, a caller or callee of its RPCs) or RPC."""
        parts = [_parts(n) for n in incident.nodes]
        if self.service is not None:
            return self.service in incident.culprits or any(self.service in (p[0], p[1]) for p in parts if p)
        labels = {rpc_label(*p) for p in parts if p}
        return self.rpc in labels or any(label.startswith(f"{self.rpc}:") for label in labels)


def _parts(node: str) -> tuple[str, str, str | None] | None:
    try:
        caller, callee, interface, _ = split_node_key(node)
    except ValueError:
        return None
    return caller, callee, interface


def find_incident(con: duckdb.DuckDBPyConnection, incident_id: str) -> Incident:
    """The incident with this id, or the one that absorbed it; UnknownIncident otherwise."""
    row = con.execute(FIND_SQL, {"id": incident_id}).fetchone()
    if row is None:
        raise UnknownIncident(f"no incident {incident_id!r} in the warehouse (see `rpcwatch incidents`)")
    return Incident.from_row(row)


def record(
    con: duckdb.DuckDBPyConnection,
    incident_id: str,
    action: str,
    actor: str,
    mark: str | None = None,
    note: str | None = None,
    now: datetime | None = None,
) -> Incident:
    """Append one action on an incident (ACK, or MARK with one of MARKS), keeping its period and
    RPCs as they are now; returns the incident."""
    if action == MARK and mark not in MARKS:
        raise ValueError(f"mark must be one of {', '.join(MARKS)}, not {mark!r}")
    if not actor.strip():
        raise ValueError("an action needs who took it")
    incident = find_incident(con, incident_id)
    con.execute(
        RECORD_SQL,
        {
            "action_id": uuid.uuid4().hex,
            "incident_id": incident.incident_id,
            "action": action,
            "mark": mark if action == MARK else None,
            "note": note,
            "actor": actor,
            "at": naive_utc(now or datetime.now(UTC)),
            "start": incident.start_ts,
            "end": incident.end_ts,
            "patterns": incident.patterns,
            "nodes": incident.nodes,
        },
    )
    return incident


def states(con: duckdb.DuckDBPyConnection, incident_ids: list[str]) -> dict[str, Triage]:
    """incident id -> what people decided about it (incidents nobody acted on are left out)."""
    found: dict[str, Triage] = {}
    for incident_id, action, mark, note, actor, at in con.execute(ACTIONS_SQL, {"ids": incident_ids}).fetchall():
        state = found.get(incident_id, Triage())
        if action == ACK and state.acked_by is None:
            state = replace(state, acked_by=actor, acked_at=at)
        elif action == MARK:
            state = replace(state, mark=mark, marked_by=actor, marked_at=at)
        found[incident_id] = replace(state, note=note or state.note)
    return found


def add_silence(
    con: duckdb.DuckDBPyConnection,
    actor: str,
    lasting: timedelta,
    service: str | None = None,
    rpc: str | None = None,
    note: str | None = None,
    now: datetime | None = None,
) -> Silence:
    """Silence a service or an RPC (exactly one) from now for `lasting` (at most LONGEST_SILENCE)."""
    if (service is None) == (rpc is None):
        raise ValueError("silence a service or an RPC: give exactly one of them")
    if not timedelta(0) < lasting <= LONGEST_SILENCE:
        raise ValueError(f"a silence lasts more than 0 and at most {LONGEST_SILENCE.days} days")
    if rpc is not None and rpc.count(":") not in (1, 2):
        raise ValueError(f"name an RPC as CALLER:CALLEE or CALLER:CALLEE:INTERFACE, not {rpc!r}")
    start = naive_utc(now or datetime.now(UTC))
    silence = Silence(uuid.uuid4().hex[:12], service, rpc, start, start + lasting, note, actor)
    con.execute(
        SILENCE_SQL,
        {
            "id": silence.silence_id,
            "service": service,
            "rpc": rpc,
            "starts": silence.starts_at,
            "ends": silence.ends_at,
            "note": note,
            "actor": actor,
            "now": start,
        },
    )
    return silence


def active_silences(con: duckdb.DuckDBPyConnection, at: datetime | None = None) -> list[Silence]:
    """The silences in force at `at` (default: now)."""
    rows = con.execute(ACTIVE_SILENCES_SQL, {"at": naive_utc(at or datetime.now(UTC))}).fetchall()
    return [Silence(*row) for row in rows]


def why_quiet(incident: Incident, state: Triage | None, silences: list[Silence]) -> str | None:
    """Why the alert step posts nothing about this incident: acknowledged, marked false positive or
    expected, or covered by a silence; None: post it."""
    if state is not None and state.mark in QUIET_MARKS:
        return f"marked {state.mark} by {state.marked_by}"
    if state is not None and state.acked:
        return f"acknowledged by {state.acked_by}"
    silence = next((s for s in silences if s.covers(incident)), None)
    if silence is not None:
        return f"{silence.what} silenced by {silence.actor} until {silence.ends_at:%Y-%m-%d %H:%M} UTC"
    return None
