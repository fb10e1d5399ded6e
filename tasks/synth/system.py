"""The simulated shop (no tables, no files): services in tiers with their pods, stores and interfaces,
the request types ("templates", each a fixed call tree with optional subtrees) and their base rates,
and the daily traffic curve. Everything is drawn from the seed, in a fixed order: changing the order
of the draws changes the generated data."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from tasks.keys import rpc_label

USER = "USER"
MAX_DEPTH = 6  # root call USER -> entry is depth 1

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
STORE_KIND = {**dict.fromkeys(_CACHES, "mc"), **dict.fromkeys(_DBS, "db"), **dict.fromkeys(_MQS, "mq")}

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
_SHARED_ROOT_CALLS = (("svc-auth", "verifyToken", "rpc"), ("redis-session", "get_session", "mc"))

assert not {v for _, _, vs in _REQUESTS for v in vs} & set(_POOL_VERBS)


def _noun(service: str) -> str:
    """'svc-mobile-bff' -> 'MobileBff'."""
    return "".join(p.capitalize() for p in service.removeprefix("svc-").split("-"))


@dataclass(frozen=True)
class Node:
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
        return rpc_label(self.caller, self.callee, self.interface)


@dataclass(frozen=True)
class Template:
    request_type: str
    entry: str
    nodes: tuple[Node, ...]
    base_rate: float = 0.0  # traces per second, before the day curve

    @property
    def keys(self) -> set[str]:
        return {n.key for n in self.nodes}

    def expected_spans(self) -> float:
        return expected_spans(self.nodes)


@dataclass(frozen=True)
class System:
    apps: tuple[str, ...]
    neighbors: dict[str, tuple[str, ...]]  # app -> downstream apps it may call
    stores: dict[str, tuple[str, ...]]  # app -> stores it uses
    interfaces: dict[str, tuple[str, ...]]  # app -> its interfaces
    pods: dict[str, int]  # service -> number of pods
    protocol: dict[str, str]  # app -> how it is called: "rpc" or "http"


def build_system(rng: np.random.Generator) -> System:
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
    pods.update({s: int(rng.integers(1, 4)) for s in STORE_KIND})
    protocol = {s: ("http" if rng.random() < 0.2 else "rpc") for s in apps}
    return System(apps, neighbors, stores, interfaces, pods, protocol)


def store_interface(rng: np.random.Generator, caller: str, store: str) -> str:
    res = _noun(caller).lower()
    kind = STORE_KIND[store]
    if kind == "mc":
        return f"{rng.choice(('get', 'set', 'mget'))}_{res}"
    if kind == "db":
        return f"{rng.choice(('select', 'insert', 'update'))}_{res}"
    return f"publish_{res}"


def latency(rng: np.random.Generator, rpctype: str) -> tuple[float, float]:
    lo, hi = {"mc": (0.3, 1.5), "db": (1.5, 12.0), "mq": (0.5, 3.0)}.get(rpctype, (1.0, 15.0))
    return float(rng.uniform(lo, hi)), float(rng.uniform(0.25, 0.6))


def make_node(
    rng: np.random.Generator,
    rpc_id: str,
    parent: int,
    caller: str,
    callee: str,
    interface: str,
    rpctype: str,
    optional: bool,
    origin: int = -1,
) -> Node:
    """A call with its latency (median, spread), presence probability and error rate drawn."""
    med, sig = latency(rng, rpctype)
    p = float(rng.uniform(0.3, 0.9)) if optional else 1.0
    return Node(
        rpc_id, parent, caller, callee, interface, rpctype, optional, round(p, 3),
        round(med, 3), round(sig, 3), round(float(rng.uniform(0.001, 0.01)), 4), origin,
    )  # fmt: skip


@dataclass(eq=False)
class _Spec:
    """A call of a template under construction, with the calls it makes."""

    caller: str
    callee: str
    interface: str
    rpctype: str
    optional: bool
    children: list[_Spec] = field(default_factory=list)


def _child_spec(rng: np.random.Generator, sysm: System, svc: str, what: str, callee: str) -> _Spec:
    """A call from `svc` into another app (one of its interfaces) or into one of its stores."""
    if what == "app":
        iface = str(rng.choice(sysm.interfaces[callee]))
        rpctype = sysm.protocol[callee]
    else:
        iface = store_interface(rng, svc, callee)
        rpctype = STORE_KIND[callee]
    return _Spec(svc, callee, iface, rpctype, bool(rng.random() < 0.3))


def _expand(rng: np.random.Generator, sysm: System, first: _Spec, count: int, budget: int) -> None:
    """Breadth-first expansion below the main service's call, within the node budget."""
    queue = [(first, 2)]
    while queue and count < budget:
        spec, depth = queue.pop(0)
        svc = spec.callee
        if svc in STORE_KIND or depth >= MAX_DEPTH:
            continue
        options = [("app", s) for s in sysm.neighbors[svc]] + [("store", s) for s in sysm.stores[svc]]
        if not options:
            continue
        k = 1 + int(rng.binomial(3, max(0.15, 0.65 - 0.1 * depth)))
        if spec is first:
            k = max(k, 2)
        k = min(k, len(options), budget - count)
        for o in rng.choice(len(options), k, replace=False):
            child = _child_spec(rng, sysm, svc, *options[int(o)])
            spec.children.append(child)
            count += 1
            queue.append((child, depth + 1))


