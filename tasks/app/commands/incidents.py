"""`rpcwatch incidents`: list incidents with what people decided about them, and decide
(tasks.triage.actions): `ack ID`, `mark ID false_positive|expected|true_positive`, `silence
--service S|--rpc R --for 2h`. The list reads the warehouse (read-only) so that marks just made
show; while a run holds the warehouse it reads the published snapshot instead and says so. The
actions write the warehouse (waiting for a run's lock like any writer)."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import duckdb

from tasks.app.commands.common import AddParser, add_common_options, settings_from
from tasks.settings import Settings

SILENCE_UNITS = {"m": 60, "h": 3600, "d": 86400}


@contextmanager
def _fresh(settings: Settings) -> Iterator[duckdb.DuckDBPyConnection]:
    """The warehouse read-only (marks made a moment ago show), else the published snapshot."""
    from tasks.app.report import reading
    from tasks.warehouse import CannotOpen, opened

    try:
        with opened(settings.warehouse, read_only=True) as con:
            yield con
            return
    except CannotOpen as busy:
        print(f"(the warehouse is busy: {busy}; showing the published snapshot)", file=sys.stderr)
    with reading(settings) as con:
        yield con


def incident_rows(con: duckdb.DuckDBPyConnection, since: str, pattern: int | None, limit: int) -> tuple[list, Any]:
    """The incidents of the window as JSON-ready dicts, newest first, and the Listing they came from."""
    from tasks.app.view import Filters, list_incidents, newest_scored, rpc_text
    from tasks.triage.actions import states

    listing = list_incidents(con, Filters(since=since, pattern=pattern, limit=limit), newest_scored(con))
    decided = states(con, [i.incident_id for i in listing.rows])
    rows = []
    for i in listing.rows:
        state = decided.get(i.incident_id)
        rows.append(
            {
                "id": i.incident_id,
                "start": f"{i.start_ts:%Y-%m-%dT%H:%M:%SZ}",
                "end": f"{i.end_ts:%Y-%m-%dT%H:%M:%SZ}",
                "patterns": i.patterns,
                "culprits": i.culprits,
                "rpcs": [rpc_text(n) for n in i.nodes],
                "peak_score": round(float(i.peak_score), 2),
                "acked": bool(state and state.acked),
                "mark": state.mark if state else None,
                "marked_by": state.marked_by if state else None,
                "note": state.note if state else None,
            }
        )
    return rows, listing


def cmd_list(args: argparse.Namespace) -> int:
    from tasks.app.report import table

    settings = settings_from(args)
    with _fresh(settings) as con:
        rows, listing = incident_rows(con, args.since, args.pattern, args.limit)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no incident in the last {args.since} of scored data")
        return 0
    headers = ["id", "start", "end", "patterns", "culprits", "peak", "acked", "mark"]
    body = [
        (r["id"], r["start"], r["end"], ",".join(map(str, r["patterns"])) or "-", ", ".join(r["culprits"][:3]) or "-")
        + (r["peak_score"], "yes" if r["acked"] else "", r["mark"] or "")
        for r in rows
    ]
    print(table(headers, body))
    if listing.cut:
        print(f"{listing.shown()} incidents; use --limit for more", file=sys.stderr)
    return 0


def _actor(args: argparse.Namespace) -> str:
    return args.by or getpass.getuser()


def cmd_ack(args: argparse.Namespace) -> int:
    from tasks.triage.actions import ACK, record
    from tasks.warehouse import opened

    with opened(settings_from(args).warehouse) as con:
        incident = record(con, args.id, ACK, _actor(args), note=args.note)
    print(f"incident {incident.incident_id} acknowledged by {_actor(args)}: no alert will be posted about it")
    return 0


def cmd_mark(args: argparse.Namespace) -> int:
    from tasks.triage.actions import MARK, QUIET_MARKS, record
    from tasks.warehouse import opened

    with opened(settings_from(args).warehouse) as con:
        incident = record(con, args.id, MARK, _actor(args), mark=args.mark, note=args.note)
    quiet = " no alert will be posted about it, and" if args.mark in QUIET_MARKS else ""
    print(
        f"incident {incident.incident_id} marked {args.mark} by {_actor(args)}:{quiet} retraining leaves "
        f"{incident.start_ts:%Y-%m-%d %H:%M}–{incident.end_ts:%H:%M} UTC out of what its models learn"
    )
    return 0


def parse_duration(text: str) -> Any:
    """`30m`, `2h`, `7d` as a timedelta."""
    from datetime import timedelta

    if len(text) < 2 or text[-1] not in SILENCE_UNITS or not text[:-1].isdigit() or int(text[:-1]) == 0:
        raise ValueError(f"--for {text!r}: use e.g. 30m, 2h, 7d")
    return timedelta(seconds=int(text[:-1]) * SILENCE_UNITS[text[-1]])


def cmd_silence(args: argparse.Namespace) -> int:
    from tasks.triage.actions import add_silence
    from tasks.warehouse import opened

    lasting = parse_duration(args.lasting)
    with opened(settings_from(args).warehouse) as con:
        s = add_silence(con, _actor(args), lasting, service=args.service, rpc=args.rpc, note=args.note)
    print(f"silenced {s.what} until {s.ends_at:%Y-%m-%d %H:%M} UTC (silence {s.silence_id}): alerts skip its incidents")
    return 0


def _who(p: argparse.ArgumentParser) -> None:
    p.add_argument("--note", help="why, for the record")
    p.add_argument("--by", help="who (default: your login name)")


def register(add_parser: AddParser) -> None:
    """incidents [ack|mark|silence]."""
    p = add_parser("incidents", help="incidents and what people decided; ack, mark or silence them")
    add_common_options(p, hour=False)
    p.add_argument("--since", default="24h", help="window back from the newest scored data: 30m, 6h, 2d or all")
    p.add_argument("--pattern", type=int, help="only this pattern's")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true", help="a JSON list of objects (id, start, end, culprits, ...)")
    p.set_defaults(func=cmd_list)
    actions = p.add_subparsers(dest="action", required=False)

    a = actions.add_parser("ack", help="acknowledge: someone is on it (no alert is posted about it)")
    add_common_options(a, hour=False)
    a.add_argument("id")
    _who(a)
    a.set_defaults(func=cmd_ack)

    from tasks.triage.actions import MARKS

    m = actions.add_parser("mark", help="say what it was; a marked period is never learnt by a retrain")
    add_common_options(m, hour=False)
    m.add_argument("id")
    m.add_argument("mark", choices=MARKS)
    _who(m)
    m.set_defaults(func=cmd_mark)

    s = actions.add_parser("silence", help="no alerts about a service or an RPC for a while")
    add_common_options(s, hour=False)
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--service")
    what.add_argument("--rpc", help="CALLER:CALLEE or CALLER:CALLEE:INTERFACE")
    s.add_argument("--for", dest="lasting", required=True, help="how long: 30m, 2h, 7d (at most 30d)")
    _who(s)
    s.set_defaults(func=cmd_silence)
