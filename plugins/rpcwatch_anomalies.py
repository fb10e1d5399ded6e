"""Airflow UI view of rpcwatch's anomalies: a nav entry "rpcwatch anomalies" served by a small
FastAPI app inside the Airflow API server. It reads the published snapshot `analytics.duckdb`,
read-only, so it never blocks the pipeline (see tasks.publish). Its only writes are people's
decisions (POST `/incident/<id>/ack`, `/incident/<id>/mark`, `/silence`: tasks.app.view_actions),
which go to the warehouse; every GET only reads.

Routes (under `/rpcwatch`): `/` incidents and irregular points, `/incident/<id>` one incident with
`graph.png` and `forecast.png`, `/quality` (detection quality over time, with `quality.png`),
`/api/incidents` and `/api/anomalies` as JSON, `/docs` (Swagger UI,
its files served from here: it works offline) and `/openapi.json`. All take the filters `since`
(30m, 6h, 2d or all: counted back from the newest scored data, tasks.app.view.parse_since),
`pattern`, `kind`. Lists come a page at a time (`limit`, `offset`) and say where they are cut: the
page in words with previous/next links, the JSON routes in `X-Total-Count` and `Link` headers. A
parameter the view does not take is a 422 that says which and what is accepted: a page for a browser,
JSON (`detail` in words, `errors` one by one) for the rest. This file holds only the routes and the
access check: what they show is built in tasks.app.view (queries, JSON), tasks.app.view_html (HTML),
tasks.app.view_pictures (pictures).

Access: the API server does not put plugin apps behind its login, so this app does it itself with
Airflow's own security dependency, on the app (every route, the docs and the OpenAPI schema too).
A request needs a valid Airflow JWT, from the UI login's `_token` cookie or an `Authorization: Bearer`
header (`POST /auth/token`), whose user may read the DAG that produces the anomalies. The auth
manager decides that (SimpleAuthManager: every role from viewer up; FAB/Keycloak: their DAG
permissions). Without a valid token the answer is 401; a browser asking for the page is sent to
Airflow's login page instead. Deciding (the POST routes) needs edit access to that DAG (SimpleAuthManager:
user, op, admin; a viewer reads only), and a form posted from a page of another origin is refused
(403), so another site cannot make a logged-in browser mark or silence anything.

Every answer (pages, pictures, JSON, refusals) carries tasks.app.view_html.SECURITY_HEADERS: a
Content-Security-Policy that allows the page's own pictures and style and nothing else (the API docs
get their own: Swagger UI's script, style and data: icons, from the view itself only),
`X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer`."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime
from importlib.util import find_spec
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi import Path as FastApiPath
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tasks.app.view import (
    DEFAULT_SINCE,
    INCIDENT_ID_PATTERN,
    KIND_PATTERN,
    MAX_OFFSET,
    MAX_PATTERN_ID,
    SINCE_HELP,
    SINCE_PATTERN,
    Filters,
    Listing,
    bad_parameters,
    find_incident,
    incident_json,
    incident_points,
    list_anomalies,
    list_incidents,
    meta,
    mlflow_url,
    model_links,
    newest_scored,
    open_snapshot,
    point_json,
    snapshot_path,
    window_note,
)
from tasks.app.view_actions import Busy, acknowledge, decisions, mark, silence
from tasks.app.view_html import (
    DOCS_SCRIPT,
    SECURITY_HEADERS,
    bad_request_page,
    docs_page,
    incident_page,
    index_page,
    not_found_page,
    quality_page,
)

# The anomalies are this DAG's output: who may read the DAG may read them.
DAG_ID = "rpcwatch_hourly"
require_read_access = requires_access_dag("GET", param_dag_id=DAG_ID)
# deciding about incidents changes what the DAG's alerts and retraining do: who may edit the DAG may
require_edit_access = requires_access_dag("PUT", param_dag_id=DAG_ID)
PNG: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}, "description": "a PNG picture"}}


# A 422's JSON (`_not_accepted`), as the OpenAPI description shows it: `detail` in words, then each wrong parameter
NOT_ACCEPTED_SCHEMA = {
    "type": "object",
    "properties": {
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {name: {"type": "string"} for name in ("name", "value", "problem", "accepted")},
            },
        },
    },
}

# FastAPI's own docs/openapi routes take no dependencies, so they are off and served below instead.
app = FastAPI(
    title="rpcwatch anomalies",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
    dependencies=[Depends(require_read_access)],
    responses={
        422: {
            "description": "a parameter not accepted: which, and what is (a page for a browser)",
            "content": {"application/json": {"schema": NOT_ACCEPTED_SCHEMA}},
        }
    },
)


@app.middleware("http")
async def _security_headers(request: Request, call_next):
    """SECURITY_HEADERS on every answer; a route that sets its own policy (the docs) keeps it."""
    response = await call_next(request)
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _wants_html(request: Request) -> bool:
    """A browser opening a page (GET, Accept: text/html), not an API client."""
    return request.method == "GET" and "text/html" in request.headers.get("accept", "")


@app.exception_handler(StarletteHTTPException)
async def _login_redirect(request: Request, exc: StarletteHTTPException):
    """401 for API clients; a browser (GET, Accept: text/html) goes to the login page and back."""
    if exc.status_code == 401 and _wants_html(request):
        try:
            from airflow.api_fastapi.app import get_auth_manager

            login = get_auth_manager().get_url_login(next_url=str(request.url))
        except RuntimeError:  # no auth manager: not inside the API server
            login = None
        if login:
            return RedirectResponse(login, status_code=307)
    return await http_exception_handler(request, exc)


@app.exception_handler(RequestValidationError)
async def _not_accepted(request: Request, exc: RequestValidationError):
    """422, saying which parameter is wrong and what it accepts: a page in the view's style for a
    browser, JSON for API clients (`detail` in words, `errors` one by one). Only a logged-in request
    gets here: the access check runs before the parameters are read."""
    problems = bad_parameters(exc.errors())
    if _wants_html(request):
        wrong = {p.name for p in problems}
        without = urlencode([(k, v) for k, v in request.query_params.multi_items() if k not in wrong])
        return HTMLResponse(bad_request_page(_base(request), problems, without), status_code=422)
    errors = [p._asdict() for p in problems]
    return JSONResponse({"detail": "; ".join(p.text() for p in problems), "errors": errors}, status_code=422)


def _base(request: Request) -> str:
    """Where this app is mounted (`/rpcwatch` in the API server): links and pictures are built on it."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def _filters(
    since: str = Query(
        DEFAULT_SINCE, pattern=SINCE_PATTERN, description=f"window back from the newest scored data: {SINCE_HELP}"
    ),
    pattern: int | None = Query(None, ge=1, le=MAX_PATTERN_ID, description="only this pattern's"),
    kind: str | None = Query(None, pattern=KIND_PATTERN, description="only this kind (traffic_spike, novel_rpc, ...)"),
) -> Filters:
    return Filters(since=since, pattern=pattern, kind=kind)


