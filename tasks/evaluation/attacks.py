"""Security case studies on real traffic: labelled attacks added to a `rpcwatch replay` folder.

Each attack kind builds extra spans from the replay's own traffic (copies of real traces with
fresh trace and span ids, shifted in time), deterministic for a seed:

- `lateral_movement`: a few calls a minute on a new caller -> callee edge, to an operation it serves.
- `credential_stuffing`: the login RPC (an operation with `login` in ts-auth-service or
  ts-user-service; else the busiest entry operation) at `FLOOD_FACTOR` times its replay rate.
- `scraping_amplification`: copies of real traces whose query RPC (a call made with HTTP GET) is
  repeated `AMPLIFICATION` times the replay's largest per-trace fan-out of any RPC.
- `slow_exfiltration`: a low-rate stream on the replay's rarest RPCs with transfers of 15-60 s.
- `internal_flood`: an internal service's busiest operation called by a service never seen calling
  it (a new edge), at `FLOOD_FACTOR` times the operation's replay rate (at least `FLOOD_FACTOR` a
  minute); each call is a trace of its own, rooted at the caller's client span.
- `endpoint_enumeration`: a scanner behind the entry service: 30-60 never-seen paths of one service
  a minute (`SCAN_WORDS` under the service's common path), each requested once or twice.

Placement. On a filled replay (`replay.json` fill: true, `rpcwatch replay --fill`) every attack lies
in the fault-free fill after the clean prefix (`prefix_end`), lasts its whole `NOMINAL_S` (2-7 min),
and has at least `ROOM_S` of attack-free fill before and after it (no capture, no fault window
within `ROOM_S`), so that false incidents around it can be counted. On a replay without fill (the
"dirty history": captures back to back) attacks go after the first `train_s`, `spacing_s` apart,
in stretches free of the fault windows (`inject_time` .. `window_end`, `MARGIN_S` either side), cut
to the stretch (at least `MIN_S`): Nezha days have a fault every ~3 minutes, so there attacks last
about 1-1.5 minutes.

Reads the replay's span Parquet (`dt=/hour=`, Nezha columns), `replay.json`, `runs.parquet` and
fault list. Writes, never touching the replay's files, `attacks-<kind>.parquet` into the hour
partitions and `labels.parquet` (see `LABELS_SCHEMA`) at the root; a rerun first removes what the
last one wrote. Judged by `labels.py`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.evaluation.replay import FAULT_WINDOW_S, META, NS, capture_spans, replay_meta
from tasks.ingest.formats import SpanMapping
from tasks.synth.events import LABEL_SCHEMA

ATTACK_KINDS = (
    "lateral_movement",
    "credential_stuffing",
    "scraping_amplification",
    "slow_exfiltration",
    "internal_flood",
    "endpoint_enumeration",
)
NOMINAL_S = dict(zip(ATTACK_KINDS, (240, 120, 180, 420, 180, 120)))  # how long each kind lasts where there is room
MIN_S, MARGIN_S, SLACK_S = 60, 15, 60  # shortest attack; gap to fault windows; detection slack after an attack
ROOM_S = (
    300  # attack-free fill before and after each attack in a filled replay (5 min: several buckets and trace windows)
)
FLOOD_FACTOR, AMPLIFICATION = 15, 4
SCAN_RATE = (30, 60)  # never-seen paths a minute of an endpoint enumeration
SCAN_WORDS = (
    "admin", "backup", "config", "debug", "env", "console", "actuator", "swagger", "api-docs", "metrics",
    "health", "export", "internal", "test", "old", "private", "upload", "files", "dump", "status",
    "graphql", "shell", "manage", "keys", "tokens", "secrets", "logs", "git", "trace", "heapdump",
    "users", "accounts", "settings", "system", "v2", "beta", "dev", "staging", "login", "reset",
)  # fmt: skip
SCAN_SUFFIXES = ("", ".bak", ".old", ".json", "/list", "/all", "/1", "/config")
LOGIN_SERVICES, SENSITIVE = ("ts-auth-service", "ts-user-service"), ("user", "auth", "payment", "order", "contacts")
# the synthetic labels' columns plus `services` (whose incidents count), `spans` (how many added) and
# `first_trace_end` (when the attack's first trace ends: detection delays count from there)
LABELS_SCHEMA = (
    LABEL_SCHEMA.append(pa.field("services", pa.list_(pa.string())))
    .append(pa.field("spans", pa.int64()))
    .append(pa.field("first_trace_end", pa.timestamp("ms", tz="UTC")))
)
US = 1000  # ns per Duration unit (us)
ENV = "RPCWATCH_MIN_TRAIN_HOURS=0.5"  # as `make trainticket` runs a replay


@dataclass
class Replay:
    """The replay's spans (Nezha columns, plus `svc`, and `caller` and `via`: the parent span's
    service and operation)."""

    folder: Path
    spans: pd.DataFrame
    schema: pa.Schema
    entry: frozenset[str]  # services of root spans (the gateway)
    complete: set[str]  # trace ids with one root and every parent present

    def calls(self) -> pd.DataFrame:
        """Spans called from another service (one RPC each), with their `rpc` label."""
        calls = self.spans[self.spans.caller.notna() & (self.spans.caller != self.spans.svc)]
        return calls.assign(rpc=calls.caller + ":" + calls.svc + ":" + calls.OperationName)

    @property
    def minutes(self) -> float:
        """How long the replay's traffic lasts, in minutes (rates are per minute of it)."""
        starts = self.spans.StartTimeUnixNano
        return max(float(starts.max() - starts.min()) / NS / 60, 1 / 60)

    def traces(self, ids: pd.Series | set[str]) -> dict[str, pd.DataFrame]:
        """The complete traces among `ids`, each as its rows in start order, by trace id."""
        keep = set(ids) & self.complete
        if not keep:
            raise ValueError(f"{self.folder}: no complete trace (one root, every parent present) to copy")
        rows = self.spans[self.spans.TraceID.isin(keep)].sort_values(["TraceID", "StartTimeUnixNano"])
        return dict(iter(rows.groupby("TraceID", sort=True)))  # not dict(groupby): it has `.keys`


