"""The view's two pictures of an incident, from the published snapshot alone (read-only):

- its pattern's graph (`pattern_nodes`, `pattern_edges` of the version its model was trained on),
  the incident's RPCs coloured, its most likely culprit outlined (tasks.app.view_graph); a novel-RPC
  incident shows its new RPCs (dashed: in no graph) under the known RPCs that reach their caller;
- its strongest RPC's actual series around it with its flagged points (tasks.app.plots.incident_plot).

The band: where the snapshot holds the forecaster's verdict on every scored point (`forecasts`:
forecast, and the lower and upper values that would not alarm), the picture draws the forecast and
that band over every scored bucket of the window, the flagged points in red. Older snapshots hold
the forecast and threshold only where a point was flagged (`anomalies.expected`,
`anomalies.threshold`): the picture then draws, at each flagged bucket, the band from the forecast
to the threshold the point crossed. The actual series is the pattern's own share of the RPC
(`pattern_series`) when the snapshot holds that node's feature, else all calls of the RPC
(`rpc_series`, every pattern together), and says which.

Pictures are cached per snapshot file version (its mtime) and incident.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path

import duckdb

from tasks.app.plots import Band, Marks, Series, incident_plot
from tasks.app.view import Point, columns, find_incident, incident_points, open_snapshot
from tasks.app.view_graph import GraphSpec, graph_png
from tasks.keys import split_node_key
from tasks.scoring.incidents import Incident

# feature -> (series column, how a bucket's rows add up, axis label); constants, never input
FEATURE_COLUMNS = {
    "calls": ("calls", "sum", "calls per bucket"),
    "errors": ("errors", "sum", "errors per bucket"),
    "rt_mean": ("rt_mean", "avg", "mean response time (ms)"),
    "rt_p95": ("rt_p95", "max", "p95 response time (ms)"),
}
COUNT_FEATURES = ("calls", "errors")
TRACE_FEATURE = "surprising_traces"
CONTEXT_RPCS = 6  # known RPCs shown above a novel RPC's caller
PICTURES = ("graph", "forecast")


def _graph_version(con: duckdb.DuckDBPyConnection, pattern_id: int, model_version: int | None) -> int | None:
    """The graph version the scoring model was trained on, if the snapshot holds it, else the newest."""
    row = con.execute(
        """SELECT m.pattern_version FROM models m WHERE m.pattern_id = ? AND m.model_version = ?
           AND EXISTS (SELECT 1 FROM pattern_nodes n
                       WHERE n.pattern_id = m.pattern_id AND n.version = m.pattern_version)
           ORDER BY m.recorded_at DESC LIMIT 1""",
        [pattern_id, model_version],
    ).fetchone()
    if row is None:
        row = con.execute("SELECT max(version) FROM pattern_nodes WHERE pattern_id = ?", [pattern_id]).fetchone()
    return row[0] if row else None


def pattern_graph(
    con: duckdb.DuckDBPyConnection, pattern_id: int, version: int | None
) -> tuple[list[str], list[tuple[str, str]]]:
    nodes = con.execute(
        "SELECT DISTINCT node FROM pattern_nodes WHERE pattern_id = ? AND version = ? ORDER BY node",
        [pattern_id, version],
    ).fetchall()
    edges = con.execute(
        "SELECT DISTINCT parent_node, child_node FROM pattern_edges WHERE pattern_id = ? AND version = ? ORDER BY 1, 2",
        [pattern_id, version],
    ).fetchall()
    return [n for (n,) in nodes], [(p, c) for p, c in edges]


def _caller(node: str) -> str | None:
    try:
        return split_node_key(node).caller
    except ValueError:
        return None


def _callee(node: str) -> str | None:
    try:
        return split_node_key(node).callee
    except ValueError:
        return None


def _parents_of(outside: set[str], nodes: list[str]) -> list[tuple[str, str]]:
    """An edge into each RPC from the RPCs that call its caller (they are how it is reached)."""
    return [(n, o) for o in sorted(outside) for n in nodes if n not in outside and _callee(n) == _caller(o)]


def graph_spec(con: duckdb.DuckDBPyConnection, incident: Incident, points: list[Point]) -> GraphSpec:
    marked: dict[str, float] = dict.fromkeys(incident.nodes, 0.0)
    for point in points:
        marked[point.node] = max(marked.get(point.node, 0.0), point.score)
    strongest = points[0].node if points else (incident.nodes[0] if incident.nodes else None)
    culprit = incident.culprits[0] if incident.culprits else None
    if incident.patterns:
        pattern_id = incident.patterns[0]
        version = _graph_version(con, pattern_id, points[0].model_version if points else None)
        nodes, edges = pattern_graph(con, pattern_id, version)
        outside = set(incident.nodes) - set(nodes)
        title = f"pattern {pattern_id}, graph version {version}" if nodes else f"pattern {pattern_id}: no graph"
    else:
        callers = sorted({c for c in map(_caller, incident.nodes) if c is not None})
        rows = con.execute(
            "SELECT DISTINCT node FROM pattern_nodes WHERE list_contains(?, callee) ORDER BY node LIMIT ?",
            [callers, CONTEXT_RPCS],
        ).fetchall()
        nodes, edges, outside = [n for (n,) in rows], [], set(incident.nodes)
        title = f"new RPCs of {', '.join(callers)} (in no pattern's graph)"
        title += " under the known RPCs reaching it" if nodes else ""
    edges = edges + _parents_of(outside, nodes)
    return GraphSpec(nodes, edges, marked, strongest, culprit, outside, title)


def _window(incident: Incident) -> tuple[datetime, datetime]:
    """The incident with context around it: its own length on each side, 30 min to 3 h."""
    pad = min(max(incident.end_ts - incident.start_ts, timedelta(minutes=30)), timedelta(hours=3))
    start = (incident.start_ts - pad).replace(second=0, microsecond=0)
    return start, incident.end_ts + pad


def node_series(con: duckdb.DuckDBPyConnection, point: Point, feature: str, lo: datetime, hi: datetime) -> Series:
    """The RPC's actual `feature` per bucket in [lo, hi): the pattern's own series when the snapshot
    publishes `pattern_series` holding the node's feature there, else the RPC's `rpc_series` (all
    patterns); counts 0 where absent."""
    column, how, ylabel = FEATURE_COLUMNS[feature]
    rows = []
    if point.pattern_id is not None and column in columns(con, "pattern_series"):
        sql = f"""SELECT bucket_ts, {how}({column}), max(bucket_seconds) FROM pattern_series
            WHERE pattern_id = ? AND node = ? AND bucket_ts >= ? AND bucket_ts < ? GROUP BY 1 ORDER BY 1"""
        rows = con.execute(sql, [point.pattern_id, point.node, lo, hi]).fetchall()
        label, table = "actual (this pattern's share of the RPC)", "pattern_series"
    if not any(r[1] is not None for r in rows):
        try:
            caller, callee, interface, rpc_type = split_node_key(point.node)
        except ValueError:
            caller, callee, interface, rpc_type = point.caller or "", point.callee or "", point.interface, ""
        sql = f"""SELECT bucket_ts, {how}({column}), max(bucket_seconds) FROM rpc_series
            WHERE caller = ? AND callee = ? AND coalesce(interface, '') = ? AND rpc_type = ?
            AND bucket_ts >= ? AND bucket_ts < ? GROUP BY 1 ORDER BY 1"""
        rows = con.execute(sql, [caller, callee, interface or "", rpc_type, lo, hi]).fetchall()
        label = "actual (all calls of this RPC, every pattern)" if point.pattern_id is not None else "actual"
        table = "rpc_series"
    seconds = max((r[2] for r in rows if r[2]), default=None) or _bucket_seconds(con)
    bucket = timedelta(seconds=int(seconds))
    values = {r[0]: float(r[1]) for r in rows if r[1] is not None}
    if feature in COUNT_FEATURES:  # a bucket without rows had no calls (or errors), up to the data's end
        end = min(hi, _data_end(con, table) + bucket)
        first = lo - timedelta(seconds=(lo - datetime(2000, 1, 1)).total_seconds() % bucket.total_seconds())
        grid = [first + i * bucket for i in range(int((end - first) / bucket) + 1) if first + i * bucket < end]
        values = {t: values.get(t, 0.0) for t in grid} | values
    times = sorted(values)
    return Series(times, [values[t] for t in times], label, ylabel, bucket)


def _data_end(con: duckdb.DuckDBPyConnection, table: str) -> datetime:
    """The newest bucket of the series table (`rpc_series` or `pattern_series`, constants): no zeros after it."""
    sql = {
        "rpc_series": "SELECT max(bucket_ts) FROM rpc_series",
        "pattern_series": "SELECT max(bucket_ts) FROM pattern_series",
    }
    row = con.execute(sql[table]).fetchone()
    return row[0] if row and row[0] else datetime.min


def _bucket_seconds(con: duckdb.DuckDBPyConnection) -> int:
    row = con.execute("SELECT max(bucket_seconds) FROM rpc_series").fetchone()
    return int(row[0]) if row and row[0] else 60


def node_marks(con: duckdb.DuckDBPyConnection, point: Point, feature: str, lo: datetime, hi: datetime) -> Marks:
    """The RPC's flagged points of `feature` in [lo, hi), with forecast and threshold."""
    rows = con.execute(
        """SELECT bucket_ts, observed, expected, threshold FROM anomalies
           WHERE pattern_id IS NOT DISTINCT FROM ? AND node = ? AND feature = ? AND bucket_ts >= ? AND bucket_ts < ?
           AND observed IS NOT NULL AND expected IS NOT NULL AND threshold IS NOT NULL ORDER BY bucket_ts""",
        [point.pattern_id, point.node, feature, lo, hi],
    ).fetchall()
    return Marks([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])


