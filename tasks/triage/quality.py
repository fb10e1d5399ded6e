"""Detection quality over time, as people judged it: per day (by incident start, UTC) and per
pattern, how many incidents there were, how many people marked false positive, expected or true
positive, how many they acknowledged, and how many were posted. Reads `incidents`,
`incident_actions`, `alerts_sent` (the snapshot or the warehouse, read-only); writes nothing.
`quality_picture` draws the days as a PNG for the Airflow view."""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime

import duckdb

QUALITY_TABLES = ("incidents", "incident_actions", "alerts_sent")
# one row per incident: its day, its group for the per-pattern table, its latest mark, whether it was
# acknowledged and whether it was posted (actions and posts under an id it absorbed count too)
OF_INCIDENT = "({t}.incident_id = i.incident_id OR list_contains(coalesce(i.aliases, []), {t}.incident_id))"
JUDGED_SQL = f"""
WITH judged AS (
    SELECT i.incident_id, date_trunc('day', i.start_ts) AS day,
           coalesce(CAST(i.patterns[1] AS VARCHAR), 'novel RPCs') AS grp,
           (SELECT arg_max(a.mark, a.acted_at) FROM incident_actions a
            WHERE a.action = 'mark' AND {OF_INCIDENT.format(t="a")}) AS mark,
           EXISTS (SELECT 1 FROM incident_actions a WHERE a.action = 'ack' AND {OF_INCIDENT.format(t="a")}) AS acked,
           EXISTS (SELECT 1 FROM alerts_sent s WHERE {OF_INCIDENT.format(t="s")}) AS posted
    FROM incidents i)
SELECT {{key}}, count(*), count(*) FILTER (WHERE mark = 'false_positive'), count(*) FILTER (WHERE mark = 'expected'),
       count(*) FILTER (WHERE mark = 'true_positive'), count(*) FILTER (WHERE acked), count(*) FILTER (WHERE posted)
FROM judged GROUP BY {{key}} ORDER BY {{order}}"""
BY_DAY = JUDGED_SQL.format(key="day", order="day")
BY_PATTERN = JUDGED_SQL.format(key="grp", order="count(*) DESC, grp")


@dataclass(frozen=True)
class Quality:
    """Counts of one day or one pattern."""

    key: datetime | str
    incidents: int
    false_positive: int
    expected: int
    true_positive: int
    acked: int
    posted: int

    @property
    def false_share(self) -> float:
        """The share of its incidents people marked false positive."""
        return self.false_positive / self.incidents if self.incidents else 0.0


def has_quality_tables(con: duckdb.DuckDBPyConnection) -> bool:
    """A snapshot published before people could mark incidents lacks the tables."""
    rows = con.execute(
        "SELECT count(DISTINCT table_name) FROM information_schema.tables WHERE list_contains($t, table_name)",
        {"t": list(QUALITY_TABLES)},
    ).fetchone()
    return bool(rows and rows[0] == len(QUALITY_TABLES))


def quality_by_day(con: duckdb.DuckDBPyConnection) -> list[Quality]:
    return [Quality(*row) for row in con.execute(BY_DAY).fetchall()]


def quality_by_pattern(con: duckdb.DuckDBPyConnection) -> list[Quality]:
    return [Quality(*row) for row in con.execute(BY_PATTERN).fetchall()]


def quality_picture(days: list[Quality]) -> bytes:
    """Incidents per day (bars: marked false positive, expected, true positive, not marked) and the
    number posted (line), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=100)
    x = [f"{d.key:%m-%d}" if isinstance(d.key, datetime) else str(d.key) for d in days]
    parts = [
        ("false positive", [d.false_positive for d in days], "#d62728"),
        ("expected", [d.expected for d in days], "#ff9f1c"),
        ("true positive", [d.true_positive for d in days], "#2ca02c"),
        ("not marked", [d.incidents - d.false_positive - d.expected - d.true_positive for d in days], "#9aa5b1"),
    ]
    bottom = [0] * len(days)
    for label, values, colour in parts:
        ax.bar(x, values, bottom=bottom, label=label, color=colour, width=0.7)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.plot(x, [d.posted for d in days], "k.-", label="posted (alerts)")
    ax.set_ylabel("incidents")
    ax.set_title("Incidents per day (UTC, by start) and what people marked")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, max(max(bottom), max(d.posted for d in days), 1) * 1.35)  # room for the legend
    ax.set_xlim(-0.75, max(len(days), 7) - 0.25)  # a bar stays a bar when there are few days
    ax.legend(loc="upper left", fontsize=8, ncols=5)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return out.getvalue()
