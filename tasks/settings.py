"""One settings object for rpcwatch, read from `RPCWATCH_*` environment variables.

Everything lives under one home folder (default `./.rpcwatch`): the DuckDB warehouse, MLflow's
sqlite database and artifacts, and Airflow's home. Many workers can instead share a warehouse on
DuckLake (`RPCWATCH_WAREHOUSE=ducklake`, tasks.lake): its catalog in PostgreSQL, reached through
libpq's own variables (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE`; never a DSN in SQL),
its data as Parquet files in `RPCWATCH_LAKE_DATA`, a folder every worker mounts at the same path.
Alerts (tasks.alerts) post to a webhook only when `RPCWATCH_ALERT_WEBHOOK` is set; its value is a
secret, never shown in messages or `repr`.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tasks.failpoints import VARIABLE as CRASH_VARIABLE

PREFIX = "RPCWATCH_"
KNOWN_RPC_TYPES = ("rpc", "http", "mq", "mc", "db", "userDefined", "span", "UNKNOWN")
FORMATS = ("alibaba-v2022", "alibaba-v2021", "spans")
THRESHOLD_METHODS = ("quantile", "pot")
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # what forecast.device / torch.device take
URL_SETTINGS = ("alert_webhook", "airflow_url", "mlflow_url")  # http(s) URLs, checked alike
SECRET_SETTINGS = ("alert_webhook",)  # a webhook URL is its own password: errors never echo it
WAREHOUSES = ("file", "ducklake")
# RPCWATCH_LAKE_DATA goes into DuckLake's ATTACH statement as a literal (DuckDB 1.4 binds no ATTACH
# parameter), so it is held to an absolute path of these characters only: nothing that can quote out
LAKE_DATA_PATTERN = re.compile(r"/[A-Za-z0-9_./-]*")
LAKE_WRITER_SLOTS = 16  # the writer pool's size on a lake (conflicting commits are retried, tasks.lake)
ENV_NAMES = {"warehouse_mode": "RPCWATCH_WAREHOUSE"}  # fields whose variable is not RPCWATCH_<FIELD>
# RPCWATCH_* variables that are not settings (so not warned about as unknown), and who reads them
OTHER_VARIABLES = {
    CRASH_VARIABLE: "tasks.failpoints: a named crash point, for crash tests",
    "RPCWATCH_EXTRA": "the Dockerfile: which optional extra the image installs",
    "RPCWATCH_IMAGE": "docker-compose.yml: the image the services run",
    "RPCWATCH_GPU_TORCH_INDEX": "the Dockerfile: where a GPU image takes torch from",
    "RPCWATCH_BIND": "docker-compose.yml: the address the UIs are published on",
    "RPCWATCH_SCREENSHOT_HOME": "tests/app/test_view_screenshots.py: a home to take pictures of",
    "RPCWATCH_DOCS_DIR": "the screenshot tests: where to copy the pictures",
}
# what MLflow takes as a tracking store: a tracking server, a database (SQLAlchemy URL, `+driver`
# allowed) or a local folder (file:// or an absolute path)
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")
TRACKING_URI_FORMS = "sqlite:////abs/path/mlflow.db, http(s)://host[:port], postgresql://host/db or an absolute path"

log = logging.getLogger(__name__)
_warned: set[str] = set()  # unknown variables already warned about in this process


def env_name(name: str) -> str:
    """The environment variable of a settings field."""
    return ENV_NAMES.get(name, PREFIX + name.upper())


@dataclass(frozen=True)
class Lake:
    """The shared DuckLake warehouse (tasks.lake): catalog in PostgreSQL, data as Parquet under `data`."""

    data: Path

    def __str__(self) -> str:
        return f"the DuckLake warehouse (catalog in PostgreSQL per the PG* variables, data in {self.data})"


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
    # the trace model (tasks.models.trace_model) and its window evidence (tasks.scoring.evidence);
    # fixed from first principles before any evaluation, never fitted to labelled data
    trace_p: float = 0.01  # a trace is surprising beyond this (per trace, corrected for its size)
    trace_window_s: int = 30  # surprising traces are counted over windows this long ...
    trace_step_s: int = 5  # ... ending this often (fast detection, whatever the forecaster's bucket)
    trace_alpha: float = 0.01  # ... alarmed at this chance of one false alarm per hour (Bonferroni)
    incident_gap_buckets: int = 3  # flagged points of a pattern at most this far apart: one incident
    incident_min_buckets: int = 3  # ... spanning at least this many buckets (or one point scoring >= 3)
    # the alarm policy's one sensitivity setting (tasks.scoring.policy): expected false incidents a day,
    # calibrated on the scored history; the fixed rule above holds until there is enough history
    alarm_false_per_day: float = 1.0
    device: str = "auto"
    # retraining: the stale patterns of an hour are split into this many training tasks (shards of
    # similar cost), each training its patterns stacked on a GPU (`batch_training` auto) or one by one
    train_shards: int = 4
    train_max_epochs: int = 200  # each model's epoch budget (early stopping usually ends it sooner)
    batch_training: str = "auto"  # on | off | auto (on where the device is a GPU)
    # a stale pattern's retrain fine-tunes its champion (same architecture) instead of starting from
    # scratch: a fraction of the epochs, no no-graph twin (tasks.models.fitting); false: from scratch
    warm_start: bool = True
    airflow_pool: str = "rpcwatch_duckdb"
    # a failed task's first retry waits this long, doubling for the next ones (at most 10 min): long
    # enough for a held lock or a restarting MLflow; a test of a killed worker sets it short
    retry_delay_s: int = 60
    # where the tables live: `file`, the embedded DuckDB file under the home (one writing process at a
    # time: the DAG's writers queue on `airflow_pool`), or `ducklake`, a shared lake (tasks.lake) that
    # many workers write at once; its data folder is then required (RPCWATCH_WAREHOUSE, _LAKE_DATA)
    warehouse_mode: str = "file"
    lake_data: Path | None = None
    # the hourly DAG: first hour to process (hours since then that never ran are caught up, oldest
    # first) and, optionally, the last (a bounded replay or backfill); set `start` when deploying
    start: datetime = datetime(2026, 1, 1, tzinfo=UTC)
    end: datetime | None = None
    catchup: bool = True  # False: a scheduler back from downtime runs only the latest hour (said in the UI)
    # default: sqlite under the home (set in __post_init__; `with_(home=...)` moves it along)
    mlflow_tracking_uri: str | None = None
    # alerts (tasks.alerts): new incidents and task failures posted to a Slack/Teams webhook;
    # None (the default): alerts are off. A secret, so kept out of repr.
    alert_webhook: str | None = field(default=None, repr=False)
    # an incident is posted when its peak score (distance from the forecast in band widths) reaches
    # this; 3.0 is the incident rule's own "far out" level (tasks.scoring.incidents.PEAK_SCORE)
    alert_min_score: float = 3.0
    airflow_url: str = "http://127.0.0.1:8080"  # where alert links point: the Airflow UI ...
    mlflow_url: str = "http://127.0.0.1:5000"  # ... and the MLflow UI, as the people alerted reach them

    def __post_init__(self) -> None:
        if self.mlflow_tracking_uri is None:
            object.__setattr__(self, "mlflow_tracking_uri", _default_tracking_uri(self.home))

    @property
    def warehouse(self) -> Path | Lake:
        """The embedded file, or the lake (`warehouse.connect` opens either)."""
        if self.warehouse_mode == "ducklake" and self.lake_data is not None:
            return Lake(self.lake_data)
        return self.home / "warehouse.duckdb"

    @property
    def writer_slots(self) -> int:
        """Slots of the Airflow writer pool: one writer at a time on the file; a lake takes many."""
        return LAKE_WRITER_SLOTS if self.warehouse_mode == "ducklake" else 1

    @property
    def incoming(self) -> Path:
        return self.source if self.source is not None else self.home / "incoming"

    @property
    def airflow_home(self) -> Path:
        return self.home / "airflow"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.home / "mlartifacts"

    def with_(self, **changes: Any) -> Settings:
        if (
            "home" in changes
            and "mlflow_tracking_uri" not in changes
            and self.mlflow_tracking_uri == _default_tracking_uri(self.home)
        ):
            changes["mlflow_tracking_uri"] = None  # the default follows the home
        return replace(self, **changes)


def _default_tracking_uri(home: Path) -> str:
    return f"sqlite:///{(home / 'mlflow.db').resolve()}"


def _parse(kind: str, raw: str) -> object:
    if "Path" in kind:
        return Path(raw).expanduser()
    if "datetime" in kind:
        return parse_utc(raw)
    if kind == "bool":
        return _parse_bool(raw)
    if kind.startswith("int"):
        return int(raw)
    if kind.startswith("float"):
        return float(raw)
    return raw


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(f"not a boolean: {raw!r} (expected true or false)")
    return value in ("true", "1", "yes")


def parse_utc(text: str) -> datetime:
    """Parse an ISO time (`2026-01-01T03:00`, optional `Z`/offset) as an aware UTC datetime."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as err:
        raise ValueError(f"not an ISO time: {text!r} (expected e.g. 2026-01-01T03:00)") from err
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


