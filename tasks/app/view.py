"""What the Airflow view (plugins/rpcwatch_anomalies.py) shows, as plain data: incidents and
irregular points of the published snapshot `analytics.duckdb` (tasks.publish), filtered by a time
window counted back from now, a pattern and a kind; one incident with its points and model links.

Reads the snapshot only, read-only (never the warehouse, so it never blocks the pipeline); writes
nothing. Every value from a request crosses into SQL as a bound parameter; column names in SQL
text are constants of this module. Snapshots published by older versions may lack a column
(`culprits`, `evidence`, `culprit`): it reads as NULL.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote, urlencode

import duckdb

from tasks.keys import split_node_key

if TYPE_CHECKING:  # imported where used: the plugin imports this module when Airflow loads plugins
    from tasks.scoring.incidents import Incident

SINCE_PATTERN = r"^(all|[1-9][0-9]{0,3}[mhd])$"  # 30m, 6h, 2d (up to 9999 units) or all
KIND_PATTERN = r"^[a-z_]{1,40}$"
INCIDENT_ID_PATTERN = r"^[0-9a-f]{6,32}$"
DEFAULT_SINCE = "24h"
QUICK_SINCE = ("30m", "1h", "6h", "24h", "2d", "7d", "all")
UNITS = {"m": "minutes", "h": "hours", "d": "days"}
DEFAULT_MLFLOW_URL = "http://127.0.0.1:5000"
NOVEL = "novel_rpc"
INCIDENT_POINTS_LIMIT = 200

# columns a snapshot published by an older version may lack: (table, column) -> SQL used instead
OPTIONAL_COLUMNS = {
    ("incidents", "culprits"): "CAST(NULL AS VARCHAR[])",
    ("incidents", "evidence"): "CAST(NULL AS VARCHAR)",
    ("anomalies", "culprit"): "CAST(NULL AS VARCHAR)",
}


def parse_since(text: str) -> timedelta | None:
    """`30m`, `6h`, `2d` as a timedelta; `all` as None. Raises ValueError otherwise."""
    if not re.fullmatch(SINCE_PATTERN, text):
        raise ValueError(f"since must look like 30m, 6h, 2d or all, not {text!r}")
    if text == "all":
        return None
    return timedelta(**{UNITS[text[-1]]: int(text[:-1])})


@dataclass(frozen=True)
class Filters:
    """What a page or API call asks for: a window back from now, a pattern, a kind, a row limit."""

    since: str = DEFAULT_SINCE
    pattern: int | None = None
    kind: str | None = None
    limit: int = 100

    def start(self, now: datetime) -> datetime | None:
        """The window's start (naive UTC, as the snapshot stores time); None: no window."""
        span = parse_since(self.since)
        return None if span is None else now.astimezone(UTC).replace(tzinfo=None) - span

    def params(self, now: datetime) -> dict[str, Any]:
        return {"start": self.start(now), "pattern": self.pattern, "kind": self.kind, "limit": self.limit}

    def query(self, **changes: Any) -> str:
        """These filters (changed as given) as a URL query string; unset ones left out."""
        f = replace(self, **changes)
        values = {"since": f.since, "pattern": f.pattern, "kind": f.kind}
        if f.limit != Filters.limit:
            values["limit"] = f.limit
        return urlencode({k: v for k, v in values.items() if v is not None})


class Point(NamedTuple):
    """An irregular point (a row of `anomalies`) as the view shows it."""

    bucket_ts: datetime
    pattern_id: int | None
    node: str
    caller: str | None
    callee: str | None
    interface: str | None
    feature: str | None
    observed: float | None
    expected: float | None
    threshold: float | None
    score: float
    direction: str | None
    kind: str
    culprit: str | None
    model_name: str | None
    model_version: int | None

    @property
    def rpc(self) -> str:
        """Its RPC as people read it, from its caller, callee and interface columns."""
        if self.caller is None or self.callee is None:
            return rpc_text(self.node)
        return f"{self.caller} → {self.callee}" + (f" : {self.interface}" if self.interface else "")


@dataclass(frozen=True)
class Meta:
    """What the snapshot holds overall: when it was published, its newest data, its patterns and kinds."""

    published_at: datetime | None
    newest: datetime | None  # the end of the newest incident or the newest irregular point
    patterns: list[int]
    kinds: list[str]


@dataclass(frozen=True)
class ModelLink:
    pattern_id: int
    name: str
    version: int
    decision: str | None
    url: str


def snapshot_path() -> Path:
    from tasks.publish import analytics_path
    from tasks.settings import load_settings

    return analytics_path(load_settings())


def mlflow_url() -> str:
    """MLflow's web address: the setting `mlflow_url` where it exists, else RPCWATCH_MLFLOW_URL."""
    from tasks.settings import load_settings

    url = getattr(load_settings(), "mlflow_url", None) or os.environ.get("RPCWATCH_MLFLOW_URL") or DEFAULT_MLFLOW_URL
    return str(url).rstrip("/")


