"""The patterns stage for one hour: rebuild traces, assign them to patterns (or re-cluster), keep
pattern identities stable, maintain each pattern's graph, and write per-pattern series and novel RPCs.

Re-clustering runs when settings say (every N hours, when too much traffic is unassigned, when
there are no patterns yet, or when forced); otherwise traces are assigned by shape (`assignment`).

Reads `calls`, `rpc_series`, `shapes`, `shape_patterns`, `patterns`, `pattern_nodes`,
`clustering_runs`; writes (through `traces`, `assignment`, `identity`, `series`) `shapes`,
`trace_patterns`, `reconstruction`, `shape_patterns`, `patterns`, `pattern_history`,
`pattern_nodes`, `pattern_edges`, `pattern_series`, `novel_rpcs`, and itself `clustering_runs`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import duckdb

from tasks.clock import hour_floor, naive_utc
from tasks.patterns.assignment import (
    assign_by_shape,
    critical_traffic,
    hour_shapes,
    recluster,
    unassigned_share,
)
from tasks.patterns.clustering import Shapes
from tasks.patterns.identity import Changes
from tasks.patterns.series import novel_rpcs, pattern_series
from tasks.patterns.traces import ReconstructionReport, rebuild_hour, store_traces
from tasks.settings import Settings
from tasks.warehouse import opened

log = logging.getLogger(__name__)


@dataclass
class PatternReport:
    hour: datetime
    reconstruction: ReconstructionReport
    reclustered: bool
    reason: str
    shapes: int
    changes: Changes
    critical: int
    critical_share: float
    unassigned_share: float
    series_rows: int
    novel_rpcs: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)  # reconstruction, clustering, store_and_series

    def lines(self) -> list[str]:
        c = self.changes
        what = (
            f"re-clustered ({self.reason}): {c.clusters} clusters from {self.shapes} shapes, "
            f"{c.noise_shapes} noise shapes ({c.noise_share:.1%} of calls)"
            if self.reclustered
            else f"assigned by shape ({self.reason})"
        )
        return [
            self.reconstruction.line(),
            what,
            f"critical patterns: {self.critical} carrying {self.critical_share:.1%} of calls; "
            f"unassigned {self.unassigned_share:.1%}; created {c.created or '-'}, graph changed "
            f"{c.changed or '-'}, revived {c.revived or '-'}, retired {c.retired or '-'}",
            f"pattern_series rows {self.series_rows:,}; novel RPC rows {self.novel_rpcs:,}; {self.seconds:.1f} s",
        ]


class Decision(NamedTuple):
    recluster: bool
    reason: str  # logged and kept in `clustering_runs`


@dataclass(frozen=True)
class Outcome:
    """How the hour's traces got their patterns."""

    reclustered: bool
    reason: str
    changes: Changes
    unassigned: float  # share of the hour's calls without a pattern


def _decide(
    con: duckdb.DuckDBPyConnection, settings: Settings, hour: datetime, force: bool, unassigned: float
) -> Decision:
    """Whether to re-cluster this hour, and why."""
    start = naive_utc(hour)
    if force:
        return Decision(True, "forced")
    [(earlier_patterns,)] = con.execute("SELECT count(*) FROM patterns WHERE first_seen < ?", [start]).fetchall()
    if not earlier_patterns:
        return Decision(True, "no patterns yet")
    [(last,)] = con.execute("SELECT max(hour) FROM clustering_runs WHERE reclustered AND hour < ?", [start]).fetchall()
    if last is None or start - last >= timedelta(hours=settings.recluster_every_hours):
        return Decision(True, f"last clustering {last or 'never'} is {settings.recluster_every_hours} h or more ago")
    if unassigned > settings.recluster_unclustered_share:
        return Decision(True, f"unassigned traffic {unassigned:.1%} > {settings.recluster_unclustered_share:.0%}")
    return Decision(False, f"patterns fresh (clustered {last:%Y-%m-%d %H:00}), unassigned {unassigned:.1%}")


