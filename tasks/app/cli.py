"""`rpcwatch` command line: each stage on its own, one hour through all stages, and the demo."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tasks.clock import hour_floor
from tasks.settings import FORMATS, Settings, load_settings, parse_utc


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        "home": getattr(args, "home", None),
        "format": getattr(args, "format", None),
        "span_mapping": getattr(args, "mapping", None),
    }
    if getattr(args, "epoch", None):
        overrides["trace_epoch"] = parse_utc(args.epoch)
    return load_settings(**overrides)


def _hours(settings: Settings, args: argparse.Namespace) -> list[datetime]:
    from tasks.ingest.stage import hours_in_sources

    if args.hour:
        return [hour_floor(parse_utc(args.hour))]
    hours = hours_in_sources(settings, args.source or [settings.incoming], args.format)
    if not hours:
        raise ValueError("no --hour given and no rows with timestamps found in the source")
    return hours


def cmd_synth(args: argparse.Namespace) -> int:
    from tasks.synth.generate import generate

    summary = generate(
        parse_utc(args.start),
        args.hours,
        args.out,
        seed=args.seed,
        spans_per_hour=args.spans_per_hour,
        anomalies=args.anomalies,
        progress=print,
    )
    from tasks.app.report import table

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

    settings = _settings(args)
    rows, status = [], 0
    for hour in _hours(settings, args):
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

    settings = _settings(args)
    status = 0
    for hour in _hours(settings, args):
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

    settings = _settings(args)
    rows = []
    for hour in _hours(settings, args):
        r = aggregate_hour(settings, hour)
        rows.append([f"{hour:%Y-%m-%d %H:00}", r.rpcs, r.series_rows, r.bucket_seconds])
    print(table(["hour", "rpcs", "series rows", "bucket s"], rows))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from tasks.app.report import table
    from tasks.pipeline import run_hour
    from tasks.publish import analytics_path

    settings = _settings(args)
    rows = []
    for hour in _hours(settings, args):
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
                sum("skipped" not in o for o in r["train"]),
                r["score"]["anomalies"],
            ]
        )
    print(
        table(
            [
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
            ],
            rows,
        )
    )
    print(f"\nsee them: rpcwatch anomalies, or read-only in DuckDB: {analytics_path(settings)}")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from tasks.patterns.stage import patterns_hour

    settings = _settings(args)
    hours = [hour_floor(parse_utc(args.hour))] if args.hour else _ingested_hours(settings)
    for hour in hours:
        print("\n".join(patterns_hour(settings, hour, force=args.force).lines()) + "\n")
    print("see them: rpcwatch patterns")
    return 0


def _ingested_hours(settings: Settings) -> list[datetime]:

    from tasks.warehouse import opened

    with opened(settings.warehouse, read_only=True) as con:
        rows = con.execute("SELECT DISTINCT hour FROM ingest_log WHERE status = 'ingested' ORDER BY 1").fetchall()
    return [r[0].replace(tzinfo=UTC) for r in rows]


def cmd_patterns(args: argparse.Namespace) -> int:
    from tasks.app.report import table
    from tasks.patterns.stage import pattern_table

    print(table(*pattern_table(_settings(args))))
    return 0


def _latest_hour(settings: Settings, args: argparse.Namespace) -> datetime:
    if args.hour:
        return hour_floor(parse_utc(args.hour))
    hours = _ingested_hours(settings)
    if not hours:
        raise ValueError("no ingested hour yet: run `rpcwatch run` or the DAG first")
    return hours[-1]


def cmd_stale(args: argparse.Namespace) -> int:
    from tasks.app.report import table
    from tasks.models.staleness import stale_patterns
    from tasks.warehouse import opened

    settings = _settings(args)
    hour = _latest_hour(settings, args)
    with opened(settings.warehouse, read_only=True) as con:
        stale = stale_patterns(con, settings, hour, args.force, args.pattern)
    if not stale:
        print(f"nothing is stale at {hour:%Y-%m-%d %H:00}: every critical pattern has a fresh champion")
        return 0
    print(table(["pattern", "reasons"], [[s.pattern_id, ", ".join(s.reasons)] for s in stale]))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from tasks.app.report import table
    from tasks.models.retrain import train_stale

    settings = _settings(args)
    hour = _latest_hour(settings, args)
    outcomes = train_stale(settings, hour, args.force, args.pattern)
    if not outcomes:
        print(f"nothing is stale at {hour:%Y-%m-%d %H:00}: no model trained")
        return 0
    rows = []
    for o in outcomes:
        if "skipped" in o:
            rows.append([o["pattern_id"], "-", "skipped", o["skipped"][:60], "", "", ""])
            continue
        m = o["metrics"]
        rows.append(
            [
                o["pattern_id"],
                o["model_version"],
                o["decision"],
                o["reason"][:60],
                f"{m['model_mape_calls']:.3f}",
                f"{m['mape_calls_over_floor']:.2f}",
                f"{m['mape_calls_vs_seasonal_naive']:.2f}",
            ]
        )
    print(table(["pattern", "version", "alias", "why", "calls MAPE", "x floor", "x seasonal naive"], rows))
    print(
        f"\ncompare versions in MLflow: .venv/bin/mlflow ui --backend-store-uri {settings.mlflow_tracking_uri}"
        f"  (then http://127.0.0.1:5000, experiment 'rpcwatch', models 'rpcwatch-pattern-<id>')"
    )
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from tasks.publish import publish
    from tasks.scoring.score import score_hour

    settings = _settings(args)
    hours = [hour_floor(parse_utc(args.hour))] if args.hour else _ingested_hours(settings)[-1:]
    for hour in hours:
        print(score_hour(settings, hour).line())
    print(f"see them: rpcwatch anomalies, or read-only in DuckDB: {publish(settings)}")
    return 0


def _since(text: str) -> timedelta:
    units = {"m": "minutes", "h": "hours", "d": "days"}
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit():
        raise ValueError(f"--since {text!r}: use e.g. 30m, 6h, 2d")
    return timedelta(**{units[text[-1]]: int(text[:-1])})


def cmd_anomalies(args: argparse.Namespace) -> int:
    import json

    from tasks.app.report import anomaly_rows, table

    settings = _settings(args)
    headers, rows = anomaly_rows(settings, _since(args.since), args.pattern, args.limit)
    _say_source(settings)
    if args.json:
        print(json.dumps([dict(zip(headers, r)) for r in rows], default=str, indent=1))
        return 0
    print(table(headers, rows) if rows else f"no irregular point in the last {args.since} of scored data")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.faults:
        from tasks.evaluation.faults import evaluate_faults, fault_report

        print(fault_report(*evaluate_faults(settings, args.faults)))
    else:
        from tasks.evaluation.labels import evaluate_labels, label_report

        print(label_report(*evaluate_labels(settings, args.labels)))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from tasks.evaluation.replay import replay_days, replay_hours

    counts = replay_days(args.days, args.out, parse_utc(args.start), args.mapping)
    hours = replay_hours(args.out)
    print(
        f"wrote {counts['rows']:,} spans of {counts['runs']} runs back to back into {args.out} "
        f"({hours[0]:%Y-%m-%d %H:00} .. {hours[-1]:%H:00}), {counts['faults']} faults in replay time"
    )
    print(
        f"next (as `make trainticket` does): RPCWATCH_BUCKET_SECONDS=5 RPCWATCH_MIN_TRAIN_HOURS=0.5 \\\n"
        f"        rpcwatch run --source {args.out} --format spans --mapping {args.mapping}\n"
        f"      rpcwatch evaluate --faults {args.out / 'fault_list.json'}"
    )
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from tasks.app.plots import plot_node

    settings = _settings(args)
    out = (
        args.out
        or settings.home / "plots" / f"pattern-{args.pattern}-{args.node.replace(':', '_').replace('/', '_')}.png"
    )
    print(f"wrote {plot_node(settings, args.pattern, args.node, args.hours, out)}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from tasks.app.report import hour_summary, table

    settings = _settings(args)
    headers, rows = hour_summary(settings)
    _say_source(settings)
    print(table(headers, rows))
    return 0


def _say_source(settings: Settings) -> None:
    """Name the published snapshot when a read command used it: hours only ingested since (no
    `run`/`score` yet) are not in it."""
    from tasks.app.report import read_source

    if (source := read_source(settings)) != settings.warehouse:
        print(f"(from {source}, published by the last run or score)", file=sys.stderr)


def cmd_demo(args: argparse.Namespace) -> int:
    from tasks.app.demo import run_demo

    return run_demo(_settings(args), hours=args.hours, spans_per_hour=args.spans_per_hour, seed=args.seed)


def cmd_airflow(args: argparse.Namespace) -> int:
    """Run the `airflow` CLI with rpcwatch's embedded defaults (AIRFLOW_HOME under the home)."""
    import os

    from tasks.app.airflow_env import airflow_env, prepare_airflow

    settings = _settings(args)
    env = airflow_env(settings)
    prepare_airflow(env, settings.airflow_pool)
    airflow = Path(sys.executable).with_name("airflow")
    os.execve(airflow, [str(airflow), *args.airflow_args], env)
    return 0


