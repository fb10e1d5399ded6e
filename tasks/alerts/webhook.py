"""Posting to a webhook, and the hourly alert on new incidents.

`post_json` uses http.client (no extra dependency), with one deadline for the whole post. A Slack
or Teams webhook URL carries its secret in the path, so its errors name only the host. Redirects
are refused (a 30x is an error): following one would turn the POST into a GET without the body,
and report success for a message nobody got.

`alert_new_incidents` is the pipeline's `alert` step: the incidents going on in the hour (started
in it, or earlier and still running) with a peak score of at least `RPCWATCH_ALERT_MIN_SCORE` that
were never posted, strongest first, as one message; each posted one is recorded in `alerts_sent`,
so a rerun posts nothing twice and an incident that crosses the level later is posted once, then.
Nothing is posted about an incident people acknowledged, marked false positive or expected, or
silenced (tasks.triage.actions). Delivery is at least once: a crash between the post and its record
posts it again on the rerun. Reads `incidents`, `incident_actions`, `silences`, `models`; writes
`alerts_sent`. It imports no heavy module at import time, so the failure notifier
(dags/rpcwatch_alerts.py) can use `post_json` from any task process.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from tasks.alerts.messages import clean, incidents_payload
from tasks.clock import HOUR, hour_floor, naive_utc
from tasks.settings import Settings

if TYPE_CHECKING:
    import duckdb

    from tasks.scoring.incidents import Incident

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 10.0
# incident columns in table order (tasks.scoring.incidents.INCIDENT_COLUMNS, repeated so that this
# module imports nothing heavy); the values come in as bound parameters only
UNSENT_INCIDENTS_SQL = """
SELECT incident_id, start_ts, end_ts, patterns, nodes, peak_score, kinds, points, culprits, evidence,
       incident_group, aliases
FROM incidents i
WHERE start_ts < $end AND end_ts > $start AND peak_score >= $min_score
  AND NOT EXISTS (SELECT 1 FROM alerts_sent s
                  WHERE s.incident_id = i.incident_id OR list_contains(coalesce(i.aliases, []), s.incident_id))
ORDER BY peak_score DESC, start_ts, incident_id"""
SENT_SQL = """INSERT INTO alerts_sent (incident_id, sent_at, hour, destination, peak_score)
VALUES ($id, $at, $hour, $destination, $peak)"""
# each pattern's champion: the newest version whose decision is `champion` (as tasks.models.registry)
CHAMPION_VERSIONS_SQL = """
SELECT pattern_id, max(model_version) FROM models
WHERE decision = 'champion' AND model_version IS NOT NULL AND list_contains($patterns, pattern_id)
GROUP BY pattern_id"""


class WebhookError(RuntimeError):
    """A webhook did not take a message. The message names the host, never the URL."""


def host_of(url: str) -> str:
    """`host[:port]` of a URL: what errors and logs may show of a webhook."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return "?"
    return f"{host or '?'}:{port}" if port else host or "?"


def _connection(url: str, timeout_s: float) -> tuple[http.client.HTTPConnection, str]:
    """A connection to the URL's host and the request target (path and query)."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    return kind(parts.hostname or "", parts.port, timeout=timeout_s), target


class _Deadline:
    """One deadline for a whole exchange: a socket timeout bounds each read, so a receiver that
    drips one byte per read would hold the post (and `rpcwatch run`) for as long as it likes. At
    the deadline a timer shuts the connection's socket, which ends whatever read is blocked."""

    def __init__(self, connection: http.client.HTTPConnection, seconds: float) -> None:
        self.connection, self.passed = connection, False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def _expire(self) -> None:
        self.passed = True
        if (sock := self.connection.sock) is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._timer.cancel()
        self.connection.close()


def _exchange(url: str, body: bytes, timeout_s: float) -> tuple[int, str]:
    """(status, reason) of one POST, all of it within `timeout_s`."""
    connection, target = _connection(url, timeout_s)
    headers = {"Content-Type": "application/json; charset=utf-8", "User-Agent": "rpcwatch"}
    with _Deadline(connection, timeout_s) as deadline:
        try:
            connection.request("POST", target, body=body, headers=headers)
            answer = connection.getresponse()
            answer.read()
        except (OSError, http.client.HTTPException):
            if deadline.passed:
                raise TimeoutError from None
            raise
        if deadline.passed:
            raise TimeoutError
        return int(answer.status), str(answer.reason)