IncidentId = Annotated[str, FastApiPath(pattern=INCIDENT_ID_PATTERN)]
WindowFilters = Annotated[Filters, Depends(_filters)]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="rows to skip: the next page starts at offset + limit")]


@app.get("/", response_class=HTMLResponse)
def page(
    request: Request,
    f: WindowFilters,
    limit: int = Query(100, ge=1, le=1000, description="rows per list"),
    offset: Offset = 0,
    incident_offset: Annotated[int, Query(ge=0, le=MAX_OFFSET, description="incidents to skip")] = 0,
) -> str:
    """Incidents (culprits, RPCs, evidence, a link to each one's page) and irregular points, a page
    of each; a list that is cut says so and links its previous and next pages."""
    f, now = replace(f, limit=limit, offset=offset, incident_offset=incident_offset), datetime.now(UTC)
    with open_snapshot(snapshot_path()) as con:
        if con is None:
            return index_page(_base(request), f, None, Listing([], 0), Listing([], 0), None, now)
        info = meta(con)
        incidents, points = list_incidents(con, f, info.newest), list_anomalies(con, f, info.newest)
        decided = decisions(con, [i.incident_id for i in incidents.rows])
    note = window_note(info, now)
    return index_page(_base(request), f, info, incidents, points, note, now, decided.states)


