"""Pictures people look at: forecast vs actual with the threshold band (like the method's figure).

`forecast_plot` draws (training logs its PNGs with it); `plot_node` reads a pattern's series and
earlier flags (`models`, `pattern_series`, `anomalies`; read-only) and writes no table.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np

from tasks.keys import node_label
from tasks.models.detector import Detector
from tasks.models.features import CALLS
from tasks.models.registry import champions
from tasks.models.thresholds import count_band
from tasks.scoring.sequential import forecast_span
from tasks.settings import Settings
from tasks.warehouse import opened


def forecast_plot(
    times: np.ndarray,
    observed: np.ndarray,
    expected: np.ndarray,
    alpha: float,
    alarm_p: float,
    title: str,
    path: Path,
    flagged: np.ndarray | None = None,
    phi: float = 1.0,
) -> Path:
    """Real vs predicted calls per bucket, the calibrated band shaded, flagged points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = count_band(expected, alpha, alarm_p, phi)
    fig, ax = plt.subplots(figsize=(10, 3.2), dpi=110)
    ax.fill_between(times, lo, hi, color="tab:orange", alpha=0.18, label=f"threshold band (p={alarm_p:g})")
    ax.plot(times, observed, color="black", lw=1.0, label="real")
    ax.plot(times, expected, color="tab:orange", lw=1.4, label="predicted")
    outside = (observed < lo) | (observed > hi) if flagged is None else flagged
    if outside.any():
        ax.scatter(times[outside], observed[outside], color="tab:red", zorder=3, s=18, label="irregular")
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("calls per bucket")
    ax.legend(loc="upper left", fontsize=7, ncol=4)
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _node_index(nodes: list[str], node: str, pattern_id: int) -> int:
    """The index of a node named as on the command line (caller:callee:interface)."""
    matches = [i for i, n in enumerate(nodes) if node_label(n) == node]
    if not matches:
        raise ValueError(
            f"node {node!r} is not in pattern {pattern_id}'s graph; nodes look like {node_label(nodes[0])}"
        )
    return matches[0]


def plot_node(settings: Settings, pattern_id: int, node: str, hours: int, out: Path) -> Path:
    """Observed vs predicted calls of one pattern node over the last `hours`, band and irregular
    points marked, from the pattern's champion (read-only: safe while the pipeline runs)."""
    with opened(settings.warehouse, read_only=True) as con:
        champion = champions(con).get(pattern_id)
        if champion is None:
            raise ValueError(f"pattern {pattern_id} has no champion model yet (see `rpcwatch stale`)")
        detector = Detector.load(settings, pattern_id, champion.model_version)
        n = _node_index(detector.nodes, node, pattern_id)
        row = con.execute("SELECT max(bucket_ts) FROM pattern_series WHERE pattern_id = ?", [pattern_id]).fetchone()
        if row is None or row[0] is None:
            raise ValueError(f"pattern {pattern_id} has no series yet")
        end = row[0] + timedelta(seconds=detector.graph.bucket_seconds)
        span = forecast_span(con, detector, end - timedelta(hours=hours), end)
    forecast = span.forecast
    flagged = np.zeros(len(span.targets), dtype=bool)
    for flag in forecast.flags:
        if flag.node == n and flag.feature == CALLS:
            flagged[flag.sample] = True
    band = detector.bands[n].calls
    return forecast_plot(
        span.buckets[span.targets],
        forecast.observed[:, n, CALLS],
        forecast.expected[:, n, CALLS],
        band.alpha,
        detector.thresholds.alarm_p,
        f"pattern {pattern_id} v{champion.model_version} · {detector.nodes[n]}",
        out,
        flagged,
        band.phi,
    )
