"""Incidents: flagged points that belong together, one row per run of points.

The one incident rule of rpcwatch (the evaluation runs it too): a group's flagged points (a
pattern's; novel RPCs: a calling service's) at most `incident_gap_buckets` apart form a run; a run
is an incident when it spans `incident_min_buckets` buckets (like an alert's `for: 3m`) or one
point scores >= 3. Reads `anomalies`; writes `incidents`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import duckdb

from tasks.clock import HOUR, naive_utc

# a group's flagged points (a pattern's; novel RPCs: a calling service's) at most $gap apart form a
# run, numbered by `run`; RANGE framing sums a bucket's rows together, so rows sharing a bucket get
# the same run whatever order the tie is sorted in
RUNS_SQL = """
WITH a AS (
    SELECT *, coalesce(CAST(pattern_id AS VARCHAR), 'novel:' || caller) AS grp FROM anomalies
    WHERE bucket_ts >= $lo AND bucket_ts < $hi),
marked AS (
    SELECT *, CASE WHEN bucket_ts - lag(bucket_ts) OVER (PARTITION BY grp ORDER BY bucket_ts) <= $gap
                   THEN 0 ELSE 1 END AS new_run FROM a),
runs AS (
    SELECT *, sum(new_run) OVER (PARTITION BY grp ORDER BY bucket_ts RANGE UNBOUNDED PRECEDING) AS run FROM marked)
"""
# [$start, $end) grown to every run of points read that overlaps it
RUN_SPAN_SQL = (
    RUNS_SQL
    + """
SELECT least($start, min(first)), greatest($end, max(last)) FROM (
    SELECT min(bucket_ts) AS first, max(bucket_ts) + $bucket AS last FROM runs GROUP BY grp, run)
WHERE first < $end AND last > $start
"""
)
INCIDENT_SPAN_SQL = """
SELECT least($start, min(start_ts)), greatest($end, max(end_ts)) FROM incidents WHERE start_ts < $end AND end_ts > $start
"""
# lists sorted: a rebuild gives identical rows
INCIDENTS_SQL = (
    RUNS_SQL
    + """
SELECT md5(grp || ':' || CAST(min(bucket_ts) AS VARCHAR))[:12], min(bucket_ts), max(bucket_ts) + $bucket,
       list_sort(list(DISTINCT pattern_id) FILTER (WHERE pattern_id IS NOT NULL)), list_sort(list(DISTINCT node)),
       max(score), list_sort(list(DISTINCT kind)), count(*)
FROM runs GROUP BY grp, run
HAVING count(DISTINCT bucket_ts) >= $min_buckets OR max(score) >= 3
"""
)


def _incident_span(
    con: duckdb.DuckDBPyConnection, start: datetime, end: datetime, gap: timedelta, bucket: timedelta, margin: timedelta
) -> tuple[datetime, datetime]:
    """[start, end) grown until no stored incident and no run of flagged points crosses its edges,
    so the incidents inside can be rebuilt from the points inside alone. Stored incidents let a run
    that began hours before be found in one step; points are read `margin` beyond the edges."""
    while True:
        lo, hi = con.execute(INCIDENT_SPAN_SQL, {"start": start, "end": end}).fetchone()
        lo, hi = con.execute(
            RUN_SPAN_SQL, {"lo": lo - margin, "hi": hi + margin, "gap": gap, "bucket": bucket, "start": lo, "end": hi}
        ).fetchone()
        if (lo, hi) == (start, end):
            return start, end
        start, end = lo, hi


def rebuild_incidents(
    con: duckdb.DuckDBPyConnection, hour: datetime, gap_buckets: int, seconds: int, min_buckets: int
) -> int:
    """Flagged points of one pattern (novel RPCs: of one calling service) no more than `gap_buckets`
    apart are one incident: a flood is one incident, not 300 rows. A run must span `min_buckets`
    buckets (like an alert's `for: 3m`) unless a point is far out (score >= 3).

    The hour's points just changed: the incidents of every run touching the hour, however far it
    reaches into earlier or later hours, are rebuilt whole (one row per run, extended; never a
    second row for its tail), so the table is the same whatever order hours are (re)scored in.
    Returns the number of incidents rebuilt."""
    gap, bucket = timedelta(seconds=gap_buckets * seconds), timedelta(seconds=seconds)
    start, end = _incident_span(
        con, naive_utc(hour), naive_utc(hour + HOUR), gap, bucket, margin=gap * max(min_buckets, 1)
    )  # a run too short to be stored fits in it
    con.execute("DELETE FROM incidents WHERE start_ts < ? AND end_ts > ?", [end, start])
    return con.execute(
        "INSERT INTO incidents " + INCIDENTS_SQL,
        {"lo": start, "hi": end, "gap": gap, "bucket": bucket, "min_buckets": min_buckets},
    ).fetchone()[0]
