"""Generated hour batches through the whole pipeline (Hypothesis): whatever a batch of valid-looking
spans holds (random call trees, a perfectly regular RPC, empty hours, duplicate span ids, parent
cycles, orphans, hostile names), every hour either goes through every stage or stops with one of
the documented errors (IngestError, BatchValidationError), and an hour that landed is never lost:
its `calls` stay as they landed through every later hour.

Hypothesis draws the structure (services, call trees, which defects an hour carries, a seed); a
seeded numpy generator makes the bulk of the spans, so an example is cheap to draw and shrinks to
a small structure. The default profile (`ci`) is derandomised, so CI runs the same examples every
time; `HYPOTHESIS_PROFILE=thorough` draws new ones, more of them.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import duckdb
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from helpers import START
from tasks.ingest.exports import OTLP_COLUMNS  # the columns the bundled `otel` mapping names
from tasks.ingest.stage import IngestError
from tasks.ingest.validate import BatchValidationError
from tasks.settings import load_settings

DOCUMENTED_ERRORS = (IngestError, BatchValidationError)  # an hour may stop with these, and only these
HOURS = 3  # a first model trains at hour 1 (RPCWATCH_MIN_TRAIN_HOURS=1) and scores hour 2
# names are data: quotes, SQL, separators of node keys, control and non-ASCII characters
HOSTILE_ALPHABET = st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\x00")
PLAIN_NAMES = ["front", "auth", "cart", "db", "pay", "search"]
OPERATIONS = ["GET /", "POST /pay", "query", "'; DROP TABLE calls; --"]

# no "explain" phase: it reruns a failing example hundreds of times (minutes of pipeline runs)
PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink]
settings.register_profile(
    "ci", max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), phases=PHASES
)
settings.register_profile(
    "thorough", max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), phases=PHASES
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@dataclass(frozen=True)
class Shape:
    """A call tree: node i is (service, operation), called by node parents[i] (-1: the root)."""

    services: tuple[str, ...]
    operations: tuple[str, ...]
    parents: tuple[int, ...]


@dataclass(frozen=True)
class HourPlan:
    """What one hour's batch holds."""

    kind: str  # empty | random | regular (the same traces every minute, constant latency)
    traces_per_minute: int
    duplicate_ids: bool  # some spans repeat another span's id
    cycles: bool  # some traces have no root: their parents form a loop
    orphans: bool  # some spans name a parent that is not in the batch
    errors: bool  # some spans have an error status
    seed: int


