"""The typed seams of retraining: plan -> `TrainShard`s of `TrainJob`s -> train -> `TrainOutcome` |
`Skipped` -> record.

Each crosses a process boundary in the DAG (Airflow hands it on as XCom), so each turns into a
JSON-able dict with `to_dict()` and back with `from_dict()`; the dicts keep the keys the CLI and
tests read (`pattern_id`, `reasons`, `meta_path`, `decision`, `metrics`, `skipped`, ...). No tables.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TrainJob:
    """One stale pattern to train at `hour`, its series exported to `meta_path` (no DuckDB needed)."""

    pattern_id: int
    reasons: list[str]
    hour: datetime
    meta_path: Path

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern_id": self.pattern_id,
            "reasons": list(self.reasons),
            "hour": self.hour.isoformat(),
            "meta_path": str(self.meta_path),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainJob:
        return cls(int(d["pattern_id"]), list(d["reasons"]), datetime.fromisoformat(d["hour"]), Path(d["meta_path"]))


@dataclass(frozen=True)
class TrainShard:
    """Stale patterns one training task trains together (batched on a GPU): shard `index` of the hour."""

    index: int
    jobs: list[TrainJob]

    def to_dict(self) -> dict[str, Any]:
        return {
            "shard": self.index,
            "patterns": [job.pattern_id for job in self.jobs],  # for people reading the XCom
            "jobs": [job.to_dict() for job in self.jobs],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainShard:
        return cls(int(d["shard"]), [TrainJob.from_dict(job) for job in d["jobs"]])


@dataclass(frozen=True)
class TrainOutcome:
    """A trained and registered version, with the decision of the champion policy."""

    pattern_id: int
    pattern_version: int
    graph_hash: str
    model_version: int
    run_id: str
    decision: str  # champion | challenger
    reason: str
    trained_for: datetime  # the hour trained for (aware, UTC)
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    device: str = "cpu"
    stale_reason: str = ""

    def line(self) -> str:
        m = self.metrics
        return (
            f"pattern {self.pattern_id}: v{self.model_version} {self.decision} ({self.reason}); calls MAPE "
            f"{m.get('model_mape_calls', float('nan')):.3f} vs floor {m.get('poisson_floor_calls', float('nan')):.3f}, "
            f"seasonal naive {m.get('seasonal_naive_mape_calls', float('nan')):.3f}, "
            f"no-graph {m.get('no_graph_mape_calls', float('nan')):.3f}; {self.seconds:.1f} s on {self.device}"
        )

    def to_dict(self) -> dict[str, Any]:
        # strict JSON (Airflow's XCom API refuses NaN): an undefined metric travels as null
        metrics = {k: v if math.isfinite(v) else None for k, v in self.metrics.items()}
        return {**asdict(self), "metrics": metrics, "trained_for": self.trained_for.astimezone(UTC).isoformat()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainOutcome:
        metrics = {k: math.nan if v is None else float(v) for k, v in d["metrics"].items()}
        return cls(**{**d, "metrics": metrics, "trained_for": datetime.fromisoformat(d["trained_for"])})


@dataclass(frozen=True)
class Skipped:
    """A stale pattern not trained this hour, reported, never stopping the others: `skipped` (too
    little history) or `failed` (its training raised: the reason names the step and the error). It
    stays stale and is tried again next hour; `record` writes it to `models` (no version) with the
    hour it was planned for."""

    pattern_id: int
    reason: str
    decision: str = "skipped"  # skipped | failed: the `models.decision` it is recorded with
    trained_for: datetime | None = None  # the hour planned for (aware, UTC); None: not recorded
    stale_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern_id": self.pattern_id,
            "skipped": self.reason,  # the key that tells it from a trained outcome
            "decision": self.decision,
            "trained_for": self.trained_for.astimezone(UTC).isoformat() if self.trained_for else None,
            "stale_reason": self.stale_reason,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Skipped:
        hour = d.get("trained_for")
        return cls(
            int(d["pattern_id"]),
            str(d["skipped"]),
            str(d.get("decision", "skipped")),
            datetime.fromisoformat(hour) if hour else None,
            str(d.get("stale_reason", "")),
        )


Outcome = TrainOutcome | Skipped


def outcome_from_dict(d: dict[str, Any]) -> Outcome:
    """A `to_dict()` of either outcome back as its type (a skipped one has the key `skipped`)."""
    return Skipped.from_dict(d) if "skipped" in d else TrainOutcome.from_dict(d)
