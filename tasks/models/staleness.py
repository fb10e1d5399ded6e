"""Which pattern models are stale: no champion, graph changed, drift, age, or forced.

Reads `patterns`, `models` (through `tasks.models.registry.champions`) and `forecast_errors`;
writes nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import duckdb

from tasks.clock import naive_utc
from tasks.models.registry import ChampionRow, champions
from tasks.settings import Settings

NO_CHAMPION = "no_champion"  # the stale reason of a pattern without a champion: a first model


@dataclass
class Stale:
    """A critical pattern whose model must be (re)trained, with every reason why."""

    pattern_id: int
    reasons: list[str] = field(default_factory=list)


def _drifting(
    con: duckdb.DuckDBPyConnection, pattern_id: int, version: int, hour: datetime, settings: Settings
) -> bool:
    """The champion's scored error stayed above factor x its calibrated level for N scored hours running.

    A quiet hour (no scored calls: MAPE NULL or NaN, or no calibrated level) is skipped, not
    evidence either way: it neither counts as drift nor breaks the run, just as an hour without
    any scoring row does; the N most recent hours that have both values decide."""
    rows = con.execute(
        """SELECT mape_calls, calibrated_mape_calls FROM forecast_errors
                          WHERE pattern_id = ? AND model_version = ? AND hour <= ?
                                AND isfinite(mape_calls) AND isfinite(calibrated_mape_calls)  -- NULL: filtered too
                          ORDER BY hour DESC LIMIT ?""",
        [pattern_id, version, naive_utc(hour), settings.drift_hours],
    ).fetchall()
    return len(rows) == settings.drift_hours and all(m > settings.drift_factor * c for m, c in rows)


def _reasons(
    con: duckdb.DuckDBPyConnection, settings: Settings, hour: datetime, graph_hash: str, champion: ChampionRow | None
) -> list[str]:
    """Why a pattern's champion (None: it has none) no longer fits: graph changed, drift, age."""
    if champion is None:
        return [NO_CHAMPION]
    reasons = []
    if champion.graph_hash != graph_hash:
        reasons.append("graph_changed")
    if _drifting(con, champion.pattern_id, champion.model_version, hour, settings):
        reasons.append("drift")
    if naive_utc(hour) - champion.trained_for > timedelta(hours=settings.model_max_age_hours):
        reasons.append("age")
    return reasons


def _candidates(con: duckdb.DuckDBPyConnection, only: list[int] | None) -> list[tuple[int, str]]:
    """(pattern_id, graph_hash) of the active critical patterns, busiest first, or exactly `only`."""
    if not only:
        return con.execute(
            "SELECT pattern_id, graph_hash FROM patterns WHERE status = 'active' AND critical ORDER BY calls DESC"
        ).fetchall()
    rows = con.execute(
        "SELECT pattern_id, graph_hash FROM patterns WHERE pattern_id IN (SELECT unnest(?))", [only]
    ).fetchall()
    missing = set(only) - {r[0] for r in rows}
    if missing:
        raise ValueError(f"no such pattern(s): {sorted(missing)} (see `rpcwatch patterns`)")
    return rows


def stale_patterns(
    con: duckdb.DuckDBPyConnection,
    settings: Settings,
    hour: datetime,
    force: bool = False,
    only: list[int] | None = None,
) -> list[Stale]:
    """Stale models among the active critical patterns (or exactly `only`), with every reason."""
    current = champions(con)
    out = []
    for pattern_id, graph_hash in _candidates(con, only):
        reasons = (["forced"] if force else []) + _reasons(con, settings, hour, graph_hash, current.get(pattern_id))
        if reasons:
            out.append(Stale(pattern_id, reasons))
    return out
