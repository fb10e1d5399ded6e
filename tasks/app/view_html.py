"""The Airflow view's HTML (plugins/rpcwatch_anomalies.py serves it): the incidents list with its
filters and irregular points, and one incident's page. Plain strings; every value from data is
HTML-escaped here (`esc`), links are built from escaped, URL-encoded parts. No tables read.

The pages run no script and carry one inline `<style>` (`STYLE`); `SECURITY_HEADERS`, which the
plugin sends with every answer, allow exactly that (the style by its hash) and nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import html
from datetime import datetime
from typing import TYPE_CHECKING

from tasks.app.view import (
    QUICK_SINCE,
    Filters,
    Meta,
    ModelLink,
    Point,
    evidence_text,
    incident_summary,
    rpc_text,
)

if TYPE_CHECKING:
    from tasks.scoring.incidents import Incident

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
summary{cursor:pointer;color:#1c7ed6;font-size:12px}
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
        'title="30m, 6h, 2d or all"> <button>show</button></form>'
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


def incidents_table(base: str, incidents: list[Incident], query: str = "") -> str:
    if not incidents:
        return '<p class="muted">No incidents match.</p>'
    head = "".join(
        f"<th>{h}</th>"
        for h in ("start (UTC)", "length", "pattern", "what", "culprits", "RPCs", "evidence", "peak", "points", "")
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
            f'<td class=num>{i.points}</td><td class="nowrap">{_link(page, "details →")}</td></tr>'
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


def index_page(
    base: str,
    filters: Filters,
    info: Meta | None,
    incidents: list[Incident],
    points: list[Point],
    note: str | None,
    now: datetime,
) -> str:
    """The incidents list, its filters and the irregular points (`info` None: nothing published)."""
    top = "<h1>rpcwatch · irregular RPC traffic</h1>"
    if info is None:
        body = "<h2>Incidents</h2><p>Nothing published yet: the hourly DAG publishes after scoring.</p>"
        return document("rpcwatch anomalies", top + body)
    window = "all time" if filters.since == "all" else f"the last {filters.since} (counted from now)"
    api = filters.query()
    parts = [
        top,
        _meta_line(info, now),
        _choices(base, filters, "since", list(QUICK_SINCE), "since", _since_form(filters)),
        _choices(base, filters, "pattern", [None, *info.patterns], "pattern"),
        _choices(base, filters, "kind", [None, *info.kinds], "kind"),
        f'<div class="filters">JSON: {_link(f"{base}/api/incidents?{api}", "incidents")} '
        f"{_link(f'{base}/api/anomalies?{api}', 'irregular points')}</div>",
    ]
    if note:
        every = _link(f"{base}/?{filters.query(since='all')}", "Show all")
        parts.append(f'<p class="note">{esc(note)} {every}</p>')
    parts += [
        f"<h2>Incidents, {esc(window)} ({len(incidents)})</h2>",
        incidents_table(base, incidents, api),
        f"<h2>Irregular points, {esc(window)} ({len(points)}, newest first)</h2>",
        points_table(points),
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


def incident_page(base: str, incident: Incident, points: list[Point], links: list[ModelLink], back: str) -> str:
    """One incident: facts and model links beside its pattern graph, the strongest RPC's forecast
    against actual below, then its points."""
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
        f'<div class="cols"><div class="left"><table class=facts>{rows}</table></div>'
        f'<div class="right"><a href="{esc(graph)}"><img src="{esc(graph)}" '
        "alt=\"the pattern's graph, the incident's RPCs marked\"></a>"
        '<p class="caption">The pattern\'s RPCs (caller → callee, interface) by call depth, callers above. Red: '
        "the incident's RPCs, dark red: its strongest; purple outline: RPCs made or served by the most likely "
        "culprit; dashed: an RPC in no pattern's graph.</p></div></div>"
        f"<h2>Forecast vs actual, the strongest RPC{strongest}</h2>"
        f'<a href="{esc(forecast)}"><img class="forecast" src="{esc(forecast)}" '
        'alt="forecast versus actual of the strongest RPC"></a>'
        f'<p class="caption">{BAND_CAPTION}</p>'
        f"<h2>Its irregular points ({len(points)}, strongest first)</h2>{points_table(points)}"
    )
    return document(f"rpcwatch incident {incident.incident_id}", body)


def not_found_page(base: str, incident_id: str) -> str:
    return document(
        "rpcwatch: no such incident",
        f"<p>No incident {esc(incident_id)} in the published snapshot. {_link(f'{base}/', '← incidents')}</p>",
    )
