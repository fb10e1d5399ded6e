"""Commands that show and judge results, read-only: `anomalies`, `summary` and `plot` (a node's
series, forecast and irregular points, to a PNG), which read the published snapshot, else the
warehouse; `evaluate` (anomalies and incidents against injected labels or a fault list), `replay`,
which writes span captures back to back as evaluation input (files, no table), and `inject`, which
adds labelled attack spans to such a replay (files, no table). `sql` (SQL on the published
snapshot) lives in `tasks.app.commands.sql` and is registered here, after them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tasks.app.commands import sql
from tasks.app.commands.common import AddParser, add_common_options, say_source, settings_from
from tasks.settings import parse_utc


def cmd_anomalies(args: argparse.Namespace) -> int:
    from tasks.app.report import anomaly_rows, table
    from tasks.app.view import Filters, parse_since, window_text

    parse_since(args.since)  # a bad --since is one line and exit 2, before any file is opened
    settings = settings_from(args)
    filters = Filters(since=args.since, pattern=args.pattern, kind=args.kind, limit=args.limit, offset=args.offset)
    headers, listing, newest = anomaly_rows(settings, filters)
    say_source(settings)
    if args.json:
        print(json.dumps([dict(zip(headers, r)) for r in listing.rows], default=str, indent=1))
    elif listing.rows:
        print(table(headers, listing.rows))
    else:
        print(f"no irregular point in {window_text(args.since, newest)}" + (" on this page" if listing.total else ""))
    if listing.cut:  # on stderr: stdout stays the table or the JSON
        more = f"; next page: --offset {listing.next_offset}" if listing.next_offset is not None else ""
        print(
            f"{listing.shown()} irregular points in {window_text(args.since, newest)}: use --limit/--offset{more}",
            file=sys.stderr,
        )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if args.faults:
        from tasks.evaluation.ceiling import ceiling_report, evaluate_ceiling
        from tasks.evaluation.faults import curve_report, evaluate_faults, fault_report, operating_curve

        visibility = None
        if args.ceiling:
            visibility = evaluate_ceiling(settings, args.faults)
        elif args.json:  # `visible` is the ceiling's verdict; null where the ceiling cannot judge
            try:
                visibility = evaluate_ceiling(settings, args.faults)
            except ValueError as why:
                print(f"rpcwatch: visible left null: {why}", file=sys.stderr)
        evaluation = evaluate_faults(settings, args.faults, visibility)
        curve = operating_curve(settings, args.faults, visibility) if args.curve else None
        if args.json:
            extra = {"curve": [c.as_json() for c in curve]} if curve else {}
            print(json.dumps(evaluation.as_json() | extra, default=str))
            return 0
        print(fault_report(evaluation))
        if curve:
            print("", curve_report(curve, settings.alarm_false_per_day), sep="\n")
        if args.ceiling:
            print("", ceiling_report(visibility), sep="\n")
    else:
        if args.ceiling or args.curve:
            raise SystemExit("--ceiling and --curve go with --faults only")
        from tasks.evaluation.labels import evaluate_labels, label_report, labels_json

        scores = evaluate_labels(settings, args.labels)
        print(json.dumps(labels_json(*scores)) if args.json else label_report(*scores))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from tasks.evaluation.replay import Layout, replay_days, replay_hours

    layout = Layout(fill=args.fill, prefix_s=int(args.prefix_hours * 3600), seed=args.seed)
    counts = replay_days(args.days, args.out, parse_utc(args.start), args.mapping, layout=layout)
    hours = replay_hours(args.out)
    how = (
        f"after a {args.prefix_hours:g} h fault-free prefix, as taken, with {counts['fill_traces']:,} fault-free "
        f"traces ({counts['fill_spans']:,} spans) filled around them"
        if args.fill
        else "back to back"
    )
    wrote = (
        f"wrote {counts['rows']:,} spans of {counts['runs']} runs {how} into {args.out} "
        f"({hours[0]:%Y-%m-%d %H:00} .. {hours[-1]:%Y-%m-%d %H:00}), {counts['duplicates']:,} duplicate spans "
        f"dropped; {counts['faults']} faults in replay time: {counts['moved']} moved to the start of their capture, "
        f"{counts['unobservable']} unobservable (no capture in their window: listed, not counted)"
    )
    after = "" if args.fill else "RPCWATCH_MIN_TRAIN_HOURS=0.5 \\\n"
    run = f"        rpcwatch run --source {args.out} --format spans --mapping {args.mapping}\n"
    print(
        wrote,
        f"next (as `make trainticket` does): {after}{run}      rpcwatch evaluate --faults "
        f"{args.out / 'fault_list.json'}",
        sep="\n",
    )
    return 0


def cmd_inject(args: argparse.Namespace) -> int:
    from tasks.evaluation.attacks import inject_attacks, inject_report

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else None
    print(inject_report(inject_attacks(args.replay, kinds, args.seed), args.replay))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from tasks.app.plots import plot_node

    settings = settings_from(args)
    out = (
        args.out
        or settings.home / "plots" / f"pattern-{args.pattern}-{args.node.replace(':', '_').replace('/', '_')}.png"
    )
    wrote = plot_node(settings, args.pattern, args.node, args.hours, out)
    say_source(settings)
    print(f"wrote {wrote}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from tasks.app.report import hour_summary, table

    settings = settings_from(args)
    headers, rows = hour_summary(settings)
    say_source(settings)
    print(table(headers, rows))
    return 0


def _rows(least: int):
    """An argparse type: a whole number of rows, at least `least`."""

    def rows(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"{text!r}: a whole number, at least {least}")
        return value

    return rows


def _register_anomalies_and_evaluate(add_parser: AddParser) -> None:
    p = add_parser("anomalies", help="irregular points, most recent first")
    add_common_options(p, hour=False)
    p.add_argument(
        "--since",
        default="6h",
        help="window counted back from the newest scored data: 30m, 6h, 2d (a number and m, h or d) or all "
        "(as the Airflow view's `since`; default 6h, the view `recent_anomalies`)",
    )
    p.add_argument("--pattern", type=int, help="only this pattern id")
    p.add_argument(
        "--kind", help="only this kind (traffic_spike, traffic_drop, errors, latency, traces, novel_rpc, ...)"
    )
    p.add_argument("--limit", type=_rows(1), default=50, help="rows to show (default 50)")
    p.add_argument("--offset", type=_rows(0), default=0, help="rows to skip: the next page is --offset LIMIT")
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    p.set_defaults(func=cmd_anomalies)

    p = add_parser("evaluate", help="event precision/recall/F1 against injected labels, next to a naive rule")
    add_common_options(p, hour=False)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--labels", type=Path, help="labels.parquet written by `rpcwatch synth --anomalies` or `rpcwatch inject`"
    )
    what.add_argument(
        "--faults", type=Path, help="fault_list.json (Nezha layout; `rpcwatch replay` writes one in replay time)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object: with --faults detector -> unit -> scores; with --labels `rpcwatch` and `naive`, "
        "each with its `events` (event, kind, detected, delay_s) and `false_incidents`",
    )
    p.add_argument(
        "--ceiling",
        action="store_true",
        help="with --faults: also what the traces hold, a label-using check of which faults change their "
        "service's calls more than fault-free time does (seconds a day of TrainTicket)",
    )
    p.add_argument(
        "--curve",
        action="store_true",
        help="with --faults: the operating curve, detection and false incidents per day at five settings "
        "of the alarm policy (models trained once)",
    )
    p.set_defaults(func=cmd_evaluate)


def register(add_parser: AddParser) -> None:
    """anomalies, evaluate, replay, inject, plot, summary and sql, in this order."""
    _register_anomalies_and_evaluate(add_parser)

    p = add_parser("replay", help="span captures with gaps (Nezha TrainTicket days) as one contiguous timeline")
    p.add_argument("days", type=Path, nargs="+", help="day folders with trace/, normal/ and fault_list.json")
    p.add_argument("--out", type=Path, required=True, help="folder for the hour-partitioned spans and fault list")
    p.add_argument("--start", default="2023-01-29T08:00", help="replay time of the first span")
    p.add_argument("--mapping", default="nezha-trainticket", help="span column mapping")
    p.add_argument(
        "--fill",
        action="store_true",
        help="a clean prefix, then the captures as taken with fault-free traffic resampled from the day's "
        "own fault-free traces between them (false alarms can be counted over hours)",
    )
    p.add_argument("--prefix-hours", type=float, default=6.0, help="with --fill: the clean prefix models learn on")
    p.add_argument("--seed", type=int, default=0, help="with --fill: which resampling")
    p.set_defaults(func=cmd_replay)

    p = add_parser("inject", help="add labelled attack traffic (built from its own traces) to a replay folder")
    p.add_argument("replay", type=Path, help="a folder written by `rpcwatch replay`")
    p.add_argument(
        "--kinds",
        help="comma-separated; default all: lateral_movement,credential_stuffing,"
        "scraping_amplification,slow_exfiltration,internal_flood,endpoint_enumeration",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_inject)

    p = add_parser("plot", help="observed vs predicted vs threshold band of one node, irregular points marked")
    add_common_options(p, hour=False)
    p.add_argument("--pattern", type=int, required=True)
    p.add_argument("--node", required=True, help="CALLER:CALLEE:INTERFACE")
    p.add_argument("--hours", type=int, default=6)
    p.add_argument("--out", type=Path, help="PNG path (default: <home>/plots/...)")
    p.set_defaults(func=cmd_plot)

    p = add_parser("summary", help="per-hour table of what the warehouse holds")
    add_common_options(p, hour=False)
    p.set_defaults(func=cmd_summary)

    sql.register(add_parser)
