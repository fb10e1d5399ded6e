"""The DuckDB warehouse: one file under the home folder (the default), or a shared lake on DuckLake
(tasks.lake, `RPCWATCH_WAREHOUSE=ducklake`); its tables, and how to open either.

DuckDB allows one writing process per file; Airflow serialises writers with a pool of one slot. A
lake takes many writers (a conflicting commit is retried, tasks.lake.retrying). A reader's lock
(an open read-only connection) blocks a writer too: a writer waits for it, bounded
(`WRITE_LOCK_WAIT_S`). Every read-only connection to a file is sandboxed (`open_sandboxed_reader`).
All timestamps are UTC (`TIMESTAMP` without zone).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from tasks.settings import Lake

log = logging.getLogger(__name__)

# the analysts' view, in the warehouse and in the published snapshot (tasks.publish): defined once here.
# The window `since=6h` of the Airflow view and `rpcwatch anomalies`, fixed: 6 hours back from the newest
# scored data (the newest irregular point, incident end or scored bucket: tasks.app.view.newest_scored)
RECENT_ANOMALIES_SQL = """
    SELECT * FROM anomalies WHERE bucket_ts >= greatest((SELECT max(bucket_ts) FROM anomalies),
        (SELECT max(end_ts) FROM incidents), (SELECT max(bucket_ts) FROM forecasts)) - INTERVAL 6 HOUR
    ORDER BY bucket_ts DESC, score DESC"""

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS calls (
    ts TIMESTAMP NOT NULL, trace_id VARCHAR NOT NULL, call_id VARCHAR NOT NULL,
    parent_call_id VARCHAR, caller VARCHAR NOT NULL, callee VARCHAR NOT NULL,
    interface VARCHAR, rpc_type VARCHAR NOT NULL, rt_ms DOUBLE NOT NULL,
    is_error BOOLEAN NOT NULL, source_file VARCHAR NOT NULL, batch_id VARCHAR NOT NULL
);
-- added later (warehouses created before them migrate here): the callee's own latency of a paired
-- client+server span (NULL otherwise), the call's number of child calls, its rt minus its children's
ALTER TABLE calls ADD COLUMN IF NOT EXISTS server_rt_ms DOUBLE;
ALTER TABLE calls ADD COLUMN IF NOT EXISTS fan_out INTEGER;
ALTER TABLE calls ADD COLUMN IF NOT EXISTS self_ms DOUBLE;
CREATE TABLE IF NOT EXISTS quarantine (
    hour TIMESTAMP NOT NULL, source_file VARCHAR NOT NULL, file_row BIGINT, reason VARCHAR NOT NULL,
    ts TIMESTAMP, trace_id VARCHAR, call_id VARCHAR, parent_call_id VARCHAR, caller VARCHAR,
    callee VARCHAR, interface VARCHAR, rpc_type VARCHAR, rt_ms DOUBLE, is_error BOOLEAN,
    batch_id VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS ingest_log (
    hour TIMESTAMP NOT NULL, path VARCHAR NOT NULL, format VARCHAR NOT NULL, size_bytes BIGINT,
    content_hash VARCHAR, rows_read BIGINT, rows_kept BIGINT, rows_quarantined BIGINT,
    status VARCHAR NOT NULL, error VARCHAR, batch_id VARCHAR, checked_at TIMESTAMP NOT NULL,
    PRIMARY KEY (hour, path)
);
CREATE TABLE IF NOT EXISTS validation_runs (
    hour TIMESTAMP NOT NULL, batch_id VARCHAR NOT NULL, expectation VARCHAR NOT NULL,
    subject VARCHAR NOT NULL, severity VARCHAR NOT NULL, success BOOLEAN NOT NULL,
    observed VARCHAR, details VARCHAR, engine VARCHAR NOT NULL, validated_at TIMESTAMP NOT NULL
);
CREATE TABLE IF NOT EXISTS rpc_series (
    bucket_ts TIMESTAMP NOT NULL, caller VARCHAR NOT NULL, callee VARCHAR NOT NULL,
    interface VARCHAR, rpc_type VARCHAR NOT NULL, calls BIGINT NOT NULL, errors BIGINT NOT NULL,
    rt_mean DOUBLE, rt_p50 DOUBLE, rt_p95 DOUBLE, bucket_seconds INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS reconstruction (
    hour TIMESTAMP PRIMARY KEY, traces BIGINT, full_traces BIGINT, partial_traces BIGINT,
    failed_traces BIGINT, calls BIGINT, late_tail_traces BIGINT, rebuilt_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS shapes (
    shape_id UBIGINT PRIMARY KEY, n_calls INTEGER, depth INTEGER, rpcs VARCHAR[], edges VARCHAR[],
    first_seen TIMESTAMP
);
CREATE TABLE IF NOT EXISTS trace_patterns (
    trace_id VARCHAR NOT NULL, hour TIMESTAMP NOT NULL, root_ts TIMESTAMP, shape_id UBIGINT,
    status VARCHAR NOT NULL, n_calls INTEGER, pattern_id INTEGER, method VARCHAR
);
CREATE TABLE IF NOT EXISTS shape_patterns (
    shape_id UBIGINT PRIMARY KEY, pattern_id INTEGER, method VARCHAR, assigned_hour TIMESTAMP
);
CREATE TABLE IF NOT EXISTS patterns (
    pattern_id INTEGER PRIMARY KEY, version INTEGER, graph_hash VARCHAR, status VARCHAR,
    critical BOOLEAN, first_seen TIMESTAMP, last_changed TIMESTAMP, traffic_share DOUBLE,
    calls BIGINT, traces BIGINT, n_nodes INTEGER, n_edges INTEGER, n_shapes INTEGER,
    updated_hour TIMESTAMP
);
CREATE TABLE IF NOT EXISTS pattern_history (
    pattern_id INTEGER, version INTEGER, hour TIMESTAMP, event VARCHAR, graph_hash VARCHAR,
    details VARCHAR
);
CREATE TABLE IF NOT EXISTS pattern_nodes (
    pattern_id INTEGER, version INTEGER, node VARCHAR, caller VARCHAR, callee VARCHAR,
    interface VARCHAR, rpc_type VARCHAR, support DOUBLE, calls BIGINT
);
CREATE TABLE IF NOT EXISTS pattern_edges (
    pattern_id INTEGER, version INTEGER, parent_node VARCHAR, child_node VARCHAR, weight BIGINT
);
CREATE TABLE IF NOT EXISTS pattern_series (
    pattern_id INTEGER NOT NULL, bucket_ts TIMESTAMP NOT NULL, node VARCHAR NOT NULL,
    caller VARCHAR, callee VARCHAR, interface VARCHAR, rpc_type VARCHAR, calls BIGINT, errors BIGINT,
    rt_mean DOUBLE, rt_p95 DOUBLE, bucket_seconds INTEGER
);
CREATE TABLE IF NOT EXISTS novel_rpcs (
    bucket_ts TIMESTAMP NOT NULL, caller VARCHAR, callee VARCHAR, interface VARCHAR, rpc_type VARCHAR,
    calls BIGINT, first_seen TIMESTAMP
);
CREATE TABLE IF NOT EXISTS models (
    pattern_id INTEGER NOT NULL, model_name VARCHAR, model_version INTEGER, run_id VARCHAR,
    graph_hash VARCHAR, pattern_version INTEGER, trained_for TIMESTAMP, decision VARCHAR,
    reason VARCHAR, stale_reason VARCHAR, val_mape_calls DOUBLE, poisson_floor_calls DOUBLE,
    seasonal_naive_mape_calls DOUBLE, moving_average_mape_calls DOUBLE, no_graph_mape_calls DOUBLE,
    calibrated_mape_calls DOUBLE, seconds DOUBLE, device VARCHAR, recorded_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS forecast_errors (
    pattern_id INTEGER NOT NULL, hour TIMESTAMP NOT NULL, model_version INTEGER,
    mape_calls DOUBLE, calibrated_mape_calls DOUBLE
);
CREATE TABLE IF NOT EXISTS anomalies (
    bucket_ts TIMESTAMP NOT NULL, pattern_id INTEGER, node VARCHAR, caller VARCHAR, callee VARCHAR,
    interface VARCHAR, feature VARCHAR, observed DOUBLE, expected DOUBLE, threshold DOUBLE,
    score DOUBLE, direction VARCHAR, kind VARCHAR, model_name VARCHAR, model_version INTEGER,
    run_id VARCHAR, scored_at TIMESTAMP
);
-- added later: the service most likely behind an irregular point / an incident's, ranked
ALTER TABLE anomalies ADD COLUMN IF NOT EXISTS culprit VARCHAR;
-- added later (older homes gain it here): the forecast and the band of observed values that would not
-- alarm, of every scored bucket, node and feature (calls; latency where the forecaster judges it);
-- NULL bound: that side never alarms
CREATE TABLE IF NOT EXISTS forecasts (
    pattern_id INTEGER NOT NULL, bucket_ts TIMESTAMP NOT NULL, node VARCHAR NOT NULL,
    feature VARCHAR NOT NULL, expected DOUBLE, lower DOUBLE, upper DOUBLE, model_version INTEGER
);
CREATE TABLE IF NOT EXISTS score_runs (
    hour TIMESTAMP NOT NULL, pattern_id INTEGER NOT NULL, status VARCHAR, reason VARCHAR,
    model_version INTEGER, flagged INTEGER, mape_calls DOUBLE
);
CREATE TABLE IF NOT EXISTS incidents (
    incident_id VARCHAR, start_ts TIMESTAMP, end_ts TIMESTAMP, patterns INTEGER[], nodes VARCHAR[],
    peak_score DOUBLE, kinds VARCHAR[], points BIGINT
);
ALTER TABLE incidents ADD COLUMN IF NOT EXISTS culprits VARCHAR[];
ALTER TABLE incidents ADD COLUMN IF NOT EXISTS evidence VARCHAR;
-- added later: the group its runs were formed in (a pattern id, or `novel:<caller>`), and the ids it
-- held before (an incident keeps the id it was first stored with: tasks.scoring.incidents)
ALTER TABLE incidents ADD COLUMN IF NOT EXISTS incident_group VARCHAR;
ALTER TABLE incidents ADD COLUMN IF NOT EXISTS aliases VARCHAR[];
-- one row per incident and RPC, for plain SQL: rebuilt with `incidents`
CREATE TABLE IF NOT EXISTS incident_rpcs (
    incident_id VARCHAR NOT NULL, start_ts TIMESTAMP, end_ts TIMESTAMP, pattern_id INTEGER,
    node VARCHAR NOT NULL, caller VARCHAR, callee VARCHAR, interface VARCHAR, kinds VARCHAR[],
    points BIGINT, peak_score DOUBLE, culprit VARCHAR, culprit_rank INTEGER
);
-- what people did (tasks.triage.actions): append-only, with who and when; an incident's state is its
-- latest mark and whether anyone acknowledged it
CREATE TABLE IF NOT EXISTS incident_actions (
    action_id VARCHAR NOT NULL, incident_id VARCHAR NOT NULL, action VARCHAR NOT NULL, mark VARCHAR,
    note VARCHAR, actor VARCHAR NOT NULL, acted_at TIMESTAMP NOT NULL, start_ts TIMESTAMP,
    end_ts TIMESTAMP, patterns INTEGER[], nodes VARCHAR[]
);
CREATE TABLE IF NOT EXISTS silences (
    silence_id VARCHAR NOT NULL, service VARCHAR, rpc VARCHAR, starts_at TIMESTAMP NOT NULL,
    ends_at TIMESTAMP NOT NULL, note VARCHAR, actor VARCHAR NOT NULL, created_at TIMESTAMP NOT NULL
);
-- every incident the alert step posted (tasks.alerts.webhook): a rerun posts none twice
CREATE TABLE IF NOT EXISTS alerts_sent (
    incident_id VARCHAR NOT NULL, sent_at TIMESTAMP NOT NULL, hour TIMESTAMP NOT NULL,
    destination VARCHAR, peak_score DOUBLE
);
CREATE OR REPLACE VIEW recent_anomalies AS """
    + RECENT_ANOMALIES_SQL
    + """;
CREATE TABLE IF NOT EXISTS clustering_runs (
    hour TIMESTAMP PRIMARY KEY, reclustered BOOLEAN, reason VARCHAR, shapes INTEGER,
    clusters INTEGER, noise_shapes INTEGER, noise_share DOUBLE, critical INTEGER,
    critical_share DOUBLE, unassigned_share DOUBLE, seconds DOUBLE
);
"""
)


