"""The DuckDB warehouse: one file under the home folder (the default), or a shared lake on DuckLake
(tasks.lake, `RPCWATCH_WAREHOUSE=ducklake`); its tables, and how to open either.

DuckDB allows one writing process per file; Airflow serialises writers with a pool of one slot. A
lake takes many writers (a conflicting commit is retried, tasks.lake.retrying).
All timestamps are UTC (`TIMESTAMP` without zone).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from tasks.settings import Lake

# the analysts' view, in the warehouse and in the published snapshot (tasks.publish): defined once here
RECENT_ANOMALIES_SQL = """
    SELECT * FROM anomalies WHERE bucket_ts >= (SELECT max(bucket_ts) FROM anomalies) - INTERVAL 6 HOUR
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


def connect(where: Path | Lake, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open the warehouse, `Settings.warehouse`: the file (creating folder and tables on first write)
    or the lake (tables created on a write connection; read-only attaches it READ_ONLY)."""
    if isinstance(where, Lake):
        from tasks.lake import connect_lake

        return connect_lake(where, SCHEMA, read_only=read_only)
    path = where
    if read_only:
        if not path.exists():
            raise FileNotFoundError(f"no warehouse at {path}: run `rpcwatch ingest` first")
        return duckdb.connect(str(path), read_only=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = duckdb.connect(str(path))
    except duckdb.IOException as err:
        raise RuntimeError(
            f"cannot open {path} for writing: another process holds DuckDB's write lock "
            f"(an open DuckDB shell or a running task). Details: {err}"
        ) from err
    con.execute(SCHEMA)
    return con


@contextmanager
def opened(where: Path | Lake, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    con = connect(where, read_only=read_only)
    try:
        yield con
    finally:
        con.close()
