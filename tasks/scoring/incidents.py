"""Incidents: flagged points that belong together, one row per run of points.

The one incident rule of rpcwatch: a group's flagged points (a pattern's; novel RPCs: a calling
service's) at most `incident_gap_buckets` apart form a run; which runs are incidents is the alarm
policy's decision (`tasks.scoring.policy`): decisive runs at once, and candidates (spanning
`incident_min_buckets` buckets, like an alert's `for: 3m`, or one point scoring >= `PEAK_SCORE`)
whose evidence reaches the bar calibrated for their hour.
`rebuild_incidents` applies it to `anomalies` (reads `anomalies` and `incidents`; writes
`incidents`); `incidents_of` applies the same SQL to any set of points (the evaluation's naive
rule, or anomalies read back), reading only what it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

import duckdb
import pandas as pd
import pyarrow as pa

from tasks.clock import HOUR, naive_utc
from tasks.keys import split_node_key
from tasks.scoring.extreme import KIND as EXTREME
from tasks.scoring.novel import KIND as NOVEL
from tasks.scoring.novel import NEW_EDGE, NEW_INTERFACE
from tasks.scoring.policy import CALIBRATION_HOURS, threshold

# a run whose calling service uses this many never-seen RPCs (new interfaces of known edges) in one
# bucket is decisive: a deploy adds a few endpoints, a scanner enumerates dozens
SCAN_INTERFACES = 10
PEAK_SCORE = 3.0  # a run shorter than `incident_min_buckets` is an incident when a point scores this much
# the product's groups: a pattern's points, or a calling service's novel RPCs
GROUP_SQL = "coalesce(CAST(pattern_id AS VARCHAR), 'novel:' || caller)"
INCIDENT_COLUMNS = (
    "incident_id, start_ts, end_ts, patterns, nodes, peak_score, kinds, points, culprits, evidence, "
    "incident_group, aliases"
)
NOVEL_GROUP = "novel:"  # the prefix of a calling service's group (GROUP_SQL)
# the columns the rule reads: bucket_ts, grp (the group), pattern_id, node, score, kind, culprit,
# caller and callee (which novel RPCs join a pattern's run), and for the evidence line: feature,
# observed, expected, threshold
ANOMALY_POINTS_SQL = f"""
SELECT bucket_ts, pattern_id, node, score, kind, culprit, feature, observed, expected, threshold,
       caller, callee, {GROUP_SQL} AS grp FROM anomalies
WHERE bucket_ts >= $lo AND bucket_ts < $hi"""
POINTS_VIEW = "incident_points"  # where `incidents_of` registers the points it is given
OPTIONAL_POINT_COLUMNS = {
    "culprit": pa.string(),
    "feature": pa.string(),
    "observed": pa.float64(),
    "expected": pa.float64(),
    "threshold": pa.float64(),
    "caller": pa.string(),
    "callee": pa.string(),
}  # NULL when not given
GIVEN_POINTS_SQL = f"""
SELECT CAST(bucket_ts AS TIMESTAMP) AS bucket_ts, CAST(pattern_id AS INTEGER) AS pattern_id, node,
       CAST(score AS DOUBLE) AS score, kind, CAST(culprit AS VARCHAR) AS culprit, CAST(feature AS VARCHAR) AS feature,
       CAST(observed AS DOUBLE) AS observed, CAST(expected AS DOUBLE) AS expected,
       CAST(threshold AS DOUBLE) AS threshold, CAST(caller AS VARCHAR) AS caller, CAST(callee AS VARCHAR) AS callee,
       grp FROM {POINTS_VIEW}"""
# the strongest point in words: "<kind> <feature>: <observed> (expected <e>, threshold <t>) on <node>";
# ties broken by the text, so that a rebuild gives the same row
POINT_TEXT_SQL = """(kind || ' ' || coalesce(feature, '') || ': ' || coalesce(CAST(round(observed, 1) AS VARCHAR), '?')
    || ' (expected ' || coalesce(CAST(round(expected, 1) AS VARCHAR), '?') || ', threshold '
    || coalesce(CAST(round(threshold, 1) AS VARCHAR), '?') || ') on ' || node)"""
EVIDENCE_SQL = f"arg_max({POINT_TEXT_SQL}, ({POINT_TEXT_SQL} IS NOT NULL, score, {POINT_TEXT_SQL}))"


def runs_sql(points_sql: str) -> str:
    """The points `points_sql` selects, each with the `run` it belongs to: a group's points at most
    $gap apart form a run. RANGE framing sums a bucket's rows together, so rows sharing a bucket get
    the same run whatever order the tie is sorted in."""
    return f"""