# numeric settings: (lowest, highest, brackets saying whether each end is allowed); None: no bound
RANGES: dict[str, tuple[float, float | None, str]] = {
    "bucket_seconds": (1, 3600, "[]"),
    "rt_max_ms": (0, None, "()"),
    "max_duplicate_ratio": (0, 1, "[]"),
    "min_volume_ratio": (0, 1, "[]"),
    "volume_lookback_hours": (1, None, "[]"),
    "sample_rows_for_ge": (1, None, "[]"),
    "recluster_every_hours": (1, None, "[]"),
    "recluster_unclustered_share": (0, 1, "[]"),
    "critical_coverage": (0, 1, "(]"),
    "critical_min_calls_per_hour": (0, None, "[]"),
    "pattern_match_jaccard": (0, 1, "[]"),
    "graph_min_support": (0, 1, "[]"),
    "pattern_min_traces": (1, None, "[]"),
    "variant_containment": (0, 1, "[]"),
    "hdbscan_min_cluster_size": (2, None, "[]"),  # HDBSCAN needs 2
    "hdbscan_min_samples": (1, None, "[]"),
    "train_history_hours": (1, None, "[]"),
    "min_train_hours": (0, None, "[]"),
    "alarm_p": (0, 1, "()"),
    "model_max_age_hours": (1, None, "[]"),
    "drift_factor": (0, None, "()"),
    "drift_hours": (1, None, "[]"),
    "trace_p": (0, 1, "()"),
    "trace_window_s": (1, 3600, "[]"),
    "trace_step_s": (1, 3600, "[]"),
    "trace_alpha": (0, 1, "()"),
    "incident_gap_buckets": (1, None, "[]"),
    "incident_min_buckets": (1, None, "[]"),
    "alarm_false_per_day": (0, None, "()"),
    "alert_min_score": (0, None, "[]"),
    "train_shards": (1, 1024, "[]"),
    "train_max_epochs": (1, None, "[]"),  # Airflow maps at most 1,024 tasks
    "retry_delay_s": (1, 3600, "[]"),
}