@dataclass
class Attack:
    """One attack: its window (ns), the RPCs it uses, the services whose incidents count, its spans."""

    kind: str
    start_ns: int
    end_ns: int
    rpcs: list[str] = field(default_factory=list)
    services: list[str] = field(default_factory=list)
    spans: pd.DataFrame = field(default_factory=pd.DataFrame)
    note: str = ""

    @property
    def first_trace_end_ns(self) -> int:
        """When the attack's first trace (the earliest to start) ends: detection delays count from here."""
        first = self.spans.TraceID[self.spans.StartTimeUnixNano.idxmin()]
        rows = self.spans[self.spans.TraceID == first]
        return int((rows.StartTimeUnixNano + rows.Duration * US).max())


class Ids:
    """Fresh, deterministic Nezha-style ids (32 hex for traces, 16 for spans)."""

    def __init__(self, seed: int, kind: str) -> None:
        self.prefix, self.n = f"{seed}/{kind}/", 0

    def new(self, size: int = 8) -> str:
        self.n += 1
        return hashlib.blake2b(f"{self.prefix}{self.n}".encode(), digest_size=size).hexdigest()


def load_replay(folder: Path, with_attacks: bool = False, mapping_name: str = "nezha-trainticket") -> Replay:
    """Reads the replay's own span Parquet (and the attack files, if asked)."""
    files = sorted(p for p in folder.glob("dt=*/hour=*/*.parquet") if with_attacks or not p.name.startswith("attacks-"))
    if not files:
        raise FileNotFoundError(f"{folder}: no span partitions (dt=*/hour=*/*.parquet): run `rpcwatch replay` first")
    mapping = SpanMapping.load(mapping_name)
    schema = pq.read_schema(files[0]).remove_metadata()
    spans = pa.concat_tables([pq.read_table(f, schema=schema) for f in files]).to_pandas()
    spans["svc"] = spans.PodName.str.extract(mapping.service_regex or "(.+)", expand=False).fillna(spans.PodName)
    parents = spans[["TraceID", "SpanID", "svc", "OperationName"]].drop_duplicates(["TraceID", "SpanID"])
    spans = spans.merge(parents.set_axis(["TraceID", "ParentID", "caller", "via"], axis=1), how="left")
    root = spans.ParentID.isin([str(v) for v in mapping.root_parent_values])
    flags = pd.DataFrame({"t": spans.TraceID, "root": root, "orphan": ~root & spans.caller.isna()})
    per_trace = flags.groupby("t").agg(roots=("root", "sum"), orphans=("orphan", "sum"))
    complete = set(per_trace.index[(per_trace.roots == 1) & (per_trace.orphans == 0)])
    return Replay(folder, spans, schema, frozenset(spans.svc[root]), complete)