@app.get("/incident/{incident_id}", response_class=HTMLResponse)
def incident(
    request: Request,
    incident_id: IncidentId,
    f: WindowFilters,
    done: str | None = Query(None, pattern="^(ack|mark|silence)$", description="the button just pressed"),
) -> HTMLResponse:
    """One incident: what people decided and the buttons to decide, its facts, model versions
    (MLflow links), graph and forecast pictures, points."""
    with open_snapshot(snapshot_path()) as con:
        found = None if con is None else find_incident(con, incident_id)
        if con is None or found is None:
            return HTMLResponse(not_found_page(_base(request), incident_id), status_code=404)
        points = incident_points(con, found)
        links = model_links(con, points, mlflow_url())
        decided = decisions(con, [found.incident_id])
    decision = (decided.states.get(found.incident_id), decided.fresh)
    return HTMLResponse(incident_page(_base(request), found, points, links, f.query(), decision, done))


# --- deciding: acknowledge, mark, silence (written to the warehouse) -------------------------------

NOTE_CHARS = 500


def _same_origin(request: Request) -> None:
    """Refuse a form posted from a page of another origin (the login cookie would come along with
    it); API clients with a Bearer token send no Origin and pass."""
    origin = request.headers.get("origin")
    if origin and urlsplit(origin).netloc != request.headers.get("host"):
        raise StarletteHTTPException(403, "a decision must be posted from the rpcwatch view itself")


async def _form(request: Request) -> dict[str, str]:
    form = await request.form()
    return {k: str(v)[:NOTE_CHARS].strip() for k, v in form.items() if isinstance(v, str)}


def _decided(request: Request, incident_id: str, done: str, said: str) -> Response:
    """A browser goes back to the incident's page, which shows the decision; an API client gets JSON."""
    if "text/html" in request.headers.get("accept", ""):
        return RedirectResponse(f"{_base(request)}/incident/{incident_id}?done={done}", status_code=303)
    return JSONResponse({"incident_id": incident_id, "done": done, "said": said})


async def _act(request: Request, incident_id: str, done: str, action: Any, *args: Any) -> Response:
    """Run a decision (blocking: it writes DuckDB) and answer; a missing incident is 404, a busy
    warehouse 503 (nothing recorded: press again), a bad value 422."""
    from tasks.triage.actions import UnknownIncident

    try:
        said = await run_in_threadpool(action, *args)
    except UnknownIncident as missing:
        raise StarletteHTTPException(404, str(missing)) from None
    except Busy as busy:
        raise StarletteHTTPException(503, f"{busy}; press again in a minute") from None
    except ValueError as bad:
        raise StarletteHTTPException(422, str(bad)) from None
    return _decided(request, incident_id, done, said)


@app.post("/incident/{incident_id}/ack", dependencies=[Depends(require_edit_access)])
async def ack(request: Request, incident_id: IncidentId, user: GetUserDep) -> Response:
    """Acknowledge the incident (form field `note`, optional): no alert is posted about it."""
    _same_origin(request)
    form = await _form(request)
    return await _act(request, incident_id, "ack", acknowledge, incident_id, user.get_name(), form.get("note") or None)


