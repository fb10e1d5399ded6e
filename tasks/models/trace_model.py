"""What a normal trace of one pattern looks like, and how surprising each new trace is.

The per-pattern trace model beside the ST-GCN traffic forecaster (same MLflow run, version and
champion; its artifact `trace_model.json`). After TraceAnomaly / GTrace / TraceVAE:

- **Position.** A call is placed by its RPC and its parent's RPC (`parent > rpc`, roots under
  ""), so the same RPC called from two places keeps two latency profiles.
- **Latency, conditioned on structure, on a log scale.** Per position (and per (shape, position)
  where the shape is common enough) and per feature: client latency `rt`, the callee's own
  `server` latency, the `gap` between them (network and queueing: a delayed link shows only
  there) and `self` time, each judged two-sided against its own history's body and heavy tails
  (`tasks.models.latency_tails`): fail-fast calls that get *faster* count.
- **Structure.** Per position, how often each child position occurs under it (minutes where a
  child was rarest left out), and by Good-Turing how often a never-seen child appears. A call that
  lacks a child that is (nearly) always there, or has one that (nearly) never is, is a structural
  surprise of -log(probability). A trace's structure score is the *max* over its calls, so a
  truncated trace cannot look more normal by having fewer calls (TraceVAE's NLL inversion).
- **Surprising trace.** Its smallest latency tail probability times its number of tests is below
  `trace_p`, or a structural event is less likely than `trace_p`: a fixed setting, not tuned.
- **Calibrated rate.** The share of surprising traces in normal traffic, estimated without labels
  from the training traces cut into windows: windows above the 75th percentile of the per-window
  rate are left out before pooling (add-one smoothed), so unlabelled incidents in the history
  (up to a quarter of the windows) do not inflate it. `tasks.scoring.evidence` tests new windows
  against it. Where most windows hold no surprising trace this leaves out every normal one too and
  the rate reads as the add-one floor: the window test then asks for `MIN_SURPRISING` traces and
  the alarm policy's calibration does the rest (an estimate that keeps them was measured and not
  adopted: README, "Evaluation").
- **Blame.** In a surprising trace, the surprising calls with no surprising call below them are
  where it starts; a slow or fast call whose extra time is mostly one child's passes the blame down
  to it ("follow the time"). Each blamed call names its callee as culprit (a slow callee, a callee
  that stopped calling downstream, a delayed link into it), and a missing child its own callee too;
  a link slow at its caller's end (the link into the caller, or most of its other links, slow as
  well: a network delay or a busy CPU at the caller) names the caller. A trace weighs its surprise
  (-log10 p), shared among its blamed calls by theirs (MicroRank, TraceRCA: rank where the change
  is localized, weighted by how far outside normal it is).

Input rows (one per call, `tasks.patterns.trace_calls.TRACE_CALLS_SQL`): trace_id, call_id,
parent_call_id, node, parent_node, callee, rt_ms, server_rt_ms, self_ms, shape_id, root_ts.
Pure pandas/numpy; no tables.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.keys import edge_key
from tasks.models.latency_tails import LAT_FEATURES, PARAMS, latency_features, tail_p, tails, unshifted

MIN_SUPPORT = 20  # calls a position needs before its latency is modelled
SHAPE_MIN_SUPPORT = 50  # ... and a (shape, position) before it gets a profile of its own
TRIM_QUANTILE = 0.75  # calibration pools the windows up to this quantile of the surprising rate
FIT_WINDOW_S = 60  # the windows the robust fit compares (one minute of history each)
FORMAT_VERSION = 2
TRACE_MODEL_ARTIFACT = "trace_model"  # the artifact (and file stem) in a model version
LN10 = math.log(10)  # structural surprise is in nats; blame weighs -log10 p
FOLLOW_SHARE = 0.5  # blame moves to a child carrying at least this share of its parent's extra time
SIBLING_SHARE = 0.5  # a link is slow at its caller's end when more than this share of the caller's others are
RT, SERVER, GAP = 0, 1, 2  # columns of the extra times (`_extra_ms`), as in LAT_FEATURES


def positions(calls: pd.DataFrame) -> pd.Series:
    codes, names = position_codes(calls)
    return pd.Series(names[codes], index=calls.index)


def position_codes(calls: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per call the code of its position, and the positions by code (an object array of `edge_key`s):
    each distinct (parent node, node) pair is keyed once, not once per call."""
    parent_codes, parents = pd.factorize(calls["parent_node"].fillna("").astype(str), use_na_sentinel=False)
    node_codes, nodes = pd.factorize(calls["node"].astype(str), use_na_sentinel=False)
    width = max(len(nodes), 1)
    codes, pairs = pd.factorize(parent_codes.astype(np.int64) * width + node_codes)
    names = np.empty(len(pairs), dtype=object)
    names[:] = [edge_key(parents[k // width], nodes[k % width]) for k in pairs]
    return codes, names


def window_index(root_ts: pd.Series, window_s: float) -> np.ndarray:
    ms = pd.to_datetime(root_ts).to_numpy().astype("datetime64[ms]").astype("int64")
    return ms // int(window_s * 1e3)


@dataclass
class TraceScores:
    """Per trace: root time, surprise and whether it counts; per blamed call: node, culprit, weight."""

    traces: pd.DataFrame  # trace_id, root_ts, latency_z, structure_s, surprising
    blame: pd.DataFrame  # trace_id, node, culprit, weight, kind


class TraceModel:
    """Fit on a pattern's training traces (no labels); `score` new ones.

    `trace_p`: a trace is surprising when one of its latencies is beyond this two-sided tail
    after a Bonferroni correction over the trace's own tests (so a big trace is not surprising
    just for being big), or one structural event is less likely than this. `rate`: calibrated
    share of surprising traces in normal traffic (`calibrate`)."""

    def __init__(self, trace_p: float = 0.01) -> None:
        self.trace_p = trace_p
        self.stats: dict[str, list[list[float] | None]] = {}  # key -> per feature tail params (or None)
        self.n_pos: dict[str, int] = {}  # position -> calls seen
        self.children: dict[str, dict[str, float]] = {}  # position -> child position -> presence
        self.novel: dict[str, float] = {}  # position -> chance of a child position never seen under it
        self.most: dict[str, dict[str, int]] = {}  # position -> child position -> most calls under one call
        self.rate = 0.0
        self.calibration: dict[str, float] = {}

    @property
    def structure_cut(self) -> float:
        return -math.log(self.trace_p)

    # --- fitting ---------------------------------------------------------------------------------
    def fit(self, calls: pd.DataFrame) -> TraceModel:
        calls = calls.reset_index(drop=True)
        pos = positions(calls)
        feats = latency_features(calls)
        windows = window_index(calls["root_ts"], FIT_WINDOW_S)
        self.n_pos = {str(k): int(v) for k, v in pos.value_counts().items()}
        self.stats = {}
        shape_pos = calls["shape_id"].astype(str) + "#" + pos
        for keys, min_support in ((pos, MIN_SUPPORT), (shape_pos, SHAPE_MIN_SUPPORT)):
            for key, idx in keys.groupby(keys).groups.items():
                if len(idx) >= min_support:
                    idx = np.asarray(idx)
                    self.stats[str(key)] = [
                        self._featuretails(feats[idx, f], windows[idx]) for f in range(len(LAT_FEATURES))
                    ]
        kids = _child_positions(calls, pos)
        self.children = self._presence(kids, pos, windows)
        self.novel = self._novelty(kids)
        self.most = self._most_repeats(kids)
        return self

    @staticmethod
    def _featuretails(values: np.ndarray, windows: np.ndarray) -> list[float] | None:
        have = ~np.isnan(values)
        values, windows = values[have], windows[have]
        if len(values) < MIN_SUPPORT:
            return None
        keep = unshifted(values, windows)
        return tails(values[keep] if keep.sum() >= MIN_SUPPORT else values)

    def _presence(self, kids: pd.DataFrame, pos: pd.Series, windows: np.ndarray) -> dict[str, dict[str, float]]:
        """Per parent position: the add-half smoothed share of its calls that have each child
        position, over the windows where that share is not in its lowest quarter (a fault that
        cut calls off in the history is left out)."""
        kids = kids.drop_duplicates(["parent_row", "child_pos"])
        parents = pd.DataFrame({"parent_pos": pos.to_numpy(), "w": windows})
        totals = parents.groupby(["parent_pos", "w"]).size().rename("total")
        kids["w"] = windows[kids["parent_row"].to_numpy()] if len(kids) else []
        present = kids.groupby(["parent_pos", "child_pos", "w"]).size().rename("present").reset_index()
        out: dict[str, dict[str, float]] = {}
        for parent, part in present.groupby("parent_pos"):
            tot = totals.loc[parent]
            for child, rows in part.groupby("child_pos"):
                share = rows.set_index("w")["present"].reindex(tot.index, fill_value=0) / tot
                kept = share >= share.quantile(1 - TRIM_QUANTILE)
                n_present = rows.set_index("w")["present"].reindex(tot.index, fill_value=0)[kept].sum()
                out.setdefault(str(parent), {})[str(child)] = float((n_present + 0.5) / (tot[kept].sum() + 1))
        return out

    @staticmethod
    def _most_repeats(kids: pd.DataFrame) -> dict[str, dict[str, int]]:
        """Per parent position and child position: the most calls of the child under one call (fan-out)."""
        repeats = kids.groupby(["parent_row", "parent_pos", "child_pos"]).size()
        most = repeats.groupby(level=["parent_pos", "child_pos"]).max()
        out: dict[str, dict[str, int]] = {}
        for (parent, child), n in most.items():
            out.setdefault(str(parent), {})[str(child)] = int(n)
        return out

    def _novelty(self, kids: pd.DataFrame) -> dict[str, float]:
        """Per parent position: the chance that a call has a child position never seen under it,
        by Good-Turing (child positions seen under one call only, over its calls; half a call when
        none): a parent whose children vary is not surprising for one more variation."""
        kids = kids.drop_duplicates(["parent_row", "child_pos"])
        seen = kids.groupby(["parent_pos", "child_pos"]).size()
        once = seen[seen == 1].groupby(level="parent_pos").size()
        return {p: float(max(once.get(p, 0), 0.5) / (n + 1)) for p, n in self.n_pos.items()}

    def calibrate(self, calls: pd.DataFrame, window_s: float) -> TraceModel:
        """The normal share of surprising traces, robust to unlabelled incidents in the history."""
        traces = self.score(calls).traces
        if not len(traces):
            self.rate, self.calibration = 0.5, {"traces": 0}
            return self
        per = traces.groupby(window_index(traces["root_ts"], window_s))["surprising"].agg(["sum", "count"])
        share = per["sum"] / per["count"]
        kept = per[share <= share.quantile(TRIM_QUANTILE, interpolation="lower")]
        self.rate = float((kept["sum"].sum() + 1) / (kept["count"].sum() + 2))
        self.calibration = {
            "traces": int(len(traces)),
            "windows": int(len(per)),
            "windows_kept": int(len(kept)),
            "raw_rate": float(traces["surprising"].mean()),
            "rate": self.rate,
        }
        return self

    # --- scoring ---------------------------------------------------------------------------------
    def score(self, calls: pd.DataFrame) -> TraceScores:
        """Surprise of every trace in `calls` and the calls blamed in the surprising ones."""
        calls = calls.reset_index(drop=True)
        if not len(calls):
            return TraceScores(_empty_traces(), _empty_blame())
        pos_codes, pos_names = position_codes(calls)
        parent_row = _parent_rows(calls)
        params = self._params(calls, pos_codes, pos_names)
        feats = latency_features(calls)
        p_call, feature, tests = self._latency_p(feats, params)
        structure, missing = self._structure(pos_codes, pos_names, parent_row)
        extra = _extra_ms(feats, params)
        frame = pd.DataFrame(
            {"trace_id": calls["trace_id"], "root_ts": calls["root_ts"], "p": p_call, "t": tests, "s": structure}
        )
        per_trace = frame.groupby("trace_id", sort=False)
        traces = per_trace.agg(
            root_ts=("root_ts", "first"), p_min=("p", "min"), tests=("t", "sum"), structure_s=("s", "max")
        )
        traces["latency_p"] = np.minimum(traces["p_min"] * np.maximum(traces["tests"], 1), 1.0)
        traces["surprising"] = (traces["latency_p"] < self.trace_p) | (traces["structure_s"] >= self.structure_cut)
        # a call counts for blame when it alone would make its trace surprising
        tests_of_trace = per_trace["t"].transform("sum").to_numpy()
        lat_p = p_call * np.maximum(tests_of_trace, 1)
        lat_hit = lat_p < self.trace_p
        struct_hit = structure >= self.structure_cut
        surprise = np.maximum(
            np.where(lat_hit, -np.log10(np.clip(lat_p, 1e-300, 1.0)), 0.0), np.where(struct_hit, structure / LN10, 0.0)
        )
        blame = _blame(calls, lat_hit | struct_hit, lat_hit, feature, missing, extra, parent_row, surprise)
        out = traces.reset_index()[["trace_id", "root_ts", "latency_p", "structure_s", "surprising"]]
        return TraceScores(out, blame)

    def _params(self, calls: pd.DataFrame, pos_codes: np.ndarray, pos_names: np.ndarray) -> np.ndarray:
        """[calls, features, PARAMS]: each call's tail parameters (its shape's profile where there
        is one, else its position's); NaN where unmodelled. Keyed once per distinct (shape, position)."""
        shape_codes, shapes = pd.factorize(calls["shape_id"], use_na_sentinel=False)
        shape_names = pd.Series(shapes, dtype=calls["shape_id"].dtype).astype(str).to_numpy(dtype=object)
        width = max(len(pos_names), 1)
        pair_codes, pairs = pd.factorize(shape_codes.astype(np.int64) * width + pos_codes)
        keys = []
        for k in pairs:
            shape, pos = shape_names[k // width], pos_names[k % width]
            shape_pos = shape + "#" + pos if isinstance(shape, str) else None  # a missing shape: none
            keys.append(shape_pos if shape_pos in self.stats else pos)
        uniq = {k: i for i, k in enumerate(dict.fromkeys(keys))}
        table = np.full((len(uniq), len(LAT_FEATURES), PARAMS), np.nan)
        for k, i in uniq.items():
            for f, params in enumerate(self.stats.get(k) or []):
                if params is not None:
                    table[i, f] = params
        return table[np.asarray([uniq[k] for k in keys], dtype=int)[pair_codes]]

    def _latency_p(self, feats: np.ndarray, params: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per call (its `latency_features`): the smallest two-sided tail probability over its
        features (1 where unmodelled), which feature, and how many features were tested."""
        p = tail_p(feats, params)
        tested = ~np.isnan(p)
        p = np.where(tested, p, 1.0)
        return p.min(axis=1), p.argmin(axis=1), tested.sum(axis=1)

    def _structure(
        self, pos_codes: np.ndarray, pos_names: np.ndarray, parent_row: np.ndarray
    ) -> tuple[np.ndarray, pd.DataFrame]:
        """Per call: -log P of its most surprising child event (a missing usual child, an unusual one
        present, more calls of a child than ever seen under one call); and the missing children
        (row, child position, surprise). The model is looked up once per distinct (parent position,
        child position) pair; the calls are handled as arrays."""
        out = np.zeros(len(pos_codes))
        width = max(len(pos_names), 1)
        rows = np.flatnonzero(parent_row >= 0)  # the calls with a parent in their trace
        parents = parent_row[rows]
        pair_codes, pairs = pd.factorize(pos_codes[parents].astype(np.int64) * width + pos_codes[rows])
        # unusual children: a child position rarely (or never) seen under this parent
        unusual = np.full(len(pairs), -np.inf)
        most = np.full(len(pairs), -1, dtype=np.int64)  # -1: no fan-out known for the pair
        for i, k in enumerate(pairs):
            parent, child = pos_names[k // width], pos_names[k % width]
            seen = self.n_pos.get(parent)
            if seen is not None:  # else the parent itself is unknown: its own parent reports it
                q = self.children.get(parent, {}).get(child, self.novel.get(parent, 0.5 / (seen + 1)))
                unusual[i] = -math.log(q)
            most_calls = self.most.get(parent, {}).get(child)
            if most_calls is not None:
                most[i] = most_calls
        out[rows] = np.maximum(out[rows], unusual[pair_codes])
        # amplification: more calls of a child under one call than ever seen (one e-fold per doubling)
        groups, counts = np.unique(parents.astype(np.int64) * max(len(pairs), 1) + pair_codes, return_counts=True)
        group_rows, group_pairs = groups // max(len(pairs), 1), groups % max(len(pairs), 1)
        over = (most[group_pairs] >= 0) & (counts > most[group_pairs])
        for row, pair, n in zip(group_rows[over], group_pairs[over], counts[over]):
            parent = pos_names[pairs[pair] // width]
            s = math.log(self.n_pos[parent] + 1) + math.log(int(n) / int(most[pair]))
            out[row] = max(out[row], s)
        missing = self._missing(pos_codes, pos_names, rows, parents, out)
        return out, missing

    def _missing(
        self, pos_codes: np.ndarray, pos_names: np.ndarray, rows: np.ndarray, parents: np.ndarray, out: np.ndarray
    ) -> pd.DataFrame:
        """The usual children (present with probability above 1 - trace_p) each call lacks, by row
        and then in the model's order; raises `out` to their surprise."""
        width = max(len(pos_names), 1)
        code_of = {name: i for i, name in enumerate(pos_names)}
        want_child: list[str] = []  # per parent position in turn: its usual children, in the model's order
        want_code: list[int] = []
        want_s: list[float] = []
        start, count = np.zeros(width, dtype=int), np.zeros(width, dtype=int)
        for u, parent in enumerate(pos_names):
            start[u] = len(want_child)
            for child, q in self.children.get(parent, {}).items():
                if q > 1 - self.trace_p:
                    want_child.append(child)
                    want_code.append(code_of.get(child, -1))
                    want_s.append(-math.log(1 - q))
            count[u] = len(want_child) - start[u]
        per_row = count[pos_codes]
        total = int(per_row.sum())
        if not total:
            return pd.DataFrame([], columns=["row", "child_pos", "surprise"])
        row = np.repeat(np.arange(len(pos_codes)), per_row)
        first = np.cumsum(per_row) - per_row
        want = np.repeat(start[pos_codes], per_row) + np.arange(total) - np.repeat(first, per_row)
        codes = np.asarray(want_code, dtype=np.int64)[want]
        present_keys = np.sort(parents.astype(np.int64) * width + pos_codes[rows])
        keys = row.astype(np.int64) * width + codes
        present = np.zeros(total, dtype=bool)
        if len(present_keys):
            at = np.minimum(np.searchsorted(present_keys, keys), len(present_keys) - 1)
            present = (codes >= 0) & (present_keys[at] == keys)
        row, want = row[~present], want[~present]
        surprise = np.asarray(want_s, dtype=float)[want]
        np.maximum.at(out, row, surprise)
        if not len(row):
            return pd.DataFrame([], columns=["row", "child_pos", "surprise"])
        return pd.DataFrame({"row": row, "child_pos": np.asarray(want_child, dtype=object)[want], "surprise": surprise})

    # --- persistence -----------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "trace_p": self.trace_p,
            "rate": self.rate,
            "calibration": self.calibration,
            "n_pos": self.n_pos,
            "children": self.children,
            "novel": self.novel,
            "most": self.most,
            "stats": self.stats,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TraceModel:
        if d.get("format") != FORMAT_VERSION:
            raise ValueError(f"trace model format {d.get('format')!r}, expected {FORMAT_VERSION}")
        model = cls(float(d["trace_p"]))
        model.rate, model.calibration = float(d["rate"]), dict(d["calibration"])
        model.n_pos, model.children, model.stats = dict(d["n_pos"]), dict(d["children"]), dict(d["stats"])
        model.novel, model.most = dict(d["novel"]), dict(d["most"])
        return model

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(self.to_json()))
        return path

    @classmethod
    def load(cls, path: Path) -> TraceModel:
        return cls.from_json(json.loads(path.read_text()))


def _child_positions(calls: pd.DataFrame, pos: pd.Series) -> pd.DataFrame:
    """Each call that has a parent in its trace: its row, its position, the parent's row and position."""
    parent_row = _parent_rows(calls)
    rows = np.flatnonzero(parent_row >= 0)
    parents, positions_ = parent_row[rows], pos.to_numpy()
    return pd.DataFrame(
        {"row": rows, "child_pos": positions_[rows], "parent_row": parents, "parent_pos": positions_[parents]}
    )


def _extra_ms(feats: np.ndarray, params: np.ndarray) -> np.ndarray:
    """[calls, (rt, server, gap)]: from the calls' `latency_features`, how much longer than its
    median each call's client latency, its callee's own (server) latency and the link between them
    (gap) took, ms (0 where unmodelled)."""
    return np.nan_to_num(np.expm1(feats[:, :3]) - np.expm1(params[:, :3, 1]))


def _blame(
    calls: pd.DataFrame,
    hit: np.ndarray,
    lat_hit: np.ndarray,
    feature: np.ndarray,
    missing: pd.DataFrame,
    extra: np.ndarray,
    parent_row: np.ndarray,
    surprise: np.ndarray,
) -> pd.DataFrame:
    """The surprising calls with no surprising call below them, each trace's weight (its surprise,
    -log10 p of its most surprising call) shared among them in proportion to their own surprise:
    a trace far outside normal outweighs several barely surprising ones. A slow (or fast) call
    whose time is mostly one child's extra time passes the blame down to it ("follow the time": a
    delayed link or a busy callee below a call that looks normal on its own). Each blamed call
    names its callee as culprit (and a missing child's callee beside it), except a link slow at
    its caller's end, which names the caller (`_link_end`)."""
    below = np.zeros(len(calls), dtype=bool)  # has a surprising descendant
    frontier = np.flatnonzero(hit)
    for _ in range(256):
        frontier = parent_row[frontier]
        frontier = frontier[(frontier >= 0) & ~below[frontier]]
        if not len(frontier):
            break
        below[frontier] = True
    start = np.flatnonzero(hit & ~below)
    rows = np.where(lat_hit[start], _follow_time(parent_row, extra[:, RT], start), start)
    followed = rows != start
    kind = np.where(followed, "time", np.where(lat_hit[start], np.asarray(LAT_FEATURES)[feature[start]], "structure"))
    upstream = lat_hit[start] & _link_end(calls, extra, parent_row, rows)
    culprit = _take(calls, "callee", rows)
    culprit[upstream] = _take(calls, "callee", parent_row[rows[upstream]])
    kind = np.where(upstream, "link", kind)
    out = pd.DataFrame(
        {
            "trace_id": _take(calls, "trace_id", rows),
            "node": _take(calls, "node", rows),
            "culprit": culprit,
            "kind": kind,
            "surprise": surprise[start],
        }
    )
    gone = missing[missing["row"].isin(start)]
    if len(gone):  # the call that vanished: its callee is the other suspect
        extra_rows = pd.DataFrame(
            {
                "trace_id": _take(calls, "trace_id", gone["row"].to_numpy()),
                "node": _take(calls, "node", gone["row"].to_numpy()),
                "culprit": [split_callee(c) for c in gone["child_pos"]],
                "kind": "missing",
                "surprise": surprise[gone["row"].to_numpy()],
            }
        )
        out = pd.concat([out, extra_rows], ignore_index=True)
    out = out.drop_duplicates(["trace_id", "node", "culprit"])
    per_trace = out.groupby("trace_id")["surprise"]
    out["weight"] = per_trace.transform("max") * out["surprise"] / per_trace.transform("sum")
    return out.drop(columns="surprise")


def _link_end(calls: pd.DataFrame, extra: np.ndarray, parent_row: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Which blamed calls X->Y are slow at X's end rather than Y's: slow in the link (its extra gap
    above Y's own extra time), while X's other links are slow too. A network delay on X's pod holds
    X's replies and its requests alike; a busy X is slow to send and to read. So either the link
    into X (its entry call, above X's internal spans) carries at least FOLLOW_SHARE of this call's
    extra gap, or most of X's calls to other services in the trace do. A delay at Y's end leaves
    X's other links alone: Y stays the culprit."""
    gap = extra[rows, GAP]
    link = (gap > 0) & (gap > extra[rows, SERVER]) & (parent_row[rows] >= 0)
    out = np.zeros(len(rows), dtype=bool)
    if not link.any():
        return out
    callee = calls["callee"].to_numpy(dtype=object)
    caller = np.full(len(callee), None, dtype=object)  # the service making each call (None at roots)
    caller[parent_row >= 0] = callee[parent_row[parent_row >= 0]]
    slow = rows[link]
    entry = _entry_calls(callee, caller, parent_row, parent_row[slow])
    upstream = extra[entry, GAP] >= FOLLOW_SHARE * gap[link]
    out[np.flatnonzero(link)] = upstream | _siblings_slow(calls["trace_id"].to_numpy(), callee, caller, extra, slow)
    return out


def _entry_calls(callee: np.ndarray, caller: np.ndarray, parent_row: np.ndarray, at: np.ndarray) -> np.ndarray:
    """For each call `at` into a service X, the call that entered X above it (climbing X's internal
    spans to the call from another service, or to the root)."""
    cur = at.copy()
    for _ in range(256):
        up = (caller[cur] == callee[cur]) & (parent_row[cur] >= 0)
        if not up.any():
            break
        cur = np.where(up, parent_row[cur], cur)
    return cur


def _siblings_slow(
    trace: np.ndarray, callee: np.ndarray, caller: np.ndarray, extra: np.ndarray, slow: np.ndarray
) -> np.ndarray:
    """For each slow link X->Y (row in `slow`): X makes calls to other services in the same trace,
    and more than SIBLING_SHARE of them carry at least FOLLOW_SHARE of this link's extra gap."""
    mine = pd.DataFrame({"i": np.arange(len(slow)), "trace": trace[slow], "caller": caller[slow], "y": callee[slow]})
    mine["gap"] = extra[slow, GAP]
    outgoing = np.flatnonzero((caller != callee) & pd.Series(trace).isin(mine["trace"].unique()).to_numpy())
    others = pd.DataFrame({"trace": trace[outgoing], "caller": caller[outgoing], "z": callee[outgoing]})
    others["z_gap"] = extra[outgoing, GAP]
    pairs = mine.merge(others, on=["trace", "caller"])
    pairs = pairs[pairs["z"] != pairs["y"]]
    share = (pairs["z_gap"] >= FOLLOW_SHARE * pairs["gap"]).groupby(pairs["i"]).mean()
    out = np.zeros(len(slow), dtype=bool)
    out[share.index[share > SIBLING_SHARE].to_numpy()] = True
    return out


def _take(calls: pd.DataFrame, column: str, rows: np.ndarray) -> np.ndarray:
    """`calls[column].to_numpy()[rows]`, converting only those rows."""
    return calls[column].iloc[rows].to_numpy()


def _follow_time(parent_row: np.ndarray, extra: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """From each row, down through the child with the largest extra time of the same sign while it
    carries at least FOLLOW_SHARE of its parent's."""
    kids = np.flatnonzero(parent_row >= 0)
    frame = pd.DataFrame({"kid": kids, "parent": parent_row[kids], "extra": extra[kids]})
    slowest = frame.loc[frame.groupby("parent")["extra"].idxmax()].set_index("parent")["kid"]
    fastest = frame.loc[frame.groupby("parent")["extra"].idxmin()].set_index("parent")["kid"]
    up, down = np.full(len(extra), -1), np.full(len(extra), -1)
    up[slowest.index.to_numpy()], down[fastest.index.to_numpy()] = slowest.to_numpy(), fastest.to_numpy()
    cur = rows.copy()
    for _ in range(256):
        nxt = np.where(extra[cur] > 0, up[cur], down[cur])
        ok = (nxt >= 0) & (extra[cur] != 0)
        ok[ok] = extra[nxt[ok]] * np.sign(extra[cur[ok]]) >= FOLLOW_SHARE * np.abs(extra[cur[ok]])
        if not ok.any():
            break
        cur = np.where(ok, nxt, cur)
    return cur


def split_callee(position: str) -> str:
    from tasks.keys import split_edge_key, split_node_key

    return split_node_key(split_edge_key(position)[1]).callee


def _parent_rows(calls: pd.DataFrame) -> np.ndarray:
    """Per call: the row of its parent call in the same trace, -1 where there is none (the last call
    with that trace_id and call_id where there are several; a parent_call_id that is not a text is
    no parent)."""
    n = len(calls)
    parent_ids = calls["parent_call_id"]
    if isinstance(parent_ids.dtype, pd.StringDtype):
        has_parent = parent_ids.notna().to_numpy()
    elif parent_ids.dtype == object:
        has_parent = np.fromiter((isinstance(p, str) for p in parent_ids.to_numpy()), dtype=bool, count=n)
    else:
        has_parent = np.zeros(n, dtype=bool)
    trace_codes, _ = pd.factorize(calls["trace_id"], use_na_sentinel=False)
    id_codes, ids = pd.factorize(pd.concat([calls["call_id"], parent_ids], ignore_index=True))
    call_codes, parent_codes = id_codes[:n], id_codes[n:]
    width = len(ids) + 1
    known = np.flatnonzero(call_codes >= 0)
    call_keys = trace_codes[known].astype(np.int64) * width + call_codes[known]
    order = np.argsort(call_keys, kind="stable")
    sorted_keys = call_keys[order]
    out = np.full(n, -1, dtype=int)
    asking = np.flatnonzero(has_parent & (parent_codes >= 0))
    if not len(asking) or not len(sorted_keys):
        return out
    keys = trace_codes[asking].astype(np.int64) * width + parent_codes[asking]
    at = np.searchsorted(sorted_keys, keys, side="right") - 1  # the last call with that key
    found = (at >= 0) & (sorted_keys[np.maximum(at, 0)] == keys)
    out[asking[found]] = known[order[at[found]]]
    return out


def _empty_traces() -> pd.DataFrame:
    return pd.DataFrame(columns=["trace_id", "root_ts", "latency_z", "structure_s", "surprising"])


def _empty_blame() -> pd.DataFrame:
    return pd.DataFrame(columns=["trace_id", "node", "culprit", "kind", "weight"])