def build_template(rng: np.random.Generator, sysm: System, noun: str, main: str, verb: str) -> Template:
    """One request type's call tree, nodes in preorder with Alibaba rpc ids."""
    entry = str(rng.choice(_ENTRIES))
    budget = int(rng.integers(8, 36))
    root = _Spec(USER, entry, f"/api/v1/{noun}/{verb}", "http", False)
    first = _Spec(entry, main, f"{verb}{noun.capitalize()}", sysm.protocol[main], False)
    root.children.append(first)
    count = 2
    for callee, iface, rtype in _SHARED_ROOT_CALLS:
        if rng.random() < 0.6:
            root.children.append(_Spec(entry, callee, iface, rtype, bool(rng.random() < 0.3)))
            count += 1
    _expand(rng, sysm, first, count, budget)
    nodes: list[Node] = []

    def walk(spec: _Spec, rpc_id: str, parent: int) -> None:
        j = len(nodes)
        nodes.append(
            make_node(rng, rpc_id, parent, spec.caller, spec.callee, spec.interface, spec.rpctype, spec.optional)
        )
        for i, ch in enumerate(spec.children, start=1):
            walk(ch, f"{rpc_id}.{i}", j)

    walk(root, "0.1", -1)
    nodes = [replace(n, origin=j) for j, n in enumerate(nodes)]
    return Template(f"{noun}.{verb}", entry, tuple(nodes))


def build_templates(seed: int) -> tuple[System, list[Template]]:
    rng = np.random.default_rng([seed, 0x7E4D])
    sysm = build_system(rng)
    catalog = [(noun, main, verb) for noun, main, verbs in _REQUESTS for verb in verbs]
    n_types = int(rng.integers(12, 25))
    chosen = [catalog[int(i)] for i in sorted(rng.choice(len(catalog), n_types, replace=False))]
    templates: list[Template] = []
    for noun, main, verb in chosen:
        for _attempt in range(50):
            t = build_template(rng, sysm, noun, main, verb)
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


def build_fleet(seed: int, systems: int = 1) -> tuple[System, list[Template]]:
    """`build_templates(seed)`, plus for `systems` > 1 the templates of further independent shops
    (seeds after `seed`), their services and request types prefixed `s<k>-` so no name is shared:
    many more patterns (a fleet of clusters) with the same generator. The first shop's `System`
    is returned (events are injected there) with every shop's pods; one shop is exactly
    `build_templates(seed)`."""
    sysm, templates = build_templates(seed)
    pods = dict(sysm.pods)
    for k in range(1, systems):
        other, more = build_templates(seed + k)
        templates += [_renamed(t, f"s{k}-") for t in more]
        pods |= {f"s{k}-{service}": n for service, n in other.pods.items()}
    return replace(sysm, pods=pods), templates


def _renamed(t: Template, prefix: str) -> Template:
    """The template with every service (but the user) and its request type prefixed."""

    def name(service: str) -> str:
        return service if service == USER else prefix + service

    nodes = tuple(replace(n, caller=name(n.caller), callee=name(n.callee)) for n in t.nodes)
    return replace(t, request_type=prefix + t.request_type, entry=name(t.entry), nodes=nodes)


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / max(1, len(a | b))


def day_factor(epoch_seconds: np.ndarray | float) -> np.ndarray:
    """Daily traffic curve (mean 1 over a day): 0.5 at 04:00 UTC, 1.5 at 16:00 UTC."""
    hod = (np.asarray(epoch_seconds, dtype=float) % 86_400) / 3_600
    return 1.0 + 0.5 * np.sin(2 * np.pi * (hod - 10.0) / 24.0)


def expected_spans(nodes: tuple[Node, ...]) -> float:
    """Mean number of spans of a trace of this tree (each optional call present with its p)."""
    presence = np.ones(len(nodes))
    for j, n in enumerate(nodes):
        if n.parent >= 0:
            presence[j] = presence[n.parent] * n.p
    return float(presence.sum())
