"""What the traces hold: a label-using ceiling for fault detection.

No detector, however good, can tell a fault from normal traffic when the traces do not change. This
oracle knows each fault's service and window (labels: for evaluation only, never for training or
thresholds) and asks whether the service's calls in the window differ from fault-free traffic more
than fault-free windows of the same length do. A fault is *visible* when it does so at the issue's
false-alarm budget: its strength beats the 95th percentile of the fault-free windows' strengths.

Calls INTO the service (callee = the service, caller another service: as its callers see them) are
tested apart from calls OUT of it (caller = the service): network delay shows only in the callers'
client spans, and a service's busy outgoing calls must not drown a change in its incoming ones. Per
window, each *statistic* sums over the service's RPCs the log-likelihood ratio (nats) of the
window's share against the RPC's fault-free share, counting only a rise:
- `slow_in`, `slow_in_server`, `slow_in_self`: calls into the service beyond their RPC's fault-free
  95th percentile of client latency (`rt_ms`), server latency and self time (where present);
- `short_in`: calls into the service with fewer descendant calls than their RPC's fault-free 5th
  percentile (a truncated subtree: children missing);
- `error_in`: failed calls into the service;
and `rate_in` / `rate_out` sum the Poisson log-likelihood ratio of each RPC's calls into / out of
the service per root trace, drops and rises (a vanished or a never-seen RPC shows here). Nothing
saturates: a window whose n calls all exceed scores n x log(1 / fault-free share), growing with n,
and no p-value is floored or capped.

The null: the day's fault-free time in the real captures, laid end to end and tiled with windows of
the fault window's length every `STEP_S` (a window may join two stretches: both are fault-free
traffic of the day); each is tested like the fault window, its own calls left out of the
fault-free shares and rates. Fault-free = outside every fault's [inject_time, window_end +
`GUARD_AFTER_S`] (clipped to the fault's capture: back to back, the next capture is another time)
and, for the service's own faults, also the `GUARD_BEFORE_S` before the injection (effects can start
that early; the other services keep that time, since the captures hold only 10-100 s before each
injection). With a fill (`rpcwatch replay --fill`) the fill is resampled from these same traces, so
only the capture minutes (`runs.parquet`) are read. Each statistic is put in units of its own null
spread, (x - median) / max(95th percentile - median, 1 nat), so that statistics with noisy nulls do
not dominate; the fault's *strength* is the largest, and the fault-free windows' strengths, computed
the same way, give `null_p95` and the empirical `percentile`. One threshold per fault, no Bonferroni:
by chance a fault is visible with about 5 %, more where the fault-free time holds fewer than 20
windows side by side (`null_tiles`; the report counts 1 / (tiles + 1) for them).

Choices, made from the issue and the data's layout: 95th / 5th percentiles and the 95 % level are
the issue's 5 % false-alarm budget; 90 s before a service's own faults and 60 s after every window
are the issue's early effects and recovery; add-half smoothing of fault-free counts; 1 nat (a
likelihood ratio of e) as the smallest spread; 10 s between fault-free windows.

Reads the fault list, `runs.parquet` beside it (when there) and the warehouse's `calls` in the
captures. Writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from tasks.evaluation.faults import PRE_EFFECT, SETTLE, evaluated_range, load_faults
from tasks.settings import Settings
from tasks.warehouse import opened

# as the evaluation's false alarms: a fault may act before its recorded injection (not fault-free for
# its own service here) and its service settles after the window
GUARD_BEFORE_S, GUARD_AFTER_S = int(PRE_EFFECT.total_seconds()), int(SETTLE.total_seconds())
STEP_S = 10  # fault-free windows start this far apart on the laid-out fault-free time
HIGH_Q, LOW_Q = 0.95, 0.05  # "slow": beyond the RPC's fault-free 95th percentile; "short": below its 5th
ALARM_SHARE = 0.05  # the false-alarm budget: visible = beyond the fault-free windows' 95th percentile
MIN_BASE_CALLS = 5  # an RPC needs this many fault-free calls to have a percentile
FLOOR_NATS = 1.0  # the smallest null spread of a statistic
MAX_DEPTH = 512  # a parent chain longer than this is a cycle in bad data: stop counting there
CALL_COLUMNS = (
    "ts",
    "trace_id",
    "call_id",
    "parent_call_id",
    "caller",
    "callee",
    "interface",
    "rt_ms",
    "server_rt_ms",
    "self_ms",
    "is_error",
)


@dataclass(frozen=True)
class Statistic:
    name: str
    side: str  # "in": calls into the service; "out": calls out of it
    flag: str | None  # the per-call flag whose share is tested; None: calls per root trace
    says: str


STATISTICS = (
    Statistic("slow_in", "in", "slow_client", "calls into it beyond their RPC's fault-free p95, client side"),
    Statistic("slow_in_server", "in", "slow_server", "calls into it beyond their RPC's fault-free p95, server side"),
    Statistic("slow_in_self", "in", "slow_self", "calls into it beyond their RPC's fault-free p95 of self time"),
    Statistic("short_in", "in", "short", "calls into it with fewer descendants than their RPC's fault-free p5"),
    Statistic("error_in", "in", "error", "failed calls into it"),
    Statistic("rate_in", "in", None, "calls into it"),
    Statistic("rate_out", "out", None, "calls out of it"),
)
FLAGS = {"in": [s.flag for s in STATISTICS if s.side == "in" and s.flag], "out": []}


@dataclass
class Side:
    """One side (in or out) of a service's calls, sorted by RPC then time: `rpc` codes, `at` times
    (ns; on the laid-out fault-free time for the pool), `flags` (1 / 0, NaN: not measured)."""

    rpc: np.ndarray
    at: np.ndarray
    flags: np.ndarray
    rpcs: int

    @classmethod
    def of(cls, rpc: np.ndarray, at: np.ndarray, flags: np.ndarray, rpcs: int) -> Side:
        order = np.lexsort((at, rpc))
        return cls(rpc[order], at[order], flags[order], rpcs)

    def counts(self, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per window and RPC: calls (W x R), measured and flagged calls per flag (W x R x F)."""
        width = self.flags.shape[1]
        calls = np.zeros((len(starts), self.rpcs))
        measured, flagged = np.zeros((len(starts), self.rpcs, width)), np.zeros((len(starts), self.rpcs, width))
        bounds = np.searchsorted(self.rpc, np.arange(self.rpcs + 1))
        for r in range(self.rpcs):
            lo, hi = bounds[r], bounds[r + 1]
            if lo == hi:
                continue
            at = self.at[lo:hi]
            a, b = np.searchsorted(at, starts), np.searchsorted(at, ends)
            calls[:, r] = b - a
            flags = self.flags[lo:hi]
            seen = np.vstack([np.zeros(width), np.cumsum(~np.isnan(flags), axis=0)])
            hit = np.vstack([np.zeros(width), np.cumsum(np.nan_to_num(flags), axis=0)])
            measured[:, r], flagged[:, r] = seen[b] - seen[a], hit[b] - hit[a]
        return calls, measured, flagged