WITH a AS ({points_sql}),
marked AS (
    SELECT *, CASE WHEN bucket_ts - lag(bucket_ts) OVER (PARTITION BY grp ORDER BY bucket_ts) <= $gap
                   THEN 0 ELSE 1 END AS new_run FROM a),
runs AS (
    SELECT *, sum(new_run) OVER (PARTITION BY grp ORDER BY bucket_ts RANGE UNBOUNDED PRECEDING) AS run FROM marked)
"""


def joined_runs_sql(points_sql: str) -> str:
    """`runs_sql`, then `grouped`: the same points with a calling service's run of novel RPCs moved
    into the pattern run it explains (one event, one incident): a pattern run whose flagged RPCs
    the service makes or serves, overlapping it within $gap (the earliest such run when several
    do). Extreme single calls stay in their own run: they are decisive on their own."""
    return (
        runs_sql(points_sql)
        + f""",
novel_runs AS (
    SELECT grp, run, min(bucket_ts) AS lo, max(bucket_ts) AS hi, substr(grp, {len(NOVEL_GROUP) + 1}) AS service
    FROM runs WHERE starts_with(grp, '{NOVEL_GROUP}') GROUP BY grp, run HAVING bool_and(kind = '{NOVEL}')),
pattern_runs AS (
    SELECT grp, run, min(bucket_ts) AS lo, max(bucket_ts) AS hi,
           list_distinct(flatten(list([caller, callee]))) AS services
    FROM runs WHERE NOT starts_with(grp, '{NOVEL_GROUP}') GROUP BY grp, run),
joins AS (
    SELECT n.grp AS novel_grp, n.run AS novel_run, arg_min(p.grp, (p.lo, p.grp)) AS to_grp,
           arg_min(p.run, (p.lo, p.grp)) AS to_run
    FROM novel_runs n JOIN pattern_runs p
      ON p.lo <= n.hi + $gap AND n.lo <= p.hi + $gap AND list_contains(p.services, n.service)
    GROUP BY n.grp, n.run),
grouped AS (
    SELECT r.* REPLACE (coalesce(j.to_grp, r.grp) AS grp, coalesce(j.to_run, r.run) AS run)
    FROM runs r LEFT JOIN joins j ON r.grp = j.novel_grp AND r.run = j.novel_run)
