"""Injected anomaly events and their labels: when (`_schedule`), which request type and what each
event does to its traffic (`plan_events`), and `labels.parquet` (schema `LABEL_SCHEMA`), one row
per event, written by `write_labels`. Reads no table."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.synth.system import STORE_KIND, Node, System, Template, make_node

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

_NOVEL_INTERFACES = ("exportAll", "dumpTable", "adminQuery", "bulkDownload", "debugExec")
_SENSITIVE = (
    "mysql-users", "mysql-payments", "svc-payment", "svc-account", "postgres-billing", "svc-auth",
    "mysql-orders", "svc-billing", "redis-session",
)  # fmt: skip


@dataclass(frozen=True)
class Event:
    event_id: str
    kind: str
    start_s: int  # epoch seconds, inclusive
    end_s: int  # exclusive
    template: int
    factor: float = 1.0
    fraction: float = 1.0  # share of the type's traces that take the variant tree
    node: int = -1  # latency: the slowed node (index in the base template)
    variant: tuple[Node, ...] | None = None
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


def _subtree(nodes: tuple[Node, ...], j: int) -> list[int]:
    """Indices of j and its descendants (contiguous in preorder)."""
    end = j + 1
    depth = nodes[j].rpc_id.count(".")
    while end < len(nodes) and nodes[end].rpc_id.startswith(nodes[j].rpc_id + "."):
        end += 1
    assert all(nodes[k].rpc_id.count(".") > depth for k in range(j + 1, end))
    return list(range(j, end))


def _ancestors(nodes: tuple[Node, ...], j: int) -> list[int]:
    out = []
    while nodes[j].parent >= 0:
        j = nodes[j].parent
        out.append(j)
    return out


def _mandatory_path(nodes: tuple[Node, ...], j: int) -> bool:
    return not nodes[j].optional and all(not nodes[a].optional for a in _ancestors(nodes, j))


def _renumber(nodes: list[Node]) -> tuple[Node, ...]:
    """Fix parents of a preorder list whose rpc ids are right."""
    index = {n.rpc_id: j for j, n in enumerate(nodes)}
    return tuple(replace(n, parent=index[n.rpc_id.rsplit(".", 1)[0]] if j else -1) for j, n in enumerate(nodes))


class _Window(NamedTuple):
    """Where an event goes: its id, kind and [start_s, end_s) in epoch seconds."""

    event_id: str
    kind: str
    start_s: int
    end_s: int


@dataclass
class _Planning:
    """What every event builder draws from: the one rng (draw order matters), the templates, and
    which calls and edges exist in any template."""

    rng: np.random.Generator
    sysm: System
    templates: list[Template]
    edges: set[tuple[str, str]] = field(init=False)
    all_keys: set[str] = field(init=False)
    used: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.all_keys = set().union(*(t.keys for t in self.templates))
        self.edges = {(nd.caller, nd.callee) for t in self.templates for nd in t.nodes}

    def pick(self, pool: list[int]) -> int:
        """A template of `pool` not used by an earlier event (else any unused one, else any of `pool`)."""
        n = len(self.templates)
        fresh = [k for k in pool if k not in self.used] or [k for k in range(n) if k not in self.used]
        k = int(self.rng.choice(fresh or pool))
        self.used.append(k)
        return k


def _pools(templates: list[Template]) -> dict[str, list[int]]:
    """Per kind, the templates (by index) that may carry the event: by base rate, most frequent first."""
    by_rate = sorted(range(len(templates)), key=lambda k: -templates[k].base_rate)
    n = len(by_rate)
    high = by_rate[: max(1, n // 2)]
    not_rare = by_rate[: max(1, n - 3)]
    return {
        "traffic_spike": by_rate[2 : max(3, n - 3)],
        "traffic_drop": high,
        "drift": high,
        "latency": not_rare,
        "novel_rpc": by_rate[: max(1, n // 3)],
        "amplification": not_rare,
    }


def plan_events(seed: int, start_s: int, hours: int, sysm: System, templates: list[Template]) -> list[Event]:
    """The injected events of a run: windows after the warm-up, each on a template picked for its kind."""
    rng = np.random.default_rng([seed, 0xE7E, hours])
    windows = _schedule(rng, start_s, hours)
    pools = _pools(templates)
    planning = _Planning(rng, sysm, templates)
    events: list[Event] = []
    for i, (kind, s, e) in enumerate(windows, start=1):
        window = _Window(f"E{i:02d}-{kind}", kind, s, e)
        k = planning.pick(pools[kind])
        events.append(_BUILDERS[kind](planning, window, k))
    return events


def _spike(planning: _Planning, w: _Window, k: int) -> Event:
    t = planning.templates[k]
    f = round(float(planning.rng.uniform(5, 10)), 2)
    note = f"flood: {t.request_type} traffic x{f}"
    return Event(*w, k, factor=f, rpcs=_keys(t.nodes), note=note)


def _drop(planning: _Planning, w: _Window, k: int) -> Event:
    t = planning.templates[k]
    f = round(float(planning.rng.uniform(0.05, 0.2)), 3)
    note = f"outage: {t.request_type} traffic x{f}"
    return Event(*w, k, factor=f, rpcs=_keys(t.nodes), note=note)


def _drift(planning: _Planning, w: _Window, k: int) -> Event:
    t = planning.templates[k]
    f = round(float(planning.rng.uniform(1.5, 2.0)), 3)
    note = (
        f"{t.request_type} traffic ramps to x{f} over {(w.end_s - w.start_s) // 3600}h and stays: "
        "legitimate gradual change: should lead to retraining, not endless alarms"
    )
    return Event(*w, k, factor=f, rpcs=_keys(t.nodes), note=note)


def _latency(planning: _Planning, w: _Window, k: int) -> Event:
    """One call unique to the type (on a path of mandatory calls) slows down; its callers wait for it."""
    templates, t = planning.templates, planning.templates[k]
    others = set().union(*(o.keys for o in templates if o is not t))
    cand = [
        j for j in range(1, len(t.nodes))
        if t.nodes[j].key not in others and _mandatory_path(t.nodes, j)
    ]  # fmt: skip
    j = int(planning.rng.choice(cand))  # the call into the main service always qualifies
    f = round(float(planning.rng.uniform(3, 6)), 2)
    slow = [j] + _ancestors(t.nodes, j)
    note = f"{t.nodes[j].key} latency x{f}; its callers' rt rises accordingly"
    return Event(*w, k, factor=f, node=j, rpcs=tuple(t.nodes[a].key for a in slow), note=note)


def _keys(nodes: Iterable[Node]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(n.key for n in nodes))


def _novel(planning: _Planning, w: _Window, k: int) -> Event:
    """A service in the tree calls a service it never calls in any template (lateral movement)."""
    rng, sysm, edges, t = planning.rng, planning.sysm, planning.edges, planning.templates[k]
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
    rtype = STORE_KIND.get(callee, "rpc")
    children = [m for m in _subtree(t.nodes, j)[1:] if t.nodes[m].parent == j]
    new_id = f"{t.nodes[j].rpc_id}.{len(children) + 1}"
    node = make_node(rng, new_id, j, caller, callee, iface, rtype, False, origin=-1)
    assert node.key not in planning.all_keys
    end = _subtree(t.nodes, j)[-1] + 1
    variant = _renumber(list(t.nodes[:end]) + [node] + list(t.nodes[end:]))
    q = round(float(rng.uniform(0.25, 0.5)), 3)
    note = f"lateral movement: {caller} calls {callee}.{iface} in {q:.0%} of {t.request_type} traces"
    return Event(*w, k, fraction=q, variant=variant, rpcs=(node.key,), note=note)


def _amplify(planning: _Planning, w: _Window, k: int) -> Event:
    """One RPC's downstream calls repeated r times in the affected traces (scraping)."""
    rng, t = planning.rng, planning.templates[k]
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
    copies: list[Node] = []
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
    return Event(*w, k, factor=float(r), fraction=q, variant=variant, rpcs=rpcs, note=note)


_BUILDERS: dict[str, Callable[[_Planning, _Window, int], Event]] = {
    "traffic_spike": _spike,
    "traffic_drop": _drop,
    "drift": _drift,
    "latency": _latency,
    "novel_rpc": _novel,
    "amplification": _amplify,
}


def write_labels(path: Path, events: list[Event], templates: list[Template]) -> None:
    """`labels.parquet`: one row per injected event (empty, with the schema, when there is none)."""

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
