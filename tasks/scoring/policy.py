"""The alarm policy: which runs of irregular points are incidents, at one sensitivity setting in the
unit an on-call team thinks in, expected false incidents per day (`alarm_false_per_day`).

Detectors write points into `anomalies`; the incident rule groups a group's points into runs
(`tasks.scoring.incidents`). The policy decides which runs alarm:

- **Decisive evidence needs no persistence.** A run holding a never-seen edge (`novel_rpc`,
  feature `new_edge`), a decisive single call (`extreme_call`, `tasks.scoring.extreme`) or
  `SCAN_INTERFACES` never-seen interfaces of one service in one bucket is an incident at once.
- **Weak evidence must persist.** Other runs are candidates when they span `incident_min_buckets`
  buckets (like an alert's `for: 3m`) or one point scores >= `PEAK_SCORE`.
- **The rate is calibrated.** A candidate alarms when its evidence (the most score its points sum
  to within that span) reaches a threshold read from held-out history: the candidates that started
  in the scored hours of the `CALIBRATION_HOURS` before the run's hour. Normal hours raise
  candidates at some rate; hours inside unlabelled incidents raise more. The rate is estimated so
  that such hours cannot drag it far (`robust_rate`: the median count of candidates an hour, or
  where most hours raise none, the rate a Poisson needs to leave that share of hours empty), and
  hours with more candidates than a Poisson at that rate gives once in a hundred hours (`KEEP_Q`)
  are left out of the evidence. If the rate is within the setting, every candidate alarms;
  otherwise the threshold is the evidence that the setting's share of normal candidates exceeds,
  read off the body of the kept hours' evidence (log scale: median and MAD, a normal tail beyond;
  `SPREAD_FLOOR` keeps near-identical runs from making a threshold any wobble crosses).
- **Too little history** (fewer than `MIN_CALIBRATION_HOURS` scored hours, or fewer than `MIN_BODY`
  candidates kept as normal: a quantile read off one or two values is no estimate): candidates alarm.

Why empirical: the points come from several detectors whose scores are in different units (band
widths, orders of magnitude beyond a window's alarm level, calls of a new RPC). Stacking analytic
corrections per detector does not add up to a false-incident rate; a quantile of the statistic
that raises incidents does, whatever its units (`rpcwatch evaluate --faults F --curve` shows the whole
operating curve). Not blind: a first version judged every run by its evidence alone, its threshold
read off the largest runs of the history; on TrainTicket 2023-01-29 (captures wall to wall with
faults) it climbed past every fault, and a second one (the body of all runs' evidence, no
persistence) raised more false incidents than the fixed rule. The third kept the fixed rule as the
detector of candidates and left the busiest quarter of the hours out of the history: on 01-29,
where a third to a half of the scored hours lie inside fault-dense captures, the bar still rose
past 4 of the 5 visible faults the fixed rule caught, and where most hours raise no candidate the
quarter left out all of them (the rate read as 0: every candidate alarmed, whatever the setting).
This fourth one estimates the rate robustly instead (above). The setting's default (1 a day) was
not changed along the way; `KEEP_Q` was chosen with this version. `MIN_BODY` came later, after
seeing 01-29's 12:00 threshold read off a single kept candidate (half the history's hours lay in
fault-dense captures, the rest raised one candidate in all) rise above a visible cpu fault: below
`MIN_BODY` kept candidates the policy now says it cannot calibrate and falls back to the fixed
rule, as it does with too few hours. Where normal traffic raises 1-5 candidates a day this allows up
to that many false incidents a day instead of the setting's.

Pure numpy/scipy; the runs' evidence comes from `tasks.scoring.incidents.run_stats_sql`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime

import numpy as np
from scipy.stats import norm, poisson

CALIBRATION_HOURS = 24  # the history a threshold is read from
MIN_CALIBRATION_HOURS = 3  # fewer scored hours: every candidate alarms
MIN_BODY = 5  # fewer candidates kept as normal: their evidence has no body to read; every candidate alarms
KEEP_Q = 0.99  # hours with more candidates than this quantile of a Poisson at the robust rate are left out
SPREAD_FLOOR = 0.25  # the least spread of log evidence assumed (normal runs vary by at least ~30 %)
MAD_TO_SD = 1.4826  # a normal's standard deviation from its median absolute deviation
CURVE = (0.25, 0.5, 1.0, 2.0, 4.0)  # the operating curve's settings, false incidents per day


def threshold(by_hour: Mapping[datetime, Sequence[float]], false_per_day: float) -> float | None:
    """The evidence a candidate needs to alarm, from the candidates' evidence in each scored hour of
    the history (an hour without candidates: an empty list); None when the history is too short."""
    if len(by_hour) < MIN_CALIBRATION_HOURS:
        return None
    counts = np.array([len(v) for v in by_hour.values()])
    rate = robust_rate(counts)
    most = poisson.ppf(KEEP_Q, rate)
    evidence = np.array([e for v in by_hour.values() if len(v) <= most for e in v], dtype=float)
    per_day = rate * 24
    if per_day <= false_per_day:  # normal hours raise fewer candidates than the budget
        return 0.0
    if len(evidence) < MIN_BODY:  # too few normal candidates to read a quantile from: no calibration yet
        return 0.0
    logs = np.log1p(evidence)
    centre = float(np.median(logs))
    spread = max(MAD_TO_SD * float(np.median(np.abs(logs - centre))), SPREAD_FLOOR)
    return float(np.expm1(centre + norm.isf(false_per_day / per_day) * spread))


def robust_rate(counts: np.ndarray) -> float:
    """Normal candidates an hour, from each hour's count, robust to up to half the hours lying inside
    incidents (which only add candidates): the median count, or where more than half the hours
    raise none, the Poisson rate that leaves that share empty (-log of it; the two meet near ln 2)."""
    median = float(np.median(counts))
    if median >= 1:
        return median
    return float(-np.log(np.mean(counts == 0)))