"""
    )


def run_stats_sql(points_sql: str) -> str:
    """Every run of the points `points_sql` selects, whether the policy keeps it or not: its
    incidents-table columns plus `evidence_mass` (the most score its points sum to within any
    $horizon: persistence counts up to the fixed rule's span, not over a whole day), `buckets` and
    `decisive` (it holds a never-seen edge, a decisive single call (`tasks.scoring.extreme`), or
    `SCAN_INTERFACES` never-seen interfaces in one bucket). Lists sorted, so that a rebuild gives
    identical rows; culprits ranked by their points' summed score (ties by name)."""
    return (
        joined_runs_sql(points_sql)
        + f""",
bucket_sums AS (
    SELECT grp, run, bucket_ts, sum(score) AS total,
           count(DISTINCT node) FILTER (WHERE kind = '{NOVEL}' AND feature = '{NEW_INTERFACE}') AS new_interfaces
    FROM grouped GROUP BY ALL),
windowed AS (
    SELECT grp, run, max(within) AS evidence_mass, max(new_interfaces) AS most_new_interfaces FROM (
        SELECT grp, run, new_interfaces, sum(total) OVER (PARTITION BY grp, run ORDER BY bucket_ts
                                          RANGE BETWEEN $horizon PRECEDING AND CURRENT ROW) AS within
        FROM bucket_sums) GROUP BY ALL),
blamed AS (
    SELECT grp, run, culprit, sum(score) AS weight FROM grouped WHERE culprit IS NOT NULL GROUP BY ALL),
ranked AS (
    SELECT grp, run, list(culprit ORDER BY weight DESC, culprit) AS culprits FROM blamed GROUP BY ALL),
run_stats AS (
    SELECT grp, run, md5(grp || ':' || CAST(min(bucket_ts) AS VARCHAR))[:12] AS incident_id,
           min(bucket_ts) AS start_ts, max(bucket_ts) + $bucket AS end_ts,
           list_sort(list(DISTINCT pattern_id) FILTER (WHERE pattern_id IS NOT NULL)) AS patterns,
           list_sort(list(DISTINCT node)) AS nodes, max(score) AS peak_score,
           list_sort(list(DISTINCT kind)) AS kinds, count(*) AS points, """
        + EVIDENCE_SQL
        + f""" AS evidence,
           count(DISTINCT bucket_ts) AS buckets,
           bool_or((kind = '{NOVEL}' AND feature = '{NEW_EDGE}') OR kind = '{EXTREME}') AS decisive
    FROM grouped GROUP BY grp, run),
stats AS (
    SELECT * EXCLUDE (decisive), decisive OR most_new_interfaces >= {SCAN_INTERFACES} AS decisive
    FROM run_stats JOIN windowed USING (grp, run))
"""
    )


def incidents_sql(points_sql: str) -> str:
    """The incidents rows (as the `incidents` table holds them) of the points `points_sql` selects:
    the runs the alarm policy keeps (`tasks.scoring.policy`): decisive ones, and candidates (runs
    spanning $min_buckets buckets or with a point scoring $peak) whose evidence reaches the
    threshold of the hour they start in ($th_hours / $th_values; none: every candidate)."""
    return (
        run_stats_sql(points_sql)
        + """,
thresholds AS (SELECT unnest(CAST($th_hours AS TIMESTAMP[])) AS hour, unnest(CAST($th_values AS DOUBLE[])) AS threshold)
SELECT incident_id, start_ts, end_ts, patterns, nodes, peak_score, kinds, points, coalesce(culprits, []), evidence,
       grp AS incident_group, CAST([] AS VARCHAR[]) AS aliases
FROM stats LEFT JOIN ranked USING (grp, run) LEFT JOIN thresholds t ON t.hour = date_trunc('hour', stats.start_ts)
WHERE decisive OR ((buckets >= $min_buckets OR peak_score >= $peak)
                   AND (t.threshold IS NULL OR evidence_mass >= t.threshold))
"""
    )


# [$start, $end) grown to every run of anomalies read that overlaps it
RUN_SPAN_SQL = (
    runs_sql(ANOMALY_POINTS_SQL)
    + """
SELECT least($start, min(first)), greatest($end, max(last)) FROM (
    SELECT min(bucket_ts) AS first, max(bucket_ts) + $bucket AS last FROM runs GROUP BY grp, run)
WHERE first < $end AND last > $start
"""
)
INCIDENT_SPAN_SQL = """
SELECT least($start, min(start_ts)), greatest($end, max(end_ts)) FROM incidents
WHERE start_ts < $end AND end_ts > $start
"""
INCIDENTS_SQL = incidents_sql(ANOMALY_POINTS_SQL)


@dataclass(frozen=True)
class Incident:
    """One run of points the rule keeps, as a row of the `incidents` table."""

    incident_id: str
    start_ts: datetime  # the first bucket
    end_ts: datetime  # the end of the last bucket
    patterns: list[int]
    nodes: list[str]
    peak_score: float
    kinds: list[str]
    points: int
    culprits: list[str]  # the services most likely behind it, most likely first
    evidence: str | None = None  # its strongest point in words
    group: str | None = None  # the group its runs were formed in (GROUP_SQL)
    aliases: list[str] = field(default_factory=list)  # ids it held before it absorbed other incidents

    @classmethod
    def from_row(cls, row: tuple) -> Incident:
        """An incident from a row of `incidents` (or of `incidents_sql`), columns in INCIDENT_COLUMNS
        order; the last two (group, aliases) may be left off."""
        incident_id, start_ts, end_ts, patterns, nodes, peak_score, kinds, points, culprits, evidence = row[:10]
        group, aliases = (tuple(row[10:12]) + (None, None))[:2]
        return cls(
            incident_id,
            start_ts,
            end_ts,
            list(patterns or []),
            list(nodes),
            peak_score,
            list(kinds),
            int(points),
            list(culprits or []),
            evidence,
            group,
            list(aliases or []),
        )


def stored_incidents(con: duckdb.DuckDBPyConnection, start: datetime, end: datetime) -> list[Incident]:
    """The `incidents` rows starting in [start, end] (both ends included), as the policy stored them."""
    rows = con.execute(
        f"SELECT {INCIDENT_COLUMNS} FROM incidents WHERE start_ts >= ? AND start_ts <= ?", [start, end]
    ).fetchall()
    return [Incident.from_row(row) for row in rows]


def rule_params(
    gap_buckets: int, min_buckets: int, seconds: int, thresholds: dict[datetime, float] | None = None
) -> dict[str, object]:
    """The parameters of `incidents_sql`: the run rule, the fixed rule, and the policy's threshold
    per hour (none: the fixed rule everywhere)."""
    hours = sorted(thresholds or {})
    return {
        "gap": timedelta(seconds=gap_buckets * seconds),
        "bucket": timedelta(seconds=seconds),
        "min_buckets": min_buckets,
        "peak": PEAK_SCORE,
        "horizon": timedelta(seconds=max(min_buckets - 1, 0) * seconds),
        "th_hours": hours,
        "th_values": [float((thresholds or {})[h]) for h in hours],
    }


def incidents_of(
    con: duckdb.DuckDBPyConnection,
    points: pd.DataFrame | pa.Table,
    gap_buckets: int,
    min_buckets: int,
    seconds: int,
    thresholds: dict[datetime, float] | None = None,
) -> list[Incident]:
    """The incident rule over any points: columns bucket_ts, grp (the group runs are formed in),
    pattern_id (may be null), node, score, kind, and optionally culprit, feature, observed,
    expected, threshold. Ordered by start, then id."""
    if not len(points):
        return []
    points = _with_optional_columns(points)
    con.register(POINTS_VIEW, points)
    try:
        rows = con.execute(
            incidents_sql(GIVEN_POINTS_SQL) + "ORDER BY 2, 1",
            rule_params(gap_buckets, min_buckets, seconds, thresholds),
        ).fetchall()
    finally:
        con.unregister(POINTS_VIEW)
    return [Incident.from_row(row) for row in rows]


def _with_optional_columns(points: pd.DataFrame | pa.Table) -> pd.DataFrame | pa.Table:
    """The points with the optional columns they lack added as NULLs."""
    for name, kind in OPTIONAL_POINT_COLUMNS.items():
        if isinstance(points, pa.Table):
            if name not in points.column_names:
                points = points.append_column(name, pa.nulls(len(points), kind))
        elif name not in points.columns:
            points = points.assign(**{name: None})
    return points


def anomaly_points(con: duckdb.DuckDBPyConnection, start: datetime, end: datetime) -> pd.DataFrame:
    """The anomalies of [start, end) as the rule reads them (with the product's groups; pattern_id
    a nullable integer)."""
    return con.execute(ANOMALY_POINTS_SQL, {"lo": start, "hi": end}).df()


def _incident_span(
    con: duckdb.DuckDBPyConnection, start: datetime, end: datetime, gap: timedelta, bucket: timedelta, margin: timedelta
) -> tuple[datetime, datetime]:
    """[start, end) grown until no stored incident and no run of flagged points crosses its edges,
    so the incidents inside can be rebuilt from the points inside alone. Stored incidents let a run
    that began hours before be found in one step; points are read `margin` beyond the edges."""
    while True:
        [(lo, hi)] = con.execute(INCIDENT_SPAN_SQL, {"start": start, "end": end}).fetchall()
        [(lo, hi)] = con.execute(
            RUN_SPAN_SQL, {"lo": lo - margin, "hi": hi + margin, "gap": gap, "bucket": bucket, "start": lo, "end": hi}
        ).fetchall()
        if (lo, hi) == (start, end):
            return start, end
        start, end = lo, hi


def rebuild_incidents(
    con: duckdb.DuckDBPyConnection,
    hour: datetime,
    gap_buckets: int,
    seconds: int,
    min_buckets: int,
    false_per_day: float | None = None,
) -> int:
    """Flagged points of one pattern (novel RPCs: of one calling service) no more than `gap_buckets`
    apart are one run: a flood is one incident, not 300 rows. Which runs are incidents is the alarm
    policy's call (`tasks.scoring.policy`) at `false_per_day` (None: the fixed rule only, a run
    spanning `min_buckets` buckets or one point scoring >= `PEAK_SCORE`).

    The hour's points just changed: the incidents of every run touching the hour, however far it
    reaches into earlier or later hours, are rebuilt whole (one row per run, extended; never a
    second row for its tail), so the table is the same whatever order hours are (re)scored in.
    Returns the number of incidents rebuilt."""
    gap, bucket = timedelta(seconds=gap_buckets * seconds), timedelta(seconds=seconds)
    start, end = _incident_span(
        con, naive_utc(hour), naive_utc(hour + HOUR), gap, bucket, margin=gap * max(min_buckets, 1)
    )  # a run too short to be stored fits in it
    thresholds = (
        {}
        if false_per_day is None
        else policy_thresholds(con, _hours(start, end), gap_buckets, seconds, min_buckets, false_per_day)
    )
    params = rule_params(gap_buckets, min_buckets, seconds, thresholds)
    span = {"start": start, "end": end}
    replaced = [_with_group(Incident.from_row(r)) for r in con.execute(REPLACED_SQL, span).fetchall()]
    rebuilt = carry_ids(
        [
            Incident.from_row(r)
            for r in con.execute(INCIDENTS_SQL + "ORDER BY 2, 1", {"lo": start, "hi": end, **params}).fetchall()
        ],
        replaced,
    )
    con.execute("DELETE FROM incidents WHERE start_ts < $end AND end_ts > $start", span)
    con.execute("DELETE FROM incident_rpcs WHERE start_ts < $end AND end_ts > $start", span)
    if rebuilt:
        con.executemany(
            f"INSERT INTO incidents ({INCIDENT_COLUMNS}) VALUES ({', '.join('?' * 12)})", [_row(i) for i in rebuilt]
        )
        con.execute(INCIDENT_RPCS_SQL, span)
    return len(rebuilt)


# the stored incidents a rebuild of [$start, $end) replaces
REPLACED_SQL = f"SELECT {INCIDENT_COLUMNS} FROM incidents WHERE start_ts < $end AND end_ts > $start ORDER BY 2, 1"


def incident_point_sql(start: str, end: str, patterns: str, nodes: str, point: str = "") -> str:
    """Which irregular points (columns of `anomalies`, prefixed `point.`) are an incident's, given SQL
    for its start, end, patterns and nodes (constants or parameters of the calling code): its
    patterns' points in its time, and the pattern-less ones (novel RPCs, extreme calls) of its RPCs."""
    a = f"{point}." if point else ""
    return f"""{a}bucket_ts >= {start} AND {a}bucket_ts < {end}
    AND (({a}pattern_id IS NOT NULL AND list_contains({patterns}, {a}pattern_id))
         OR ({a}pattern_id IS NULL AND list_contains({nodes}, {a}node)))"""


INCIDENT_POINT_SQL = incident_point_sql("i.start_ts", "i.end_ts", "i.patterns", "i.nodes", point="a")
# `incident_rpcs` of the incidents in [$start, $end): one row per incident and RPC, its culprit the
# service its strongest blamed point names, ranked as in the incident's culprits (1: most likely)
INCIDENT_RPCS_SQL = f"""
INSERT INTO incident_rpcs
SELECT incident_id, start_ts, end_ts, pattern_id, node, caller, callee, interface, kinds, points, peak_score,
       culprit, list_position(culprits, culprit) FROM (
    SELECT i.incident_id, i.start_ts, i.end_ts, i.culprits, a.pattern_id, a.node, any_value(a.caller) AS caller,
           any_value(a.callee) AS callee, any_value(a.interface) AS interface,
           list_sort(list(DISTINCT a.kind)) AS kinds,
           count(*) AS points, max(a.score) AS peak_score,
           arg_max(a.culprit, (a.culprit IS NOT NULL, a.score, a.culprit)) AS culprit
    FROM incidents i JOIN anomalies a ON {INCIDENT_POINT_SQL}
    WHERE i.start_ts < $end AND i.end_ts > $start
    GROUP BY i.incident_id, i.start_ts, i.end_ts, i.culprits, a.pattern_id, a.node)"""


def _row(incident: Incident) -> tuple:
    """An incident as a row of INCIDENT_COLUMNS."""
    i = incident
    return (
        i.incident_id, i.start_ts, i.end_ts, i.patterns, i.nodes, i.peak_score, i.kinds, i.points, i.culprits,
        i.evidence, i.group, i.aliases,
    )  # fmt: skip


def _with_group(incident: Incident) -> Incident:
    """A stored incident with its group (rows stored before the column existed: from its pattern, or
    the calling service of its first RPC)."""
    if incident.group is not None:
        return incident
    if incident.patterns:
        return replace(incident, group=str(incident.patterns[0]))
    try:
        return replace(incident, group=NOVEL_GROUP + split_node_key(incident.nodes[0]).caller)
    except (IndexError, ValueError):
        return incident


def carry_ids(rebuilt: list[Incident], replaced: list[Incident]) -> list[Incident]:
    """The rebuilt incidents with the ids people already have: an incident keeps the id it was first
    stored with (the identity of its first point then) however it grows or is rescored, so links in
    alerts and marks stay valid. A rebuilt incident takes over the stored ones it overlaps that share
    its group or an RPC (each taken once, by the earliest rebuilt incident): the id of the earliest
    of its own group (else of any of them), the others' ids becoming its aliases."""
    taken: set[str] = set()
    out = []
    for new in sorted(rebuilt, key=lambda i: (i.start_ts, i.incident_id)):
        old = [
            o
            for o in replaced
            if o.incident_id not in taken
            and o.start_ts < new.end_ts
            and o.end_ts > new.start_ts
            and (o.group == new.group or set(o.nodes) & set(new.nodes))
        ]
        if not old:
            out.append(new)
            continue
        old.sort(key=lambda o: (o.group != new.group, o.start_ts, o.incident_id))
        keep = old[0].incident_id
        taken.update(o.incident_id for o in old)
        aliases = {a for o in old for a in (o.incident_id, *o.aliases)} - {keep}
        out.append(replace(new, incident_id=keep, aliases=sorted(aliases)))
    return out


def _hours(start: datetime, end: datetime) -> list[datetime]:
    """The hours [start, end) touches. In seconds: inside Airflow `start` may be a pendulum
    DateTime, whose differences do not divide by a plain timedelta."""
    first = start.replace(minute=0, second=0, microsecond=0)
    return [first + HOUR * i for i in range(int((end - first).total_seconds() // 3600) + 1)]


# the hour and evidence of the candidates (non-decisive runs the fixed rule keeps) of [$lo, $hi)
CALIBRATION_SQL = (
    run_stats_sql(ANOMALY_POINTS_SQL)
    + """SELECT date_trunc('hour', start_ts), evidence_mass FROM stats
WHERE NOT decisive AND (buckets >= $min_buckets OR peak_score >= $peak)"""
)
SCORED_HOURS_SQL = "SELECT DISTINCT hour FROM score_runs WHERE status = 'scored' AND hour >= ? AND hour < ?"


def policy_thresholds(
    con: duckdb.DuckDBPyConnection,
    hours: list[datetime],
    gap_buckets: int,
    seconds: int,
    min_buckets: int,
    false_per_day: float,
) -> dict[datetime, float]:
    """Per hour, the evidence a run starting in it needs (`tasks.scoring.policy.threshold`), from
    the runs of the `CALIBRATION_HOURS` before it; hours without enough history are left out."""
    out = {}
    for hour in hours:
        value = threshold(calibration_history(con, hour, gap_buckets, seconds, min_buckets), false_per_day)
        if value is not None:
            out[hour] = value
    return out


def calibration_history(
    con: duckdb.DuckDBPyConnection, hour: datetime, gap_buckets: int, seconds: int, min_buckets: int
) -> dict[datetime, list[float]]:
    """The candidates' evidence in each scored hour of the `CALIBRATION_HOURS` before `hour`."""
    lo = hour - timedelta(hours=CALIBRATION_HOURS)
    rule = rule_params(gap_buckets, min_buckets, seconds)
    params = {"lo": lo, "hi": hour, **{k: rule[k] for k in ("gap", "bucket", "horizon", "min_buckets", "peak")}}
    by_hour: dict[datetime, list[float]] = {h: [] for (h,) in con.execute(SCORED_HOURS_SQL, [lo, hour]).fetchall()}
    for start_hour, evidence in con.execute(CALIBRATION_SQL, params).fetchall():
        if start_hour in by_hour:
            by_hour[start_hour].append(float(evidence))
    return by_hour
