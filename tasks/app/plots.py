"""Pictures people look at: forecast vs actual with the threshold band (like the method's figure).

`forecast_plot` draws (training logs its PNGs with it); `plot_node` reads a pattern's series and
earlier flags (`models`, `pattern_series`, `anomalies`; read-only, the published snapshot when there
is one) and writes no table.
`incident_plot` draws the Airflow view's picture of an incident's strongest RPC from what the
published snapshot holds (tasks.app.view_pictures): the actual series, the forecast and its
non-alarm band over every scored bucket (`forecasts`), or, in older snapshots without it, the
forecast and threshold of the flagged points only. The model code is imported where it is used, so that the view
(inside Airflow's API server) loads no model libraries.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tasks.keys import node_label

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from tasks.settings import Settings


@dataclass(frozen=True)
class ForecastPanel:
    """One node's real and predicted calls per bucket and its calibrated band, to draw."""

    times: np.ndarray
    observed: np.ndarray
    expected: np.ndarray
    alpha: float
    alarm_p: float
    title: str
    flagged: np.ndarray | None = None
    phi: float = 1.0
    ceiling: tuple[tuple[float, float], ...] = ()  # the band's `CountBand.ceiling`
    normal: float | None = None  # the band's `CountBand.mean`: no count within the band at it is a spike


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
    ceiling: tuple[tuple[float, float], ...] = (),
    normal: float | None = None,
) -> Path:
    """Real vs predicted calls per bucket, the calibrated band shaded, flagged points marked."""
    panel = ForecastPanel(times, observed, expected, alpha, alarm_p, title, flagged, phi, ceiling, normal)
    return forecast_panels([panel], path)


def forecast_panels(panels: list[ForecastPanel], path: Path) -> Path:
    """`forecast_plot`'s picture for several nodes, one panel each, in one PNG (one figure to lay out
    and encode: training draws one per pattern, hundreds an hour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 0.4 + 2.8 * len(panels)), dpi=110, squeeze=False)
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        _draw_forecast(ax, panel)
    fig.autofmt_xdate()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _draw_forecast(ax: Axes, p: ForecastPanel) -> None:
    from tasks.models.thresholds import count_band, count_ceiling, normal_ceiling

    lo, hi = count_band(p.expected, p.alpha, p.alarm_p, p.phi)
    hi = np.maximum(hi, count_ceiling(p.expected, p.ceiling))
    hi = np.maximum(hi, normal_ceiling(p.normal, p.alpha, p.alarm_p, p.phi))
    ax.fill_between(p.times, lo, hi, color="tab:orange", alpha=0.18, label=f"threshold band (p={p.alarm_p:g})")
    ax.plot(p.times, p.observed, color="black", lw=1.0, label="real")
    ax.plot(p.times, p.expected, color="tab:orange", lw=1.4, label="predicted")
    outside = (p.observed < lo) | (p.observed > hi) if p.flagged is None else p.flagged
    if outside.any():
        ax.scatter(p.times[outside], p.observed[outside], color="tab:red", zorder=3, s=18, label="irregular")
    ax.set_title(p.title, fontsize=9)
    ax.set_ylabel("calls per bucket")
    ax.legend(loc="upper left", fontsize=7, ncol=4)
    ax.grid(alpha=0.3)


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
    points marked, from the pattern's champion (read from the published snapshot when there is one,
    tasks.app.report.reading: safe while the pipeline runs)."""
    from tasks.app.report import reading
    from tasks.models.features import CALLS
    from tasks.models.registry import champions

    with reading(settings) as con:
        champion = champions(con).get(pattern_id)
        if champion is None:
            raise ValueError(f"pattern {pattern_id} has no champion model yet (see `rpcwatch stale`)")
        # the model libraries (seconds to import) only once there is a model to draw
        from tasks.models.detector import Detector
        from tasks.scoring.sequential import forecast_span

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
        band.ceiling,
        band.mean,
    )


@dataclass(frozen=True)
class Marks:
    """Flagged points: when, what was seen, what the model expected, and the threshold crossed."""

    times: list[datetime]
    observed: list[float]
    expected: list[float]
    threshold: list[float]


@dataclass(frozen=True)
class Band:
    """The forecast and the band of values that would not alarm, per bucket (bucket start times;
    None: no forecast, or that side never alarms)."""

    times: list[datetime]
    expected: list[float | None]
    lower: list[float | None]
    upper: list[float | None]


@dataclass(frozen=True)
class Series:
    """An RPC's actual values per bucket (bucket start times) and what they are."""

    times: list[datetime]
    values: list[float]
    label: str
    ylabel: str
    bucket: timedelta


ORANGE, DARK_ORANGE, RED = "tab:orange", "#b35900", "tab:red"