@st.composite
def names(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        return draw(st.sampled_from(PLAIN_NAMES))
    return draw(st.text(HOSTILE_ALPHABET, min_size=1, max_size=12))


@st.composite
def shapes(draw: st.DrawFn) -> Shape:
    size = draw(st.integers(1, 6))
    parents = tuple([-1] + [draw(st.integers(0, i - 1)) for i in range(1, size)])
    services = tuple(draw(names()) for _ in range(size))
    operations = tuple(
        draw(st.sampled_from(["GET /", "POST /pay", "query", "'; DROP TABLE calls; --"])) for _ in parents
    )
    return Shape(services, operations, parents)


hour_plans = st.builds(
    HourPlan,
    kind=st.sampled_from(["empty", "random", "regular"]),
    traces_per_minute=st.integers(1, 4),
    duplicate_ids=st.booleans(),
    cycles=st.booleans(),
    orphans=st.booleans(),
    errors=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)


def _spans_of_trace(shape: Shape, trace: str, start_ns: int, latencies_ms: np.ndarray, error: np.ndarray) -> list[list]:
    """One trace's spans as OTel rows: each child inside its parent's time."""
    rows, starts, ends = [], [], []
    for i, parent in enumerate(shape.parents):
        begin = start_ns if parent < 0 else starts[parent] + 1000
        end = begin + int(latencies_ms[i] * 1e6)
        if parent >= 0:
            end = min(end, ends[parent] - 1000)
        starts.append(begin)
        ends.append(max(end, begin))
        status = "STATUS_CODE_ERROR" if error[i] else "STATUS_CODE_OK"
        kind = "SPAN_KIND_SERVER" if parent < 0 else "SPAN_KIND_INTERNAL"
        parent_id = "" if parent < 0 else f"{trace}-{parent}"
        rows.append([trace, f"{trace}-{i}", parent_id, shape.services[i], shape.operations[i], begin, ends[i]])
        rows[-1] += [status, kind]
    return rows


def _hour_rows(hour_index: int, plan: HourPlan, shapes_: list[Shape]) -> list[list]:
    """The spans of one hour, as the plan says."""
    if plan.kind == "empty":
        return []
    rng = np.random.default_rng(plan.seed)
    hour_ns = int((START + timedelta(hours=hour_index)).timestamp() * 1e9)
    rows: list[list] = []
    for minute in range(60):
        for s, shape in enumerate(shapes_):
            count = plan.traces_per_minute if plan.kind == "regular" else int(rng.poisson(plan.traces_per_minute))
            for k in range(count):
                trace = f"h{hour_index}m{minute}s{s}k{k}"
                if plan.kind == "regular":
                    latencies, offset = np.full(len(shape.parents), 20.0 + 5 * s), 1_000_000_000 * k
                else:
                    latencies, offset = rng.gamma(2.0, 15.0, len(shape.parents)) + 0.1, int(rng.integers(0, 59e9))
                error = rng.random(len(shape.parents)) < (0.05 if plan.errors else 0.0)
                rows += _spans_of_trace(shape, trace, hour_ns + minute * 60_000_000_000 + offset, latencies, error)
    return _damaged(rows, plan, rng)


def _damaged(rows: list[list], plan: HourPlan, rng: np.random.Generator) -> list[list]:
    """The plan's defects: duplicate ids, parent cycles, orphans (each on a share of spans)."""
    if not rows:
        return rows
    picks = rng.choice(len(rows), size=max(1, len(rows) // 10), replace=True)
    if plan.duplicate_ids:
        rows += [[*rows[i][:1], rows[i][1], *rows[i][2:]] for i in picks]  # the same span id again
        rows += [[rows[i][0], rows[(i + 1) % len(rows)][1], *rows[i][2:]] for i in picks[:5]]  # another's id
    if plan.cycles:
        roots = [r for r in rows if r[2] == ""][:5]
        for root in roots:  # the root's parent is its last span: a loop, no root
            root[2] = next((r[1] for r in reversed(rows) if r[0] == root[0]), root[1])
    if plan.orphans:
        for i in picks[:5]:
            rows[i][2] = f"missing-{i}"
    return rows


def _defects(plan: HourPlan) -> str:
    named = [name for name in ("duplicate_ids", "cycles", "orphans") if getattr(plan, name)]
    return f" with {', '.join(named)}" if named else ""


def _clean(plan: HourPlan) -> bool:
    """A batch with no defect: nothing in it may stop the hour."""
    return not (plan.duplicate_ids or plan.cycles or plan.orphans)


def _write(folder: Path, hour_index: int, rows: list[list]) -> Path:
    path = folder / f"spans-{hour_index}.csv"
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(OTLP_COLUMNS)
        writer.writerows(rows)
    return path


def _landed(warehouse: Path) -> dict[str, list]:
    """Each landed hour's calls, as rows sorted (the hour as text)."""
    if not warehouse.exists():
        return {}
    with duckdb.connect(str(warehouse), read_only=True) as con:
        rows = con.execute(
            "SELECT strftime(date_trunc('hour', ts), '%Y-%m-%dT%H'), trace_id, call_id, parent_call_id, caller, "
            "callee, rt_ms, is_error FROM calls ORDER BY ALL"
        ).fetchall()
    landed: dict[str, list] = {}
    for hour, *row in rows:
        landed.setdefault(hour, []).append(tuple(row))
    return landed


@pytest.fixture(scope="module")
def empty_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite store created and migrated once, copied into each example's home (creating
    one costs seconds; what is under test here is the pipeline, not MLflow's migrations)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("registry") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@settings()
@given(shapes_=st.lists(shapes(), min_size=1, max_size=3), plans=st.lists(hour_plans, min_size=HOURS, max_size=HOURS))
def test_any_hour_batch_runs_or_stops_with_a_documented_error_and_never_loses_a_landed_hour(
    empty_registry: Path, shapes_: list[Shape], plans: list[HourPlan]
) -> None:
    from tasks.pipeline import run_hour

    root = Path(tempfile.mkdtemp(prefix="rpcwatch-property-"))
    try:
        home = root / "home"
        home.mkdir()
        shutil.copy(empty_registry, home / "mlflow.db")
        config = load_settings(
            env={},
            home=home,
            format="spans",
            span_mapping="otel",
            min_train_hours=1.0,
            critical_min_calls_per_hour=30,
            train_max_epochs=3,
            train_shards=2,
        )
        landed: dict[str, list] = {}
        for i, plan in enumerate(plans):
            source = _write(root, i, _hour_rows(i, plan, shapes_))
            hour = START + timedelta(hours=i)
            try:
                results = run_hour(config, hour, [source])
                event(f"{plan.kind} hour{_defects(plan)}: every stage ran")
                scored = len(results["score"]["scored"])
                event(f"hour {i}: {results['record']} model(s) recorded, {scored} pattern(s) scored")
            except DOCUMENTED_ERRORS as err:  # the hour stopped: what landed must still be there
                event(f"{plan.kind} hour{_defects(plan)}: {type(err).__name__}")
                assert not isinstance(err, IngestError) or plan.kind == "empty", f"a batch with spans: {err}"
                assert not (isinstance(err, BatchValidationError) and _clean(plan)), f"a clean batch: {err}"
            now = _landed(config.warehouse)
            assert (f"{hour:%Y-%m-%dT%H}" in now) == (plan.kind != "empty"), "a batch with spans lands its calls"
            for earlier, rows in landed.items():
                assert now.get(earlier) == rows, f"hour {earlier} changed or was lost while hour {i} ran ({plan})"
            landed = now
    finally:
        shutil.rmtree(root, ignore_errors=True)