def fault_windows(path: Path) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    """[inject_time, window_end] (naive UTC) of each observable fault of a fault list; none if absent."""
    if not path.exists():
        return []
    listed = [f for group in json.loads(path.read_text()).values() for f in group]
    faults = [(pd.Timestamp(f["inject_time"]), f) for f in listed if f.get("inject_time") and f.get("observable", True)]
    window = pd.Timedelta(seconds=FAULT_WINDOW_S)
    return sorted((start, pd.Timestamp(f.get("window_end") or start + window)) for start, f in faults)


Stretch = tuple[int, int]  # [lo, hi) in ns


def _free(lo: int, hi: int, blocked: list[Stretch]) -> list[Stretch]:
    """[lo, hi) less the blocked intervals, as ordered stretches."""
    free, cursor = [], lo
    for a, b in sorted(blocked) + [(hi, hi)]:
        if min(a, hi) > cursor:
            free.append((cursor, min(a, hi)))
        cursor = max(cursor, b)
    return free


def place(
    kinds: list[str], start_ns: int, end_ns: int, faults: list[tuple[pd.Timestamp, pd.Timestamp]],
    train_s: int, spacing_s: int,
) -> list[tuple[str, int, int]]:  # fmt: skip
    """(kind, start, end) of each attack on a replay without fill: in order, after `train_s`,
    `spacing_s` apart, in stretches free of fault windows, cut to the stretch (at least `MIN_S`)."""
    blocked = [(a.value - MARGIN_S * NS, b.value + MARGIN_S * NS) for a, b in faults]
    free = _free(start_ns + train_s * NS, end_ns, blocked)
    out, cursor = [], start_ns + train_s * NS
    for kind in kinds:
        need = min(NOMINAL_S[kind], MIN_S) * NS
        slot = next(((max(lo, cursor), hi) for lo, hi in free if hi - max(lo, cursor) >= need), None)
        if slot is None:
            raise ValueError(f"no fault-free stretch of {need // NS} s left for {kind} after {_stamp(cursor)}")
        lo, hi = slot
        out.append((kind, lo, min(hi, lo + NOMINAL_S[kind] * NS)))
        cursor = out[-1][2] + spacing_s * NS
    return out


def fill_stretches(folder: Path) -> list[Stretch] | None:
    """The stretches of fill (ns) after the clean prefix of a filled replay, clear of every capture
    and fault window; None for a replay without fill."""
    if not (folder / META).is_file():  # written before fill existed: captures back to back
        return None
    meta = replay_meta(folder)
    if not meta.get("fill"):
        return None
    blocked = [(a.value, b.value) for a, b in capture_spans(folder)]
    faults = fault_windows(folder / "fault_list.json")
    blocked += [(a.value - MARGIN_S * NS, b.value + MARGIN_S * NS) for a, b in faults]
    return _free(pd.Timestamp(meta["prefix_end"]).value, pd.Timestamp(meta["end"]).value, blocked)


def place_in_fill(kinds: list[str], stretches: list[Stretch], room_s: int = ROOM_S) -> list[tuple[str, int, int]]:
    """(kind, start, end) of each attack in a filled replay: whole (`NOMINAL_S`), each as early as
    it fits inside one stretch of fill with `room_s` of fill free of attacks before and after it
    (two attacks are at least `room_s` apart and share the fill between them)."""
    room = room_s * NS
    out: list[tuple[str, int, int]] = []
    for kind in kinds:
        need = NOMINAL_S[kind] * NS
        taken = [(lo, hi) for _, lo, hi in out]
        pieces = [p for lo, hi in stretches for p in _free(lo, hi, taken)]
        slot = next((lo + room for lo, hi in pieces if hi - lo - 2 * room >= need), None)
        if slot is None:
            longest = max((hi - lo for lo, hi in pieces), default=0) // NS
            raise ValueError(
                f"no stretch of fill after the prefix holds {kind} ({need // NS} s) with {room_s} s of "
                f"attack-free fill either side (the longest free stretch left is {longest} s): replay with "
                "more fill, or inject fewer kinds"
            )
        out.append((kind, slot, slot + need))
    return out


def _stamp(ns: int) -> str:
    return f"{datetime.fromtimestamp(ns / NS, UTC):%Y-%m-%d %H:%M:%S}"


def _times(rng: np.random.Generator, start_ns: int, end_ns: int, n: int) -> list[int]:
    return sorted(int(t) for t in rng.integers(start_ns, max(end_ns, start_ns + 1), size=n))