# What a read-only connection reaches: its own file, nothing else. No other file, URL or database
# (COPY, read_csv, glob, ATTACH, EXPORT), no extension installed or loaded, and no setting changed
# after the connect (SET, RESET, PRAGMA), so none of these can be switched back on by a query.
READER_CONFIG: dict[str, str | bool | int | float | list[str]] = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "lock_configuration": True,
}
# How long a write connection waits for another process to let go of the file (a read command, a
# DuckDB shell) before it fails: far longer than a read command holds it; a task still locked out
# after it fails and is retried by Airflow (1, 2, 4 min later).
WRITE_LOCK_WAIT_S = 60.0
_LONGEST_PAUSE_S = 2.0
_HOLDER = re.compile(r"lock is held in (.+?\(PID \d+\)|[^.]+)")
_NOT_DUCKDB = ("not a valid DuckDB database", "Could not read enough bytes", "checksum", "Corrupt")


class CannotOpen(RuntimeError):
    """A DuckDB file that cannot be opened, saying why in one line; `holder` names the process that
    holds its lock when that is why (as DuckDB reports it: program and PID)."""

    def __init__(self, message: str, holder: str | None = None) -> None:
        super().__init__(message)
        self.holder = holder


def lock_holder(error: str) -> str | None:
    """The process holding the file's lock, from DuckDB's error text ("/usr/bin/python3 (PID 42)")."""
    found = _HOLDER.search(error)
    return found.group(1).strip() if found else None