@app.post("/incident/{incident_id}/mark", dependencies=[Depends(require_edit_access)])
async def mark_incident(request: Request, incident_id: IncidentId, user: GetUserDep) -> Response:
    """Mark the incident (form fields `mark`: false_positive, expected or true_positive; `note`)."""
    _same_origin(request)
    form = await _form(request)
    args = (incident_id, form.get("mark", ""), user.get_name(), form.get("note") or None)
    return await _act(request, incident_id, "mark", mark, *args)


@app.post("/silence", dependencies=[Depends(require_edit_access)])
async def silence_service(request: Request, user: GetUserDep) -> Response:
    """Silence a service (form fields `service`, `lasting`: 1h, 4h or 24h; `incident`: the page to
    go back to): alerts skip the incidents that involve it until then."""
    _same_origin(request)
    form = await _form(request)
    back = form.get("incident", "")
    if not re.fullmatch(INCIDENT_ID_PATTERN, back) or not form.get("service"):
        raise StarletteHTTPException(422, "a silence needs a service and the incident it was asked from")
    args = (user.get_name(), form.get("lasting", ""), form["service"])
    return await _act(request, back, "silence", silence, *args)


# --- detection quality ------------------------------------------------------------------------------


def _quality() -> tuple[list | None, list]:
    from tasks.triage.quality import has_quality_tables, quality_by_day, quality_by_pattern

    with open_snapshot(snapshot_path()) as con:
        if con is None or not has_quality_tables(con):
            return None, []
        return quality_by_day(con), quality_by_pattern(con)


@app.get("/quality", response_class=HTMLResponse)
def quality(request: Request) -> str:
    """Detection quality over time as people judged it: incidents per day and per pattern, the
    share marked false positive, alerts posted, with a picture."""
    days, patterns = _quality()
    return quality_page(_base(request), days, patterns)


@app.get("/quality.png", response_class=Response, responses=PNG)
def quality_picture_png() -> Response:
    """Incidents per day by what people marked them, and alerts posted (PNG)."""
    from tasks.triage.quality import quality_picture

    days, _ = _quality()
    if not days:
        raise StarletteHTTPException(404, "no incidents published yet")
    return Response(quality_picture(days), media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


def _picture(incident_id: str, which: str) -> Response:
    from tasks.app.view_pictures import picture

    png = picture(snapshot_path(), incident_id, which)
    if png is None:
        raise StarletteHTTPException(404, f"no incident {incident_id} in the published snapshot")
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})


@app.get("/incident/{incident_id}/graph.png", response_class=Response, responses=PNG)
def graph_picture(incident_id: IncidentId) -> Response:
    """The pattern's graph, the incident's RPCs coloured, its most likely culprit outlined (PNG)."""
    return _picture(incident_id, "graph")


@app.get("/incident/{incident_id}/forecast.png", response_class=Response, responses=PNG)
def forecast_picture(incident_id: IncidentId) -> Response:
    """The strongest RPC's actual series around the incident with the forecast, the band that does
    not alarm (table `forecasts`) and the irregular points (PNG)."""
    return _picture(incident_id, "forecast")


def _paged(request: Request, response: Response, listing: Listing) -> None:
    """The page's place in its list, for API clients: `X-Total-Count` (rows that match in all) and a
    `Link` header with the `next` and `prev` pages (RFC 8288), the body staying a plain list."""
    response.headers["X-Total-Count"] = str(listing.total)
    links = [
        f'<{request.url.include_query_params(offset=offset)}>; rel="{rel}"'
        for offset, rel in ((listing.next_offset, "next"), (listing.previous_offset, "prev"))
        if offset is not None
    ]
    if links:
        response.headers["Link"] = ", ".join(links)


LIST_HEADERS: dict[int | str, dict[str, Any]] = {
    200: {
        "headers": {
            "X-Total-Count": {"description": "how many rows match in all", "schema": {"type": "integer"}},
            "Link": {"description": "the next and previous pages (rel=next, rel=prev), where there are"},
        }
    }
}


