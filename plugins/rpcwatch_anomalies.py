"""Airflow UI view of rpcwatch's anomalies: a nav entry "rpcwatch anomalies" served by a small
FastAPI app inside the Airflow API server. It reads `incidents` and the view `recent_anomalies` of
the published snapshot `analytics.duckdb`, read-only, so it never blocks the pipeline (see
tasks.publish); it writes nothing.

Access: the API server does not put plugin apps behind its login, so this app does it itself with
Airflow's own security dependency, on the app (every route, the docs and the OpenAPI schema too).
A request needs a valid Airflow JWT, from the UI login's `_token` cookie or an `Authorization: Bearer`
header (`POST /auth/token`), whose user may read the DAG that produces the anomalies. The auth
manager decides that (SimpleAuthManager: every role from viewer up; FAB/Keycloak: their DAG
permissions). Without a valid token the answer is 401; a browser asking for the page is sent to
Airflow's login page instead."""

from __future__ import annotations

import html

import duckdb
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

# The anomalies are this DAG's output: who may read the DAG may read them.
DAG_ID = "rpcwatch_hourly"
require_read_access = requires_access_dag("GET", param_dag_id=DAG_ID)

# FastAPI's own docs/openapi routes take no dependencies, so they are off and served below instead.
app = FastAPI(
    title="rpcwatch anomalies",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
    dependencies=[Depends(require_read_access)],
)


@app.exception_handler(StarletteHTTPException)
async def _login_redirect(request: Request, exc: StarletteHTTPException):
    """401 for API clients; a browser (GET, Accept: text/html) goes to the login page and back."""
    if exc.status_code == 401 and request.method == "GET" and "text/html" in request.headers.get("accept", ""):
        try:
            from airflow.api_fastapi.app import get_auth_manager

            login = get_auth_manager().get_url_login(next_url=str(request.url))
        except RuntimeError:  # no auth manager: not inside the API server
            login = None
        if login:
            return RedirectResponse(login, status_code=307)
    return await http_exception_handler(request, exc)


INCIDENTS_SQL = """SELECT strftime(start_ts, '%Y-%m-%d %H:%M') AS start, strftime(end_ts, '%H:%M') AS "end",
    array_to_string(patterns, ', ') AS patterns, array_to_string(kinds, ', ') AS kinds, points,
    round(peak_score, 1) AS peak_score, array_to_string(coalesce(culprits, []), ', ') AS suspects, evidence
    FROM incidents ORDER BY start_ts DESC LIMIT ?"""
ANOMALIES_SQL = """SELECT strftime(bucket_ts, '%Y-%m-%d %H:%M') AS bucket, pattern_id AS pattern, kind, caller, callee,
    interface, feature, round(observed, 1) AS observed, round(expected, 1) AS expected, round(score, 2) AS score
    FROM recent_anomalies LIMIT ?"""

PAGE_STYLE = (
    "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
    "td,th{padding:3px 8px;border-bottom:1px solid #ddd;font-size:13px}"
)


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
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in r) + "</tr>" for r in rows
    )
    return f"<h2>{title}</h2><table><tr>{head}</tr>{body}</table>"


@app.get("/", response_class=HTMLResponse)
def page(limit: int = Query(100, ge=1, le=1000)) -> str:
    incidents = _table("Incidents", *_query(INCIDENTS_SQL, limit))
    anomalies = _table("Irregular points, last 6 hours", *_query(ANOMALIES_SQL, limit))
    return (
        f"<html><head><title>rpcwatch anomalies</title><style>{PAGE_STYLE}</style></head>"
        f"<body>{incidents}{anomalies}</body></html>"
    )


@app.get("/api/anomalies")
def anomalies(limit: int = Query(100, ge=1, le=10000)) -> list[dict]:
    headers, rows = _query(ANOMALIES_SQL, limit)
    return [dict(zip(headers, r)) for r in rows]


@app.get("/openapi.json", include_in_schema=False)
def openapi_schema(request: Request) -> JSONResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    servers = [{"url": root}] if root else None
    return JSONResponse(get_openapi(title=app.title, version=app.version, routes=app.routes, servers=servers))


@app.get("/docs", include_in_schema=False)
def docs(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=f"{app.title} - API docs")


class RpcwatchPlugin(AirflowPlugin):
    name = "rpcwatch"
    fastapi_apps = [{"app": app, "url_prefix": "/rpcwatch", "name": "rpcwatch anomalies"}]
    external_views = [
        {"name": "rpcwatch anomalies", "href": "rpcwatch/", "destination": "nav", "url_route": "rpcwatch-anomalies"}
    ]
