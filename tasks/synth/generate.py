"""Synthetic microservice call traces with ground truth, in the Alibaba v2022 CallGraph layout.

`generate(start, hours, out, ...)` simulates a ~40-service shop (plus cache/db/mq leaf services)
that serves 12-24 request types ("templates", how many is drawn from the seed). Each template
is a fixed call tree; every trace of a type is that tree minus the optional subtrees it skipped.
Traffic per type follows a Zipf-like base rate x a daily curve x Poisson noise per second,
scaled so that an hour holds about `spans_per_hour` spans on average over the day.

Everything is deterministic for a seed. An hour's normal traffic depends only on (seed,
spans_per_hour, absolute hour), not on `start`/`hours` or on whether anomalies are on.

Output under `out`:

- `dt=YYYY-MM-DD/hour=HH/part-<YYYYMMDDHH of the generated hour>.parquet` — spans, partitioned
  by the hour of each span's own timestamp. A trace that starts just before an hour boundary
  can have spans after it: these go into the next hour's folder, in a file named after the
  generated hour (the "spill"). The spill after the last generated hour has its own small
  partition, one hour past the generated range.
- `truth/trace_templates.parquet` — `traceid`, `request_type` for every generated trace.
- `labels.parquet` — one row per injected event (empty when anomalies are off).
- `manifest.json` — parameters, rows per partition hour, the templates and the file list.

Columns of the span files (in this order): timestamp (int64 ms since the epoch), traceid,
service (the trace's entry service), rpc_id, rpctype, um, uminstanceid, interface, dm,
dminstanceid, rt (float64 ms), error (int8 0/1, an extension to the Alibaba layout).

Rows are trace-major: traces ordered by start time, each trace's spans in preorder (parent
before children). A child starts at its parent's start plus part of the parent's own time and
ends before the parent ends (rt = own time + slowest child); its `uminstanceid` is the parent's
`dminstanceid`. The root call is `USER -> entry service`, rpc_id `0.1`, uminstanceid `USER`.

Injected events (anomalies=True), after a warm-up of half the hours (at least 2 h), in
non-overlapping windows on minute boundaries: `drift` first (a request type's rate ramps up by
50-100% over >= 3 h and stays; needs >= 8 h), then `traffic_spike`, `traffic_drop`, `latency`,
`novel_rpc` and `amplification` (5-20 min each), about one event per 1.5 h. Every trace,
anomalous or not, keeps a valid tree (each rpc_id's parent is in the trace).

The generation is vectorised: per chunk of an hour and per template, numpy draws per-second
Poisson counts, the presence of optional subtrees and the per-span values; loops run over
template nodes only. A writer thread writes Parquet while the next chunk is generated.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = [
    "COLUMNS",
    "EVENT_KINDS",
    "LABEL_SCHEMA",
    "SPAN_SCHEMA",
    "TRUTH_SCHEMA",
    "SynthSummary",
    "day_factor",
    "generate",
]

USER = "USER"
HOUR_MS = 3_600_000
MAX_DEPTH = 6  # root call USER -> entry is depth 1

COLUMNS = (
    "timestamp",
    "traceid",
    "service",
    "rpc_id",
    "rpctype",
    "um",
    "uminstanceid",
    "interface",
    "dm",
    "dminstanceid",
    "rt",
    "error",
)
SPAN_SCHEMA = pa.schema(
    [
        ("timestamp", pa.int64()),
        ("traceid", pa.string()),
        ("service", pa.string()),
        ("rpc_id", pa.string()),
        ("rpctype", pa.string()),
        ("um", pa.string()),
        ("uminstanceid", pa.string()),
        ("interface", pa.string()),
        ("dm", pa.string()),
        ("dminstanceid", pa.string()),
        ("rt", pa.float64()),
        ("error", pa.int8()),
    ]
)
TRUTH_SCHEMA = pa.schema([("traceid", pa.string()), ("request_type", pa.string())])
LABEL_SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("kind", pa.string()),
        ("start", pa.timestamp("ms", tz="UTC")),
        ("end", pa.timestamp("ms", tz="UTC")),
        ("request_type", pa.string()),
        ("rpcs", pa.list_(pa.string())),
        ("note", pa.string()),
    ]
)
SHORT_KINDS = ("traffic_spike", "traffic_drop", "latency", "novel_rpc", "amplification")
EVENT_KINDS = SHORT_KINDS + ("drift",)

_DICT_COLUMNS_NO_TRACE = [c for c in COLUMNS if SPAN_SCHEMA.field(c).type == pa.string() and c != "traceid"]

# --------------------------------------------------------------------------------------------
# the simulated system
# --------------------------------------------------------------------------------------------

_ENTRIES = ("svc-frontend", "svc-gateway", "svc-mobile-bff")
_TIER1 = (
    "svc-cart", "svc-order", "svc-catalog", "svc-search", "svc-user", "svc-checkout",
    "svc-payment", "svc-review", "svc-recommend", "svc-shipping", "svc-account", "svc-media",
    "svc-feed", "svc-message", "svc-wishlist", "svc-loyalty",
)  # fmt: skip
_TIER2 = (
    "svc-inventory", "svc-pricing", "svc-promo", "svc-fraud", "svc-billing", "svc-invoice",
    "svc-tax", "svc-currency", "svc-ads", "svc-profile", "svc-session", "svc-image",
    "svc-social", "svc-analytics", "svc-risk",
)  # fmt: skip
_TIER3 = (
    "svc-auth", "svc-config", "svc-notify", "svc-email", "svc-sms", "svc-geo", "svc-audit",
    "svc-idgen",
)  # fmt: skip
_CACHES = ("redis-1", "redis-2", "redis-session", "memcached-1")
_DBS = (
    "mysql-orders", "mysql-users", "mysql-catalog", "mysql-payments", "postgres-billing",
    "mongo-media", "es-search",
)  # fmt: skip
_MQS = ("kafka", "rabbitmq")
_STORE_KIND = {**dict.fromkeys(_CACHES, "mc"), **dict.fromkeys(_DBS, "db"), **dict.fromkeys(_MQS, "mq")}

# request types: (noun, main service, verbs); request_type = "<noun>.<verb>"
_REQUESTS = (
    ("cart", "svc-cart", ("add", "view", "remove", "clear")),
    ("order", "svc-order", ("place", "track", "cancel", "history")),
    ("product", "svc-catalog", ("detail", "browse", "compare")),
    ("search", "svc-search", ("query", "suggest")),
    ("user", "svc-user", ("login", "logout", "register")),
    ("checkout", "svc-checkout", ("start", "confirm")),
    ("payment", "svc-payment", ("pay", "refund")),
    ("review", "svc-review", ("post", "read")),
    ("recommend", "svc-recommend", ("home", "similar")),
    ("shipping", "svc-shipping", ("quote", "schedule")),
    ("account", "svc-account", ("settings", "close")),
    ("media", "svc-media", ("upload", "stream")),
    ("feed", "svc-feed", ("timeline", "refresh")),
    ("message", "svc-message", ("send", "inbox")),
    ("wishlist", "svc-wishlist", ("save", "share")),
    ("loyalty", "svc-loyalty", ("points", "redeem")),
)
# interior interfaces are "<pool verb><Service noun>"; disjoint from the request verbs so that
# each template's "<verb><Noun>" call is unique to it
_POOL_VERBS = (
    "get", "list", "batchGet", "check", "validate", "compute", "lookup", "fetch", "resolve",
    "count", "sync", "load", "reserve", "apply", "score",
)  # fmt: skip
_NOVEL_INTERFACES = ("exportAll", "dumpTable", "adminQuery", "bulkDownload", "debugExec")
_SENSITIVE = (
    "mysql-users", "mysql-payments", "svc-payment", "svc-account", "postgres-billing", "svc-auth",
    "mysql-orders", "svc-billing", "redis-session",
)  # fmt: skip
_SHARED_ROOT_CALLS = (("svc-auth", "verifyToken", "rpc"), ("redis-session", "get_session", "mc"))

assert not {v for _, _, vs in _REQUESTS for v in vs} & set(_POOL_VERBS)


def _noun(service: str) -> str:
    """'svc-mobile-bff' -> 'MobileBff'."""
    return "".join(p.capitalize() for p in service.removeprefix("svc-").split("-"))


@dataclass(frozen=True)
class _Node:
    rpc_id: str
    parent: int  # index in the template's node list (preorder); -1 for the root
    caller: str
    callee: str
    interface: str
    rpctype: str
    optional: bool
    p: float  # presence probability given the parent is present
    median_ms: float  # median self time (excluding the wait for children)
    sigma: float
    err: float
    origin: int  # index of the node in the base template this node copies (variants)

    @property
    def key(self) -> str:
        return f"{self.caller}:{self.callee}:{self.interface}"


@dataclass(frozen=True)
class _Template:
    request_type: str
    entry: str
    nodes: tuple[_Node, ...]
    base_rate: float = 0.0  # traces per second, before the day curve

    @property
    def keys(self) -> set[str]:
        return {n.key for n in self.nodes}

    def expected_spans(self) -> float:
        return _expected_spans(self.nodes)


@dataclass(frozen=True)
class _System:
    apps: tuple[str, ...]
    neighbors: dict[str, tuple[str, ...]]  # app -> downstream apps it may call
    stores: dict[str, tuple[str, ...]]  # app -> stores it uses
    interfaces: dict[str, tuple[str, ...]]  # app -> its interfaces
    pods: dict[str, int]  # service -> number of pods
    protocol: dict[str, str]  # app -> how it is called: "rpc" or "http"


def _build_system(rng: np.random.Generator) -> _System:
    tiers = [_ENTRIES, _TIER1, _TIER2, _TIER3]
    apps = tuple(s for t in tiers for s in t)
    neighbors: dict[str, tuple[str, ...]] = {}
    stores: dict[str, tuple[str, ...]] = {}
    interfaces: dict[str, tuple[str, ...]] = {}
    for ti, tier in enumerate(tiers):
        for si, svc in enumerate(tier):
            if ti == 0:
                cand: list[str] = []  # entries: their calls are chosen per template
            else:
                cand = [s for t in tiers[ti + 1 :] for s in t]
                if ti in (1, 2):
                    cand += list(tier[si + 1 :])  # same tier, later name: keeps it acyclic
            k = min(len(cand), int(rng.integers(3, 7)))
            neighbors[svc] = tuple(sorted(rng.choice(cand, k, replace=False))) if k else ()
            own: list[str] = []
            if ti == 0:
                own.append("redis-session")
            else:
                if rng.random() < 0.75:
                    own.append(str(rng.choice(_CACHES)))
                own += list(rng.choice(_DBS, int(rng.integers(0, 3)), replace=False))
                if rng.random() < 0.3:
                    own.append(str(rng.choice(_MQS)))
            stores[svc] = tuple(sorted(set(own)))
            verbs = rng.choice(_POOL_VERBS, int(rng.integers(3, 6)), replace=False)
            interfaces[svc] = tuple(sorted(f"{v}{_noun(svc)}" for v in verbs))
    pods = {s: int(rng.integers(2, 11)) for s in apps}
    pods.update({s: int(rng.integers(1, 4)) for s in _STORE_KIND})
    protocol = {s: ("http" if rng.random() < 0.2 else "rpc") for s in apps}
    return _System(apps, neighbors, stores, interfaces, pods, protocol)


def _store_interface(rng: np.random.Generator, caller: str, store: str) -> str:
    res = _noun(caller).lower()
    kind = _STORE_KIND[store]
    if kind == "mc":
        return f"{rng.choice(('get', 'set', 'mget'))}_{res}"
    if kind == "db":
        return f"{rng.choice(('select', 'insert', 'update'))}_{res}"
    return f"publish_{res}"


def _latency(rng: np.random.Generator, rpctype: str) -> tuple[float, float]:
    lo, hi = {"mc": (0.3, 1.5), "db": (1.5, 12.0), "mq": (0.5, 3.0)}.get(rpctype, (1.0, 15.0))
    return float(rng.uniform(lo, hi)), float(rng.uniform(0.25, 0.6))


def _make_node(rng, rpc_id, parent, caller, callee, interface, rpctype, optional, origin=-1):
    med, sig = _latency(rng, rpctype)
    p = float(rng.uniform(0.3, 0.9)) if optional else 1.0
    return _Node(
        rpc_id, parent, caller, callee, interface, rpctype, optional, round(p, 3),
        round(med, 3), round(sig, 3), round(float(rng.uniform(0.001, 0.01)), 4), origin,
    )  # fmt: skip


def _build_template(rng: np.random.Generator, sysm: _System, noun: str, main: str, verb: str):
    """One request type's call tree, nodes in preorder with Alibaba rpc ids."""
    entry = str(rng.choice(_ENTRIES))
    budget = int(rng.integers(8, 36))
    # tree as nested specs: [caller, callee, interface, rpctype, optional, children]
    root = [USER, entry, f"/api/v1/{noun}/{verb}", "http", False, []]
    first = [entry, main, f"{verb}{noun.capitalize()}", sysm.protocol[main], False, []]
    root[5].append(first)
    count = 2
    for callee, iface, rtype in _SHARED_ROOT_CALLS:
        if rng.random() < 0.6:
            root[5].append([entry, callee, iface, rtype, bool(rng.random() < 0.3), []])
            count += 1
    # breadth-first expansion below the main service, within the node budget
    queue = [(first, 2)]
    while queue and count < budget:
        spec, depth = queue.pop(0)
        svc = spec[1]
        if svc in _STORE_KIND or depth >= MAX_DEPTH:
            continue
        options = [("app", s) for s in sysm.neighbors[svc]] + [("store", s) for s in sysm.stores[svc]]
        if not options:
            continue
        k = 1 + int(rng.binomial(3, max(0.15, 0.65 - 0.1 * depth)))
        if spec is first:
            k = max(k, 2)
        k = min(k, len(options), budget - count)
        for o in rng.choice(len(options), k, replace=False):
            what, callee = options[int(o)]
            if what == "app":
                iface = str(rng.choice(sysm.interfaces[callee]))
                child = [svc, callee, iface, sysm.protocol[callee]]
            else:
                child = [svc, callee, _store_interface(rng, svc, callee), _STORE_KIND[callee]]
            child += [bool(rng.random() < 0.3), []]
            spec[5].append(child)
            count += 1
            queue.append((child, depth + 1))
    nodes: list[_Node] = []

    def walk(spec, rpc_id, parent):
        j = len(nodes)
        nodes.append(_make_node(rng, rpc_id, parent, *spec[:5]))
        for i, ch in enumerate(spec[5], start=1):
            walk(ch, f"{rpc_id}.{i}", j)

    walk(root, "0.1", -1)
    nodes = [replace(n, origin=j) for j, n in enumerate(nodes)]
    return _Template(f"{noun}.{verb}", entry, tuple(nodes))


