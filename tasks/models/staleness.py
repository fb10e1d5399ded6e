"""Which pattern models are stale: no champion, graph changed, drift, age, or forced."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import duckdb

from tasks.clock import naive_utc
from tasks.settings import Settings

CHAMPIONS_SQL = """
SELECT pattern_id, arg_max(graph_hash, model_version), arg_max(trained_for, model_version), max(model_version),
       arg_max(calibrated_mape_calls, model_version)
FROM models WHERE decision = 'champion' GROUP BY pattern_id
"""


@dataclass
class Stale:
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


def stale_patterns(
    con: duckdb.DuckDBPyConnection,
    settings: Settings,
    hour: datetime,
    force: bool = False,
    only: list[int] | None = None,
) -> list[Stale]:
    """Stale models among the active critical patterns (or exactly `only`), with every reason."""
    if only:
        rows = con.execute(
            "SELECT pattern_id, graph_hash FROM patterns WHERE pattern_id IN (SELECT unnest(?))", [only]
        ).fetchall()
        missing = set(only) - {r[0] for r in rows}
        if missing:
            raise ValueError(f"no such pattern(s): {sorted(missing)} (see `rpcwatch patterns`)")
    else:
        rows = con.execute(
            "SELECT pattern_id, graph_hash FROM patterns WHERE status = 'active' AND critical ORDER BY calls DESC"
        ).fetchall()
    champions = {r[0]: r[1:] for r in con.execute(CHAMPIONS_SQL).fetchall()}
    out = []
    for pattern_id, graph_hash in rows:
        reasons = ["forced"] if force else []
        if pattern_id not in champions:
            reasons.append("no_champion")
        else:
            model_hash, trained_for, version, _ = champions[pattern_id]
            if model_hash != graph_hash:
                reasons.append("graph_changed")
            if _drifting(con, pattern_id, version, hour, settings):
                reasons.append("drift")
            if naive_utc(hour) - trained_for > timedelta(hours=settings.model_max_age_hours):
                reasons.append("age")
        if reasons:
            out.append(Stale(pattern_id, reasons))
    return out
