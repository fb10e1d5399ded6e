"""The forecast loop scoring used before batching: one forward pass per bucket. Kept as the
reference the batched loop must equal (tests/scoring/test_scoring.py) and beat
(tests/benchmarks/bench_score.py). A plain helper module, not a test module."""

from __future__ import annotations

import numpy as np
import torch

from tasks.models.detector import Detector, Flag
from tasks.models.forecast import Prepared, input_windows, predict
from tasks.scoring.sequential import MAX_CLEANED_RUN, Forecast, normal_level


def per_bucket_forecast(detector: Detector, values: np.ndarray, targets: np.ndarray, clean: np.ndarray) -> Forecast:
    """Forecast bucket by bucket; flagged observations are replaced in `clean` (up to MAX_CLEANED_RUN in a
    row) by their forecasts, a spike's at least and a drop's at most the node's normal level."""
    cfg = detector.cfg
    observed = values[targets].copy()
    expected = np.zeros_like(observed)
    flags: list[Flag] = []
    run = np.zeros(values.shape[1:], dtype=int)
    level = normal_level(detector, values.shape[2])
    for s, t in enumerate(targets):
        starts = np.array([t - cfg.horizon - cfg.window + 1])
        x, offsets = input_windows(detector.norm, clean, starts, cfg.window)
        prep = Prepared(x, torch.zeros(0), np.array([t]), 0, detector.edge_index, offsets, detector.norm)
        expected[s] = predict(detector.model, prep, slice(None), torch.device("cpu"))[0]
        flagged = np.zeros(values.shape[1:], dtype=bool)
        target = expected[s].copy()
        for flag in detector.flags(observed[s : s + 1], expected[s : s + 1]):
            flags.append(flag._replace(sample=s))
            flagged[flag.node, flag.feature] = True
            normal = level[flag.node, flag.feature]
            if normal == normal:  # not NaN
                pick = np.fmax if flag.direction == "up" else np.fmin
                target[flag.node, flag.feature] = pick(target[flag.node, flag.feature], normal)
        run = np.where(flagged, run + 1, 0)
        replace = flagged & (run <= MAX_CLEANED_RUN)
        clean[t][replace] = target[replace]
    return Forecast(expected, observed, flags)
