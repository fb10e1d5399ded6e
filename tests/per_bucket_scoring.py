"""The forecast loop scoring used before batching: one forward pass per bucket. Kept as the
reference the batched loop must equal (tests/test_scoring.py) and beat (tests/benchmarks/bench_score.py)."""

from __future__ import annotations

import numpy as np
import torch

from tasks.models.forecast import Prepared, _windows, predict
from tasks.scoring.score import MAX_CLEANED_RUN, _flags


def per_bucket_forecast(model, cfg, norm, values, targets, edge_index, nodes, thresholds, clean):
    """Forecast bucket by bucket; flagged observations are replaced in `clean` (up to MAX_CLEANED_RUN in a row)."""
    observed = values[targets].copy()
    expected = np.zeros_like(observed)
    flags = []
    run = np.zeros(values.shape[1:], dtype=int)
    for s, t in enumerate(targets):
        starts = np.array([t - cfg.horizon - cfg.window + 1])
        x, offsets = _windows(norm, clean, starts, cfg.window)
        prep = Prepared(x, torch.zeros(0), np.array([t]), 0, edge_index, offsets, norm)
        expected[s] = predict(model, prep, slice(None), torch.device("cpu"))[0]
        flagged = np.zeros(values.shape[1:], dtype=bool)
        for _, n, f, threshold, score, direction, kind in _flags(
            observed[s : s + 1], expected[s : s + 1], nodes, thresholds
        ):
            flags.append((s, n, f, threshold, score, direction, kind))
            flagged[n, f] = True
        run = np.where(flagged, run + 1, 0)
        replace = flagged & (run <= MAX_CLEANED_RUN)
        clean[t][replace] = expected[s][replace]
    return expected, observed, flags