def _common(p: argparse.ArgumentParser, hour: bool = True) -> None:
    p.add_argument("--home", type=Path, help="rpcwatch home folder (default $RPCWATCH_HOME or ./.rpcwatch)")
    if hour:
        p.add_argument("--hour", help="hour to process, e.g. 2026-01-01T03:00 (default: every hour in the source)")
        p.add_argument("--source", type=Path, nargs="+", help="trace folder(s) or file(s) (default: <home>/incoming)")
        p.add_argument("--format", choices=FORMATS, help="trace format (default $RPCWATCH_FORMAT or alibaba-v2022)")
        p.add_argument(
            "--epoch", help="start of an Alibaba capture (its timestamps are relative), e.g. 2021-06-01T00:00"
        )
        p.add_argument("--mapping", help="span column mapping: bundled name (otel, nezha-trainticket) or JSON file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rpcwatch", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="generate synthetic traces with ground truth")
    p.add_argument("--start", required=True, help="first hour, e.g. 2026-01-01T00:00")
    p.add_argument("--hours", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spans-per-hour", type=int, default=200_000)
    p.add_argument("--anomalies", action="store_true", help="inject labelled anomalies (see labels.parquet)")
    p.set_defaults(func=cmd_synth)

    for name, func, text in [
        ("ingest", cmd_ingest, "load trace files of an hour into DuckDB"),
        ("validate", cmd_validate, "run the validation suite on an ingested hour"),
        ("aggregate", cmd_aggregate, "build rpc_series for an hour"),
        ("run", cmd_run, "one hour through every stage, without Airflow"),
    ]:
        p = sub.add_parser(name, help=text)
        _common(p)
        p.set_defaults(func=func)
        if name == "ingest":
            p.add_argument("--force", action="store_true", help="re-ingest even if no file changed")

    p = sub.add_parser("cluster", help="rebuild traces, assign or re-cluster patterns for an hour")
    _common(p, hour=False)
    p.add_argument("--hour", help="hour, e.g. 2026-01-01T03:00 (default: every ingested hour, in order)")
    p.add_argument("--force", action="store_true", help="re-cluster even if the cadence says no")
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("patterns", help="table of RPC chain patterns: id, nodes, traffic share, status")
    _common(p, hour=False)
    p.set_defaults(func=cmd_patterns)

    for name, func, text in [
        ("stale", cmd_stale, "which pattern models are stale, and why"),
        ("train", cmd_train, "train the stale pattern models (MLflow-tracked)"),
    ]:
        p = sub.add_parser(name, help=text)
        _common(p, hour=False)
        p.add_argument("--hour", help="as of this hour (default: the latest ingested)")
        p.add_argument("--pattern", type=int, nargs="+", help="only these pattern ids")
        p.add_argument("--force", action="store_true", help="treat them as stale anyway")
        p.set_defaults(func=func)

    p = sub.add_parser("score", help="score an hour against the champion models into `anomalies`")
    _common(p, hour=False)
    p.add_argument("--hour", help="hour to score (default: the latest ingested)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("anomalies", help="irregular points, most recent first")
    _common(p, hour=False)
    p.add_argument("--since", default="6h", help="window before the latest scored bucket, e.g. 30m, 6h, 2d")
    p.add_argument("--pattern", type=int, help="only this pattern id")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    p.set_defaults(func=cmd_anomalies)

    p = sub.add_parser("evaluate", help="event precision/recall/F1 against injected labels, next to a naive rule")
    _common(p, hour=False)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--labels", type=Path, help="labels.parquet written by `rpcwatch synth --anomalies`")
    what.add_argument(
        "--faults", type=Path, help="fault_list.json (Nezha layout; `rpcwatch replay` writes one in replay time)"
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("replay", help="span captures with gaps (Nezha TrainTicket days) as one contiguous timeline")
    p.add_argument("days", type=Path, nargs="+", help="day folders with trace/, normal/ and fault_list.json")
    p.add_argument("--out", type=Path, required=True, help="folder for the hour-partitioned spans and fault list")
    p.add_argument("--start", default="2023-01-29T08:00", help="replay time of the first span")
    p.add_argument("--mapping", default="nezha-trainticket", help="span column mapping")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("plot", help="observed vs predicted vs threshold band of one node, irregular points marked")
    _common(p, hour=False)
    p.add_argument("--pattern", type=int, required=True)
    p.add_argument("--node", required=True, help="CALLER:CALLEE:INTERFACE")
    p.add_argument("--hours", type=int, default=6)
    p.add_argument("--out", type=Path, help="PNG path (default: <home>/plots/...)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("summary", help="per-hour table of what the warehouse holds")
    _common(p, hour=False)
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser(
        "demo",
        help="synthetic hours with injected anomalies through the Airflow DAG, then incidents and the evaluation",
    )
    _common(p, hour=False)
    p.add_argument("--hours", type=int, default=10, help="synthetic hours (>= 8 for the drift event)")
    p.add_argument("--spans-per-hour", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=7)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("airflow", help="the airflow CLI on rpcwatch's home, e.g. `rpcwatch airflow standalone`")
    _common(p, hour=False)
    p.add_argument("airflow_args", nargs=argparse.REMAINDER, help="arguments for airflow")
    p.set_defaults(func=cmd_airflow)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        # a person's mistake or a busy/missing file: the message says what to do, a traceback would not
        print(f"rpcwatch: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
