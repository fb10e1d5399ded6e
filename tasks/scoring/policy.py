"""The alarm policy: which runs of irregular points are incidents, at one sensitivity setting in the
unit an on-call team thinks in, expected false incidents per day (`alarm_false_per_day`).

Detectors write points into `anomalies`; the incident rule groups a group's points into runs
(`tasks.scoring.incidents`). The policy decides which runs alarm:

- **Decisive evidence needs no persistence.** A run holding a never-seen edge (`novel_rpc`,
  feature `new_edge`) is an incident at once.
- **Weak evidence must persist.** Other runs are candidates when they span `incident_min_buckets`
  buckets (like an alert's `for: 3m`) or one point scores >= `PEAK_SCORE`.
- **The rate is calibrated.** A candidate alarms when its evidence (the most score its points sum
  to within that span) reaches a threshold read from held-out history: the candidates that started
  in the scored hours of the `CALIBRATION_HOURS` before the run's hour. Hours are ranked by their
  candidates' summed evidence and the busiest quarter is left out (`TRIM_QUANTILE`, as the trace
  models' calibration does: unlabelled incidents in up to a quarter of the hours do not count as
  normal). If the remaining hours raise fewer candidates a day than the setting allows, every
  candidate alarms; otherwise the threshold is the evidence that the setting's share of their
  candidates exceeds, read off the body of their evidence (log scale: median and MAD, a normal tail
  beyond; `SPREAD_FLOOR` keeps near-identical runs from making a threshold any wobble crosses).
- **Too little history** (fewer than `MIN_CALIBRATION_HOURS` scored hours): candidates alarm.

Why empirical: the points come from several detectors whose scores are in different units (band
widths, orders of magnitude beyond a window's alarm level, calls of a new RPC). Stacking analytic
corrections per detector does not add up to a false-incident rate; a quantile of the statistic
that raises incidents does, whatever its units (`rpcwatch evaluate --faults F --curve` shows the whole
operating curve). Not blind: a first version judged every run by its evidence alone, its threshold
read off the largest runs of the history; on TrainTicket 2023-01-29 (captures wall to wall with
faults) it climbed past every fault, and a second one (the body of all runs' evidence, no
persistence) raised more false incidents than the fixed rule. This third one keeps the fixed rule
as the detector of candidates and only raises its bar where normal hours need it. The setting's
default (1 a day) and the constants were not changed along the way.

Pure numpy/scipy; the runs' evidence comes from `tasks.scoring.incidents.run_stats_sql`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import numpy as np
from scipy.stats import norm

CALIBRATION_HOURS = 24  # the history a threshold is read from
MIN_CALIBRATION_HOURS = 3  # fewer scored hours: every candidate alarms
TRIM_QUANTILE = 0.75  # hours busier than this quantile of the history are left out of it
SPREAD_FLOOR = 0.25  # the least spread of log evidence assumed (normal runs vary by at least ~30 %)
MAD_TO_SD = 1.4826  # a normal's standard deviation from its median absolute deviation
CURVE = (0.25, 0.5, 1.0, 2.0, 4.0)  # the operating curve's settings, false incidents per day


def threshold(by_hour: Mapping[datetime, Sequence[float]], false_per_day: float) -> float | None:
    """The evidence a candidate needs to alarm, from the candidates' evidence in each scored hour of
    the history (an hour without candidates: an empty list); None when the history is too short."""
    if len(by_hour) < MIN_CALIBRATION_HOURS:
        return None
    activity = np.array([sum(v) for v in by_hour.values()])
    normal = [v for v, a in zip(by_hour.values(), activity) if a <= np.quantile(activity, TRIM_QUANTILE)]
    evidence = np.array([e for v in normal for e in v], dtype=float)
    per_day = len(evidence) / len(normal) * 24
    if per_day <= false_per_day:  # normal hours raise fewer candidates than the budget: all alarm
        return 0.0
    logs = np.log1p(evidence)
    centre = float(np.median(logs))
    spread = max(MAD_TO_SD * float(np.median(np.abs(logs - centre))), SPREAD_FLOOR)
    return float(np.expm1(centre + norm.isf(false_per_day / per_day) * spread))
