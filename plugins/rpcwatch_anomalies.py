"""Airflow UI view of rpcwatch's anomalies: a nav entry "rpcwatch anomalies" served by a small
FastAPI app inside the Airflow API server. It reads the published snapshot `analytics.duckdb`
read-only, so it never blocks the pipeline (see tasks.publish)."""

from __future__ import annotations

import html

import duckdb
from airflow.plugins_manager import AirflowPlugin
from fastapi import FastAPI, Query
from fastapi.responses import HTMLResponse

app = FastAPI(title="rpcwatch anomalies")

INCIDENTS_SQL = """SELECT strftime(start_ts, '%Y-%m-%d %H:%M') AS start, strftime(end_ts, '%H:%M') AS "end",
    array_to_string(patterns, ', ') AS patterns, array_to_string(kinds, ', ') AS kinds, points,
    round(peak_score, 1) AS peak_score FROM incidents ORDER BY start_ts DESC LIMIT ?"""
ANOMALIES_SQL = """SELECT strftime(bucket_ts, '%Y-%m-%d %H:%M') AS bucket, pattern_id AS pattern, kind, caller, callee,
    interface, feature, round(observed, 1) AS observed, round(expected, 1) AS expected, round(score, 2) AS score
    FROM recent_anomalies LIMIT ?"""


def _query(sql: str, limit: int) -> tuple[list[str], list[tuple]]:
    from tasks.publish import analytics_path
    from tasks.settings import load_settings

    path = analytics_path(load_settings())
    if not path.exists():
        return [], []
    with duckdb.connect(str(path), read_only=True) as con:
        cursor = con.execute(sql, [limit])
        return [d[0] for d in cursor.description], cursor.fetchall()


def _table(title: str, headers: list[str], rows: list[tuple]) -> str:
    if not headers:
        return f"<h2>{title}</h2><p>Nothing published yet: the hourly DAG publishes after scoring.</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<h2>{title}</h2><table><tr>{head}</tr>{body}</table>"


@app.get("/", response_class=HTMLResponse)
def page(limit: int = Query(100, le=1000)) -> str:
    incidents = _table("Incidents", *_query(INCIDENTS_SQL, limit))
    anomalies = _table("Irregular points, last 6 hours", *_query(ANOMALIES_SQL, limit))
    style = "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}td,th{padding:3px 8px;border-bottom:1px solid #ddd;font-size:13px}"
    return f"<html><head><title>rpcwatch anomalies</title><style>{style}</style></head><body>{incidents}{anomalies}</body></html>"


@app.get("/api/anomalies")
def anomalies(limit: int = Query(100, le=10000)) -> list[dict]:
    headers, rows = _query(ANOMALIES_SQL, limit)
    return [dict(zip(headers, r)) for r in rows]


class RpcwatchPlugin(AirflowPlugin):
    name = "rpcwatch"
    fastapi_apps = [{"app": app, "url_prefix": "/rpcwatch", "name": "rpcwatch anomalies"}]
    external_views = [{"name": "rpcwatch anomalies", "href": "rpcwatch/", "destination": "nav",
                       "url_route": "rpcwatch-anomalies"}]
