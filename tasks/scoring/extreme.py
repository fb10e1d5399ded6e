"""Decisive single calls: one call no earlier call of its RPC resembles is an incident at once.

Persistence is for weak evidence (`tasks.scoring.policy`). Some evidence is overwhelming in one
trace: a call that takes `LONGEST_FACTOR` times the longest its RPC ever took (a slow exfiltration,
a hung dependency), or a call that makes `FAN_OUT_FACTOR` times the most child calls its RPC ever
made (scraping amplification, a retry storm). No window could make them more certain, and in thin
traffic no window ever fills (a transfer a minute never reaches the window rule's three traces).

Judged on every RPC, not only the critical patterns the models cover, against the history the
models learn from (`memory`, the training window): the RPC needs `MIN_HISTORY_CALLS` earlier calls
there, so one unlucky first call cannot set the bar, and the call must matter on a human scale too
(`MIN_EXTREME_MS`, `MIN_EXTRA_CALLS`: a 0.01 ms RPC's 1 ms hiccup, or 3 child calls where 1 was the
most, is no event). Both factors are fixed settings, chosen from the
issue's own wording ("a call 100x its RPC's longest", "a fan-out far beyond any seen"), not fitted
to any data; the fan-out factor is below the 4x that `rpcwatch inject`'s scraping uses.

A point of kind `extreme_call` per RPC and bucket where such calls end (a span is reported then;
clipped to the hour scored), feature `call_beyond_longest` or `fan_out_beyond_most`, observed the largest
call's value, expected the RPC's longest (most) before, threshold the factor times it, score the ratio
observed / threshold (>= 1). Its group is its calling service, as for novel RPCs; the culprit is the
callee (where the time went, or the service making the calls).

Reads `calls`; replaces the hour's `extreme_call` rows of `anomalies`.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import duckdb

from tasks.clock import HOUR, naive_utc
from tasks.keys import node_key_sql
from tasks.scoring.store import ANOMALY_COLUMNS

KIND = "extreme_call"
BEYOND_LONGEST, BEYOND_MOST = "call_beyond_longest", "fan_out_beyond_most"
LONGEST_FACTOR = 100.0  # a call this many times its RPC's longest is decisive
FAN_OUT_FACTOR = 3.0  # ... or making this many times the most child calls it ever made
MIN_HISTORY_CALLS = 20  # earlier calls an RPC needs before its longest (most) sets a bar
MIN_EXTREME_MS = 1000.0  # ... and the call takes at least this long: a fast RPC's jitter is no event
MIN_EXTRA_CALLS = 10  # ... or makes at least this many more child calls than the most before
SLOW = "c.rt_ms >= greatest($longest_factor * h.longest, $min_ms)"
WIDE = "(h.most > 0 AND coalesce(c.fan_out, 0) >= greatest($fan_out_factor * h.most, h.most + $min_extra))"
RPC_KEY = "caller, callee, coalesce(interface, '') AS iface, rpc_type"
# the history is aggregated only for RPCs with a call this hour that could be decisive at all (long
# enough, or with enough children): the training window's calls are many, such RPCs few
EXTREME_SQL = f"""
WITH now AS (SELECT *, coalesce(interface, '') AS iface FROM calls WHERE ts >= $start AND ts < $end),
candidates AS (
    SELECT DISTINCT caller, callee, iface, rpc_type FROM now
    WHERE rt_ms >= $min_ms OR coalesce(fan_out, 0) > $min_extra),
history AS (
    SELECT {RPC_KEY}, count(*) AS n, max(rt_ms) AS longest, max(coalesce(fan_out, 0)) AS most
    FROM calls WHERE ts >= $start - $memory AND ts < $start
      AND (caller, callee, coalesce(interface, ''), rpc_type) IN (
          SELECT (caller, callee, iface, rpc_type) FROM candidates)
    GROUP BY ALL HAVING count(*) >= $min_calls),
extreme AS (
    SELECT c.*, h.longest, h.most,
           CASE WHEN {SLOW} THEN '{BEYOND_LONGEST}' ELSE '{BEYOND_MOST}' END AS feature
    FROM now c JOIN history h USING (caller, callee, iface, rpc_type)
    WHERE {SLOW} OR {WIDE}),
points AS (
    SELECT least(time_bucket(to_seconds($bucket_s), ts + to_microseconds(CAST(rt_ms * 1000 AS BIGINT))),
                 $end - to_seconds($bucket_s)) AS bucket_ts,
           caller, callee, interface, rpc_type, feature,
           CASE feature WHEN '{BEYOND_LONGEST}' THEN rt_ms ELSE fan_out END AS observed,
           CASE feature WHEN '{BEYOND_LONGEST}' THEN longest ELSE most END AS expected,
           CASE feature WHEN '{BEYOND_LONGEST}' THEN greatest($longest_factor * longest, $min_ms)
                ELSE greatest($fan_out_factor * most, most + $min_extra) END AS threshold
    FROM extreme)
INSERT INTO anomalies ({", ".join(ANOMALY_COLUMNS)})
SELECT bucket_ts, NULL, {node_key_sql()}, caller, callee, interface, feature, max(observed), expected, threshold,
       max(observed) / threshold, 'up', '{KIND}', NULL, NULL, NULL, $scored_at, callee
FROM points GROUP BY bucket_ts, caller, callee, interface, rpc_type, feature, expected, threshold"""


def extreme_anomalies(
    con: duckdb.DuckDBPyConnection,
    hour: datetime,
    scored_at: datetime,
    bucket_seconds: int,
    memory: timedelta = timedelta(hours=48),
) -> int:
    """Replace the hour's decisive single calls (`extreme_call` points); returns how many were written."""
    start, end = naive_utc(hour), naive_utc(hour + HOUR)
    con.execute("DELETE FROM anomalies WHERE kind = ? AND bucket_ts >= ? AND bucket_ts < ?", [KIND, start, end])
    params = {
        "start": start,
        "end": end,
        "memory": memory,
        "min_calls": MIN_HISTORY_CALLS,
        "longest_factor": LONGEST_FACTOR,
        "fan_out_factor": FAN_OUT_FACTOR,
        "min_ms": MIN_EXTREME_MS,
        "min_extra": MIN_EXTRA_CALLS,
        "bucket_s": bucket_seconds,
        "scored_at": scored_at,
    }
    row = con.execute(EXTREME_SQL, params).fetchone()
    return int(row[0]) if row else 0
