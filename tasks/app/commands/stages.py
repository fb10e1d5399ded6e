"""Commands for the pipeline stages: `synth` (writes trace files), `ingest`, `validate`, `aggregate`,
`run` (one hour through every stage), `cluster` and `patterns`. The stages write the warehouse
tables (calls, quarantine, ingest_log, validation_runs, rpc_series, patterns...); these commands
print what they did. `patterns` only reads: the published snapshot, else the warehouse."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tasks.app.commands.common import (
    AddParser,
    add_common_options,
    ingested_hours,
    say_source,
    settings_from,
    source_hours,
)
from tasks.clock import hour_floor
from tasks.settings import parse_utc

RUN_HEADERS = [
    "hour",
    "rows read",
    "kept",
    "quarantined",
    "checks",
    "series rows",
    "traces",
    "clusters",
    "critical share",
    "models trained",
    "irregular points",
]


def cmd_synth(args: argparse.Namespace) -> int:
    from tasks.app.report import table
    from tasks.synth.generate import generate

    summary = generate(
        parse_utc(args.start),
        args.hours,
        args.out,
        seed=args.seed,
        spans_per_hour=args.spans_per_hour,
        anomalies=args.anomalies,
        progress=print,
        systems=args.systems,
    )
    print(table(["hour", "rows"], sorted(summary.rows_per_hour.items())))
    print(
        f"\n{summary.templates} request types over {summary.services} services, {summary.events} injected "
        f"events; {sum(summary.rows_per_hour.values()):,} spans in {summary.seconds:.1f} s "
        f"({summary.spans_per_second():,.0f} spans/s) -> {args.out}"
    )
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from tasks.app.report import table
    from tasks.ingest.stage import ingest_hour

    settings = settings_from(args)
    rows, status = [], 0
    for hour in source_hours(settings, args):
        report = ingest_hour(settings, hour, args.source, args.format, force=args.force)
        state = "unchanged, skipped" if report.skipped_unchanged else "ingested"
        rows.append(
            [
                f"{hour:%Y-%m-%d %H:00}",
                len(report.files),
                report.rows_read,
                report.rows_kept,
                report.rows_quarantined,
                state,
            ]
        )
        for bad in report.failed_files:
            print(f"ERROR {bad.status}: {bad.error}", file=sys.stderr)
            status = 1
    print(table(["hour", "files", "rows read", "kept", "quarantined", "state"], rows))
    print(f"\nwarehouse: {settings.warehouse}  (tables calls, quarantine, ingest_log)")
    return status


def cmd_validate(args: argparse.Namespace) -> int:
    from tasks.app.report import table
    from tasks.ingest.validate import validate_hour

    settings = settings_from(args)
    status = 0
    for hour in source_hours(settings, args):
        report = validate_hour(settings, hour, raise_on_failure=False)
        shown = [f for f in report.findings if not f.success or args.verbose]
        print(f"hour {hour:%Y-%m-%d %H:00}: {len(report.findings)} expectations, {len(report.failures)} batch failures")
        if shown:
            print(
                table(
                    ["severity", "expectation", "subject", "observed"],
                    [[f.severity, f.expectation, f.subject, f.observed[:60]] for f in shown],
                )
            )
        if not report.ok:
            print(report.message(), file=sys.stderr)
            status = 1
    return status


def cmd_aggregate(args: argparse.Namespace) -> int:
    from tasks.app.report import table
    from tasks.ingest.aggregate import aggregate_hour

    settings = settings_from(args)
    rows = []
    for hour in source_hours(settings, args):
        r = aggregate_hour(settings, hour)
        rows.append([f"{hour:%Y-%m-%d %H:00}", r.rpcs, r.series_rows, r.bucket_seconds])
    print(table(["hour", "rpcs", "series rows", "bucket s"], rows))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from tasks.app.report import table
    from tasks.pipeline import run_hour
    from tasks.publish import analytics_path

    settings = settings_from(args)
    rows = []
    for hour in source_hours(settings, args):
        r = run_hour(settings, hour, args.source, args.format)
        ingest, patterns = r["ingest"], r["patterns"]
        rows.append(
            [
                f"{hour:%Y-%m-%d %H:00}",
                ingest["rows_read"],
                ingest["rows_kept"],
                ingest["rows_quarantined"],
                r["validate"]["expectations"],
                r["aggregate"]["series_rows"],
                patterns["traces"],
                "-" if patterns["clusters"] is None else patterns["clusters"],
                f"{patterns['critical_share']:.1%}",
                sum("skipped" not in o for shard in r["train"] for o in shard),
                r["score"]["anomalies"],
            ]
        )
    print(table(RUN_HEADERS, rows))
    print(f"\nsee them: rpcwatch anomalies, or read-only in DuckDB: {analytics_path(settings)}")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from tasks.patterns.stage import patterns_hour

    settings = settings_from(args)
    hours = [hour_floor(parse_utc(args.hour))] if args.hour else ingested_hours(settings)
    for hour in hours:
        print("\n".join(patterns_hour(settings, hour, force=args.force).lines()) + "\n")
    print("see them: rpcwatch patterns")
    return 0


def cmd_patterns(args: argparse.Namespace) -> int:
    from tasks.app.report import table, table_of
    from tasks.patterns.stage import PATTERNS_SQL

    settings = settings_from(args)
    rows = table_of(settings, PATTERNS_SQL)  # the published snapshot: a run holding the warehouse never blocks it
    say_source(settings)
    print(table(*rows))
    return 0


def register(add_parser: AddParser) -> None:
    """synth, ingest, validate, aggregate, run, cluster and patterns, in this order."""
    p = add_parser("synth", help="generate synthetic traces with ground truth")
    p.add_argument("--start", required=True, help="first hour, e.g. 2026-01-01T00:00")
    p.add_argument("--hours", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spans-per-hour", type=int, default=200_000)
    p.add_argument("--anomalies", action="store_true", help="inject labelled anomalies (see labels.parquet)")
    p.add_argument("--systems", type=int, default=1, help="a fleet of this many independent shops (more patterns)")
    p.set_defaults(func=cmd_synth)

    for name, func, text in [
        ("ingest", cmd_ingest, "load trace files of an hour into DuckDB"),
        ("validate", cmd_validate, "run the validation suite on an ingested hour"),
        ("aggregate", cmd_aggregate, "build rpc_series for an hour"),
        ("run", cmd_run, "one hour through every stage, without Airflow"),
    ]:
        p = add_parser(name, help=text)
        add_common_options(p)
        p.set_defaults(func=func)
        if name == "ingest":
            p.add_argument("--force", action="store_true", help="re-ingest even if no file changed")

    p = add_parser("cluster", help="rebuild traces, assign or re-cluster patterns for an hour")
    add_common_options(p, hour=False)
    p.add_argument("--hour", help="hour, e.g. 2026-01-01T03:00 (default: every ingested hour, in order)")
    p.add_argument("--force", action="store_true", help="re-cluster even if the cadence says no")
    p.set_defaults(func=cmd_cluster)

    p = add_parser("patterns", help="table of RPC chain patterns: id, nodes, traffic share, status")
    add_common_options(p, hour=False)
    p.set_defaults(func=cmd_patterns)