def _renumber(rows: pd.DataFrame, ids: Ids, trace_id: str, shift_ns: int) -> pd.DataFrame:
    """`rows` with fresh span ids (parents among `rows` follow), in trace `trace_id`, shifted in time."""
    new = {old: ids.new() for old in rows.SpanID}
    return rows.assign(
        TraceID=trace_id,
        SpanID=rows.SpanID.map(new),
        ParentID=[new.get(p, p) for p in rows.ParentID],
        StartTimeUnixNano=rows.StartTimeUnixNano + shift_ns,
    ).reset_index(drop=True)


def _copy(trace: pd.DataFrame, at_ns: int, ids: Ids) -> pd.DataFrame:
    """A real trace again at `at_ns`: fresh ids, same shape and durations."""
    return _renumber(trace, ids, ids.new(16), at_ns - int(trace.StartTimeUnixNano.min()))


def _subtree(trace: pd.DataFrame, span_id: str) -> pd.DataFrame:
    """The span and all its descendants."""
    keep, frontier = {span_id}, {span_id}
    while frontier:
        frontier = set(trace.SpanID[trace.ParentID.isin(frontier)]) - keep
        keep |= frontier
    return trace[trace.SpanID.isin(keep)]


def _stretch(trace: pd.DataFrame, span_id: str) -> pd.DataFrame:
    """Lengthen the span's ancestors so each covers the latest end below it."""
    ends = trace.StartTimeUnixNano + trace.Duration * US
    need = int(ends[trace.SpanID.isin(set(_subtree(trace, span_id).SpanID))].max())
    by_id = {s: i for i, s in zip(trace.index, trace.SpanID)}
    i = by_id.get(trace.ParentID[by_id[span_id]])
    while i is not None:
        if int(ends[i]) < need:
            trace.loc[i, "Duration"] = math.ceil((need - int(trace.StartTimeUnixNano[i])) / US)
        i = by_id.get(trace.ParentID[i])
    return trace


def _unit(rows: pd.DataFrame, call: pd.Series) -> pd.Series:
    """The span that makes the call: the client span above a server span (same service as the caller
    and one child), else the server span itself."""
    parent = rows[(rows.TraceID == call.TraceID) & (rows.SpanID == call.ParentID)].iloc[0]
    kids = ((rows.TraceID == call.TraceID) & (rows.ParentID == parent.SpanID)).sum()
    return parent if parent.svc == parent.caller and kids == 1 else call


def _call(trace: pd.DataFrame, rpc: str) -> pd.Series:
    """The trace's first span making the RPC labelled `rpc`."""
    return trace[(trace.caller + ":" + trace.svc + ":" + trace.OperationName) == rpc].iloc[0]


def _uses(replay: Replay, attack: Attack, rpc: str, spans: list[pd.DataFrame], note: str) -> None:
    """Record the attack's spans, its RPC and the services whose incidents count: the RPC's caller
    and callee, except the entry service (every request passes it) unless no other is left."""
    caller, callee, _ = rpc.split(":", 2)
    attack.spans, attack.rpcs, attack.note = pd.concat(spans, ignore_index=True), [rpc], note
    attack.services = [s for s in dict.fromkeys((caller, callee)) if s not in replay.entry | {"USER"}] or [callee]


def _new_edges(replay: Replay, calls: pd.DataFrame, kind: str, into: set[str] | None = None) -> list[tuple[str, str]]:
    """(A, B) pairs of internal services (no entry service; B among `into` if given) where A never
    calls B in the replay; those into a service with a sensitive name, if any."""
    edges = set(zip(calls.caller, calls.svc))
    callers = sorted(set(calls.caller) - replay.entry)
    callees = sorted(set(calls.svc) - replay.entry if into is None else into - replay.entry)
    pairs = [(a, b) for a in callers for b in callees if a != b and (a, b) not in edges]
    if not pairs:
        raise ValueError(f"{kind}: every internal service already calls every other")
    return [p for p in pairs if any(w in p[1] for w in SENSITIVE)] or pairs


