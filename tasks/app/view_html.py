"""The Airflow view's HTML (plugins/rpcwatch_anomalies.py serves it): the incidents list with its
filters and irregular points, and one incident's page. Plain strings; every value from data is
HTML-escaped here (`esc`), links are built from escaped, URL-encoded parts. No tables read.

The pages run no script and carry one inline `<style>` (`STYLE`); `SECURITY_HEADERS`, which the
plugin sends with every answer, allow exactly that (the style by its hash) and nothing else. The API
docs (`docs_page`) load Swagger UI's files and `DOCS_SCRIPT` from the view itself, no inline script.
"""

from __future__ import annotations

import base64
import hashlib
import html
from datetime import datetime
from typing import TYPE_CHECKING

from tasks.app.view import (
    QUICK_SINCE,
    SINCE_HELP,
    BadParameter,
    Filters,
    Listing,
    Meta,
    ModelLink,
    Point,
    evidence_text,
    incident_summary,
    rpc_text,
    window_text,
)

if TYPE_CHECKING:
    from tasks.scoring.incidents import Incident
    from tasks.triage.actions import Triage
    from tasks.triage.quality import Quality

MARK_WORDS = {"false_positive": "false positive", "expected": "expected", "true_positive": "true positive"}
SILENCE_FOR = ("1h", "4h", "24h")  # tasks.app.view_actions.SILENCE_CHOICES
# what the page says after a button was pressed (fixed texts: a link cannot make the page say anything)
DONE = {
    "ack": "Acknowledged: no alert will be posted about this incident.",
    "mark": "Marked. Retraining leaves this period out.",
    "silence": "Silenced: alerts skip incidents that involve it until the silence ends.",
}

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.2em 1.6em;color:#212529}
h1{font-size:1.35em;margin:0 0 .2em}h2{font-size:1.1em;margin:1.2em 0 .4em}
table{border-collapse:collapse}td,th{padding:4px 8px;border-bottom:1px solid #dee2e6;font-size:13px;
vertical-align:top;text-align:left}th{background:#f1f3f5}tr:hover td{background:#f8f9fa}
.meta{color:#495057;font-size:13px;margin:0 0 .8em}.filters{font-size:13px;margin:.3em 0}
.filters a,.filters b{margin-right:.5em}.filters b{background:#e7f5ff;padding:1px 5px;border-radius:3px}
.note{background:#fff3bf;border:1px solid #fcc419;padding:6px 10px;font-size:13px;display:inline-block}
.culprit{font-weight:600;color:#5f3dc4}.novel{color:#c92a2a;font-weight:600}.num{text-align:right}
.rpcs{font-family:ui-monospace,monospace;font-size:12px}.muted{color:#868e96}
.facts th{width:9em;background:none}img{max-width:100%;border:1px solid #dee2e6}
.caption{font-size:12px;color:#495057;max-width:70em}form{display:inline}input{width:5em}
.nowrap{white-space:nowrap}.cols{display:flex;gap:1.5em;align-items:flex-start}
.left{flex:0 0 30em;max-width:36%}.right{flex:1 1 auto;min-width:0}img.forecast{max-width:min(100%,1100px)}
summary{cursor:pointer;color:#1c7ed6;font-size:12px}.cut{font-size:13px;margin:.4em 0}
.cut a{margin-left:.6em}.bad{background:#fff5f5;border:1px solid #ffa8a8;padding:6px 10px;font-size:14px}
.decide{background:#f8f9fa;border:1px solid #dee2e6;padding:6px 10px;font-size:13px;margin:.6em 0}
.decide form{margin-right:1.2em}.decide input.note{width:14em}.done{background:#ebfbee;border:1px solid #8ce99a;
padding:6px 10px;font-size:13px;display:inline-block}.status{font-size:12px}.false_positive,.expected{color:#868e96}
.true_positive{color:#2b8a3e;font-weight:600}.acked{color:#1c7ed6}
"""


def source_hash(text: str) -> str:
    """A CSP source allowing exactly this inline `<style>` or `<script>` content ('sha256-...')."""
    return f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"


# What a page may load: its own pictures and its one style; no script, no other origin; forms go to
# the view itself; framed only by Airflow's UI (same origin). JSON and PNG answers carry it too.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        f"style-src {source_hash(STYLE)}",
        "img-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'self'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",  # a PNG or JSON answer is never run as HTML or script
    "Referrer-Policy": "no-referrer",  # links out (MLflow) do not carry the view's address and filters
}
SHOWN = 3  # culprits and RPCs listed in the incidents table before "+N more"
FOLD = 6  # culprits and RPCs listed on an incident's page before the rest is folded


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _when(value: datetime | None) -> str:
    return "" if value is None else f"{value:%Y-%m-%d %H:%M}" + (f":{value:%S}" if value.second else "")


def _minutes(incident: Incident) -> str:
    return f"{(incident.end_ts - incident.start_ts).total_seconds() / 60:.0f} min"


def document(title: str, body: str) -> str:
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{STYLE}</style></head><body>{body}</body></html>"
    )


def _link(href: str, text: str) -> str:
    return f'<a href="{esc(href)}">{esc(text)}</a>'


def _choices(base: str, filters: Filters, name: str, values: list[object], label: str, extra: str = "") -> str:
    """One filter as a row of links, the chosen value in bold."""
    current = getattr(filters, name)
    items = []
    for value in values:
        text = "any" if value is None else str(value)
        if value == current:
            items.append(f"<b>{esc(text)}</b>")
        else:
            items.append(_link(f"{base}/?{filters.query(**{name: value})}", text))
    return f'<div class="filters">{esc(label)}: {" ".join(items)}{extra}</div>'


def _since_form(filters: Filters) -> str:
    hidden = "".join(
        f'<input type="hidden" name="{name}" value="{esc(value)}">'
        for name, value in (("pattern", filters.pattern), ("kind", filters.kind))
        if value is not None
    )
    return (
        f'<form method="get">{hidden}<input name="since" value="{esc(filters.since)}" '
        f'title="{esc(SINCE_HELP)}"> <button>show</button></form>'
    )


def _list(items: list[str], cls: str = "", first_cls: str = "") -> str:
    if not items:
        return '<span class="muted">none</span>'
    shown = [f'<span class="{first_cls if i == 0 else cls}">{esc(v)}</span>' for i, v in enumerate(items[:SHOWN])]
    more = f' <span class="muted">+{len(items) - SHOWN} more</span>' if len(items) > SHOWN else ""
    return "<br>".join(shown) + more


def _what(incident: Incident) -> str:
    text = esc(incident_summary(incident))
    return f'<span class="novel">{text}</span>' if "novel_rpc" in incident.kinds else text


def status_text(state: Triage | None) -> str:
    """What people decided, as HTML: `acked by ana · false positive (bo)`; empty when nothing."""
    if state is None:
        return ""
    parts = [f'<span class="acked">acked by {esc(state.acked_by)}</span>'] if state.acked else []
    if state.mark:
        words = MARK_WORDS.get(state.mark, state.mark)
        parts.append(f'<span class="{esc(state.mark)}">{esc(words)} ({esc(state.marked_by)})</span>')
    return " · ".join(parts)


def incidents_table(
    base: str, incidents: list[Incident], query: str = "", decided: dict[str, Triage] | None = None
) -> str:
    if not incidents:
        return '<p class="muted">No incidents match.</p>'
    decided = decided or {}
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "start (UTC)",
            "length",
            "pattern",
            "what",
            "culprits",
            "RPCs",
            "evidence",
            "peak",
            "points",
            "status",
            "",
        )
    )
    rows = []
    for i in incidents:
        page = f"{base}/incident/{i.incident_id}" + (f"?{query}" if query else "")
        rows.append(
            "<tr>"
            f'<td class="nowrap">{_link(page, _when(i.start_ts))}</td><td class="nowrap">{_minutes(i)}</td>'
            f"<td>{esc(', '.join(map(str, i.patterns))) or '—'}</td><td>{_what(i)}</td>"
            f"<td>{_list(i.culprits, first_cls='culprit')}</td>"
            f'<td class="rpcs">{_list([rpc_text(n) for n in i.nodes])}</td>'
            f"<td>{esc(evidence_text(i.evidence))}</td><td class=num>{_num(i.peak_score)}</td>"
            f'<td class=num>{i.points}</td><td class="status">{status_text(decided.get(i.incident_id))}</td>'
            f'<td class="nowrap">{_link(page, "details →")}</td></tr>'
        )
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def points_table(points: list[Point]) -> str:
    if not points:
        return '<p class="muted">No irregular points match.</p>'
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "bucket (UTC)",
            "pattern",
            "kind",
            "RPC",
            "feature",
            "observed",
            "forecast",
            "threshold",
            "score",
            "culprit",
        )
    )
    rows = [
        "<tr>"
        f'<td class="nowrap">{_when(p.bucket_ts)}</td><td>{esc(p.pattern_id) or "—"}</td><td>{esc(p.kind)}</td>'
        f'<td class="rpcs">{esc(p.rpc)}</td><td>{esc(p.feature)}</td>'
        f"<td class=num>{_num(p.observed)}</td><td class=num>{_num(p.expected)}</td>"
        f"<td class=num>{_num(p.threshold)}</td><td class=num>{_num(p.score, 2)}</td>"
        f'<td class="culprit">{esc(p.culprit)}</td></tr>'
        for p in points
    ]
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _meta_line(info: Meta, now: datetime) -> str:
    return (
        f'<p class="meta">Snapshot published {esc(_when(info.published_at)) or "?"} UTC · newest data '
        f"{esc(_when(info.newest)) or 'none'} UTC · now {now:%Y-%m-%d %H:%M} UTC</p>"
    )


def _cut(base: str, filters: Filters, listing: Listing, offset_name: str, what: str) -> str:
    """`showing 101–200 of 652 irregular points · ← previous page · next page →` for a cut list; ""
    for a whole one. The links keep every filter and the other list's place."""
    if not listing.cut:
        return ""
    links = [
        _link(f"{base}/?{filters.query(**{offset_name: offset})}", text)
        for offset, text in ((listing.previous_offset, "← previous page"), (listing.next_offset, "next page →"))
        if offset is not None
    ]
    return f'<p class="cut">{esc(listing.shown())} {esc(what)}{"".join(links)}</p>'


def index_page(
    base: str,
    filters: Filters,
    info: Meta | None,
    incidents: Listing[Incident],
    points: Listing[Point],
    note: str | None,
    now: datetime,
    decided: dict[str, Triage] | None = None,
) -> str:
    """The incidents list (with what people decided), its filters and the irregular points, each a
    page of `filters.limit` rows that says where it is cut (`info` None: nothing published)."""
    top = "<h1>rpcwatch · irregular RPC traffic</h1>"
    if info is None:
        body = "<h2>Incidents</h2><p>Nothing published yet: the hourly DAG publishes after scoring.</p>"
        return document("rpcwatch anomalies", top + body)
    window = window_text(filters.since, info.newest)
    api = filters.query(offset=0, incident_offset=0)
    parts = [
        top,
        _meta_line(info, now),
        _choices(base, filters, "since", list(QUICK_SINCE), "since", _since_form(filters)),
        _choices(base, filters, "pattern", [None, *info.patterns], "pattern"),
        _choices(base, filters, "kind", [None, *info.kinds], "kind"),
        f'<div class="filters">JSON: {_link(f"{base}/api/incidents?{api}", "incidents")} '
        f"{_link(f'{base}/api/anomalies?{api}', 'irregular points')} · {_link(f'{base}/docs', 'API docs')} · "
        f"{_link(f'{base}/quality', 'detection quality')}</div>",
    ]
    if note:
        parts.append(f'<p class="note">{esc(note)}</p>')
    incidents_cut = _cut(base, filters, incidents, "incident_offset", "incidents")
    points_cut = _cut(base, filters, points, "offset", "irregular points")
    parts += [
        f"<h2>Incidents, {esc(window)} ({incidents.total:,})</h2>",
        incidents_cut,
        incidents_table(base, incidents.rows, api, decided),
        incidents_cut,
        f"<h2>Irregular points, {esc(window)} ({points.total:,}, newest first)</h2>",
        points_cut,
        points_table(points.rows),
        points_cut,
    ]
    return document("rpcwatch anomalies", "".join(parts))


def _models(links: list[ModelLink], incident: Incident) -> str:
    if links:
        return "<br>".join(
            _link(m.url, f"{m.name} version {m.version}") + (f" ({esc(m.decision)})" if m.decision else "")
            for m in links
        )
    if "novel_rpc" in incident.kinds:
        return '<span class="muted">none: a new RPC is flagged without a model</span>'
    from tasks.scoring.extreme import KIND as EXTREME

    if EXTREME in incident.kinds:
        return '<span class="muted">none: a decisive single call is judged against its RPC\'s history</span>'
    return '<span class="muted">not recorded</span>'


BAND_CAPTION = (
    "Black: the RPC's actual values per bucket around the incident (shaded red): this pattern's share "
    "(<code>pattern_series</code>) where the snapshot holds it, else all calls of the RPC. Orange line: the "
    "model's forecast of every scored bucket; the orange band holds the values that would not alarm "
    "(<code>forecasts.lower</code> to <code>forecasts.upper</code>; latency has only an upper side, shaded "
    "from 0); red dots are the irregular points. Snapshots published before <code>forecasts</code> existed "
    "show, at each flagged bucket only, the band from the forecast to the threshold the point crossed "
    "(<code>anomalies.expected</code>, <code>anomalies.threshold</code>). When the strongest point is a "
    "burst of surprising traces, a second panel shows the surprising traces per window against the alarm level."
)


def _folded(items: list[str], what: str, first_cls: str = "", cls: str = "") -> str:
    """Items listed; beyond FOLD of them, the rest behind a <details> (no script)."""
    spans = [f'<span class="{first_cls if i == 0 else cls}">{esc(v)}</span>' for i, v in enumerate(items)]
    if len(spans) <= FOLD:
        return "<br>".join(spans) or '<span class="muted">none</span>'
    return (
        "<br>".join(spans[:FOLD])
        + f"<details><summary>{len(spans) - FOLD} more {esc(what)}</summary>{'<br>'.join(spans[FOLD:])}</details>"
    )


def _options(values: list[tuple[str, str]]) -> str:
    return "".join(f'<option value="{esc(v)}">{esc(label)}</option>' for v, label in values)


def decide_section(page: str, base: str, incident: Incident, state: Triage | None, fresh: bool) -> str:
    """What people decided about the incident and the buttons to decide: acknowledge, mark (with a
    note), silence its first culprit. Plain forms posting to the view (no script)."""
    now = status_text(state) or '<span class="muted">nobody has acknowledged or marked it yet</span>'
    if state is not None and state.note:
        now += f' · note: "{esc(state.note)}"'
    if not fresh:
        now += ' <span class="muted">(as of the last publish: a run is writing the warehouse)</span>'
    note = '<input class="note" name="note" maxlength="500" placeholder="note (optional)">'
    forms = [
        f'<form method="post" action="{esc(page)}/ack">{note} <button>acknowledge</button></form>',
        f'<form method="post" action="{esc(page)}/mark"><select name="mark">{_options(list(MARK_WORDS.items()))}'
        f"</select> {note} <button>mark</button></form>",
    ]
    if incident.culprits:
        services = _options([(c, c) for c in incident.culprits[:SHOWN]])
        lasting = _options([(d, f"for {d}") for d in SILENCE_FOR])
        forms.append(
            f'<form method="post" action="{esc(base)}/silence"><input type="hidden" name="incident" '
            f'value="{esc(incident.incident_id)}">silence <select name="service">{services}</select> '
            f'<select name="lasting">{lasting}</select> <button>silence</button></form>'
        )
    return f'<div class="decide"><b>Status:</b> {now}<br>{"".join(forms)}</div>'


def incident_page(
    base: str,
    incident: Incident,
    points: list[Point],
    links: list[ModelLink],
    back: str,
    decision: tuple[Triage | None, bool] = (None, True),
    done: str | None = None,
) -> str:
    """One incident: what people decided and the buttons to decide, facts and model links beside its
    pattern graph, the strongest RPC's forecast against actual below, then its points. `decision`:
    its state and whether that is current; `done`: which button was just pressed (DONE)."""
    page = f"{base}/incident/{incident.incident_id}"
    facts = [
        ("when", f"{_when(incident.start_ts)} – {_when(incident.end_ts)} UTC ({_minutes(incident)})"),
        ("pattern", esc(", ".join(map(str, incident.patterns))) or "none (new RPC)"),
        ("kinds", esc(", ".join(incident.kinds))),
        ("culprits", _folded(incident.culprits, "services", first_cls="culprit")),
        ("evidence", esc(evidence_text(incident.evidence)) or '<span class="muted">not recorded</span>'),
        ("peak score", _num(incident.peak_score, 2)),
        ("points", str(incident.points)),
        ("RPCs", f'<div class="rpcs">{_folded([rpc_text(n) for n in incident.nodes], "RPCs")}</div>'),
        ("model", _models(links, incident)),
    ]
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
    strongest = f": {esc(points[0].rpc)}" if points else ""
    graph, forecast = f"{page}/graph.png", f"{page}/forecast.png"
    body = (
        f"<p>{_link(f'{base}/?{back}', '← incidents')}</p>"
        f"<h1>Incident {esc(incident.incident_id)} · {_what(incident)}</h1>"
        + (f'<p class="done">{esc(DONE[done])}</p>' if done in DONE else "")
        + decide_section(page, base, incident, *decision)
        + f'<div class="cols"><div class="left"><table class=facts>{rows}</table></div>'
        f'<div class="right"><a href="{esc(graph)}"><img src="{esc(graph)}" '
        "alt=\"the pattern's graph, the incident's RPCs marked\"></a>"
        '<p class="caption">The pattern\'s RPCs (caller → callee, interface) by call depth, callers above. Red: '
        "the incident's RPCs, dark red: its strongest; purple outline: RPCs made or served by the most likely "
        "culprit; dashed: an RPC in no pattern's graph.</p></div></div>"
        f"<h2>Forecast vs actual, the strongest RPC{strongest}</h2>"
        f'<a href="{esc(forecast)}"><img class="forecast" src="{esc(forecast)}" '
        'alt="forecast versus actual of the strongest RPC"></a>'
        f'<p class="caption">{BAND_CAPTION}</p>'
        f"<h2>Its irregular points ({_strongest(points, incident.points)}, strongest first)</h2>"
        f"{points_table(points)}"
    )
    return document(f"rpcwatch incident {incident.incident_id}", body)


def _strongest(points: list[Point], total: int | None) -> str:
    """How many of the incident's points its page lists: all, or `the 200 strongest of 1,234`."""
    if total is not None and len(points) < total:
        return f"showing the {len(points):,} strongest of {total:,}"
    return f"{len(points):,}"


def _quality_rows(rows: list[Quality], label: str) -> str:
    head = "".join(
        f"<th>{h}</th>"
        for h in (label, "incidents", "false positive", "share false", "expected", "true positive", "acked", "posted")
    )
    body = "".join(
        f"<tr><td>{esc(f'{q.key:%Y-%m-%d}' if isinstance(q.key, datetime) else q.key)}</td>"
        f"<td class=num>{q.incidents}</td><td class=num>{q.false_positive}</td>"
        f"<td class=num>{q.false_share:.0%}</td><td class=num>{q.expected}</td><td class=num>{q.true_positive}</td>"
        f"<td class=num>{q.acked}</td><td class=num>{q.posted}</td></tr>"
        for q in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def quality_page(base: str, days: list[Quality] | None, patterns: list[Quality]) -> str:
    """Detection quality over time as people judged it (tasks.triage.quality): the picture, per day
    and per pattern. `days` None: the snapshot predates marks."""
    top = f"<p>{_link(f'{base}/', '← incidents')}</p><h1>rpcwatch · detection quality</h1>"
    if days is None:
        return document(
            "rpcwatch detection quality",
            top + "<p>Nothing to show yet: the snapshot was "
            "published before incidents could be marked; the next run publishes it.</p>",
        )
    if not days:
        return document("rpcwatch detection quality", top + '<p class="muted">No incidents yet.</p>')
    body = (
        top + '<p class="meta">Incidents by the day they started (UTC), what people marked them, and how many '
        "were posted to the alert webhook. A rising share marked false positive says the alarm level "
        "(RPCWATCH_ALARM_FALSE_PER_DAY) or a pattern's model needs a look. As of the last publish.</p>"
        + f'<img src="{esc(base)}/quality.png" alt="incidents per day by mark, and alerts posted">'
        + "<h2>Per day</h2>"
        + _quality_rows(days, "day (UTC)")
        + "<h2>Per pattern</h2>"
        + _quality_rows(patterns, "pattern")
    )
    return document("rpcwatch detection quality", body)


def bad_request_page(base: str, problems: list[BadParameter], without: str) -> str:
    """A request the view does not take (422): which parameter is wrong, the value given, what is
    accepted; a link to the page without the wrong parameters (`without`: that query string)."""
    items = "".join(
        f"<li><b>{esc(p.name)}</b> = <code>{esc(p.value)}</code>: {esc(p.problem)}.<br>"
        f"Accepted: {esc(p.accepted)}.</li>"
        for p in problems
    )
    back = _link(f"{base}/" + (f"?{without}" if without else ""), "the incidents without it")
    return document(
        "rpcwatch: not accepted",
        "<h1>rpcwatch · that request is not accepted</h1>"
        f'<div class="bad"><ul>{items}</ul></div><p>Show {back}, or {_link(f"{base}/", "the incidents")} '
        f"with the default filters. The API's parameters: {_link(f'{base}/docs', 'API docs')}.</p>",
    )


def not_found_page(base: str, incident_id: str) -> str:
    return document(
        "rpcwatch: no such incident",
        f"<p>No incident {esc(incident_id)} in the published snapshot. {_link(f'{base}/', '← incidents')}</p>",
    )


# Swagger UI's start-up, served as a file of the view (`/docs/swagger-init.js`) so that the docs page runs
# no inline script: it reads the OpenAPI address from the page (`data-openapi`). No validator badge (it
# would call an outside validator); FastAPI's own settings otherwise.
DOCS_SCRIPT = """window.ui = SwaggerUIBundle({
  url: document.getElementById("swagger-ui").dataset.openapi,
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
"""


def docs_page(base: str, title: str) -> str:
    """The API docs: Swagger UI, every file of it from the view itself (`<base>/docs/...`)."""
    docs = f"{base}/docs"
    return (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f'<link rel="stylesheet" type="text/css" href="{esc(docs)}/swagger-ui.css">'
        f'<link rel="icon" type="image/png" href="{esc(docs)}/favicon.png"></head><body>'
        f'<div id="swagger-ui" data-openapi="{esc(base)}/openapi.json"></div>'
        f'<script src="{esc(docs)}/swagger-ui-bundle.js"></script>'
        f'<script src="{esc(docs)}/swagger-init.js"></script></body></html>'
    )
