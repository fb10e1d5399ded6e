"""One settings object for rpcwatch, read from `RPCWATCH_*` environment variables.

Everything lives under one home folder (default `./.rpcwatch`): the DuckDB warehouse, MLflow's
sqlite database and artifacts, and Airflow's home.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from pathlib import Path

PREFIX = "RPCWATCH_"
KNOWN_RPC_TYPES = ("rpc", "http", "mq", "mc", "db", "userDefined", "span", "UNKNOWN")
FORMATS = ("alibaba-v2022", "alibaba-v2021", "spans")


@dataclass(frozen=True)
class Settings:
    """Runtime configuration; each field can be set as `RPCWATCH_<FIELD NAME IN CAPS>`."""

    home: Path = Path(".rpcwatch")
    source: Path | None = None  # where trace files arrive (default: <home>/incoming)
    format: str = "alibaba-v2022"
    # Alibaba timestamps are relative to the start of the trace capture; v2021 needs this.
    trace_epoch: datetime | None = None
    span_mapping: str = "otel"  # a bundled mapping name or a JSON file path (spans format)
    bucket_seconds: int = 60
    # validation
    rt_max_ms: float = 600_000.0
    max_duplicate_ratio: float = 0.15  # real Alibaba v2022 samples carry ~10% duplicated rows
    min_volume_ratio: float = 0.2  # an hour below 20% of the recent median volume is a finding
    volume_lookback_hours: int = 24
    sample_rows_for_ge: int = 50_000
    # patterns: clustering cadence, critical patterns, stable identities
    recluster_every_hours: int = 24  # 1 = every hour
    recluster_unclustered_share: float = 0.05  # re-cluster when more traffic than this is unassigned
    critical_coverage: float = 0.98  # critical patterns: the busiest until this share of calls
    critical_min_calls_per_hour: int = 600  # ... each with at least this much traffic to model
    pattern_match_jaccard: float = 0.5  # a new cluster keeps an old pattern id above this RPC-set overlap
    graph_min_support: float = 0.01  # a node/edge belongs to a pattern graph if in >= 1% of its traces
    pattern_min_traces: int = 20  # a shape HDBSCAN calls noise is still a pattern with this many traces
    variant_containment: float = 0.9  # a cluster inside another's RPC set is a variant of it
    hdbscan_min_cluster_size: int = 3
    hdbscan_min_samples: int = 2
    # models: training window, thresholds, staleness
    train_history_hours: int = 48  # series a model learns from (up to the hour being processed)
    min_train_hours: float = 3.0  # a pattern is first trained once it has this much history
    alarm_p: float = 1e-4  # two-sided tail probability of a normal point outside its band
    threshold_method: str = "quantile"  # or "pot" (peaks over threshold, generalised Pareto)
    model_max_age_hours: int = 168
    drift_factor: float = 1.5  # drift: scored error above this x the calibrated level ...
    drift_hours: int = 3  # ... for this many consecutive scored hours
    incident_gap_buckets: int = 3  # flagged points of a pattern at most this far apart: one incident
    incident_min_buckets: int = 3  # ... spanning at least this many buckets (or one point scoring >= 3)
    device: str = "auto"
    airflow_pool: str = "rpcwatch_duckdb"

    @property
    def warehouse(self) -> Path:
        return self.home / "warehouse.duckdb"

    @property
    def incoming(self) -> Path:
        return self.source if self.source is not None else self.home / "incoming"

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    @property
    def mlflow_tracking_uri(self) -> str:
        uri = os.environ.get(PREFIX + "MLFLOW_TRACKING_URI")
        return uri or f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.home / "mlartifacts"

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)


def _parse(kind: str, raw: str) -> object:
    if "Path" in kind:
        return Path(raw).expanduser()
    if "datetime" in kind:
        return parse_utc(raw)
    if kind.startswith("int"):
        return int(raw)
    if kind.startswith("float"):
        return float(raw)
    return raw


def parse_utc(text: str) -> datetime:
    """Parse an ISO time (`2026-01-01T03:00`, optional `Z`/offset) as an aware UTC datetime."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as err:
        raise ValueError(f"not an ISO time: {text!r} (expected e.g. 2026-01-01T03:00)") from err
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)


def load_settings(env: dict[str, str] | None = None, **overrides: object) -> Settings:
    """Settings from the environment (`RPCWATCH_*`), then explicit overrides."""
    env = dict(os.environ if env is None else env)
    values: dict[str, object] = {}
    for spec in fields(Settings):
        raw = env.get(PREFIX + spec.name.upper())
        if raw not in (None, ""):
            try:
                values[spec.name] = _parse(str(spec.type), raw)
            except ValueError as err:
                raise ValueError(f"{PREFIX}{spec.name.upper()}={raw!r}: {err}") from err
    values.update({k: v for k, v in overrides.items() if v is not None})
    settings = Settings(**values)
    if settings.format not in FORMATS:
        raise ValueError(f"unknown trace format {settings.format!r}; choose one of {FORMATS}")
    if not 1 <= settings.bucket_seconds <= 3600 or 3600 % settings.bucket_seconds:
        raise ValueError(f"bucket_seconds={settings.bucket_seconds} must divide 3600 (1 s .. 1 h)")
    return settings