def lateral_movement(replay: Replay, attack: Attack, rng: np.random.Generator, ids: Ids) -> None:
    """Copies of real traces through service A, each with a new call from A to B (an edge never seen)."""
    calls = replay.calls()
    sensitive = _new_edges(replay, calls, attack.kind)
    a, b = sensitive[int(rng.integers(len(sensitive)))]
    into_b = calls[calls.svc == b]
    op = into_b.OperationName.value_counts().sort_index().idxmax()
    server = into_b[into_b.OperationName == op].iloc[0]
    client = _unit(replay.spans, server)
    hosts = replay.traces(calls.TraceID[calls.svc == a])
    keys = sorted(hosts)
    n = max(3, round(4 * (attack.end_ns - attack.start_ns) / NS / 60))
    out = []
    for t in _times(rng, attack.start_ns, attack.end_ns, n):
        trace = _copy(hosts[keys[int(rng.integers(len(keys)))]], t, ids)
        host = trace[(trace.svc == a) & (trace.caller != a)].iloc[0]
        at = int(host.StartTimeUnixNano) + int(host.Duration) * US // 10
        new = pd.DataFrame([client, server][: 1 if client is server else 2])
        new = _renumber(new, ids, str(trace.TraceID[0]), at - int(new.StartTimeUnixNano.min()))
        new.loc[0, "ParentID"] = host.SpanID
        new.loc[0, "PodName"] = host.PodName if client is not server else new.PodName[0]
        trace = pd.concat([trace, new], ignore_index=True)
        out.append(_stretch(trace, str(new.SpanID[0])))
    _uses(replay, attack, f"{a}:{b}:{op}", out, f"new edge {a} -> {b} ({op}), {n} calls")


def credential_stuffing(replay: Replay, attack: Attack, rng: np.random.Generator, ids: Ids) -> None:
    """Copies of real login traces at `FLOOD_FACTOR` times the login's replay rate."""
    calls = replay.calls()
    login = calls[calls.svc.isin(LOGIN_SERVICES) & calls.OperationName.str.contains("login", case=False)]
    if login.empty:  # the busiest entry operation
        roots = replay.spans[replay.spans.caller.isna()]
        top = roots.OperationName.value_counts().sort_index().idxmax()
        login = roots[roots.OperationName == top].assign(rpc=f"USER:{roots.svc.iloc[0]}:{top}")
    rpc = login.rpc.value_counts().sort_index().idxmax()
    login = login[login.rpc == rpc]
    templates = replay.traces(login.TraceID)
    rate = len(login) / replay.minutes
    n = math.ceil(FLOOD_FACTOR * rate * (attack.end_ns - attack.start_ns) / NS / 60)
    keys = sorted(templates)
    picks = [keys[int(i)] for i in rng.integers(len(keys), size=n)]
    times = _times(rng, attack.start_ns, attack.end_ns, n)
    copies = [_copy(templates[k], t, ids) for k, t in zip(picks, times)]
    _uses(replay, attack, rpc, copies, f"{n} logins at {FLOOD_FACTOR}x the replay's {rate:.1f}/min")


def fan_out(spans: pd.DataFrame) -> int:
    """The largest number of calls of one RPC in one trace (spans with `caller`, `svc`)."""
    cross = spans[spans.caller.notna() & (spans.caller != spans.svc)]
    return int(cross.groupby(["TraceID", "caller", "svc", "OperationName"]).size().max())


def scraping_amplification(replay: Replay, attack: Attack, rng: np.random.Generator, ids: Ids) -> None:
    """Copies of real traces whose query call (HTTP GET) is repeated far beyond the replay's fan-out."""
    calls = replay.calls()
    calls = calls[~calls.caller.isin(replay.entry) & calls.TraceID.isin(replay.complete)]
    queries = calls[calls.via == "HTTP GET"] if (calls.via == "HTTP GET").any() else calls
    top = queries.rpc.value_counts().sort_index(kind="stable").sort_values(ascending=False, kind="stable")
    rpc = top.index[int(rng.integers(min(5, len(top))))]
    templates = replay.traces(queries.TraceID[queries.rpc == rpc])
    keys, repeat = sorted(templates), AMPLIFICATION * fan_out(replay.spans)
    n = max(3, round(3 * (attack.end_ns - attack.start_ns) / NS / 60))
    out = []
    for t in _times(rng, attack.start_ns, attack.end_ns, n):
        trace = _copy(templates[keys[int(rng.integers(len(keys)))]], t, ids)
        call = _call(trace, rpc)
        root = str(_unit(trace, call).SpanID)
        unit = _subtree(trace, root)
        extra = [_renumber(unit, ids, str(call.TraceID), j * 2_000_000) for j in range(1, repeat)]
        trace = pd.concat([trace, *extra], ignore_index=True)
        out.append(_stretch(trace, str(extra[-1].SpanID[list(unit.SpanID).index(root)])))
    _uses(
        replay, attack, rpc, out, f"{n} traces calling it {repeat} times (replay max fan-out {repeat // AMPLIFICATION})"
    )


