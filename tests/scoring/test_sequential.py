"""The sequential loop's cleaning (`tasks.scoring.sequential`) on a tiny hand-built detector: a
persistence forecaster (the mean of its window) with a fixed band, so that every forecast and flag
can be worked out by hand."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from tasks.models.detector import Flag
from tasks.models.features import CALLS, FEATURES
from tasks.models.thresholds import CountBand, LatencyBand, NodeBands
from tasks.scoring.sequential import MAX_CLEANED_RUN, forecast_sequentially

WINDOW = 5
LEVEL = 10.0  # the node's normal calls a bucket


class Persistence:
    """Forecasts a bucket as the mean of the `WINDOW` before it; flags calls beyond [e / 2 - 3, 2 e + 3]."""

    def __init__(self, mean: float | None) -> None:
        self.cfg = SimpleNamespace(horizon=1, window=WINDOW)
        lat = LatencyBand(1.0, 6.0)
        self.bands = [NodeBands(CountBand(0.0, 1.0, mean), CountBand(0.0, 1.0, 0.0), lat, lat)]

    def forecast(self, clean: np.ndarray, targets: np.ndarray) -> np.ndarray:
        return np.stack([clean[t - WINDOW : t].mean(axis=0) for t in targets])

    def flags(self, observed: np.ndarray, expected: np.ndarray) -> list[Flag]:
        out = []
        for s in range(len(observed)):
            o, e = observed[s, 0, CALLS], expected[s, 0, CALLS]
            if o > 2 * e + 3:
                out.append(Flag(s, 0, CALLS, 2 * e + 3, 2.0, "up", "traffic_spike"))
            elif o < e / 2 - 3:
                out.append(Flag(s, 0, CALLS, e / 2 - 3, 2.0, "down", "traffic_drop"))
        return out


def _outage_and_recovery(mean: float | None) -> tuple[set[int], set[int], np.ndarray]:
    calls = [LEVEL] * 20 + [0.0] * 50 + [LEVEL] * 20  # an outage longer than MAX_CLEANED_RUN, then traffic as before
    values = np.zeros((len(calls), 1, len(FEATURES)))
    values[:, 0, CALLS] = calls
    targets = np.arange(WINDOW, len(calls))
    forecast = forecast_sequentially(Persistence(mean), values, targets, values.copy())
    by = {d: {int(targets[f.sample]) for f in forecast.flags if f.direction == d} for d in ("up", "down")}
    return by["up"], by["down"], forecast.expected[:, 0, CALLS]


def test_an_outage_is_flagged_then_accepted_and_its_recovery_is_not_held_at_the_outage_level():
    spikes, drops, _ = _outage_and_recovery(mean=LEVEL)
    assert set(range(20, 20 + MAX_CLEANED_RUN)) <= drops  # cleaned to the forecast: still flagged
    assert max(drops) < 70  # accepted as the level before the traffic came back
    assert spikes == {70, 71}, sorted(spikes)  # cleaned to the normal level, back within the window


def test_without_a_normal_level_a_spike_is_cleaned_to_its_forecast():
    """A model that did not keep its calibration mean (older versions): the forecast, as before; the
    recovery is then held at the outage level for MAX_CLEANED_RUN buckets (here all 20 left)."""
    spikes, _, expected = _outage_and_recovery(mean=None)
    assert spikes == set(range(70, 90))
    assert np.all(expected[-20:] == 0.0)


def test_a_drop_is_never_cleaned_above_the_normal_level():
    """A drop below a forecast that sits above the node's level (after a flood accepted as normal)
    is cleaned to the level, not to the flood's height."""
    calls = [40.0] * 10 + [0.0] * 3 + [LEVEL] * 10
    values = np.zeros((len(calls), 1, len(FEATURES)))
    values[:, 0, CALLS] = calls
    clean = values.copy()
    forecast_sequentially(Persistence(LEVEL), values, np.arange(WINDOW, len(calls)), clean)
    assert clean[10:13, 0, CALLS].tolist() == [LEVEL, LEVEL, LEVEL]