def _assign_patterns(
    con: duckdb.DuckDBPyConnection, settings: Settings, hour: datetime, shapes: Shapes, force: bool
) -> Outcome:
    """Assign by shape; re-cluster when `_decide` says so, then assign again by the new clusters."""
    assign_by_shape(con, settings, hour)
    unassigned = unassigned_share(con, hour)
    decision = _decide(con, settings, hour, force, unassigned)
    if not decision.recluster:
        return Outcome(False, decision.reason, Changes(), unassigned)
    changes = recluster(con, settings, hour, shapes)
    assign_by_shape(con, settings, hour, include_this_hour=True)
    return Outcome(True, decision.reason, changes, unassigned_share(con, hour))


def _record_run(con: duckdb.DuckDBPyConnection, report: PatternReport) -> None:
    changes = report.changes
    # delete then insert (in the stage's transaction), not INSERT OR REPLACE: a lake has no keys
    con.execute("DELETE FROM clustering_runs WHERE hour = ?", [naive_utc(report.hour)])
    con.execute(
        """INSERT INTO clustering_runs (hour, reclustered, reason, shapes, clusters, noise_shapes,
            noise_share, critical, critical_share, unassigned_share, seconds)
        VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        [
            naive_utc(report.hour),
            report.reclustered,
            report.reason,
            report.shapes,
            changes.clusters,
            changes.noise_shapes,
            changes.noise_share,
            report.critical,
            report.critical_share,
            report.unassigned_share,
            report.seconds,
        ],
    )


def patterns_hour(settings: Settings, hour: datetime, force: bool = False) -> PatternReport:
    """The patterns stage for `hour` (idempotent: rerunning the hour gives the same tables)."""
    hour = hour_floor(hour)
    started = time.perf_counter()
    with opened(settings.warehouse) as con:
        con.execute("BEGIN")
        reconstruction = rebuild_hour(con, hour)
        timings = {"reconstruction": time.perf_counter() - started}
        shapes = hour_shapes(con, hour)
        outcome = _assign_patterns(con, settings, hour, shapes, force)
        critical = critical_traffic(con, hour)
        timings["clustering"] = time.perf_counter() - started - timings["reconstruction"]
        store_traces(con, hour)
        series_rows = pattern_series(con, settings, hour)
        novel = novel_rpcs(con, hour)
        seconds = time.perf_counter() - started
        timings["store_and_series"] = seconds - timings["reconstruction"] - timings["clustering"]
        report = PatternReport(
            hour=hour,
            reconstruction=reconstruction,
            reclustered=outcome.reclustered,
            reason=outcome.reason,
            shapes=len(shapes),
            changes=outcome.changes,
            critical=critical.patterns,
            critical_share=critical.share,
            unassigned_share=outcome.unassigned,
            series_rows=series_rows,
            novel_rpcs=novel,
            seconds=seconds,
            timings=timings,
        )
        _record_run(con, report)
        con.execute("COMMIT")
    for line in report.lines():
        log.debug(line)  # the stage says them (tasks.pipeline)
    return report


PATTERNS_SQL = """
SELECT p.pattern_id AS id, p.status, CASE WHEN p.critical THEN 'yes' ELSE '' END AS critical, p.version,
       p.n_nodes AS nodes, p.n_edges AS edges, p.n_shapes AS shapes, round(100 * p.traffic_share, 1) AS "share %",
       p.calls, strftime(p.first_seen, '%Y-%m-%d %H:00') AS first_seen,
       strftime(p.last_changed, '%Y-%m-%d %H:00') AS last_change,
       (SELECT string_agg(DISTINCT n.callee, ', ') FROM pattern_nodes n
        WHERE n.pattern_id = p.pattern_id AND n.version = p.version AND n.caller = 'USER') AS entry
FROM patterns p ORDER BY p.status, p.calls DESC
"""


def pattern_table(settings: Settings) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Headers and rows of the patterns overview (`PATTERNS_SQL`), for the CLI and the demo."""
    with opened(settings.warehouse, read_only=True) as con:
        cursor = con.execute(PATTERNS_SQL)
        return [d[0] for d in cursor.description], cursor.fetchall()