def _range_problem(value: float, low: float, high: float | None, ends: str) -> str | None:
    """Why `value` is outside its range, or None."""
    if not math.isfinite(value):
        return "must be finite"
    above = value >= low if ends[0] == "[" else value > low
    below = high is None or (value <= high if ends[1] == "]" else value < high)
    if above and below:
        return None
    if high is None:
        return f"must be {'>=' if ends[0] == '[' else '>'} {low:g}"
    return f"must be in {ends[0]}{low:g}, {high:g}{ends[1]}"


def _home_problem(home: Path) -> str | None:
    """The home must be a folder, or creatable as one: no regular file on its path."""
    for path in (home, *home.parents):
        if path.exists():
            if path.is_dir():
                return None
            return "exists and is not a directory" if path == home else f"{path} is a regular file, not a folder"
    return None


def _url_problem(url: str) -> str | None:
    """Why `url` is not a plain http(s) URL, or None. Characters that end a link in Slack or
    markdown (`<`, `>`, `|`, quotes, spaces) are refused: alert links are built from these URLs."""
    if re.search(r"[\s<>|\"'`]", url):
        return "must be an http(s) URL without spaces, quotes, <, > or |"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        return "must be an http(s) URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http(s) URL (http://host[:port]/...)"
    return None


def _tracking_uri_problem(uri: str) -> str | None:
    """Why MLflow could not use `uri` as its tracking store, or None (its text is never echoed: a
    database URL may hold a password)."""
    if uri.startswith("/"):
        return None  # a local folder
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        return f"not a URI MLflow takes; use {TRACKING_URI_FORMS}"
    scheme = parts.scheme.split("+", 1)[0]
    if scheme not in TRACKING_SCHEMES:
        return f"unknown scheme {scheme!r}; use {TRACKING_URI_FORMS}"
    if scheme in ("http", "https") and not parts.hostname:
        return "an http(s) tracking server needs a host: http(s)://host[:port]"
    if scheme in ("sqlite", "file") and parts.path in ("", "/"):
        return f"{scheme}: needs a path, e.g. {scheme}:////abs/path"
    return None


def _without_password(uri: str) -> str:
    """`uri` with the password of its user info replaced, as messages may show it."""
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", uri)


