"""Pictures people look at: forecast vs actual with the threshold band (like the method's figure)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.keys import split_node_key


def _display(key: str) -> str:
    """A node as users name it on the command line: caller:callee:interface."""
    caller, callee, interface, _ = split_node_key(key)
    return f"{caller}:{callee}:{interface or ''}"


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

    from tasks.models.thresholds import count_band

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


def plot_node(settings, pattern_id: int, node: str, hours: int, out: Path) -> Path:
    """Observed vs predicted calls of one pattern node over the last `hours`, band and irregular
    points marked, from the pattern's champion (read-only: safe while the pipeline runs)."""
    from datetime import timedelta

    from tasks.models.nn import graph_edge_index
    from tasks.models.training import load_model
    from tasks.scoring.score import _cleaned_lead_in, _forecast_sequentially, _series, champion_folder
    from tasks.warehouse import opened

    with opened(settings.warehouse, read_only=True) as con:
        champion = con.execute(
            "SELECT max(model_version) FROM models WHERE pattern_id = ? AND decision = 'champion'", [pattern_id]
        ).fetchone()[0]
        if champion is None:
            raise ValueError(f"pattern {pattern_id} has no champion model yet (see `rpcwatch stale`)")
        model, cfg, graph, norm, thresholds = load_model(champion_folder(settings, pattern_id, champion))
        matches = [i for i, n in enumerate(graph["nodes"]) if _display(n) == node]
        if not matches:
            raise ValueError(
                f"node {node!r} is not in pattern {pattern_id}'s graph; nodes look like {_display(graph['nodes'][0])}"
            )
        seconds = graph["bucket_seconds"]
        end = con.execute("SELECT max(bucket_ts) FROM pattern_series WHERE pattern_id = ?", [pattern_id]).fetchone()[0]
        end = end + timedelta(seconds=seconds)
        lead = cfg.window + cfg.horizon - 1
        start = end - timedelta(hours=hours) - timedelta(seconds=lead * seconds)
        buckets, values = _series(con, pattern_id, graph["nodes"], start, end, seconds)
        clean = _cleaned_lead_in(con, pattern_id, graph["nodes"], buckets, values, end - timedelta(hours=hours))
    targets = np.arange(lead, len(buckets))
    edge_index = graph_edge_index(len(graph["nodes"]), [tuple(e) for e in graph["edges"]])
    expected, observed, flags = _forecast_sequentially(
        model, cfg, norm, values, targets, edge_index, graph["nodes"], thresholds, clean
    )
    n = matches[0]
    flagged = np.zeros(len(targets), dtype=bool)
    for s, fn, f, *_ in flags:
        if fn == n and f == 0:
            flagged[s] = True
    band = thresholds["nodes"][graph["nodes"][n]]["calls"]
    return forecast_plot(
        buckets[targets],
        observed[:, n, 0],
        expected[:, n, 0],
        band["alpha"],
        thresholds["alarm_p"],
        f"pattern {pattern_id} v{champion} · {graph['nodes'][n]}",
        out,
        flagged,
        band.get("phi", 1.0),
    )