def post_json(url: str, payload: dict[str, Any], timeout_s: float = DEFAULT_TIMEOUT_S) -> int:
    """POST `payload` as JSON; returns the HTTP status (2xx). Anything else (a redirect too: it is
    not followed), or no full answer within `timeout_s` for the whole post, raises WebhookError
    naming the host."""
    host = host_of(url)
    if urlsplit(url).scheme not in ("http", "https"):
        raise WebhookError(f"webhook at {host}: not an http(s) URL")
    try:
        status, reason = _exchange(url, json.dumps(payload).encode(), timeout_s)
    except TimeoutError:
        raise WebhookError(f"webhook at {host} gave no full answer within {timeout_s:g} s") from None
    except (ConnectionRefusedError, socket.gaierror, ssl.SSLError) as err:  # refused, unknown host, TLS
        raise WebhookError(f"webhook at {host} could not be reached: {clean(err, 200)}") from None
    except (OSError, http.client.HTTPException) as err:  # connection dropped, bad answer
        raise WebhookError(f"webhook at {host} failed: {type(err).__name__} {clean(err, 200)}") from None
    except (ValueError, UnicodeError):  # a malformed URL: its text (with the secret) would be in the message
        raise WebhookError(f"webhook at {host}: not a valid URL") from None
    if not 200 <= status < 300:
        raise WebhookError(f"webhook at {host} answered HTTP {status} {clean(reason, 80)}") from None
    return status


def _naive_utc(value: datetime) -> datetime:
    """As DuckDB's TIMESTAMPs hold it; a naive value is UTC already."""
    return naive_utc(value) if value.tzinfo else value


def unsent_incidents(
    con: duckdb.DuckDBPyConnection, hour_start: datetime, hour_end: datetime, min_score: float
) -> list[Incident]:
    """Incidents going on in [hour_start, hour_end) with peak score >= `min_score` that were never
    posted (under their id or one they absorbed), strongest first (ties: earliest, then by id)."""
    from tasks.scoring.incidents import Incident

    params = {"start": _naive_utc(hour_start), "end": _naive_utc(hour_end), "min_score": float(min_score)}
    return [Incident.from_row(row) for row in con.execute(UNSENT_INCIDENTS_SQL, params).fetchall()]


def to_post(con: duckdb.DuckDBPyConnection, found: list[Incident]) -> tuple[list[Incident], dict[str, str]]:
    """The incidents people did not quieten (tasks.triage.actions.why_quiet), and why each other one
    is held back, by id."""
    from tasks.triage.actions import active_silences, states, why_quiet

    decided, silences = states(con, [i.incident_id for i in found]), active_silences(con)
    held = {i.incident_id: why for i in found if (why := why_quiet(i, decided.get(i.incident_id), silences))}
    return [i for i in found if i.incident_id not in held], held


def champion_versions(con: duckdb.DuckDBPyConnection, pattern_ids: Sequence[int]) -> dict[int, int]:
    """pattern id -> its champion's model version, for those of `pattern_ids` that have one."""
    if not pattern_ids:
        return {}
    rows = con.execute(CHAMPION_VERSIONS_SQL, {"patterns": [int(p) for p in pattern_ids]}).fetchall()
    return {int(pattern_id): int(version) for pattern_id, version in rows}


def alert_new_incidents(
    settings: Settings,
    hour: datetime,
    say: Callable[[str], None] = log.info,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> int:
    """Post the incidents that started in `hour` with peak score >= `alert_min_score`, strongest
    first, as one message to `alert_webhook`. Returns how many were posted: 0 when there are none
    or no webhook is set (the warehouse is not opened then), saying which."""
    if not settings.alert_webhook:
        say("alerts are off (RPCWATCH_ALERT_WEBHOOK is not set): nothing posted")
        return 0
    from tasks.warehouse import opened

    start, host = hour_floor(hour), host_of(settings.alert_webhook)
    with opened(settings.warehouse) as con:
        found, held = to_post(con, unsent_incidents(con, start, start + HOUR, settings.alert_min_score))
        for incident_id, why in held.items():
            say(f"not posting incident {incident_id}: {why}")
        if not found:
            say(f"no new incident at {start:%Y-%m-%d %H:00} UTC with peak score >= {settings.alert_min_score:g}")
            return 0
        payload = incidents_payload(
            found,
            champion_versions(con, sorted({p for incident in found for p in incident.patterns})),
            hour=(start, start + HOUR),
            min_score=settings.alert_min_score,
            airflow_url=settings.airflow_url,
            mlflow_url=settings.mlflow_url,
        )
        post_json(settings.alert_webhook, payload, timeout_s)
        sent_at = naive_utc(datetime.now(UTC))
        for i in found:
            params = {"id": i.incident_id, "at": sent_at, "hour": naive_utc(start), "destination": host}
            con.execute(SENT_SQL, params | {"peak": i.peak_score})
    say(f"posted {len(found)} new incident(s) to the webhook at {host}")
    return len(found)