def _band(ax, band: Band, bucket: timedelta) -> None:
    """The forecast line and its non-alarm band over every bucket, as steps like the actual series;
    buckets without a forecast break them, a missing lower side shades from 0."""
    if not band.times:
        return
    rows = dict(zip(band.times, zip(band.expected, band.lower, band.upper)))
    first, last = min(rows), max(rows)
    steps = int((last - first) / bucket) + 2  # one more bucket: the last step's end
    times = [first + i * bucket for i in range(steps)]
    values = [rows.get(t, (None, None, None)) for t in times[:-1]]
    values.append(values[-1])

    def column(i: int, missing: float) -> np.ndarray:
        return np.array([missing if v[i] is None else v[i] for v in values], dtype=float)

    expected, lower, upper = column(0, np.nan), column(1, 0.0), column(2, np.nan)
    lower[np.isnan(expected)] = np.nan
    ok = np.isfinite(lower) & np.isfinite(upper)
    ax.fill_between(
        times, lower, upper, where=ok, step="post", color=ORANGE, alpha=0.22, lw=0, label="band (no alarm inside)"
    )
    ax.plot(times, expected, drawstyle="steps-post", color=ORANGE, lw=1.4, label="forecast")


def _marks(ax, marks: Marks, width: timedelta, band_label: str, points_only: bool = False) -> None:
    """The band between forecast and threshold of each flagged point, its two ends and the point
    (`points_only`: the observed points alone, the band being drawn over every bucket)."""
    if not marks.times:
        return
    if points_only:
        middle = [t + width / 2 for t in marks.times]
        ax.scatter(middle, marks.observed, color=RED, s=20, zorder=4, label="irregular (observed)")
        return
    expected, threshold = np.asarray(marks.expected, float), np.asarray(marks.threshold, float)
    low = np.minimum(expected, threshold)
    ax.bar(
        marks.times,
        np.abs(threshold - expected),
        bottom=low,
        width=width,
        align="edge",
        color=ORANGE,
        alpha=0.25,
        label=band_label,
    )
    middle = [t + width / 2 for t in marks.times]
    ax.scatter(middle, expected, marker="_", s=90, color=ORANGE, lw=2, label="forecast", zorder=3)
    ax.scatter(middle, threshold, marker="_", s=90, color=DARK_ORANGE, lw=2, label="threshold", zorder=3)
    ax.scatter(middle, marks.observed, color=RED, s=20, zorder=4, label="irregular (observed)")


def incident_plot(
    series: Series,
    marks: Marks,
    title: str,
    span: tuple[datetime, datetime],
    windows: Marks | None = None,
    window_step: timedelta = timedelta(seconds=5),
    band: Band | None = None,
) -> bytes:
    """An RPC's actual series around an incident with its flagged points (PNG bytes): the incident
    shaded, the forecast and its non-alarm band over every bucket when `band` holds them (else each
    flagged bucket's band from the forecast to the threshold), the observed value in red.
    `windows`: flagged trace windows (surprising traces per window, one every `window_step`), in a
    second panel.
    matplotlib's object API (no pyplot: safe in a web server's threads); data texts unparsed."""
    import matplotlib.dates as mdates
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = 2 if windows is not None and windows.times else 1
    fig = Figure(figsize=(12, 3.3 + 2.0 * (panels - 1)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    for axis in axes:
        axis.axvspan(span[0], span[1], color=RED, alpha=0.07, label="incident" if axis is ax else None)
        axis.grid(alpha=0.3)
    if series.times:
        ax.plot(series.times, series.values, drawstyle="steps-post", color="black", lw=1.0, label=series.label)
    else:
        ax.text(0.5, 0.5, "no series of this RPC in the snapshot", transform=ax.transAxes, ha="center")
    if band is not None and band.times:
        _band(ax, band, series.bucket)
        _marks(ax, marks, series.bucket, "", points_only=True)
    else:
        _marks(ax, marks, series.bucket, "forecast → threshold (flagged buckets)")
    ax.set_ylabel(series.ylabel, parse_math=False)
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9, loc="left", parse_math=False)
    if windows is not None and windows.times:
        low = axes[1]
        _marks(low, windows, window_step, "expected → alarm level")
        low.set_ylabel("surprising traces\nper window")
        low.set_ylim(bottom=0)
    for axis in axes:
        handles, labels = axis.get_legend_handles_labels()
        if handles:
            legend = axis.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
            for text in legend.get_texts():
                text.set_parse_math(False)
    locator = mdates.AutoDateLocator()
    axes[-1].xaxis.set_major_locator(locator)
    axes[-1].xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    axes[-1].set_xlabel("UTC")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", bbox_inches="tight", pad_inches=0.15)
    return out.getvalue()