def node_band(con: duckdb.DuckDBPyConnection, point: Point, feature: str, lo: datetime, hi: datetime) -> Band | None:
    """The forecast and non-alarm band of the RPC's `feature` per scored bucket in [lo, hi), from
    `forecasts`; None when the snapshot has no such table (published before it existed)."""
    if point.pattern_id is None or not {"expected", "lower", "upper"} <= columns(con, "forecasts"):
        return None
    rows = con.execute(
        """SELECT bucket_ts, any_value(expected), any_value(lower), any_value(upper) FROM forecasts
           WHERE pattern_id = ? AND node = ? AND feature = ? AND bucket_ts >= ? AND bucket_ts < ?
           GROUP BY 1 ORDER BY 1""",
        [point.pattern_id, point.node, feature, lo, hi],
    ).fetchall()
    return Band([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])


def _step(marks: Marks) -> timedelta:
    gaps = [b - a for a, b in zip(marks.times, marks.times[1:]) if b > a]
    return min(gaps, default=timedelta(seconds=5))


def _point_words(point: Point) -> str:
    def num(value: float | None) -> str:
        return "?" if value is None else f"{value:.1f}"

    return (
        f"{point.kind} {point.feature}: {num(point.observed)} "
        f"(forecast {num(point.expected)}, threshold {num(point.threshold)})"
    )