def slow_exfiltration(replay: Replay, attack: Attack, rng: np.random.Generator, ids: Ids) -> None:
    """About one call a minute on one of the replay's rarest RPCs, each a transfer of 15-60 s."""
    calls = replay.calls()
    calls = calls[~calls.caller.isin(replay.entry) & calls.TraceID.isin(replay.complete)]
    rare = calls.rpc.value_counts().sort_index(kind="stable").sort_values(kind="stable")
    rpc = rare.index[int(rng.integers(min(3, len(rare))))]
    templates = replay.traces(calls.TraceID[calls.rpc == rpc])
    keys = sorted(templates)
    span_s = (attack.end_ns - attack.start_ns) / NS
    n = max(3, round(span_s / 60))
    longest = max(15.0, min(60.0, 0.5 * span_s))
    out = []
    for t in _times(rng, attack.start_ns, attack.end_ns - int(longest * NS), n):
        trace = _copy(templates[keys[int(rng.integers(len(keys)))]], t, ids)
        call = _call(trace, rpc)
        transfer = int(rng.uniform(15.0, longest) * 1e6)  # us
        unit = _unit(trace, call)
        trace.loc[trace.SpanID == call.SpanID, "Duration"] = transfer
        trace.loc[trace.SpanID == unit.SpanID, "Duration"] = transfer + max(0, int(unit.Duration - call.Duration))
        out.append(_stretch(trace, str(unit.SpanID)))
    _uses(
        replay,
        attack,
        rpc,
        out,
        f"{n} transfers of 15-{longest:.0f} s (RPC called {int(rare[rpc])} times in the replay)",
    )


def _sample(ids: pd.Series, replay: Replay, rng: np.random.Generator, most: int = 50) -> dict[str, pd.DataFrame]:
    """Up to `most` of the complete traces among `ids`, drawn for the seed (templates to copy)."""
    keys = sorted(set(ids) & replay.complete)
    picked = sorted(keys[int(i)] for i in rng.choice(len(keys), size=min(most, len(keys)), replace=False))
    return replay.traces(set(picked))


def _root_value(trace: pd.DataFrame) -> str:
    """What the trace's root span has as its parent id (the mapping's root value, e.g. `root`)."""
    return str(trace.ParentID[~trace.ParentID.isin(set(trace.SpanID))].iloc[0])


def _as_own_trace(trace: pd.DataFrame, call: pd.Series, pod: str, caller: str, client_op: str) -> pd.DataFrame:
    """The call's subtree under a new root: a client span in `pod` (service `caller`) as long as the
    call's real client span (or, where the call has none, the call itself, named `client_op`)."""
    unit = _unit(trace, call)
    root = trace[trace.SpanID == unit.SpanID].head(1)
    root = root.assign(PodName=pod, svc=caller, ParentID=_root_value(trace), caller=None, via=None)
    below = _subtree(trace, str(call.SpanID))
    if unit.SpanID == call.SpanID:  # no client span to copy: one of its own
        root = root.assign(SpanID=root.SpanID + "c", OperationName=client_op)
        below = below.assign(ParentID=below.ParentID.where(below.SpanID != call.SpanID, root.SpanID.iloc[0]))
    return pd.concat([root, below], ignore_index=True)


def internal_flood(replay: Replay, attack: Attack, rng: np.random.Generator, ids: Ids) -> None:
    """Service B's busiest internal operation (one that services other than the entry call) called
    by a service A never seen calling B, at `FLOOD_FACTOR` times the operation's replay rate (at
    least `FLOOD_FACTOR` a minute). A process in a compromised pod serves no incoming request, so
    each call is a trace of its own: A's client span as its root (as OpenTelemetry starts a client
    span without a parent), then B's real work for the call."""
    calls = replay.calls()
    internal = calls[~calls.caller.isin(replay.entry)]
    pairs = _new_edges(replay, calls, attack.kind, set(internal.svc))
    a, b = pairs[int(rng.integers(len(pairs)))]
    op = internal.OperationName[internal.svc == b].value_counts().sort_index().idxmax()
    served = calls[(calls.svc == b) & (calls.OperationName == op)]
    rate = max(FLOOD_FACTOR * len(served) / replay.minutes, FLOOD_FACTOR)
    n = math.ceil(rate * (attack.end_ns - attack.start_ns) / NS / 60)
    pod = replay.spans.PodName[replay.spans.svc == a].value_counts().sort_index().idxmax()
    used = calls.via[(calls.caller == a) & calls.via.notna()]
    client_op = used.value_counts().sort_index().idxmax() if len(used) else op
    templates = []
    for trace in _sample(served.TraceID, replay, rng).values():
        call = trace[(trace.svc == b) & (trace.OperationName == op) & (trace.caller != b)].iloc[0]
        templates.append(_as_own_trace(trace, call, pod, a, client_op))
    picks = rng.integers(len(templates), size=n)
    copies = [_copy(templates[int(k)], t, ids) for k, t in zip(picks, _times(rng, attack.start_ns, attack.end_ns, n))]
    _uses(replay, attack, f"{a}:{b}:{op}", copies, f"new edge {a} -> {b} ({op}): {n} calls at {rate:.1f}/min")