@app.get("/api/incidents", responses=LIST_HEADERS)
def incidents(
    request: Request,
    response: Response,
    f: WindowFilters,
    limit: int = Query(100, ge=1, le=10000),
    offset: Offset = 0,
) -> list[dict]:
    """Incidents going on in the window, newest first; `X-Total-Count` says how many match in all."""
    f = replace(f, limit=limit)
    with open_snapshot(snapshot_path()) as con:
        listing: Listing = (
            Listing([], 0, offset, limit) if con is None else list_incidents(con, f, newest_scored(con), offset)
        )
    _paged(request, response, listing)
    return [incident_json(i) for i in listing.rows]


@app.get("/api/anomalies", responses=LIST_HEADERS)
def anomalies(
    request: Request,
    response: Response,
    f: WindowFilters,
    limit: int = Query(100, ge=1, le=10000),
    offset: Offset = 0,
) -> list[dict]:
    """Irregular points in the window, newest first; `X-Total-Count` says how many match in all."""
    f = replace(f, limit=limit, offset=offset)
    with open_snapshot(snapshot_path()) as con:
        listing: Listing = Listing([], 0, offset, limit) if con is None else list_anomalies(con, f, newest_scored(con))
    _paged(request, response, listing)
    return [point_json(p) for p in listing.rows]


@app.get("/openapi.json", include_in_schema=False)
def openapi_schema(request: Request) -> JSONResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    servers = [{"url": root}] if root else None
    return JSONResponse(get_openapi(title=app.title, version=app.version, routes=app.routes, servers=servers))


# Swagger UI's files, served by the view itself (behind its login), so that the docs work offline:
# the copy the package fastapi-offline installs (its only other requirement is FastAPI).
SWAGGER_PACKAGE = "fastapi-offline"
SWAGGER_FILES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon.png": "image/png",
}


def swagger_folder() -> Path | None:
    """The folder holding Swagger UI's files (SWAGGER_FILES); None where the package is not installed."""
    spec = find_spec(SWAGGER_PACKAGE.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "static"
    return folder if all((folder / name).is_file() for name in SWAGGER_FILES) else None


def _docs_policy() -> str:
    """The docs' Content-Security-Policy: Swagger UI's script and style, its data: icons and the
    OpenAPI document, all from the view itself; no inline script, no other origin."""
    return "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' data:",
            "connect-src 'self'",
            "form-action 'self'",
            "base-uri 'none'",
            "frame-ancestors 'self'",
        ]
    )


@app.get("/docs", include_in_schema=False)
def docs(request: Request) -> HTMLResponse:
    page = HTMLResponse(docs_page(_base(request), f"{app.title} - API docs"))
    page.headers["Content-Security-Policy"] = _docs_policy()
    return page


@app.get("/docs/swagger-init.js", include_in_schema=False)
def docs_script() -> Response:
    return Response(DOCS_SCRIPT, media_type="text/javascript", headers={"Cache-Control": "private, max-age=3600"})


def _swagger_file(name: str):
    def serve() -> FileResponse:
        folder = swagger_folder()
        if folder is None:
            raise StarletteHTTPException(404, f"Swagger UI's files are not installed: pip install {SWAGGER_PACKAGE}")
        return FileResponse(
            folder / name, media_type=SWAGGER_FILES[name], headers={"Cache-Control": "private, max-age=86400"}
        )

    return serve


for _name in SWAGGER_FILES:
    app.add_api_route(f"/docs/{_name}", _swagger_file(_name), methods=["GET"], include_in_schema=False)


class RpcwatchPlugin(AirflowPlugin):
    name = "rpcwatch"
    fastapi_apps = [{"app": app, "url_prefix": "/rpcwatch", "name": "rpcwatch anomalies"}]
    external_views = [
        {"name": "rpcwatch anomalies", "href": "rpcwatch/", "destination": "nav", "url_route": "rpcwatch-anomalies"}
    ]
