"""What the Airflow view (plugins/rpcwatch_anomalies.py) shows, as plain data: incidents and
irregular points of the published snapshot `analytics.duckdb` (tasks.publish), filtered by a time
window, a pattern and a kind, one page at a time; one incident with its points and model links.

`since`, the window, has one meaning wherever rpcwatch takes it (the view, its JSON API, `rpcwatch
anomalies --since`): `parse_since` reads it, and it counts back from the newest scored data
(`newest_scored`), not from the clock, so a pipeline that is behind, or a replay of old traces, still
shows its last hours. `all` is no window. The warehouse's view `recent_anomalies` is the same window
fixed at 6 h (tasks.warehouse.RECENT_ANOMALIES_SQL).

Reads the snapshot only, read-only (never the warehouse, so it never blocks the pipeline); writes
nothing. Every value from a request crosses into SQL as a bound parameter; column names in SQL
text are constants of this module. Snapshots published by older versions may lack a column
(`culprits`, `evidence`, `culprit`): it reads as NULL; or a table (`forecasts`): left out.
The Airflow plugin imports this module when Airflow loads plugins: keep its imports light.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar
from urllib.parse import quote, urlencode

import duckdb

from tasks.keys import split_node_key

if TYPE_CHECKING:  # imported where used: the plugin imports this module when Airflow loads plugins
    from tasks.scoring.incidents import Incident

SINCE_PATTERN = r"^(all|[1-9][0-9]{0,3}[mhd])$"  # 30m, 6h, 2d (up to 9999 units) or all
SINCE_HELP = "30m, 6h, 2d (a number from 1 to 9999 and m, h or d) or all"
KIND_PATTERN = r"^[a-z_]{1,40}$"
INCIDENT_ID_PATTERN = r"^[0-9a-f]{6,32}$"
DEFAULT_SINCE = "24h"
QUICK_SINCE = ("30m", "1h", "6h", "24h", "2d", "7d", "all")
UNITS = {"m": "minutes", "h": "hours", "d": "days"}
MAX_PATTERN_ID = 2**31 - 1  # the column is an INTEGER: a larger id matches nothing, and DuckDB cannot cast it
MAX_OFFSET = 10**9
DEFAULT_MLFLOW_URL = "http://127.0.0.1:5000"
NOVEL = "novel_rpc"
INCIDENT_POINTS_LIMIT = 200
# newer than this behind the clock, the newest scored data is current; older, the page says how old
STALE_AFTER = timedelta(hours=2)

# where the newest scored data is read (table, time column): the newest irregular point, the end of the
# newest incident, the newest scored bucket of any forecaster (a snapshot older than `forecasts` lacks it)
NEWEST_SOURCES = (("anomalies", "bucket_ts"), ("incidents", "end_ts"), ("forecasts", "bucket_ts"))

# columns a snapshot published by an older version may lack: (table, column) -> SQL used instead
OPTIONAL_COLUMNS = {
    ("incidents", "culprits"): "CAST(NULL AS VARCHAR[])",
    ("incidents", "evidence"): "CAST(NULL AS VARCHAR)",
    ("anomalies", "culprit"): "CAST(NULL AS VARCHAR)",
    ("incidents", "aliases"): "CAST(NULL AS VARCHAR[])",
}


def parse_since(text: str) -> timedelta | None:
    """The one reading of `since` (the view, its JSON API, `rpcwatch anomalies --since`): `30m`, `6h`,
    `2d` as the span counted back from the newest scored data (`newest_scored`); `all` as None, no
    window. Raises ValueError otherwise."""
    if not isinstance(text, str) or not re.fullmatch(SINCE_PATTERN, text):
        raise ValueError(f"since {text!r} is not accepted: use {SINCE_HELP}")
    if text == "all":
        return None
    return timedelta(**{UNITS[text[-1]]: int(text[:-1])})


def window_start(since: str, newest: datetime | None) -> datetime | None:
    """Where the window `since` starts (naive UTC, as the snapshot stores time): `newest` (the newest
    scored data) less the span; None, no bound, for `all` or when nothing is scored yet."""
    span = parse_since(since)
    return None if span is None or newest is None else newest - span


@dataclass(frozen=True)
class Filters:
    """What a page or API call asks for: a window (`since`, counted back from the newest scored data),
    a pattern, a kind, and which rows: `limit` of them after skipping `offset` (irregular points; on
    the JSON routes the route's rows) and `incident_offset` (the page's incidents)."""

    since: str = DEFAULT_SINCE
    pattern: int | None = None
    kind: str | None = None
    limit: int = 100
    offset: int = 0
    incident_offset: int = 0

    def start(self, newest: datetime | None) -> datetime | None:
        return window_start(self.since, newest)

    def window(self, newest: datetime | None) -> dict[str, Any]:
        """The bound parameters of WHERE clauses below ($start, $pattern, $kind)."""
        return {"start": self.start(newest), "pattern": self.pattern, "kind": self.kind}

    def query(self, **changes: Any) -> str:
        """These filters (changed as given) as a URL query string; unset and default ones left out."""
        f = replace(self, **changes)
        values: dict[str, Any] = {"since": f.since, "pattern": f.pattern, "kind": f.kind}
        for name in ("limit", "offset", "incident_offset"):
            if getattr(f, name) != getattr(Filters, name):
                values[name] = getattr(f, name)
        return urlencode({k: v for k, v in values.items() if v is not None})


T = TypeVar("T")


@dataclass(frozen=True)
class Listing(Generic[T]):
    """One page of a list: its `rows`, the `total` that match, where the page starts (`offset`) and
    how many rows a page holds (`limit`). Every list that is cut says so (`shown`)."""

    rows: list[T]
    total: int
    offset: int = 0
    limit: int = 100

    @property
    def cut(self) -> bool:
        return self.offset > 0 or self.offset + len(self.rows) < self.total

    @property
    def next_offset(self) -> int | None:
        return self.offset + self.limit if self.offset + self.limit < self.total else None

    @property
    def previous_offset(self) -> int | None:
        return max(self.offset - self.limit, 0) if self.offset > 0 else None

    def shown(self) -> str:
        """`showing 101–200 of 652` (a whole list: `652`)."""
        if not self.cut:
            return f"{self.total:,}"
        if not self.rows:
            return f"none from row {self.offset + 1:,} on, of {self.total:,}"
        return f"showing {self.offset + 1:,}–{self.offset + len(self.rows):,} of {self.total:,}"


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
    newest: datetime | None  # the newest scored data (`newest_scored`): every window counts back from it
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


def newest_scored(con: duckdb.DuckDBPyConnection) -> datetime | None:
    """The newest scored data, the moment every `since` window counts back from: the latest of the
    newest irregular point's bucket, the newest incident's end and the newest bucket a forecaster
    scored (NEWEST_SOURCES, those the connection's snapshot or warehouse has). None: nothing scored."""
    parts = [
        f"(SELECT max({column}) FROM {table})" for table, column in NEWEST_SOURCES if column in columns(con, table)
    ]
    if not parts:
        return None
    row = con.execute(f"SELECT greatest({', '.join(parts)})").fetchone()
    return row[0] if row else None


def meta(con: duckdb.DuckDBPyConnection) -> Meta:
    published = None
    if columns(con, "published"):
        row = con.execute("SELECT max(published_at) FROM published").fetchone()
        published = row[0] if row else None
    patterns = con.execute(
        "SELECT DISTINCT pattern_id FROM anomalies WHERE pattern_id IS NOT NULL ORDER BY 1"
    ).fetchall()
    kinds = con.execute("SELECT DISTINCT kind FROM anomalies WHERE kind IS NOT NULL ORDER BY 1").fetchall()
    return Meta(published, newest_scored(con), [r[0] for r in patterns], [r[0] for r in kinds])


def window_text(since: str, newest: datetime | None) -> str:
    """The window in words: `all time`, or `the last 6h of scored data (to 2026-01-01 03:59 UTC)`."""
    if parse_since(since) is None:
        return "all time"
    if newest is None:
        return f"the last {since} of scored data"
    return f"the last {since} of scored data (to {newest:%Y-%m-%d %H:%M} UTC)"


def window_note(info: Meta, now: datetime) -> str | None:
    """Says how old the newest scored data is when it is older than STALE_AFTER (the pipeline is
    behind, or the data is a replay of old traces): the windows count back from it, not from now."""
    if info.newest is None:
        return None
    age = now.astimezone(UTC).replace(tzinfo=None) - info.newest
    if age <= STALE_AFTER:
        return None
    return (
        f"The newest scored data is from {info.newest:%Y-%m-%d %H:%M} UTC, {_age_text(age)} ago (the pipeline is "
        "behind, or the data is a replay of old traces): every window counts back from it, not from now."
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


INCIDENT_WHERE = """ WHERE ($start IS NULL OR end_ts > CAST($start AS TIMESTAMP))
        AND ($pattern IS NULL OR list_contains(patterns, CAST($pattern AS INTEGER)))
        AND ($kind IS NULL OR list_contains(kinds, CAST($kind AS VARCHAR)))"""
POINT_WHERE = """ WHERE ($start IS NULL OR bucket_ts >= CAST($start AS TIMESTAMP))
        AND ($pattern IS NULL OR pattern_id = CAST($pattern AS INTEGER))
        AND ($kind IS NULL OR kind = CAST($kind AS VARCHAR))"""
POINT_ORDER = " ORDER BY bucket_ts DESC, score DESC, node"  # newest first, the strongest first within a bucket
PAGE = " LIMIT $limit OFFSET $offset"


def total_rows(
    con: duckdb.DuckDBPyConnection, table: str, where: str, window: dict[str, Any], page: list, offset: int, limit: int
) -> int:
    """How many rows match; counted only when the page may be cut (a short first page is all of them)."""
    if offset == 0 and len(page) < limit:
        return len(page)
    row = con.execute(f"SELECT count(*) FROM {table}" + where, window).fetchone()
    return int(row[0]) if row else 0


def list_incidents(
    con: duckdb.DuckDBPyConnection, filters: Filters, newest: datetime | None, offset: int | None = None
) -> Listing[Incident]:
    """Incidents still going on at or after the window's start, newest first: `filters.limit` of them
    from `offset` (default `filters.incident_offset`), and how many match in all."""
    from tasks.scoring.incidents import Incident

    offset = filters.incident_offset if offset is None else offset
    window = filters.window(newest)
    sql = _incident_select(con) + INCIDENT_WHERE + " ORDER BY start_ts DESC, incident_id" + PAGE
    rows = [
        Incident.from_row(r) for r in con.execute(sql, {**window, "limit": filters.limit, "offset": offset}).fetchall()
    ]
    total = total_rows(con, "incidents", INCIDENT_WHERE, window, rows, offset, filters.limit)
    return Listing(rows, total, offset, filters.limit)


def _point_select(con: duckdb.DuckDBPyConnection) -> str:
    return (
        "SELECT bucket_ts, pattern_id, node, caller, callee, interface, feature, observed, expected, threshold, "
        f"score, direction, kind, {_column(con, 'anomalies', 'culprit')}, model_name, model_version FROM anomalies"
    )


def list_anomalies(con: duckdb.DuckDBPyConnection, filters: Filters, newest: datetime | None) -> Listing[Point]:
    """Irregular points in the window, newest first (the strongest first within a bucket):
    `filters.limit` of them from `filters.offset`, and how many match in all."""
    window = filters.window(newest)
    sql = _point_select(con) + POINT_WHERE + POINT_ORDER + PAGE
    params = {**window, "limit": filters.limit, "offset": filters.offset}
    rows = [Point(*r) for r in con.execute(sql, params).fetchall()]
    return Listing(
        rows,
        total_rows(con, "anomalies", POINT_WHERE, window, rows, filters.offset, filters.limit),
        filters.offset,
        filters.limit,
    )


def find_incident(con: duckdb.DuckDBPyConnection, incident_id: str) -> Incident | None:
    """The incident with this id, or the one that absorbed it (its `aliases`: ids stay valid)."""
    from tasks.scoring.incidents import Incident

    aliases = _column(con, "incidents", "aliases")
    sql = _incident_select(con) + f" WHERE incident_id = $id OR list_contains(coalesce({aliases}, []), $id) LIMIT 1"
    row = con.execute(sql, {"id": incident_id}).fetchone()
    return None if row is None else Incident.from_row(row)


def incident_points(
    con: duckdb.DuckDBPyConnection, incident: Incident, limit: int = INCIDENT_POINTS_LIMIT
) -> list[Point]:
    """The incident's own points (tasks.scoring.incidents.incident_point_sql), the strongest first."""
    from tasks.scoring.incidents import incident_point_sql

    where = incident_point_sql("$start", "$end", "CAST($patterns AS INTEGER[])", "CAST($nodes AS VARCHAR[])")
    sql = _point_select(con) + f" WHERE {where} ORDER BY score DESC, bucket_ts, node LIMIT $limit"
    params = {
        "start": incident.start_ts,
        "end": incident.end_ts,
        "patterns": [int(p) for p in incident.patterns],
        "nodes": list(incident.nodes),
        "limit": limit,
    }
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


# what each request parameter takes, in words, for the answer to a bad one (422)
ACCEPTED = {
    "since": f"{SINCE_HELP}, counted back from the newest scored data",
    "pattern": f"a pattern id, a whole number from 1 to {MAX_PATTERN_ID}",
    "kind": "one of traffic_spike, traffic_drop, errors, latency, traces, novel_rpc, extreme_call",
    "limit": "a whole number of rows, at least 1 (the page: at most 1000; the JSON routes: at most 10000)",
    "offset": f"a whole number of rows to skip, from 0 to {MAX_OFFSET}",
    "incident_offset": f"a whole number of incidents to skip, from 0 to {MAX_OFFSET}",
    "incident_id": "an incident id: 6 to 32 hex digits (0-9, a-f), as the incidents list links it",
}
SHOWN_INPUT = 80  # characters of a rejected value repeated back


class BadParameter(NamedTuple):
    """A request parameter the view does not take: its name, the value given, what is wrong, what is accepted."""

    name: str
    value: str
    problem: str
    accepted: str

    def text(self) -> str:
        return f"{self.name}={self.value!r}: {self.problem}; accepted: {self.accepted}"


def bad_parameters(errors: Iterable[Any]) -> list[BadParameter]:
    """FastAPI's validation errors as BadParameters a person can read (no regular expressions)."""
    found = []
    for error in errors:
        loc = [str(part) for part in error.get("loc", ())]
        name = loc[-1] if loc else "request"
        given = error.get("input")
        value = "" if given is None else str(given)
        value = value if len(value) <= SHOWN_INPUT else value[:SHOWN_INPUT] + "…"
        kind = str(error.get("type", ""))
        problem = "not accepted" if kind == "string_pattern_mismatch" else str(error.get("msg", "not accepted"))
        found.append(BadParameter(name, value, problem[:1].lower() + problem[1:], ACCEPTED.get(name, "see /docs")))
    return found


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