@dataclass
class Pool:
    """A day's fault-free calls of one service, laid end to end (`length_ns`), with the thresholds
    its RPCs set and their totals."""

    sides: dict[str, Side]
    codes: dict[str, pd.Index]  # RPC names per side
    thresholds: pd.DataFrame  # per RPC into the service: q95 of each latency, q05 of descendants
    roots: np.ndarray  # root calls' times on the laid-out time
    length_ns: int


def _shares(k: np.ndarray, n: np.ndarray, k0: np.ndarray, n0: np.ndarray) -> np.ndarray:
    """sum over RPCs of n x KL(k / n || p0) where the share rose above the fault-free share p0
    (add-half smoothed, so 0 < p0 < 1): the log-likelihood ratio of 'this RPC's share changed'."""
    p0 = (k0 + 0.5) / (n0 + 1)
    share = k / np.maximum(n, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = np.where(share > 0, share * np.log(share / p0), 0.0)
        kl += np.where(share < 1, (1 - share) * np.log((1 - share) / (1 - p0)), 0.0)
    return np.where((share > p0) & (n0 > 0), n * kl, 0.0).sum(axis=-1)


def _rates(calls: np.ndarray, roots: np.ndarray, n0: np.ndarray, roots0: np.ndarray) -> np.ndarray:
    """sum over RPCs of the Poisson log-likelihood ratio of the window's calls against fault-free
    calls per root trace (smoothed), both ways."""
    expected = (n0 + 0.5) / np.maximum(roots0, 1)[..., None] * roots[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        term = np.where(calls > 0, calls * np.log(calls / expected), 0) - (calls - expected)
    return np.where(roots[..., None] > 0, term, 0).sum(axis=-1)


def evidence(pool: Pool, side_counts: dict[str, tuple], roots: np.ndarray, leave_out: bool) -> np.ndarray:
    """W x S: each statistic's evidence (nats) for W windows; `leave_out`: the windows are part of
    the pool (fault-free windows), so their own calls leave the fault-free shares and rates."""
    totals = {s: pool.sides[s].counts(np.array([0]), np.array([pool.length_ns])) for s in pool.sides}
    roots0 = np.full(len(roots), len(pool.roots), dtype=float) - (roots if leave_out else 0)
    out = np.zeros((len(roots), len(STATISTICS)))
    for j, stat in enumerate(STATISTICS):
        calls, measured, flagged = side_counts[stat.side]
        calls0, measured0, flagged0 = totals[stat.side]
        if stat.flag is None:
            out[:, j] = _rates(calls, roots, calls0 - (calls if leave_out else 0), roots0)
            continue
        f = FLAGS[stat.side].index(stat.flag)
        n, k = measured[..., f], flagged[..., f]
        n0 = measured0[..., f] - (n if leave_out else 0)
        k0 = flagged0[..., f] - (k if leave_out else 0)
        out[:, j] = _shares(k, n, k0, n0)
    return out


def descendants(calls: pd.DataFrame) -> np.ndarray:
    """How many calls hang below each call in its trace (parents found by trace and call id)."""
    key = pd.MultiIndex.from_arrays([calls.trace_id.to_numpy(), calls.call_id.to_numpy()])
    first = ~key.duplicated()
    where = pd.Series(np.flatnonzero(first), index=key[first])
    parent_key = pd.MultiIndex.from_arrays([calls.trace_id.to_numpy(), calls.parent_call_id.to_numpy()])
    parent = where.reindex(parent_key).fillna(-1).to_numpy(dtype=np.int64)
    size = np.zeros(len(calls), dtype=np.int64)
    ancestor = parent.copy()
    for _ in range(MAX_DEPTH):
        live = np.flatnonzero(ancestor >= 0)
        if not len(live):
            break
        size += np.bincount(ancestor[live], minlength=len(calls))
        ancestor[live] = parent[ancestor[live]]
    return size


def _rpc_names(calls: pd.DataFrame, side: str) -> pd.Series:
    other = calls.caller if side == "in" else calls.callee
    return other.astype(str) + " " + calls.interface.fillna("").astype(str)


def _thresholds(free: pd.DataFrame) -> pd.DataFrame:
    """Per RPC (fault-free calls into the service): q95 of each latency, q05 of descendants."""
    grouped = free.groupby("rpc")
    out = grouped[["rt_ms", "server_rt_ms", "self_ms"]].quantile(HIGH_Q)
    out["descendants"] = grouped.descendants.quantile(LOW_Q)
    return out[grouped.size() >= MIN_BASE_CALLS]


def _flags(calls: pd.DataFrame, limits: pd.DataFrame) -> np.ndarray:
    """The into-side flags (in FLAGS["in"] order): 1 / 0, NaN where the RPC has no fault-free
    percentile or the call lacks the value."""
    at = limits.reindex(calls.rpc)

    def beyond(column: str, above: bool) -> np.ndarray:
        v, q = calls[column].to_numpy(dtype=float), at[column].to_numpy(dtype=float)
        hit = (v > q) if above else (v < q)
        return np.where(np.isnan(v) | np.isnan(q), np.nan, hit.astype(float))

    known = np.where(at.rt_ms.isna().to_numpy(), np.nan, 1.0)
    columns = {
        "slow_client": beyond("rt_ms", True),
        "slow_server": beyond("server_rt_ms", True),
        "slow_self": beyond("self_ms", True),
        "short": beyond("descendants", False),
        "error": known * calls.is_error.fillna(False).to_numpy(dtype=float),
    }
    return np.column_stack([columns[f] for f in FLAGS["in"]]) if len(calls) else np.zeros((0, len(FLAGS["in"])))


def _sides(calls: pd.DataFrame, service: str) -> list[tuple[str, np.ndarray]]:
    """Calls into the service (from another service) and calls out of it (to another)."""
    return [
        ("in", ((calls.callee == service) & (calls.caller != service)).to_numpy()),
        ("out", ((calls.caller == service) & (calls.callee != service)).to_numpy()),
    ]


def _side_calls(calls: pd.DataFrame, side: str, limits: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """The side's calls named by RPC, and their flags against the fault-free `limits`."""
    named = calls.assign(rpc=_rpc_names(calls, side))
    return named, _flags(named, limits) if side == "in" else np.zeros((len(named), 0))


def laid_out(ns: np.ndarray, stretches: list[tuple[pd.Timestamp, pd.Timestamp]]) -> tuple[np.ndarray, np.ndarray, int]:
    """Which times fall in the stretches, where they land once the stretches are laid end to end
    (ns from the first stretch's start), and the laid-out length."""
    free, laid, offset = np.zeros(len(ns), dtype=bool), np.zeros(len(ns), dtype=np.int64), 0
    for start, end in stretches:
        a, b = pd.Timestamp(start).value, pd.Timestamp(end).value
        inside = (ns >= a) & (ns < b)
        free |= inside
        laid[inside] = ns[inside] - a + offset
        offset += b - a
    return free, laid, offset


@dataclass
class Day:
    """One day's calls in its captures, with their descendants."""

    calls: pd.DataFrame
    ns: np.ndarray

    @classmethod
    def of(cls, calls: pd.DataFrame) -> Day:
        calls = calls.assign(descendants=descendants(calls))
        return cls(calls, calls.ts.to_numpy(dtype="datetime64[ns]").astype(np.int64))

    def pool(self, service: str, stretches: list[tuple[pd.Timestamp, pd.Timestamp]]) -> Pool:
        """The service's calls in the fault-free stretches, laid end to end."""
        free, laid, length_ns = laid_out(self.ns, stretches)
        root = self.calls.parent_call_id.isna().to_numpy()
        sides, codes = {}, {}
        thresholds = pd.DataFrame()
        for side, mask in _sides(self.calls, service):
            picked = self.calls[mask & free]
            if side == "in":
                thresholds = _thresholds(picked.assign(rpc=_rpc_names(picked, side)))
            named, flags = _side_calls(picked, side, thresholds)
            codes[side] = pd.Index(sorted(set(named.rpc)))
            sides[side] = Side.of(codes[side].get_indexer(named.rpc), laid[mask & free], flags, len(codes[side]))
        return Pool(sides, codes, thresholds, np.sort(laid[root & free]), length_ns)

    def window(self, pool: Pool, start: pd.Timestamp, end: pd.Timestamp, service: str) -> tuple[dict, np.ndarray]:
        """The counts of one real window of the day, on the pool's RPCs (novel RPCs appended)."""
        inside = ((self.calls.ts >= start) & (self.calls.ts < end)).to_numpy()
        calls, ns = self.calls[inside], self.ns[inside]
        counts = {}
        for side, mask in _sides(calls, service):
            named, flags = _side_calls(calls[mask], side, pool.thresholds)
            known = pool.codes[side]
            names = known.append(pd.Index(sorted(set(named.rpc) - set(known))))
            window = Side.of(names.get_indexer(named.rpc), ns[mask], flags, len(names))
            counts[side] = window.counts(np.array([start.value]), np.array([end.value]))
        return counts, np.array([float(calls.parent_call_id.isna().sum())])


def _widen(pool: Pool, counts: dict[str, tuple]) -> Pool:
    """The pool with empty RPCs appended so that its RPCs line up with a window's novel ones."""
    sides = {}
    for side, s in pool.sides.items():
        extra = counts[side][0].shape[1] - s.rpcs
        sides[side] = Side(s.rpc, s.at, s.flags, s.rpcs + extra)
    return Pool(sides, pool.codes, pool.thresholds, pool.roots, pool.length_ns)


def null_windows(pool: Pool, length_ns: int) -> tuple[dict, np.ndarray]:
    """Counts of the fault-free windows of `length_ns`, every `STEP_S`, on the laid-out time."""
    if pool.length_ns < length_ns or length_ns <= 0:
        return {}, np.zeros(0)
    starts = np.arange(0, pool.length_ns - length_ns + 1, STEP_S * 10**9, dtype=np.int64)
    ends = starts + length_ns
    counts = {side: s.counts(starts, ends) for side, s in pool.sides.items()}
    roots = (np.searchsorted(pool.roots, ends) - np.searchsorted(pool.roots, starts)).astype(float)
    return counts, roots


def strengths(fault: np.ndarray, null: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each statistic in units of its null spread; the fault's and each null window's largest."""
    median, high = np.median(null, axis=0), np.quantile(null, HIGH_Q, axis=0)
    scale = np.maximum(high - median, FLOOR_NATS)
    return (fault - median) / scale, ((null - median) / scale).max(axis=1)


def _why(stat: Statistic, counts: dict[str, tuple], roots: float, pool: Pool) -> str:
    calls, measured, flagged = counts[stat.side]
    total_calls, total_measured, total_flagged = pool.sides[stat.side].counts(np.array([0]), np.array([pool.length_ns]))
    if stat.flag is None:
        expected = total_calls.sum() / max(len(pool.roots), 1) * roots
        return f"{stat.name}: {calls.sum():.0f} {stat.says} in {roots:.0f} root traces, fault-free ~{expected:.0f}"
    f = FLAGS[stat.side].index(stat.flag)
    k, n = flagged[..., f].sum(), measured[..., f].sum()
    if not n:
        return f"{stat.name}: no call into it measured in the window"
    base = total_flagged[..., f].sum() / max(total_measured[..., f].sum(), 1)
    return f"{stat.name}: {k:.0f} / {n:.0f} {stat.says} ({k / max(n, 1):.0%}; fault-free {base:.0%})"


def _judge(day: Day, pool: Pool, fault: pd.Series) -> dict[str, object]:
    start, end = pd.Timestamp(fault.inject_time), pd.Timestamp(fault.window_end)
    counts, roots = day.window(pool, start, end, fault.service)
    pool = _widen(pool, counts)
    null_counts, null_roots = null_windows(pool, end.value - start.value)
    out: dict[str, object] = {
        "nulls": len(null_roots),
        "null_tiles": pool.length_ns // max(end.value - start.value, 1),
        "null_minutes": round(pool.length_ns / 60e9, 1),
    }
    if not len(null_roots):
        return out | {"why": f"no fault-free time as long as its {(end - start).total_seconds():.0f} s window"}
    fault_ev = evidence(pool, counts, roots, leave_out=False)[0]
    null_ev = evidence(pool, null_counts, null_roots, leave_out=True)
    z, null = strengths(fault_ev, null_ev)
    best = int(np.argmax(z))
    strength, null_p95 = float(z[best]), float(np.quantile(null, 1 - ALARM_SHARE))
    return out | {
        "visible": strength > null_p95,
        "percentile": float(np.mean(null < strength) + 0.5 * np.mean(null == strength)),
        "strength": strength,
        "null_p95": null_p95,
        "null_max": float(null.max()),
        "statistic": STATISTICS[best].name,
        "why": _why(STATISTICS[best], counts, float(roots[0]), pool),
    }


def _day_of(faults: pd.DataFrame) -> pd.Series:
    date = faults.inject_time.dt.strftime("%Y-%m-%d")
    return faults["day"].fillna(date).astype(str) if "day" in faults else date


def _default_captures(calls: pd.DataFrame) -> pd.DataFrame:
    """Without a replay's runs: one capture per calendar day of the calls, first to last call."""
    by_day = calls.groupby(calls.ts.dt.strftime("%Y-%m-%d")).ts.agg(["min", "max"])
    return pd.DataFrame(
        {
            "day": by_day.index,
            "start": by_day["min"].to_numpy(),
            "end": by_day["max"].to_numpy() + np.timedelta64(1, "s"),
        }
    )


def fault_free_stretches(
    captures: pd.DataFrame, faults: pd.DataFrame, service: str
) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    """The captures less every fault's [inject_time, window_end + `GUARD_AFTER_S`] and, for the
    service's own faults, the `GUARD_BEFORE_S` before their injection; each fault's interval
    clipped to its own capture (back to back, the next capture is another time)."""
    stretches = []
    for c in captures.sort_values("start").itertuples():
        cut = [
            (
                max(f.inject_time - pd.Timedelta(seconds=GUARD_BEFORE_S if f.service == service else 0), c.start),
                min(f.window_end + pd.Timedelta(seconds=GUARD_AFTER_S), c.end),
            )
            for f in faults.itertuples()
            if c.start <= f.inject_time < c.end
        ]
        at = c.start
        for a, b in sorted(cut):
            if a > at:
                stretches.append((at, a))
            at = max(at, b)
        if at < c.end:
            stretches.append((at, c.end))
    return stretches


def fault_visibility(
    calls: pd.DataFrame,
    faults: pd.DataFrame,
    judged: pd.Series | None = None,
    captures: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per fault of `faults` (all of them define the fault-free time): day, inject_time,
    window_end, real_inject_time (as listed before a replay moved it), service, inject_type, judged,
    visible, percentile, strength, null_p95, null_max, nulls (fault-free windows, overlapping),
    null_tiles (how many windows the fault-free time holds side by side), null_minutes, statistic
    and why.

    calls: the CALL_COLUMNS; faults: inject_time, window_end, service, inject_type (optional day),
    as `load_faults` returns them; judged: which faults the evaluation counts (default all);
    captures: day, start, end of the real captures (default: one per calendar day of the calls)."""
    faults = faults.assign(day=_day_of(faults), judged=True if judged is None else np.asarray(judged, dtype=bool))
    captures = _default_captures(calls) if captures is None else captures
    rows = []
    for day_name, day_faults in faults.groupby("day", sort=False):
        day_captures = captures[captures.day.astype(str) == day_name]
        if day_captures.empty:  # captures of another labelling: all of them
            day_captures = captures
        in_captures = np.zeros(len(calls), dtype=bool)
        for c in day_captures.itertuples():
            in_captures |= ((calls.ts >= c.start) & (calls.ts < c.end)).to_numpy()
        for f in day_faults.itertuples():  # a window outside the captures is judged all the same
            in_captures |= ((calls.ts >= f.inject_time) & (calls.ts < f.window_end)).to_numpy()
        day = Day.of(calls[in_captures])
        pools: dict[str, Pool] = {}
        for _, fault in day_faults.iterrows():
            if fault.service not in pools:
                pools[fault.service] = day.pool(
                    fault.service, fault_free_stretches(day_captures, day_faults, fault.service)
                )
            pool = pools[fault.service]
            rows.append(
                {
                    "day": day_name,
                    "inject_time": fault.inject_time,
                    "window_end": fault.window_end,
                    "real_inject_time": fault.get("real_inject_time", str(fault.inject_time)),
                    "service": fault.service,
                    "inject_type": fault.inject_type,
                    "judged": bool(fault.judged),
                    "visible": False,
                    "percentile": np.nan,
                    "strength": np.nan,
                    "null_p95": np.nan,
                    "null_max": np.nan,
                    "statistic": "",
                }
                | _judge(day, pool, fault)
            )
    return pd.DataFrame(rows)


def chance(visibility: pd.DataFrame) -> pd.Series:
    """Each fault's chance of being called visible with no effect: the 5 % budget, or more where the
    fault-free time holds fewer than 20 windows side by side (the 95th percentile then sits near the
    largest of `null_tiles` independent windows: beaten with chance ~1 / (tiles + 1))."""
    return np.maximum(ALARM_SHARE, 1 / (visibility.null_tiles.fillna(0) + 1))


def ceiling_report(visibility: pd.DataFrame) -> str:
    """A table per fault, the counts per type, and the chance level of 'visible'."""
    if visibility.empty:
        return "ceiling: no fault to judge"
    judged = visibility[visibility.judged]
    by_type = judged.groupby("inject_type").visible.agg(["sum", "count"])
    shown = visibility.assign(
        injected=visibility.real_inject_time,
        percentile=visibility.percentile.round(3),
        strength=visibility.strength.round(1),
        null_p95=visibility.null_p95.round(1),
    )[
        [
            "injected",
            "service",
            "inject_type",
            "judged",
            "visible",
            "percentile",
            "strength",
            "null_p95",
            "null_tiles",
            "null_minutes",
            "why",
        ]
    ]
    thin = visibility[visibility.null_tiles.fillna(0) < 1 / ALARM_SHARE]
    lines = [
        "What the traces hold (label-using ceiling): per fault, the injected service's calls in its window "
        "(calls into it as its callers see them, apart from calls out of it) against fault-free windows of the "
        "same length from the day's real captures; strength = the largest statistic in units of its fault-free "
        "spread; visible = beyond the fault-free windows' 95th percentile:",
        shown.to_string(index=False),
        "",
        f"visible: {int(judged.visible.sum())} / {len(judged)} judged faults "
        f"(by chance ~{chance(judged).sum():.1f})"
        + "".join(f"; {t} {int(r['sum'])} / {int(r['count'])}" for t, r in by_type.iterrows()),
        f"all listed faults in the captures: {int(visibility.visible.sum())} / {len(visibility)} visible "
        f"(by chance ~{chance(visibility).sum():.1f})",
    ]
    if len(thin):
        lines.append(
            f"{len(thin)} faults have fault-free time for fewer than {1 / ALARM_SHARE:.0f} windows side by side "
            "(null_tiles): their 95th percentile is close to the largest fault-free window, and chance is "
            "counted as 1 / (tiles + 1) for them."
        )
    lines.append(
        "A fault that is not visible here changes its service's calls no more than fault-free traffic does: "
        "no trace-based detector can catch it without alarming in more than 5 % of fault-free windows."
    )
    return "\n".join(lines)


def replay_captures(faults_path: Path) -> pd.DataFrame | None:
    """day, start, end (naive UTC, replay time) of the real captures of the replay whose fault list
    this is (`runs.parquet` beside it); None for a fault list without one."""
    runs_path = Path(faults_path).parent / "runs.parquet"
    if not runs_path.is_file():
        return None
    runs = pd.read_parquet(runs_path, columns=["day", "replay_start", "replay_end"])

    def naive(column: pd.Series) -> pd.Series:
        stamps = pd.to_datetime(column)
        return stamps.dt.tz_convert("UTC").dt.tz_localize(None) if stamps.dt.tz is not None else stamps

    return pd.DataFrame({"day": runs.day.astype(str), "start": naive(runs.replay_start), "end": naive(runs.replay_end)})


def _load_calls(con: duckdb.DuckDBPyConnection, captures: pd.DataFrame | None) -> pd.DataFrame:
    """The calls inside the captures (all calls without them): a fill between captures is not read."""
    columns = ", ".join(CALL_COLUMNS)
    if captures is None or captures.empty:
        return con.execute(f"SELECT {columns} FROM calls ORDER BY ts").df()
    where = " OR ".join(["(ts >= ? AND ts < ?)"] * len(captures))
    bounds = [t.to_pydatetime() for c in captures.itertuples() for t in (c.start, c.end)]
    return con.execute(f"SELECT {columns} FROM calls WHERE {where} ORDER BY ts", bounds).df()


def evaluate_ceiling(settings: Settings, faults_path: Path) -> pd.DataFrame:
    """The ceiling for every observable fault of the list (`judged`: those `rpcwatch evaluate
    --faults` counts), from the warehouse's calls in the replay's real captures."""
    listed = load_faults(faults_path)
    faults = listed[listed.observable & listed.inject_time.notna()].reset_index(drop=True)
    captures = replay_captures(faults_path)
    with opened(settings.warehouse, read_only=True) as con:
        start, end = evaluated_range(con)
        calls = _load_calls(con, captures)
    if calls.empty:
        raise ValueError(f"{faults_path}: the warehouse holds no calls in the replay's captures")
    return fault_visibility(calls, faults, (faults.inject_time >= start) & (faults.inject_time < end), captures)