def model_url(base: str, name: str, version: int) -> str:
    return f"{base}/#/models/{quote(name, safe='')}/versions/{int(version)}"


@contextmanager
def open_snapshot(path: Path) -> Iterator[duckdb.DuckDBPyConnection | None]:
    """The snapshot opened read-only and sandboxed (tasks.warehouse.open_sandboxed_reader), or None
    when nothing is published yet."""
    from tasks.warehouse import open_sandboxed_reader

    if not path.exists():
        yield None
        return
    with open_sandboxed_reader(path) as con:
        yield con


def columns(con: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    rows = con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table])
    return {r[0] for r in rows.fetchall()}


def _column(con: duckdb.DuckDBPyConnection, table: str, column: str) -> str:
    """`column` when the snapshot's table has it, else its NULL stand-in (constants only)."""
    return column if column in columns(con, table) else OPTIONAL_COLUMNS[(table, column)]


def rpc_text(node: str) -> str:
    """A node key as people read it: `caller → callee : interface` (the key itself if not one)."""
    try:
        caller, callee, interface, _ = split_node_key(node)
    except ValueError:
        return node
    return f"{caller} → {callee}" + (f" : {interface}" if interface else "")


def evidence_text(evidence: str | None) -> str:
    """The stored evidence line with its trailing node key written as an RPC."""
    if not evidence:
        return ""
    head, sep, node = evidence.rpartition(" on ")
    return f"{head} on {rpc_text(node)}" if sep else evidence


def incident_summary(incident: Incident) -> str:
    """What happened in a few words; a novel-RPC incident names its RPCs."""
    if NOVEL in incident.kinds:
        shown = ", ".join(rpc_text(n) for n in incident.nodes[:3])
        more = f" and {len(incident.nodes) - 3} more" if len(incident.nodes) > 3 else ""
        return f"new RPC {shown}{more} (in no pattern's graph)"
    from tasks.scoring.extreme import KIND as EXTREME

    if incident.kinds == [EXTREME]:
        return f"a single call far beyond anything {rpc_text(incident.nodes[0])} did before"
    where = ", ".join(f"pattern {p}" for p in incident.patterns) or "no pattern"
    return f"{', '.join(incident.kinds)} in {where}"


def meta(con: duckdb.DuckDBPyConnection) -> Meta:
    published = None
    if columns(con, "published"):
        row = con.execute("SELECT max(published_at) FROM published").fetchone()
        published = row[0] if row else None
    row = con.execute(
        "SELECT greatest((SELECT max(end_ts) FROM incidents), (SELECT max(bucket_ts) FROM anomalies))"
    ).fetchone()
    newest = row[0] if row else None
    patterns = con.execute(
        "SELECT DISTINCT pattern_id FROM anomalies WHERE pattern_id IS NOT NULL ORDER BY 1"
    ).fetchall()
    kinds = con.execute("SELECT DISTINCT kind FROM anomalies WHERE kind IS NOT NULL ORDER BY 1").fetchall()
    return Meta(published, newest, [r[0] for r in patterns], [r[0] for r in kinds])


def window_note(filters: Filters, info: Meta, now: datetime) -> str | None:
    """Says so when the snapshot's newest data is older than the window (the pipeline is behind, or
    the data is a replay of old traces); None when it is not, or there is no window."""
    start = filters.start(now)
    if start is None or info.newest is None or info.newest >= start:
        return None
    age = now.astimezone(UTC).replace(tzinfo=None) - info.newest
    return (
        f"The snapshot's newest data is from {info.newest:%Y-%m-%d %H:%M} UTC ({_age_text(age)} ago), "
        f"older than the window (the last {filters.since})."
    )


def _age_text(age: timedelta) -> str:
    hours = age.total_seconds() / 3600
    if hours < 1:
        return f"{max(int(hours * 60), 0)} min"
    return f"{hours:.0f} h" if hours < 48 else f"{hours / 24:.0f} days"


def _incident_select(con: duckdb.DuckDBPyConnection) -> str:
    culprits, evidence = _column(con, "incidents", "culprits"), _column(con, "incidents", "evidence")
    return (
        "SELECT incident_id, start_ts, end_ts, patterns, nodes, peak_score, kinds, points, "
        f"{culprits}, {evidence} FROM incidents"
    )


def list_incidents(con: duckdb.DuckDBPyConnection, filters: Filters, now: datetime) -> list[Incident]:
    """Incidents still going on at or after the window's start, newest first."""
    from tasks.scoring.incidents import Incident

    sql = (
        _incident_select(con)
        + """ WHERE ($start IS NULL OR end_ts > CAST($start AS TIMESTAMP))
        AND ($pattern IS NULL OR list_contains(patterns, CAST($pattern AS INTEGER)))
        AND ($kind IS NULL OR list_contains(kinds, CAST($kind AS VARCHAR)))
        ORDER BY start_ts DESC, incident_id LIMIT $limit"""
    )
    return [Incident.from_row(r) for r in con.execute(sql, filters.params(now)).fetchall()]