def forecast_picture(con: duckdb.DuckDBPyConnection, incident: Incident, points: list[Point]) -> bytes:
    lo, hi = _window(incident)
    span = (incident.start_ts, incident.end_ts)
    if not points:
        empty = Series([], [], "actual", "calls per bucket", timedelta(minutes=1))
        return incident_plot(empty, Marks([], [], [], []), "no irregular points of this incident", span)
    point = points[0]
    feature = point.feature if point.feature in FEATURE_COLUMNS else "calls"
    series = node_series(con, point, feature, lo, hi)
    windows = node_marks(con, point, TRACE_FEATURE, lo, hi)
    where = f"pattern {point.pattern_id}" if point.pattern_id is not None else "no pattern (new RPC)"
    model = f", model v{point.model_version}" if point.model_version is not None else ""
    title = f"{point.rpc} · {where}{model}\nstrongest point {point.bucket_ts:%H:%M:%S}: "
    title += _point_words(point)
    marks, band = node_marks(con, point, feature, lo, hi), node_band(con, point, feature, lo, hi)
    return incident_plot(series, marks, title, span, windows, _step(windows), band)


def render(con: duckdb.DuckDBPyConnection, incident_id: str, which: str) -> bytes | None:
    """One picture ("graph" or "forecast") of an incident; None when there is no such incident."""
    incident = find_incident(con, incident_id)
    if incident is None:
        return None
    points = incident_points(con, incident)
    if which == "graph":
        return graph_png(graph_spec(con, incident, points))
    return forecast_picture(con, incident, points)


@lru_cache(maxsize=64)
def _cached(path: str, mtime_ns: int, incident_id: str, which: str) -> bytes | None:
    with open_snapshot(Path(path)) as con:
        return None if con is None else render(con, incident_id, which)


def picture(path: Path, incident_id: str, which: str) -> bytes | None:
    """A picture of the snapshot at `path`, cached until the next publish replaces the file."""
    if which not in PICTURES:
        raise ValueError(f"no picture {which!r}; there are {', '.join(PICTURES)}")
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        return None
    return _cached(str(path), mtime, incident_id, which)