def unknown_variables(env: dict[str, str]) -> list[str]:
    """`RPCWATCH_*` variables of `env` that are neither a setting nor one of OTHER_VARIABLES, sorted."""
    known = {env_name(f.name) for f in fields(Settings)} | set(OTHER_VARIABLES)
    return sorted(name for name in env if name.startswith(PREFIX) and name not in known)


def _warn_unknown(env: dict[str, str]) -> None:
    """Warn, once a process, about each unknown `RPCWATCH_*` variable: a misspelled setting is
    ignored, and a misspelled webhook turns alerts off without a word. Names only, never values."""
    known = sorted({env_name(f.name) for f in fields(Settings)})
    for name in unknown_variables(env):
        if name in _warned:
            continue
        _warned.add(name)
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f": did you mean {close[0]}?" if close else " (the settings are listed in the README, Settings)"
        log.warning("%s is not an rpcwatch setting and is ignored%s", name, hint)


def _problems(s: Settings) -> dict[str, str]:
    """Every setting checked: field name -> what is wrong with its value."""
    out = {
        name: why
        for name, (low, high, ends) in RANGES.items()
        if (why := _range_problem(getattr(s, name), low, high, ends))
    }
    if "bucket_seconds" not in out and 3600 % s.bucket_seconds:
        out["bucket_seconds"] = "must divide 3600 (1 s .. 1 h)"
    if "trace_step_s" not in out and 3600 % s.trace_step_s:
        out["trace_step_s"] = "must divide 3600 (1 s .. 1 h)"
    if s.format not in FORMATS:
        out["format"] = f"unknown trace format; choose one of {', '.join(FORMATS)}"
    if s.threshold_method not in THRESHOLD_METHODS:
        out["threshold_method"] = "must be quantile or pot"
    if s.batch_training not in ("on", "off", "auto"):
        out["batch_training"] = "must be on, off or auto"
    if not DEVICE_PATTERN.fullmatch(s.device):
        out["device"] = "must be auto, cpu, cuda, cuda:N or mps"
    for name in ("airflow_pool", "span_mapping"):
        if not getattr(s, name).strip():
            out[name] = "must not be empty"
    if why := _home_problem(s.home):
        out["home"] = why
    for name in ("start", "end"):
        value = getattr(s, name)
        if value is not None and value != value.replace(minute=0, second=0, microsecond=0):
            out[name] = "must be a whole hour, e.g. 2026-01-01T03:00"
    if s.end is not None and "start" not in out and s.end < s.start:
        out["end"] = "must not be before RPCWATCH_START"
    for name in URL_SETTINGS:
        if (url := getattr(s, name)) is not None and (why := _url_problem(url)):
            out[name] = why
    if s.mlflow_tracking_uri is not None and (why := _tracking_uri_problem(s.mlflow_tracking_uri)):
        out["mlflow_tracking_uri"] = why
    if s.warehouse_mode not in WAREHOUSES:
        out["warehouse_mode"] = "must be file or ducklake"
    if s.lake_data is not None and not LAKE_DATA_PATTERN.fullmatch(str(s.lake_data)):
        out["lake_data"] = "must be an absolute path of letters, digits and _ . / - only"
    elif s.lake_data is None and s.warehouse_mode == "ducklake":
        out["lake_data"] = "must be set with RPCWATCH_WAREHOUSE=ducklake: the shared folder of the lake's Parquet files"
    return out


def load_settings(env: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from `env` (default: the environment, `RPCWATCH_*`), then explicit overrides; every
    value is checked, and a bad one raises ValueError naming its variable, e.g.
    `RPCWATCH_ALARM_P=2: must be in (0, 1)`."""
    env = dict(os.environ if env is None else env)
    _warn_unknown(env)
    values: dict[str, Any] = {}  # parsed here, checked by _problems once built
    shown: dict[str, str] = {}  # the text each value came as, for messages
    for spec in fields(Settings):
        raw = env.get(env_name(spec.name))
        if raw not in (None, ""):
            shown[spec.name] = raw
            try:
                values[spec.name] = _parse(str(spec.type), raw)
            except ValueError as err:
                raise ValueError(f"{env_name(spec.name)}={raw}: {err}") from err
    given = {k: v for k, v in overrides.items() if v is not None}
    values.update(given)
    shown.update({k: str(v) for k, v in given.items()})
    settings = Settings(**values)
    problems = _problems(settings)
    for name in (f.name for f in fields(Settings) if f.name in problems):  # the first, in field order
        value = "(hidden)" if name in SECRET_SETTINGS else shown.get(name, getattr(settings, name))
        if name == "mlflow_tracking_uri":
            value = _without_password(str(value))
        raise ValueError(f"{env_name(name)}={value}: {problems[name]}")
    return settings