def _point_select(con: duckdb.DuckDBPyConnection) -> str:
    return (
        "SELECT bucket_ts, pattern_id, node, caller, callee, interface, feature, observed, expected, threshold, "
        f"score, direction, kind, {_column(con, 'anomalies', 'culprit')}, model_name, model_version FROM anomalies"
    )


def list_anomalies(con: duckdb.DuckDBPyConnection, filters: Filters, now: datetime) -> list[Point]:
    """Irregular points in the window, newest first (the strongest first within a bucket)."""
    sql = (
        _point_select(con)
        + """ WHERE ($start IS NULL OR bucket_ts >= CAST($start AS TIMESTAMP))
        AND ($pattern IS NULL OR pattern_id = CAST($pattern AS INTEGER))
        AND ($kind IS NULL OR kind = CAST($kind AS VARCHAR))
        ORDER BY bucket_ts DESC, score DESC, node LIMIT $limit"""
    )
    return [Point(*r) for r in con.execute(sql, filters.params(now)).fetchall()]


def find_incident(con: duckdb.DuckDBPyConnection, incident_id: str) -> Incident | None:
    from tasks.scoring.incidents import Incident

    row = con.execute(_incident_select(con) + " WHERE incident_id = ? LIMIT 1", [incident_id]).fetchone()
    return None if row is None else Incident.from_row(row)


def incident_group(incident: Incident) -> str:
    """The group its points were formed in (tasks.scoring.incidents.GROUP_SQL): the pattern, or
    for novel RPCs `novel:<calling service>`."""
    if incident.patterns:
        return str(incident.patterns[0])
    try:
        return "novel:" + split_node_key(incident.nodes[0]).caller
    except (IndexError, ValueError):
        return ""


def incident_points(
    con: duckdb.DuckDBPyConnection, incident: Incident, limit: int = INCIDENT_POINTS_LIMIT
) -> list[Point]:
    """The incident's own points (its group, its time), the strongest first."""
    from tasks.scoring.incidents import GROUP_SQL

    sql = (
        _point_select(con)
        + f" WHERE bucket_ts >= ? AND bucket_ts < ? AND {GROUP_SQL} = ? ORDER BY score DESC, bucket_ts, node LIMIT ?"
    )
    params = [incident.start_ts, incident.end_ts, incident_group(incident), limit]
    return [Point(*r) for r in con.execute(sql, params).fetchall()]


def model_links(con: duckdb.DuckDBPyConnection, points: list[Point], base: str) -> list[ModelLink]:
    """The model versions that flagged these points, each with its decision and MLflow page."""
    seen = sorted({(p.pattern_id, p.model_name, p.model_version) for p in points if p.model_version is not None})
    links = []
    for pattern_id, name, version in seen:
        if pattern_id is None or version is None:
            continue
        name = name or f"rpcwatch-pattern-{pattern_id}"
        row = con.execute(
            "SELECT decision FROM models WHERE pattern_id = ? AND model_version = ? ORDER BY recorded_at DESC LIMIT 1",
            [pattern_id, version],
        ).fetchone()
        links.append(ModelLink(pattern_id, name, version, row[0] if row else None, model_url(base, name, version)))
    return links


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


def incident_json(incident: Incident) -> dict[str, Any]:
    return {
        "incident_id": incident.incident_id,
        "start": _iso(incident.start_ts),
        "end": _iso(incident.end_ts),
        "patterns": incident.patterns,
        "kinds": incident.kinds,
        "summary": incident_summary(incident),
        "culprits": incident.culprits,
        "nodes": incident.nodes,
        "rpcs": [rpc_text(n) for n in incident.nodes],
        "evidence": evidence_text(incident.evidence),
        "peak_score": _round(incident.peak_score, 2),
        "points": incident.points,
        "page": f"incident/{incident.incident_id}",
    }


def point_json(point: Point) -> dict[str, Any]:
    ts = point.bucket_ts
    return {
        "bucket": ts.strftime("%Y-%m-%d %H:%M" if ts.second == 0 else "%Y-%m-%d %H:%M:%S"),
        "bucket_ts": _iso(ts),
        "pattern": point.pattern_id,
        "kind": point.kind,
        "caller": point.caller,
        "callee": point.callee,
        "interface": point.interface,
        "rpc": point.rpc,
        "feature": point.feature,
        "observed": _round(point.observed, 1),
        "expected": _round(point.expected, 1),
        "threshold": _round(point.threshold, 1),
        "score": _round(point.score, 2),
        "direction": point.direction,
        "culprit": point.culprit,
        "model_version": point.model_version,
    }
