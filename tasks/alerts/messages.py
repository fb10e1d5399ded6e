"""Webhook messages for Slack and Microsoft Teams: new incidents, and a failed task.

A message is `{"text": ..., "blocks": [...]}`. `text` is markdown both render: lines separated by a
blank line (Teams joins single newlines), values in code spans, bare links (both make them links).
Slack shows `blocks` instead (header + one section per entry, links as `<url|label>`) and `text` in
notifications; Teams ignores `blocks`.

Values that come from data (service names, nodes, evidence, exception text) are outside input:
`code` drops what could end a code span or open a Slack link or mention (`<`, `>`, `|`, backticks),
control and text-direction characters, caps the length, and shows the rest in a code span, where
neither Slack nor Teams formats, links or mentions. Sections are `verbatim`: Slack links nothing
by itself either. Labels and URLs are ours (settings, quoted ids). Standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from tasks.scoring.incidents import Incident

MODEL_PREFIX = "rpcwatch-pattern-"  # MLflow model names, as tasks.models.registry registers them
FIELD_CHARS = 160  # one value from data, at most
EVIDENCE_CHARS = 300
EXCEPTION_CHARS = 1500
MAX_LISTED = 10  # incidents per message (Slack: <= 50 blocks, <= 3000 characters per section)
# `<` `>` `|` make Slack links and mentions, a backtick ends a code span, control characters break
# lines, zero-width and direction controls disguise or reorder what is shown
_UNSAFE = re.compile(r"[<>|`\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
_PLAIN_URL = re.compile(r"https?://[^\s<>|\"'`]+")


def clean(value: object, limit: int = FIELD_CHARS) -> str:
    """`value` as one line without markup characters, at most `limit` characters."""
    text = " ".join(_UNSAFE.sub(" ", str(value)).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def code(value: object, limit: int = FIELD_CHARS) -> str:
    """`value` cleaned, in a code span: shown as it is, never formatted, linked or mentioned."""
    return f"`{clean(value, limit) or '-'}`"


@dataclass(frozen=True)
class Link:
    label: str  # our words, never data
    url: str  # from the settings, ids quoted

    def markdown(self) -> str:
        return f"{self.label}: {self.url}"

    def slack(self) -> str:
        return f"<{self.url}|{self.label}>"


def message(title: str, entries: Sequence[tuple[str, Sequence[Link]]]) -> dict[str, Any]:
    """A title (no data in it) and entries (a line, its links) as `text` and as Slack blocks."""
    lines = [title, *(" · ".join([line, *(link.markdown() for link in links)]) for line, links in entries)]
    blocks: list[dict[str, Any]] = [{"type": "header", "text": {"type": "plain_text", "text": title[:150]}}]
    for line, links in entries:
        body = "\n".join([line, " · ".join(link.slack() for link in links)]) if links else line
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": body, "verbatim": True}})
    return {"text": "\n\n".join(lines), "blocks": blocks}


def utc_span(start: datetime, end: datetime) -> str:
    """`2026-01-01 08:12–08:18 UTC` (the end's date too when it is another day)."""
    start, end = _utc(start), _utc(end)
    end_format = "%H:%M" if end.date() == start.date() else "%Y-%m-%d %H:%M"
    return f"{start:%Y-%m-%d %H:%M}–{end.strftime(end_format)} UTC"


def _utc(value: datetime) -> datetime:
    """Aware values in UTC; naive ones are UTC already (DuckDB's TIMESTAMPs)."""
    return value.astimezone(UTC) if value.tzinfo else value


# --- new incidents ---------------------------------------------------------------------------------


def view_url(airflow_url: str, incident_id: str | None = None) -> str:
    """The rpcwatch view in the Airflow UI (the plugin mounts at /rpcwatch), at one incident."""
    base = f"{airflow_url.rstrip('/')}/rpcwatch/"
    return base if incident_id is None else f"{base}incident/{quote(str(incident_id), safe='')}"


def model_url(mlflow_url: str, pattern_id: int, version: int) -> str:
    """A registered model version in the MLflow UI."""
    return f"{mlflow_url.rstrip('/')}/#/models/{MODEL_PREFIX}{int(pattern_id)}/versions/{int(version)}"


def incident_line(incident: Incident) -> str:
    """When, how strong, where, what kinds, the likeliest culprit, how many nodes, and the evidence."""
    patterns = ", ".join(str(int(p)) for p in incident.patterns)
    where = f"pattern{'s' if len(incident.patterns) > 1 else ''} {patterns}" if patterns else "new RPC"
    culprit = code(incident.culprits[0]) if incident.culprits else "unknown"
    return (
        f"{utc_span(incident.start_ts, incident.end_ts)} · peak score {incident.peak_score:.1f} · {where} · "
        f"kinds {code(', '.join(map(str, incident.kinds)))} · culprit {culprit} · {len(incident.nodes)} node(s) · "
        f"evidence {code(incident.evidence or '-', EVIDENCE_CHARS)}"
    )


def incident_links(incident: Incident, champions: Mapping[int, int], airflow_url: str, mlflow_url: str) -> list[Link]:
    """The incident in the Airflow view, then each of its patterns' champion in MLflow."""
    links = [Link("view in Airflow", view_url(airflow_url, incident.incident_id))]
    for pattern_id in incident.patterns:
        if (version := champions.get(int(pattern_id))) is not None:
            label = f"pattern {int(pattern_id)} model v{int(version)}"
            links.append(Link(label, model_url(mlflow_url, pattern_id, version)))
    return links


def incidents_payload(
    incidents: Sequence[Incident],
    champions: Mapping[int, int],
    *,
    hour: tuple[datetime, datetime],
    min_score: float,
    airflow_url: str,
    mlflow_url: str,
    max_listed: int = MAX_LISTED,
) -> dict[str, Any]:
    """One message for the incidents first posted for `hour` ([start, end)), in the order given
    (strongest first); beyond `max_listed`, a count and a link to the view."""
    title = f"rpcwatch: {len(incidents)} new incident(s) with peak score ≥ {min_score:g}, {utc_span(*hour)}"
    entries = [
        (incident_line(i), incident_links(i, champions, airflow_url, mlflow_url)) for i in incidents[:max_listed]
    ]
    if len(incidents) > max_listed:
        entries.append((f"… and {len(incidents) - max_listed} more", [Link("all incidents", view_url(airflow_url))]))
    return message(title, entries)


# --- a failed task ---------------------------------------------------------------------------------


def exception_text(exception: object) -> str:
    """`Type: message` of an exception (plain text as it is), before cleaning."""
    if exception is None:
        return "no exception given"
    if isinstance(exception, BaseException):
        return f"{type(exception).__name__}: {exception}"
    return str(exception)


def failure_payload(
    dag_id: str | None,
    run_id: str | None,
    task_id: str | None,
    hour: datetime | str | None,
    exception: object,
    log_url: str | None = None,
) -> dict[str, Any]:
    """A failed task: DAG, task, run, the hour it covered, the exception (truncated), its log."""
    when = f"{_utc(hour):%Y-%m-%d %H:%M} UTC" if isinstance(hour, datetime) else code(hour or "unknown")
    line = (
        f"task {code(task_id)} of DAG {code(dag_id)} failed · run {code(run_id)} · hour {when} · "
        f"{code(exception_text(exception), EXCEPTION_CHARS)}"
    )
    links = [Link("task log", log_url)] if log_url and _PLAIN_URL.fullmatch(log_url) else []
    return message("rpcwatch: a task failed", [(line, links)])