def first_line(error: Exception) -> str:
    """An error's message without DuckDB's multi-line hints: what a one-line CLI error shows."""
    return (str(error).splitlines() or [type(error).__name__])[0]


def why_unopenable(path: Path, error: duckdb.Error, writing: bool, waited_s: float = 0) -> CannotOpen:
    """What went wrong opening `path`, for people, in one line: a lock (and its holder, after waiting
    `waited_s` seconds for it), a file that is no DuckDB database, a permission, a folder; else
    DuckDB's own first line."""
    text, first = str(error), first_line(error)
    doing = f"cannot open {path} for writing" if writing else f"cannot read {path}"
    holder = lock_holder(text)
    if holder is not None:
        waited = f" and did not let go within {waited_s:g} s" if waited_s > 0 else ""
        return CannotOpen(f"{doing}: another process holds its lock ({holder}){waited}; retry when it is done", holder)
    if any(sign in text for sign in _NOT_DUCKDB):
        return CannotOpen(f"{doing}: it is not a DuckDB database (corrupt or another file): {first}")
    if "Permission denied" in text:
        return CannotOpen(f"{doing}: permission denied (check the owner and mode of the file and its folder)")
    if "Is a directory" in text:
        return CannotOpen(f"{doing}: it is a directory, not a DuckDB database file")
    return CannotOpen(f"{doing}: {first}")


