"""Airflow UI view of rpcwatch's anomalies: a nav entry "rpcwatch anomalies" served by a small
FastAPI app inside the Airflow API server. It reads the published snapshot `analytics.duckdb`,
read-only, so it never blocks the pipeline (see tasks.publish); it writes nothing.

Routes (under `/rpcwatch`): `/` incidents and irregular points, `/incident/<id>` one incident with
`graph.png` and `forecast.png`, `/api/incidents` and `/api/anomalies` as JSON; all take the filters
`since` (30m, 6h, 2d, all: counted back from now), `pattern`, `kind`. This file holds only the
routes and the access check: what they show is built in tasks.app.view (queries, JSON),
tasks.app.view_html (HTML), tasks.app.view_pictures (pictures).

Access: the API server does not put plugin apps behind its login, so this app does it itself with
Airflow's own security dependency, on the app (every route, the docs and the OpenAPI schema too).
A request needs a valid Airflow JWT, from the UI login's `_token` cookie or an `Authorization: Bearer`
header (`POST /auth/token`), whose user may read the DAG that produces the anomalies. The auth
manager decides that (SimpleAuthManager: every role from viewer up; FAB/Keycloak: their DAG
permissions). Without a valid token the answer is 401; a browser asking for the page is sent to
Airflow's login page instead.

Every answer (pages, pictures, JSON, refusals) carries tasks.app.view_html.SECURITY_HEADERS: a
Content-Security-Policy that allows the page's own pictures and style and nothing else (the API docs
get their own, for Swagger UI's scripts), `X-Content-Type-Options: nosniff` and
`Referrer-Policy: no-referrer`."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime
from typing import Annotated, Any

from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi import Path as FastApiPath
from fastapi.exception_handlers import http_exception_handler
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tasks.app.view import (
    DEFAULT_SINCE,
    INCIDENT_ID_PATTERN,
    KIND_PATTERN,
    SINCE_PATTERN,
    Filters,
    find_incident,
    incident_json,
    incident_points,
    list_anomalies,
    list_incidents,
    meta,
    mlflow_url,
    model_links,
    open_snapshot,
    point_json,
    snapshot_path,
    window_note,
)
from tasks.app.view_html import SECURITY_HEADERS, incident_page, index_page, not_found_page, source_hash

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


@app.middleware("http")
async def _security_headers(request: Request, call_next):
    """SECURITY_HEADERS on every answer; a route that sets its own policy (the docs) keeps it."""
    response = await call_next(request)
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


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


def _base(request: Request) -> str:
    """Where this app is mounted (`/rpcwatch` in the API server): links and pictures are built on it."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def _filters(
    since: str = Query(DEFAULT_SINCE, pattern=SINCE_PATTERN, description="window back from now: 30m, 6h, 2d or all"),
    pattern: int | None = Query(None, ge=1, description="only this pattern's"),
    kind: str | None = Query(None, pattern=KIND_PATTERN, description="only this kind (traffic_spike, novel_rpc, ...)"),
) -> Filters:
    return Filters(since=since, pattern=pattern, kind=kind)


IncidentId = Annotated[str, FastApiPath(pattern=INCIDENT_ID_PATTERN)]
WindowFilters = Annotated[Filters, Depends(_filters)]


@app.get("/", response_class=HTMLResponse)
def page(request: Request, f: WindowFilters, limit: int = Query(100, ge=1, le=1000)) -> str:
    """Incidents (culprits, RPCs, evidence, a link to each one's page) and irregular points."""
    f, now = replace(f, limit=limit), datetime.now(UTC)
    with open_snapshot(snapshot_path()) as con:
        if con is None:
            return index_page(_base(request), f, None, [], [], None, now)
        info, incidents, points = meta(con), list_incidents(con, f, now), list_anomalies(con, f, now)
    return index_page(_base(request), f, info, incidents, points, window_note(f, info, now), now)


