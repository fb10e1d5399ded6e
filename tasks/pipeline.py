"""One hour through every stage that exists, in order, without Airflow (the DAG runs the same calls)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tasks.aggregate import AggregateReport, aggregate_hour
from tasks.ingest import IngestReport, ingest_hour
from tasks.patterns import PatternReport, patterns_hour
from tasks.scoring import ScoreReport
from tasks.settings import Settings
from tasks.validate import ValidationReport, validate_hour


@dataclass
class HourReport:
    ingest: IngestReport
    validation: ValidationReport
    aggregate: AggregateReport
    patterns: PatternReport
    trained: list[dict]
    scored: ScoreReport


def run_hour(settings: Settings, hour: datetime, sources: list[Path] | None = None,
             fmt_name: str | None = None) -> HourReport:
    """ingest → validate → aggregate → patterns → train the stale models → score; a failed
    batch-level validation stops the hour."""
    from tasks.retrain import train_stale
    from tasks.scoring import score_hour

    ingest = ingest_hour(settings, hour, sources, fmt_name)
    validation = validate_hour(settings, hour)
    aggregate = aggregate_hour(settings, hour)
    patterns = patterns_hour(settings, hour)
    trained = train_stale(settings, hour)
    return HourReport(ingest, validation, aggregate, patterns, trained, score_hour(settings, hour))