def _common_path(operations: list[str]) -> str:
    """The leading path segments the operations share, always short of a whole operation
    ("/api/v1/travelservice"); "" when none is a path."""
    paths = [o.strip("/").split("/") for o in operations if o.startswith("/")]
    if not paths:
        return ""
    common: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    common = common[: min(map(len, paths)) - 1]
    return "/" + "/".join(common) if common else ""


def _scan_paths(base: str, known: set[str], n: int, rng: np.random.Generator) -> list[str]:
    """`n` distinct paths under `base` from a scanner's word list, none of them in `known`."""
    candidates = [f"{base}/{w}{s}" for s in SCAN_SUFFIXES for w in SCAN_WORDS]
    more = 2
    while len(set(candidates) - known) < n:  # a long scan: numbered words
        candidates += [f"{base}/{w}{more}" for w in SCAN_WORDS]
        more += 1
    fresh = [c for c in dict.fromkeys(candidates) if c not in known]
    return [fresh[int(i)] for i in rng.permutation(len(fresh))[:n]]


def _ancestry(trace: pd.DataFrame, span_id: str) -> pd.DataFrame:
    """The span and its ancestors up to the root, nothing else."""
    parent = dict(zip(trace.SpanID, trace.ParentID))
    keep = [span_id]
    while parent.get(keep[-1]) in parent and parent[keep[-1]] not in keep:
        keep.append(parent[keep[-1]])
    return trace[trace.SpanID.isin(keep)]


def endpoint_enumeration(replay: Replay, attack: Attack, rng: np.random.Generator, ids: Ids) -> None:
    """A scanner behind the entry service: `SCAN_RATE` never-seen paths of one service a minute
    (evenly spread, so any minute holds at least the lower rate), each requested once or twice.
    Each request copies a real entry -> service call with its ancestors, renamed to the path; the
    service answers without calling on (its subtree is cut)."""
    calls = replay.calls()
    inward = calls[calls.caller.isin(replay.entry) & ~calls.svc.isin(replay.entry)]
    inward = inward[inward.TraceID.isin(replay.complete)]
    if inward.empty:
        raise ValueError(f"{attack.kind}: no call from an entry service into another service to copy")
    svc = sorted(set(inward.svc))[int(rng.integers(inward.svc.nunique()))]
    inward = inward[inward.svc == svc]
    entry = inward.caller.value_counts().sort_index().idxmax()
    inward = inward[inward.caller == entry]
    base = _common_path(sorted(set(inward.OperationName)))
    rate = int(rng.integers(SCAN_RATE[0], SCAN_RATE[1] + 1))
    n = math.ceil(rate * (attack.end_ns - attack.start_ns) / NS / 60)
    paths = _scan_paths(base, set(replay.spans.OperationName[replay.spans.svc == svc]), n, rng)
    templates = []
    for trace in _sample(inward.TraceID, replay, rng).values():
        call = trace[(trace.svc == svc) & (trace.caller == entry)].iloc[0]
        templates.append((_ancestry(trace, str(call.SpanID)), call.SpanID))
    step, out = (attack.end_ns - attack.start_ns) / n, []
    for i, (path, u, twice) in enumerate(zip(paths, rng.random(n), rng.random(n) < 0.5)):
        first = attack.start_ns + int((i + u) * step)
        again = min(first + int(rng.uniform(0.2, 3.0) * NS), attack.end_ns - 1)
        for at in [first, again][: 1 + int(twice)]:
            rows, call_id = templates[int(rng.integers(len(templates)))]
            named = rows.assign(OperationName=rows.OperationName.where(rows.SpanID != call_id, path))
            out.append(_copy(named, at, ids))
    attack.spans, attack.services = pd.concat(out, ignore_index=True), [svc]
    attack.rpcs = [f"{entry}:{svc}:{p}" for p in paths]
    attack.note = f"{n} never-seen paths of {svc} under {base or '/'} ({rate}/min), {len(out)} requests"


BUILDERS: dict[str, Callable[[Replay, Attack, np.random.Generator, Ids], None]] = dict(
    zip(
        ATTACK_KINDS,
        (
            lateral_movement,
            credential_stuffing,
            scraping_amplification,
            slow_exfiltration,
            internal_flood,
            endpoint_enumeration,
        ),
    )
)