@app.get("/incident/{incident_id}", response_class=HTMLResponse)
def incident(request: Request, incident_id: IncidentId, f: WindowFilters) -> HTMLResponse:
    """One incident: its facts, model versions (MLflow links), graph and forecast pictures, points."""
    with open_snapshot(snapshot_path()) as con:
        found = None if con is None else find_incident(con, incident_id)
        if con is None or found is None:
            return HTMLResponse(not_found_page(_base(request), incident_id), status_code=404)
        points = incident_points(con, found)
        links = model_links(con, points, mlflow_url())
    return HTMLResponse(incident_page(_base(request), found, points, links, f.query()))


def _picture(incident_id: str, which: str) -> Response:
    from tasks.app.view_pictures import picture

    png = picture(snapshot_path(), incident_id, which)
    if png is None:
        raise StarletteHTTPException(404, f"no incident {incident_id} in the published snapshot")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


PNG: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}, "description": "a PNG picture"}}


@app.get("/incident/{incident_id}/graph.png", response_class=Response, responses=PNG)
def graph_picture(incident_id: IncidentId) -> Response:
    """The pattern's graph, the incident's RPCs coloured, its most likely culprit outlined (PNG)."""
    return _picture(incident_id, "graph")


@app.get("/incident/{incident_id}/forecast.png", response_class=Response, responses=PNG)
def forecast_picture(incident_id: IncidentId) -> Response:
    """The strongest RPC's actual series around the incident with the forecast, the band that does
    not alarm (table `forecasts`) and the irregular points (PNG)."""
    return _picture(incident_id, "forecast")


@app.get("/api/incidents")
def incidents(f: WindowFilters, limit: int = Query(100, ge=1, le=10000)) -> list[dict]:
    """Incidents going on in the window, newest first."""
    f, now = replace(f, limit=limit), datetime.now(UTC)
    with open_snapshot(snapshot_path()) as con:
        return [] if con is None else [incident_json(i) for i in list_incidents(con, f, now)]


@app.get("/api/anomalies")
def anomalies(f: WindowFilters, limit: int = Query(100, ge=1, le=10000)) -> list[dict]:
    """Irregular points in the window, newest first."""
    f, now = replace(f, limit=limit), datetime.now(UTC)
    with open_snapshot(snapshot_path()) as con:
        return [] if con is None else [point_json(p) for p in list_anomalies(con, f, now)]


@app.get("/openapi.json", include_in_schema=False)
def openapi_schema(request: Request) -> JSONResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    servers = [{"url": root}] if root else None
    return JSONResponse(get_openapi(title=app.title, version=app.version, routes=app.routes, servers=servers))


# Swagger UI: its script and stylesheet from FastAPI's CDN, its start-up script inline (allowed by its
# hash), the styles it sets at run time, its icons (data: URIs) and FastAPI's favicon.
SWAGGER_CDN = "https://cdn.jsdelivr.net"


def _docs_policy(page: str) -> str:
    inline = " ".join(source_hash(script) for script in re.findall(r"<script>(.*?)</script>", page, flags=re.S))
    return "; ".join(
        [
            "default-src 'none'",
            f"script-src {SWAGGER_CDN} {inline}",
            f"style-src {SWAGGER_CDN} 'unsafe-inline'",
            "img-src 'self' data: https://fastapi.tiangolo.com",
            "connect-src 'self'",
            "form-action 'self'",
            "base-uri 'none'",
            "frame-ancestors 'self'",
        ]
    )


@app.get("/docs", include_in_schema=False)
def docs(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    page = get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=f"{app.title} - API docs")
    page.headers["Content-Security-Policy"] = _docs_policy(bytes(page.body).decode())
    return page


class RpcwatchPlugin(AirflowPlugin):
    name = "rpcwatch"
    fastapi_apps = [{"app": app, "url_prefix": "/rpcwatch", "name": "rpcwatch anomalies"}]
    external_views = [
        {"name": "rpcwatch anomalies", "href": "rpcwatch/", "destination": "nav", "url_route": "rpcwatch-anomalies"}
    ]