def _build_templates(seed: int) -> tuple[_System, list[_Template]]:
    rng = np.random.default_rng([seed, 0x7E4D])
    sysm = _build_system(rng)
    catalog = [(noun, main, verb) for noun, main, verbs in _REQUESTS for verb in verbs]
    n_types = int(rng.integers(12, 25))
    chosen = [catalog[int(i)] for i in sorted(rng.choice(len(catalog), n_types, replace=False))]
    templates: list[_Template] = []
    for noun, main, verb in chosen:
        for _attempt in range(50):
            t = _build_template(rng, sysm, noun, main, verb)
            if all(_jaccard(t.keys, o.keys) < 0.5 for o in templates):
                break
        templates.append(t)
    # >= 2 mandatory RPCs unique to each template (the root and the call into the main service)
    for t in templates:
        others = set().union(*(o.keys for o in templates if o is not t))
        mandatory = {t.nodes[0].key, t.nodes[1].key}
        assert not mandatory & others, t.request_type
    # Zipf-like base rates (max/min ratio 20..60), scaled so that an hour holds spans_per_hour
    ratio = float(rng.uniform(20, 60))
    expo = math.log(ratio) / math.log(len(templates))
    ranks = rng.permutation(len(templates)) + 1
    weights = ranks.astype(float) ** -expo
    templates = [replace(t, base_rate=float(w)) for t, w in zip(templates, weights, strict=True)]
    return sysm, templates


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / max(1, len(a | b))