def open_sandboxed_reader(path: Path) -> duckdb.DuckDBPyConnection:
    """`path` opened read-only, reaching that file and nothing else (`READER_CONFIG`). Every read path
    opens a DuckDB file here: the read commands, `rpcwatch sql`, the Airflow view, read-only stages.
    Raises FileNotFoundError for a missing file and CannotOpen saying why for an unusable one."""
    if not path.exists():
        raise FileNotFoundError(f"no DuckDB file at {path}")
    try:
        return duckdb.connect(str(path), read_only=True, config=dict(READER_CONFIG))
    except duckdb.Error as err:
        raise why_unopenable(path, err, writing=False) from err


def _open_for_writing(path: Path, lock_wait_s: float) -> duckdb.DuckDBPyConnection:
    """A write connection to `path`; while another process holds the file's lock, retried with a
    growing pause for up to `lock_wait_s` seconds (logged with the holder), then a CannotOpen."""
    deadline = time.monotonic() + lock_wait_s
    pause, announced = 0.05, None
    while True:
        try:
            return duckdb.connect(str(path))
        except duckdb.Error as err:
            holder = lock_holder(str(err))
            if holder is None or time.monotonic() >= deadline:
                raise why_unopenable(path, err, writing=True, waited_s=lock_wait_s) from err
            if holder != announced:
                log.warning("waiting up to %g s for the write lock on %s, held by %s", lock_wait_s, path, holder)
                announced = holder
            time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
            pause = min(pause * 2, _LONGEST_PAUSE_S)


def connect(
    where: Path | Lake, read_only: bool = False, lock_wait_s: float = WRITE_LOCK_WAIT_S
) -> duckdb.DuckDBPyConnection:
    """Open the warehouse, `Settings.warehouse`: the file (creating folder and tables on first write;
    read-only: sandboxed, `open_sandboxed_reader`) or the lake (tables created on a write connection;
    read-only attaches it READ_ONLY). A write connection waits up to `lock_wait_s` seconds for another
    process's lock on the file; a file that cannot be opened is a CannotOpen saying why."""
    if isinstance(where, Lake):
        from tasks.lake import connect_lake

        return connect_lake(where, SCHEMA, read_only=read_only)
    path = where
    if read_only:
        if not path.exists():
            raise FileNotFoundError(f"no warehouse at {path}: run `rpcwatch ingest` first")
        return open_sandboxed_reader(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = _open_for_writing(path, lock_wait_s)
    con.execute(SCHEMA)
    return con


@contextmanager
def opened(
    where: Path | Lake, read_only: bool = False, lock_wait_s: float = WRITE_LOCK_WAIT_S
) -> Iterator[duckdb.DuckDBPyConnection]:
    con = connect(where, read_only=read_only, lock_wait_s=lock_wait_s)
    try:
        yield con
    finally:
        con.close()
