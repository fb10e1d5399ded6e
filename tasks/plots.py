"""Pictures people look at: forecast vs actual with the threshold band (like the method's figure)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def forecast_plot(times: np.ndarray, observed: np.ndarray, expected: np.ndarray, alpha: float, alarm_p: float,
                  title: str, path: Path, flagged: np.ndarray | None = None) -> Path:
    """Real vs predicted calls per bucket, the calibrated band shaded, flagged points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tasks.forecast import count_band

    lo, hi = count_band(expected, alpha, alarm_p)
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