def day_factor(epoch_seconds: np.ndarray | float) -> np.ndarray:
    """Daily traffic curve (mean 1 over a day): 0.5 at 04:00 UTC, 1.5 at 16:00 UTC."""
    hod = (np.asarray(epoch_seconds, dtype=float) % 86_400) / 3_600
    return 1.0 + 0.5 * np.sin(2 * np.pi * (hod - 10.0) / 24.0)


# --------------------------------------------------------------------------------------------
# injected events
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Event:
    event_id: str
    kind: str
    start_s: int  # epoch seconds, inclusive
    end_s: int  # exclusive
    template: int
    factor: float = 1.0
    fraction: float = 1.0  # share of the type's traces that take the variant tree
    node: int = -1  # latency: the slowed node (index in the base template)
    variant: tuple[_Node, ...] | None = None
    rpcs: tuple[str, ...] = ()
    note: str = ""

    def active(self, t: np.ndarray) -> np.ndarray:
        return (t >= self.start_s) & (t < self.end_s)

    def rate_multiplier(self, t: np.ndarray) -> np.ndarray | None:
        if self.kind in ("traffic_spike", "traffic_drop"):
            return np.where(self.active(t), self.factor, 1.0)
        if self.kind == "drift":
            ramp = np.clip((t - self.start_s) / (self.end_s - self.start_s), 0.0, 1.0)
            return 1.0 + (self.factor - 1.0) * ramp
        return None