def _clear(folder: Path) -> None:
    """Remove what an earlier `inject` wrote (and nothing else)."""
    for path in [*folder.glob("dt=*/hour=*/attacks-*.parquet"), folder / "labels.parquet"]:
        path.unlink(missing_ok=True)


def _write_spans(replay: Replay, attack: Attack) -> None:
    """The attack's spans, hour-partitioned like the replay, as `attacks-<kind>.parquet`; their
    EndTimeUnixNano is start + Duration (the replay's own rows keep the capture's real end)."""
    spans = attack.spans.sort_values("StartTimeUnixNano", kind="stable").reset_index(drop=True)
    spans["EndTimeUnixNano"] = spans.StartTimeUnixNano + spans.Duration * US
    for hour, part in spans.groupby(spans.StartTimeUnixNano // (3600 * NS)):
        ts = datetime.fromtimestamp(int(hour) * 3600, UTC)
        folder = replay.folder / f"dt={ts:%Y-%m-%d}" / f"hour={ts:%H}"
        folder.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pandas(part[replay.schema.names], schema=replay.schema, preserve_index=False)
        pq.write_table(table.replace_schema_metadata(None), folder / f"attacks-{attack.kind}.parquet")


def write_labels(attacks: list[Attack], path: Path) -> None:
    """One `LABELS_SCHEMA` row per attack."""
    ts = partial(pd.Timestamp, tz="UTC")
    rows = [
        {"event_id": f"A{i:02d}-{a.kind}", "kind": a.kind, "start": ts(a.start_ns), "end": ts(a.end_ns),
         "request_type": "attack", "rpcs": a.rpcs, "note": a.note, "services": a.services, "spans": len(a.spans),
         "first_trace_end": ts(a.first_trace_end_ns)}
        for i, a in enumerate(attacks, 1)
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, LABELS_SCHEMA), path)


def inject_attacks(
    folder: Path,
    kinds: list[str] | None = None,
    seed: int = 0,
    train_s: int = 40 * 60,
    spacing_s: int = 120,
    room_s: int = ROOM_S,
) -> list[Attack]:
    """Add the attacks (in `ATTACK_KINDS` order) to the replay in `folder`; write their spans and
    labels. A filled replay places them in its fill (`place_in_fill`, `room_s`); one without fill
    after `train_s`, `spacing_s` apart (`place`)."""
    unknown = sorted(set(kinds or ATTACK_KINDS) - set(ATTACK_KINDS))
    if unknown:
        raise ValueError(f"unknown attack kind(s) {', '.join(unknown)}; choose from {', '.join(ATTACK_KINDS)}")
    _clear(folder)
    replay = load_replay(folder)
    starts = replay.spans.StartTimeUnixNano
    wanted = [k for k in ATTACK_KINDS if k in (kinds or ATTACK_KINDS)]
    stretches = fill_stretches(folder)
    if stretches is None:
        faults = fault_windows(folder / "fault_list.json")
        plan = place(wanted, int(starts.min()), int(starts.max()), faults, train_s, spacing_s)
    else:
        plan = place_in_fill(wanted, stretches, room_s)
    attacks = []
    for kind, lo, hi in plan:
        attack = Attack(kind, lo, hi)
        BUILDERS[kind](replay, attack, np.random.default_rng([seed, ATTACK_KINDS.index(kind)]), Ids(seed, kind))
        _write_spans(replay, attack)
        attacks.append(attack)
    write_labels(attacks, folder / "labels.parquet")
    return attacks


def _rpcs(attack: Attack) -> str:
    more = len(attack.rpcs) - 1
    return attack.rpcs[0] + (f" (+{more} more)" if more > 0 else "")


def inject_report(attacks: list[Attack], folder: Path) -> str:
    """What `rpcwatch inject` prints: each attack, then where the labels went and what to run next."""
    from tasks.app.report import table

    rows = [[a.kind, _stamp(a.start_ns), _stamp(a.end_ns)[11:], len(a.spans), _rpcs(a), a.note] for a in attacks]
    labels = folder / "labels.parquet"
    env = "" if fill_stretches(folder) is not None else f"{ENV} "  # a filled replay's prefix is long enough
    run = f"{env}rpcwatch run --source {folder} --format spans --mapping nezha-trainticket"
    done = table(["kind", "start", "end", "spans added", "RPC", "what"], rows)
    return f"{done}\nlabels: {labels}\nnext: {run}\n      {env}rpcwatch evaluate --labels {labels}"
