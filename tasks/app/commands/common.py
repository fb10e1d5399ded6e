"""What every `rpcwatch` command shares: settings from the arguments, the common options, which
hours to work on (reads `ingest_log`, read-only), and saying which file a read command used."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.clock import hour_floor
from tasks.settings import FORMATS, Settings, load_settings, parse_utc

# the `add_parser` of the subcommands: add_parser(name, help=...) returns the command's parser
AddParser = Callable[..., argparse.ArgumentParser]


def settings_from(args: argparse.Namespace) -> Settings:
    """Settings with the command line's --home, --format, --mapping and --epoch over the environment."""
    overrides: dict[str, Any] = {
        "home": getattr(args, "home", None),
        "format": getattr(args, "format", None),
        "span_mapping": getattr(args, "mapping", None),
    }
    if getattr(args, "epoch", None):
        overrides["trace_epoch"] = parse_utc(args.epoch)
    return load_settings(**overrides)


def source_hours(settings: Settings, args: argparse.Namespace) -> list[datetime]:
    """--hour, else every hour with rows in the source (--source, default the incoming folder)."""
    from tasks.ingest.stage import hours_in_sources

    if args.hour:
        return [hour_floor(parse_utc(args.hour))]
    hours = hours_in_sources(settings, args.source or [settings.incoming], args.format)
    if not hours:
        raise ValueError("no --hour given and no rows with timestamps found in the source")
    return hours


def ingested_hours(settings: Settings) -> list[datetime]:
    """Every hour with an ingested file, in order (from `ingest_log`)."""
    from tasks.warehouse import opened

    with opened(settings.warehouse, read_only=True) as con:
        rows = con.execute("SELECT DISTINCT hour FROM ingest_log WHERE status = 'ingested' ORDER BY 1").fetchall()
    return [r[0].replace(tzinfo=UTC) for r in rows]


def latest_hour(settings: Settings, args: argparse.Namespace) -> datetime:
    """--hour, else the latest ingested hour."""
    if args.hour:
        return hour_floor(parse_utc(args.hour))
    hours = ingested_hours(settings)
    if not hours:
        raise ValueError("no ingested hour yet: run `rpcwatch run` or the DAG first")
    return hours[-1]


def say_source(settings: Settings) -> None:
    """Name the published snapshot when a read command used it: hours only ingested since (no
    `run`/`score` yet) are not in it."""
    from tasks.app.report import read_source

    if (source := read_source(settings)) != settings.warehouse:
        print(f"(from {source}, published by the last run or score)", file=sys.stderr)


def add_common_options(p: argparse.ArgumentParser, hour: bool = True) -> None:
    """--home; with `hour`, also --hour, --source, --format, --epoch and --mapping (the stage commands)."""
    p.add_argument("--home", type=Path, help="rpcwatch home folder (default $RPCWATCH_HOME or ./.rpcwatch)")
    if hour:
        p.add_argument("--hour", help="hour to process, e.g. 2026-01-01T03:00 (default: every hour in the source)")
        p.add_argument("--source", type=Path, nargs="+", help="trace folder(s) or file(s) (default: <home>/incoming)")
        p.add_argument("--format", choices=FORMATS, help="trace format (default $RPCWATCH_FORMAT or alibaba-v2022)")
        p.add_argument(
            "--epoch", help="start of an Alibaba capture (its timestamps are relative), e.g. 2021-06-01T00:00"
        )
        p.add_argument("--mapping", help="span column mapping: bundled name (otel, nezha-trainticket) or JSON file")