def _schedule(rng: np.random.Generator, start_s: int, hours: int) -> list[tuple[str, int, int]]:
    """(kind, start_s, end_s) windows, non-overlapping, on minute boundaries, after warm-up."""
    total = hours * 60
    warm = max(120, math.ceil(total * 0.5))
    region = total - warm
    ramp = min(360, max(180, int(region * 0.3)))
    with_drift = region - ramp >= 5 * 12
    short_room = region - ramp if with_drift else region
    n_short = min(max(5, round(region / 90) - int(with_drift)), short_room // 12)
    kinds = list(rng.permutation(SHORT_KINDS))
    out: list[tuple[str, int, int]] = []
    cursor = warm
    if with_drift:
        out.append(("drift", cursor, cursor + ramp))
        cursor += ramp
    if n_short > 0:
        slot = (total - cursor) // n_short
        gap = min(5, max(1, slot // 8))
        for i in range(n_short):
            lo = cursor + i * slot
            dur = int(rng.integers(5, min(20, slot - 2 * gap) + 1))
            s = lo + gap + int(rng.integers(0, slot - 2 * gap - dur + 1))
            out.append((str(kinds[i % len(kinds)]), s, s + dur))
    return [(k, start_s + a * 60, start_s + b * 60) for k, a, b in out]


def _subtree(nodes: tuple[_Node, ...], j: int) -> list[int]:
    """Indices of j and its descendants (contiguous in preorder)."""
    end = j + 1
    depth = nodes[j].rpc_id.count(".")
    while end < len(nodes) and nodes[end].rpc_id.startswith(nodes[j].rpc_id + "."):
        end += 1
    assert all(nodes[k].rpc_id.count(".") > depth for k in range(j + 1, end))
    return list(range(j, end))


def _ancestors(nodes: tuple[_Node, ...], j: int) -> list[int]:
    out = []
    while nodes[j].parent >= 0:
        j = nodes[j].parent
        out.append(j)
    return out


def _mandatory_path(nodes: tuple[_Node, ...], j: int) -> bool:
    return not nodes[j].optional and all(not nodes[a].optional for a in _ancestors(nodes, j))


def _renumber(nodes: list[_Node]) -> tuple[_Node, ...]:
    """Fix parents of a preorder list whose rpc ids are right."""
    index = {n.rpc_id: j for j, n in enumerate(nodes)}
    return tuple(replace(n, parent=index[n.rpc_id.rsplit(".", 1)[0]] if j else -1) for j, n in enumerate(nodes))


def _plan_events(seed: int, start_s: int, hours: int, sysm: _System, templates: list[_Template]) -> list[_Event]:
    rng = np.random.default_rng([seed, 0xE7E, hours])
    windows = _schedule(rng, start_s, hours)
    by_rate = sorted(range(len(templates)), key=lambda k: -templates[k].base_rate)
    n = len(by_rate)
    high = by_rate[: max(1, n // 2)]
    middle = by_rate[2 : max(3, n - 3)]
    not_rare = by_rate[: max(1, n - 3)]
    top = by_rate[: max(1, n // 3)]
    used: list[int] = []

    def pick(pool: list[int]) -> int:
        fresh = [k for k in pool if k not in used] or [k for k in range(n) if k not in used]
        k = int(rng.choice(fresh or pool))
        used.append(k)
        return k

    all_keys = set().union(*(t.keys for t in templates))
    edges = {(nd.caller, nd.callee) for t in templates for nd in t.nodes}
    events: list[_Event] = []
    for i, (kind, s, e) in enumerate(windows, start=1):
        eid = f"E{i:02d}-{kind}"
        if kind == "traffic_spike":
            k = pick(middle)
            t = templates[k]
            f = round(float(rng.uniform(5, 10)), 2)
            note = f"flood: {t.request_type} traffic x{f}"
            ev = _Event(eid, kind, s, e, k, factor=f, rpcs=_keys(t.nodes), note=note)
        elif kind == "traffic_drop":
            k = pick(high)
            t = templates[k]
            f = round(float(rng.uniform(0.05, 0.2)), 3)
            note = f"outage: {t.request_type} traffic x{f}"
            ev = _Event(eid, kind, s, e, k, factor=f, rpcs=_keys(t.nodes), note=note)
        elif kind == "drift":
            k = pick(high)
            t = templates[k]
            f = round(float(rng.uniform(1.5, 2.0)), 3)
            note = (
                f"{t.request_type} traffic ramps to x{f} over {(e - s) // 3600}h and stays: "
                "legitimate gradual change: should lead to retraining, not endless alarms"
            )
            ev = _Event(eid, kind, s, e, k, factor=f, rpcs=_keys(t.nodes), note=note)
        elif kind == "latency":
            k = pick(not_rare)
            t = templates[k]
            others = set().union(*(o.keys for o in templates if o is not t))
            cand = [
                j for j in range(1, len(t.nodes))
                if t.nodes[j].key not in others and _mandatory_path(t.nodes, j)
            ]  # fmt: skip
            j = int(rng.choice(cand))  # the call into the main service always qualifies
            f = round(float(rng.uniform(3, 6)), 2)
            slow = [j] + _ancestors(t.nodes, j)
            note = f"{t.nodes[j].key} latency x{f}; its callers' rt rises accordingly"
            ev = _Event(eid, kind, s, e, k, factor=f, node=j,
                        rpcs=tuple(t.nodes[a].key for a in slow), note=note)  # fmt: skip
        elif kind == "novel_rpc":
            k = pick(top)
            t = templates[k]
            ev = _novel(rng, eid, s, e, k, t, sysm, edges, all_keys)
        else:  # amplification
            k = pick(not_rare)
            t = templates[k]
            ev = _amplify(rng, eid, s, e, k, t)
        events.append(ev)
    return events


def _keys(nodes) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n.key for n in nodes))


def _novel(rng, eid, s, e, k, t: _Template, sysm: _System, edges, all_keys) -> _Event:
    """A service in the tree calls a service it never calls in any template (lateral movement)."""
    callers = [
        j for j, nd in enumerate(t.nodes)
        if nd.callee in sysm.neighbors and j > 0 and _mandatory_path(t.nodes, j)
    ]  # fmt: skip
    for j in rng.permutation(callers):
        j = int(j)
        caller = t.nodes[j].callee
        targets = [c for c in _SENSITIVE if c != caller and (caller, c) not in edges]
        if targets:
            break
    else:  # every sensitive service is already a known callee: any other service will do
        targets = [c for c in sysm.apps if c != caller and (caller, c) not in edges]
    callee = str(rng.choice(targets))
    iface = str(rng.choice(_NOVEL_INTERFACES))
    rtype = _STORE_KIND.get(callee, "rpc")
    children = [m for m in _subtree(t.nodes, j)[1:] if t.nodes[m].parent == j]
    new_id = f"{t.nodes[j].rpc_id}.{len(children) + 1}"
    node = _make_node(rng, new_id, j, caller, callee, iface, rtype, False, origin=-1)
    assert node.key not in all_keys
    end = _subtree(t.nodes, j)[-1] + 1
    variant = _renumber(list(t.nodes[:end]) + [node] + list(t.nodes[end:]))
    q = round(float(rng.uniform(0.25, 0.5)), 3)
    note = f"lateral movement: {caller} calls {callee}.{iface} in {q:.0%} of {t.request_type} traces"
    return _Event(eid, "novel_rpc", s, e, k, fraction=q, variant=variant, rpcs=(node.key,), note=note)


def _amplify(rng, eid, s, e, k, t: _Template) -> _Event:
    """One RPC's downstream calls repeated r times in the affected traces (scraping)."""
    cand = [
        j for j in range(1, len(t.nodes))
        if len(_subtree(t.nodes, j)) > 1 and len(_subtree(t.nodes, j)) <= 10
        and _mandatory_path(t.nodes, j)
    ] or [1]  # fmt: skip
    j = int(rng.choice(cand))
    r = int(rng.integers(5, 11))
    sub = _subtree(t.nodes, j)
    below = [t.nodes[m] for m in sub[1:]]
    base = t.nodes[j].rpc_id
    n_children = sum(1 for nd in below if nd.parent == j)
    # the repeated calls are made every time (scraping is systematic)
    below = [replace(nd, optional=False, p=1.0) if nd.parent == j else nd for nd in below]
    copies: list[_Node] = []
    for c in range(1, r):
        for nd in below:
            rest = nd.rpc_id[len(base) + 1 :].split(".", 1)
            first = int(rest[0]) + c * n_children
            new_id = f"{base}.{first}" + (f".{rest[1]}" if len(rest) > 1 else "")
            copies.append(replace(nd, rpc_id=new_id))
    end = sub[-1] + 1
    variant = _renumber(list(t.nodes[: j + 1]) + below + copies + list(t.nodes[end:]))
    q = round(float(rng.uniform(0.3, 0.7)), 3)
    note = f"scraping/exfiltration: {t.nodes[j].key} fans out x{r} in {q:.0%} of {t.request_type} traces"
    rpcs = _keys(t.nodes[m] for m in sub)
    return _Event(
        eid,
        "amplification",
        s,
        e,
        k,
        factor=float(r),
        fraction=q,
        variant=variant,
        rpcs=rpcs,
        note=note,
    )


# --------------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SynthSummary:
    out: Path
    hours: int
    rows_per_hour: dict[str, int]  # "2026-01-01T03:00" -> rows written into that partition
    templates: int  # number of request types
    services: int  # distinct services in the templates (apps and cache/db/mq), USER excluded
    events: int  # injected anomaly events
    seconds: float

    @property
    def rows(self) -> int:
        return sum(self.rows_per_hour.values())

    def spans_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class _Unit:
    """Traces of one request type drawn from one tree (the template or an event's variant)."""

    template: int
    variant: int  # 0 for the template, else 1 + index of the event
    nodes: tuple[_Node, ...]
    gbase: int  # offset of its nodes in the global node table
    rate: np.ndarray | None = None  # traces per second over the hour
    slow: list[_Event] = field(default_factory=list)  # latency events active in the hour


class _Tables:
    """String tables: node-level columns as dictionary indices, and pod names."""

    def __init__(self, units_nodes: list[tuple[str, tuple[_Node, ...]]], pods: dict[str, int]):
        cols: dict[str, list[str]] = {c: [] for c in ("service", "rpc_id", "rpctype", "um", "interface", "dm")}
        callee, caller = [], []
        for entry, nodes in units_nodes:
            for nd in nodes:
                cols["service"].append(entry)
                cols["rpc_id"].append(nd.rpc_id)
                cols["rpctype"].append(nd.rpctype)
                cols["um"].append(nd.caller)
                cols["interface"].append(nd.interface)
                cols["dm"].append(nd.callee)
                callee.append(nd.callee)
                caller.append(nd.caller)
        self.node_index: dict[str, np.ndarray] = {}
        self.dictionary: dict[str, pa.Array] = {}
        for c, values in cols.items():
            uniq = sorted(set(values))
            pos = {v: i for i, v in enumerate(uniq)}
            self.node_index[c] = np.array([pos[v] for v in values], dtype=np.int32)
            self.dictionary[c] = pa.array(uniq, pa.string())
        services = sorted(pods)
        names, offsets = [], {}
        for s in services:
            offsets[s] = len(names)
            names += [f"{s}_POD_{i}" for i in range(pods[s])]
        self.user_pod = len(names)
        names.append(USER)
        self.pods = pa.array(names, pa.string())
        self.pod_offset = np.array([offsets[s] for s in callee], dtype=np.int32)
        self.pod_count = np.array([pods[s] for s in callee], dtype=np.int32)


def _check_start(start: datetime) -> datetime:
    if not isinstance(start, datetime):
        raise ValueError(f"start must be a datetime, got {type(start).__name__}")
    if start.tzinfo is None or start.utcoffset() is None:
        raise ValueError(f"start must be timezone-aware UTC, got naive {start.isoformat()}")
    if start.utcoffset() != timedelta(0):
        raise ValueError(f"start must be in UTC, got offset {start.utcoffset()}")
    if (start.minute, start.second, start.microsecond) != (0, 0, 0):
        raise ValueError(f"start must be on an hour boundary, got {start.isoformat()}")
    return start.astimezone(UTC)


def _hour_key(epoch_hour: int) -> str:
    return datetime.fromtimestamp(epoch_hour * 3600, UTC).strftime("%Y-%m-%dT%H:00")


def _hour_path(epoch_hour: int, gen_hour: int) -> str:
    d = datetime.fromtimestamp(epoch_hour * 3600, UTC)
    g = datetime.fromtimestamp(gen_hour * 3600, UTC)
    return f"dt={d:%Y-%m-%d}/hour={d:%H}/part-{g:%Y%m%d%H}.parquet"


def _clean(out: Path) -> None:
    """Remove what a previous `generate` wrote into `out` (and only that)."""
    for f in out.glob("dt=*/hour=*/part-*.parquet"):
        f.unlink()
    for d in sorted(out.glob("dt=*/hour=*")) + sorted(out.glob("dt=*")):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    for f in (
        out / "truth" / "trace_templates.parquet",
        out / "labels.parquet",
        out / "manifest.json",
    ):
        f.unlink(missing_ok=True)


def _rng(seed: int, epoch_hour: int, chunk: int, unit: _Unit) -> np.random.Generator:
    return np.random.default_rng([seed, epoch_hour, chunk, unit.template, unit.variant])


class _HourSpans(NamedTuple):
    ts: np.ndarray  # int64 ms, one per span (trace-major, traces by start time)
    rt: np.ndarray
    node: np.ndarray  # global node index
    um_pod: np.ndarray  # index into the pod table
    dm_pod: np.ndarray
    error: np.ndarray
    trace_template: np.ndarray  # template index, one per trace
    trace_spans: np.ndarray  # spans per trace


def _hour_spans(
    seed: int, epoch_hour: int, units: list[_Unit], tables: _Tables, chunk: int, lo: int, hi: int
) -> _HourSpans | None:
    """Spans of the traces that start in seconds [lo, hi) of the hour: trace-major, traces
    ordered by start time, each trace's spans in preorder (the order of their rpc ids)."""
    hour_ms = epoch_hour * HOUR_MS
    secs = epoch_hour * 3600 + np.arange(3600)
    # phase A: trace counts, start times and which nodes each trace has
    live = []
    for u in units:
        rng = _rng(seed, epoch_hour, chunk, u)
        counts = rng.poisson(u.rate[lo:hi])
        n = int(counts.sum())
        if n == 0:
            continue
        sec = np.repeat(np.arange(lo, hi, dtype=np.int32), counts)
        root_ts = hour_ms + sec.astype(np.int64) * 1000 + rng.integers(0, 1000, n)
        idxs: list[np.ndarray] = []
        pposs: list[np.ndarray | None] = []
        spans = np.zeros(n, dtype=np.int32)
        for j, nd in enumerate(u.nodes):
            if j == 0:
                idx, ppos = np.arange(n, dtype=np.int32), None
            else:
                pidx = idxs[nd.parent]
                if nd.optional:
                    ppos = np.flatnonzero(rng.random(len(pidx), dtype=np.float32) < nd.p)
                    idx = pidx[ppos]
                else:
                    idx, ppos = pidx, None
            idxs.append(idx)
            pposs.append(ppos)
            spans[idx] += 1
        live.append((u, rng, sec, root_ts, idxs, pposs, spans))
    if not live:
        return None
    # phase B: global order of traces by start time, offsets of each trace's spans
    root_all = np.concatenate([x[3] for x in live])
    spans_all = np.concatenate([x[6] for x in live])
    order = np.argsort(root_all, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    spans_sorted = spans_all[order]
    offsets_sorted = np.cumsum(spans_sorted, dtype=np.int64) - spans_sorted
    total = int(spans_sorted.sum())
    out_ts = np.empty(total, dtype=np.int64)
    out_rt = np.empty(total, dtype=np.float64)
    out_node = np.empty(total, dtype=np.int32)
    out_um = np.empty(total, dtype=np.int32)
    out_dm = np.empty(total, dtype=np.int32)
    out_err = np.zeros(total, dtype=np.int8)
    trace_unit = np.empty(len(order), dtype=np.int32)
    # phase C: per unit, latencies (bottom-up), start times and pods (top-down), scatter
    first = 0
    for u, rng, sec, root_ts, idxs, pposs, _spans in live:
        n = len(root_ts)
        toff = offsets_sorted[rank[first : first + n]]
        trace_unit[rank[first : first + n]] = u.template
        first += n
        m = len(u.nodes)
        self_rt: list[np.ndarray] = []
        for j, nd in enumerate(u.nodes):
            z = rng.standard_normal(len(idxs[j]), dtype=np.float32)
            self_rt.append(np.exp(z * np.float32(nd.sigma)) * np.float32(nd.median_ms))
        # rt = own time + the slowest child (children are called in parallel)
        child_max: list[np.ndarray | None] = [None] * m
        rt: list[np.ndarray] = [None] * m  # type: ignore[list-item]
        for j in range(m - 1, -1, -1):
            r = self_rt[j] if child_max[j] is None else self_rt[j] + child_max[j]
            for ev in u.slow:  # latency event: this call's rt x factor, its callers wait longer
                if u.nodes[j].origin == ev.node:
                    hit = ev.active(secs[sec[idxs[j]]])
                    extra = np.where(hit, r * np.float32(ev.factor - 1.0), np.float32(0.0))
                    self_rt[j] = self_rt[j] + extra
                    r = r + extra
            rt[j] = r
            p = u.nodes[j].parent
            if p >= 0:
                if child_max[p] is None:
                    child_max[p] = np.zeros(len(idxs[p]), dtype=np.float32)
                cm = child_max[p]
                if pposs[j] is None:
                    np.maximum(cm, r, out=cm)
                else:
                    cm[pposs[j]] = np.maximum(cm[pposs[j]], r)
        ts: list[np.ndarray] = []
        dm: list[np.ndarray] = []
        run = np.zeros(n, dtype=np.int32)
        for j, nd in enumerate(u.nodes):
            idx, ppos = idxs[j], pposs[j]
            k = len(idx)
            g = u.gbase + j
            dm_j = rng.integers(0, tables.pod_count[g], k, dtype=np.int32)
            dm_j += tables.pod_offset[g]
            if nd.parent < 0:
                ts_j = root_ts
                um_j = np.full(k, tables.user_pod, dtype=np.int32)
            else:
                p = nd.parent
                pts, pself, pdm = ts[p], self_rt[p], dm[p]
                if ppos is not None:
                    pts, pself, pdm = pts[ppos], pself[ppos], pdm[ppos]
                off = rng.random(k, dtype=np.float32) * np.float32(0.5) * pself
                ts_j = pts + off.astype(np.int64)
                um_j = pdm
            ts.append(ts_j)
            dm.append(dm_j)
            pos = toff[idx] + run[idx]
            run[idx] += 1
            out_ts[pos] = ts_j
            out_rt[pos] = rt[j]
            out_node[pos] = g
            out_um[pos] = um_j
            out_dm[pos] = dm_j
            n_err = int(rng.binomial(k, nd.err))
            if n_err:
                out_err[pos[rng.integers(0, k, n_err)]] = 1
    return _HourSpans(out_ts, out_rt, out_node, out_um, out_dm, out_err, trace_unit, spans_sorted)


def _trace_ids(prefix: str, n_traces: int, repeats: np.ndarray | None = None, first: int = 0) -> pa.Array:
    """`<prefix><8+ digit ordinal>` for traces first.. (each repeated `repeats[i]` times when
    given), built as fixed-width byte rows: no per-string Python work."""
    width = max(8, len(str(first + n_traces)))
    head = np.frombuffer(prefix.encode(), dtype=np.uint8)
    ordinal = np.arange(first, first + n_traces, dtype=np.int64)[:, None]
    digits = (ordinal // 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)) % 10 + ord("0")
    rows = np.empty((n_traces, len(head) + width), dtype=np.uint8)
    rows[:, : len(head)] = head
    rows[:, len(head) :] = digits
    if repeats is not None:
        rows = np.repeat(rows, repeats, axis=0)
    length = rows.shape[1]
    step = max(1, (2**31 - 1) // length - 1)  # int32 offsets per chunk
    chunks = []
    for lo in range(0, len(rows), step):
        part = rows[lo : lo + step]
        offsets = np.arange(0, (len(part) + 1) * length, length, dtype=np.int32)
        chunks.append(pa.StringArray.from_buffers(len(part), pa.py_buffer(offsets), pa.py_buffer(part)))
    if len(chunks) == 1:
        return chunks[0]
    return pa.chunked_array(chunks, pa.string()) if chunks else pa.array([], pa.string())


def _span_table(cols: _HourSpans, tables: _Tables, trace_ids) -> pa.Table:
    node = pa.array(cols.node, pa.int32())

    def dict_col(indices, dictionary: pa.Array) -> pa.DictionaryArray:
        return pa.DictionaryArray.from_arrays(pa.array(indices, pa.int32()), dictionary)

    def node_col(name: str) -> pa.DictionaryArray:
        return dict_col(pc.take(pa.array(tables.node_index[name]), node), tables.dictionary[name])

    arrays = [
        pa.array(cols.ts, pa.int64()),
        trace_ids,
        node_col("service"),
        node_col("rpc_id"),
        node_col("rpctype"),
        node_col("um"),
        dict_col(cols.um_pod, tables.pods),
        node_col("interface"),
        node_col("dm"),
        dict_col(cols.dm_pod, tables.pods),
        pa.array(cols.rt, pa.float64()),
        pa.array(cols.error, pa.int8()),
    ]
    return pa.Table.from_arrays(arrays, names=list(COLUMNS))


def _partitions(table: pa.Table, ts: np.ndarray, epoch_hour: int) -> list[tuple[int, pa.Table]]:
    """Split an hour's spans by the hour of each span's timestamp. Spans past the hour belong
    to the traces that started last, i.e. sit in the table's tail: only the tail is filtered."""
    end_ms = (epoch_hour + 1) * HOUR_MS
    late = ts >= end_ms
    if not late[-1] and not late.any():
        return [(epoch_hour, table)]
    first = int(np.argmax(late))
    tail, tail_ts = table.slice(first), ts[first:]
    part = tail_ts // HOUR_MS
    head = pa.concat_tables([table.slice(0, first), tail.filter(pa.array(part == epoch_hour))])
    out = [(epoch_hour, head)]
    for p in range(epoch_hour + 1, int(part.max()) + 1):
        mask = part == p
        if mask.any():
            out.append((p, tail.filter(pa.array(mask))))
    return out


_WRITE_OPTIONS: dict = dict(
    compression="zstd",
    compression_level=1,
    use_dictionary=_DICT_COLUMNS_NO_TRACE,
    write_statistics=["timestamp"],
    column_encoding={
        "timestamp": "DELTA_BINARY_PACKED",
        "traceid": "PLAIN",  # trace-major order: zstd squeezes the repeats
        "rt": "BYTE_STREAM_SPLIT",
        "error": "PLAIN",
    },
    store_schema=False,  # readers see plain string columns, not Arrow dictionary types
)


class _SpanFiles:
    """The span files of one generated hour, appended chunk by chunk (on the writer thread)."""

    def __init__(self) -> None:
        self.writers: dict[Path, pq.ParquetWriter] = {}

    def write(self, path: Path, table: pa.Table) -> None:
        writer = self.writers.get(path)
        if writer is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            writer = self.writers[path] = pq.ParquetWriter(path, table.schema, **_WRITE_OPTIONS)
        writer.write_table(table)

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()
        self.writers.clear()


def _expected_spans(nodes: tuple[_Node, ...]) -> float:
    presence = np.ones(len(nodes))
    for j, n in enumerate(nodes):
        if n.parent >= 0:
            presence[j] = presence[n.parent] * n.p
    return float(presence.sum())


CHUNK_SPANS = 1_500_000  # about this many spans are generated (and written) at a time
_CHUNKS = (1, 2, 3, 4, 5, 6, 8, 9, 10, 12, 15, 16, 18, 20, 24, 30, 36, 40, 45, 48, 50, 60)


def _n_chunks(units: list[_Unit]) -> int:
    expected = sum(float(u.rate.sum()) * _expected_spans(u.nodes) for u in units)
    return next((c for c in _CHUNKS if expected / c <= CHUNK_SPANS), _CHUNKS[-1])


def generate(
    start: datetime,
    hours: int,
    out: Path,
    seed: int = 0,
    spans_per_hour: int = 200_000,
    anomalies: bool = False,
    progress: Callable[[str], None] | None = None,
) -> SynthSummary:
    """Write `hours` hours of synthetic traces starting at `start` into `out` (replacing the
    output of a previous run there). See the module docstring for the layout."""
    t0 = time.perf_counter()
    start = _check_start(start)
    if int(hours) != hours or hours < 1:
        raise ValueError(f"hours must be a positive integer, got {hours!r}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not spans_per_hour > 0:
        raise ValueError(f"spans_per_hour must be positive, got {spans_per_hour!r}")
    hours, seed = int(hours), int(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _clean(out)

    sysm, templates = _build_templates(seed)
    scale = spans_per_hour / 3600.0 / sum(t.base_rate * t.expected_spans() for t in templates)
    templates = [replace(t, base_rate=t.base_rate * scale) for t in templates]
    start_hour = int(start.timestamp()) // 3600
    events = _plan_events(seed, start_hour * 3600, hours, sysm, templates) if anomalies else []

    units = [_Unit(k, 0, t.nodes, 0) for k, t in enumerate(templates)]
    units += [_Unit(ev.template, 1 + i, ev.variant, 0) for i, ev in enumerate(events) if ev.variant]
    gbase = 0
    for u in units:
        u.gbase = gbase
        gbase += len(u.nodes)
    tables = _Tables([(templates[u.template].entry, u.nodes) for u in units], sysm.pods)

    rows: dict[int, int] = {}
    files: dict[str, None] = {}  # relative paths, in order
    names = pa.array([t.request_type for t in templates], pa.string())
    truth_path = out / "truth" / "trace_templates.parquet"
    truth_path.parent.mkdir(parents=True, exist_ok=True)
    pending: deque[Future] = deque()
    with (
        ThreadPoolExecutor(max_workers=1) as pool,
        pq.ParquetWriter(truth_path, TRUTH_SCHEMA, compression="zstd") as truth,
    ):

        def submit(fn, *args) -> None:
            # the writer thread works while the next chunk is generated; at most 2 queued
            while len(pending) >= 2:
                pending.popleft().result()
            pending.append(pool.submit(fn, *args))

        for h in range(hours):
            epoch_hour = start_hour + h
            secs = epoch_hour * 3600 + np.arange(3600)
            day = day_factor(secs + 0.5)
            active = [u for u in units if _unit_active(u, events, secs)]
            for u in active:
                u.rate = _unit_rate(u, templates, events, secs, day)
                u.slow = [ev for ev in events if ev.kind == "latency" and ev.template == u.template
                          and ev.active(secs).any()]  # fmt: skip
            gen = datetime.fromtimestamp(epoch_hour * 3600, UTC).strftime("%Y%m%d%H")
            prefix = f"T{seed}_{gen}_"
            n_chunks = _n_chunks(active)
            span_files = _SpanFiles()
            n_spans = n_traces = 0
            for c in range(n_chunks):
                lo, hi = c * 3600 // n_chunks, (c + 1) * 3600 // n_chunks
                cols = _hour_spans(seed, epoch_hour, active, tables, c, lo, hi)
                if cols is None:
                    continue
                trace_unit = cols.trace_template
                ids = _trace_ids(prefix, len(trace_unit), first=n_traces)
                truth.write_table(pa.table([ids, pc.take(names, pa.array(trace_unit))], schema=TRUTH_SCHEMA))
                ids = _trace_ids(prefix, len(trace_unit), cols.trace_spans, first=n_traces)
                table = _span_table(cols, tables, ids)
                n_traces += len(trace_unit)
                n_spans += table.num_rows
                for p, sub in _partitions(table, cols.ts, epoch_hour):
                    rel = _hour_path(p, epoch_hour)
                    if rel not in files:
                        files[rel] = None
                    rows[p] = rows.get(p, 0) + sub.num_rows
                    submit(span_files.write, out / rel, sub)
                del cols, table, ids
            submit(span_files.close)
            if progress is not None:
                progress(f"hour {_hour_key(epoch_hour)}: {n_spans:,} spans")
        while pending:
            pending.popleft().result()

    last_hour = max([start_hour + hours - 1, *rows])
    rows_per_hour = {_hour_key(h): rows.get(h, 0) for h in range(start_hour, last_hour + 1)}
    _write_labels(out / "labels.parquet", events, templates)
    used_services = {n.callee for t in templates for n in t.nodes}
    manifest = {
        "format": "alibaba-v2022",
        "columns": list(COLUMNS),
        "start": start.isoformat(),
        "hours": hours,
        "seed": seed,
        "spans_per_hour": spans_per_hour,
        "anomalies": bool(anomalies),
        "rows_per_hour": rows_per_hour,
        "templates": [
            {
                "request_type": t.request_type,
                "entry": t.entry,
                "base_rate": round(t.base_rate, 6),
                "expected_spans": round(t.expected_spans(), 3),
                "nodes": [
                    {
                        "rpc_id": n.rpc_id,
                        "caller": n.caller,
                        "callee": n.callee,
                        "interface": n.interface,
                        "rpctype": n.rpctype,
                        "optional": n.optional,
                        "p": n.p,
                    }
                    for n in t.nodes
                ],
            }
            for t in templates
        ],
        "events": [
            {
                "event_id": ev.event_id,
                "kind": ev.kind,
                "request_type": templates[ev.template].request_type,
            }
            for ev in events
        ],
        "files": sorted(files),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return SynthSummary(
        out=out,
        hours=hours,
        rows_per_hour=rows_per_hour,
        templates=len(templates),
        services=len(used_services),
        events=len(events),
        seconds=time.perf_counter() - t0,
    )


def _unit_active(u: _Unit, events: list[_Event], secs: np.ndarray) -> bool:
    return u.variant == 0 or bool(events[u.variant - 1].active(secs).any())


def _unit_rate(u: _Unit, templates, events: list[_Event], secs, day) -> np.ndarray:
    """Expected traces per second of one unit: base rate x day curve x events; an event's
    variant tree takes a share of its type's traces inside the window (Poisson thinning)."""
    rate = templates[u.template].base_rate * day
    for i, ev in enumerate(events):
        if ev.template != u.template:
            continue
        mult = ev.rate_multiplier(secs)
        if mult is not None:
            rate = rate * mult
        elif ev.variant is not None:
            share = ev.fraction * ev.active(secs)
            rate = rate * (share if u.variant == i + 1 else 1.0 - share)
    return rate


def _write_labels(path: Path, events: list[_Event], templates: list[_Template]) -> None:
    def ts(s: int) -> datetime:
        return datetime.fromtimestamp(s, UTC)

    table = pa.table(
        {
            "event_id": [e.event_id for e in events],
            "kind": [e.kind for e in events],
            "start": [ts(e.start_s) for e in events],
            "end": [ts(e.end_s) for e in events],
            "request_type": [templates[e.template].request_type for e in events],
            "rpcs": [list(e.rpcs) for e in events],
            "note": [e.note for e in events],
        },
        schema=LABEL_SCHEMA,
    )
    pq.write_table(table, path, compression="zstd")
