"""Security case studies on real traffic: labelled attacks added to a `rpcwatch replay` folder.

Each attack kind builds extra spans from the replay's own traffic (copies of real traces with
fresh trace and span ids, shifted in time), deterministic for a seed:

- `lateral_movement`: a few calls a minute on a new caller -> callee edge, to an operation it serves.
- `credential_stuffing`: the login RPC (an operation with `login` in ts-auth-service or
  ts-user-service; else the busiest entry operation) at `FLOOD_FACTOR` times its replay rate.
- `scraping_amplification`: copies of real traces whose query RPC (a call made with HTTP GET) is
  repeated `AMPLIFICATION` times the replay's largest per-trace fan-out of any RPC.
- `slow_exfiltration`: a low-rate stream on the replay's rarest RPCs with transfers of 15-60 s.

Placement: after the first `train_s` of the replay (the models learn there), `spacing_s` apart,
in stretches free of the fault windows of its `fault_list.json` (`inject_time` .. `window_end`,
`MARGIN_S` either side). An attack lasts `NOMINAL_S`, cut to the free stretch (at least `MIN_S`):
Nezha days have a fault every ~3 minutes, so there attacks last about 1-1.5 minutes.

Reads the replay's span Parquet (`dt=/hour=`, Nezha columns) and fault list. Writes, never touching
the replay's files, `attacks-<kind>.parquet` into the hour partitions and `labels.parquet` (see
`LABELS_SCHEMA`) at the root; a rerun first removes what the last one wrote. Judged by `labels.py`.
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

from tasks.evaluation.replay import FAULT_WINDOW_S, NS
from tasks.ingest.formats import SpanMapping
from tasks.synth.events import LABEL_SCHEMA

ATTACK_KINDS = ("lateral_movement", "credential_stuffing", "scraping_amplification", "slow_exfiltration")
NOMINAL_S = dict(zip(ATTACK_KINDS, (240, 120, 180, 420)))  # how long each kind lasts where there is room
MIN_S, MARGIN_S, SLACK_S = 60, 15, 60  # shortest attack; gap to fault windows; detection slack after an attack
FLOOD_FACTOR, AMPLIFICATION = 15, 4
LOGIN_SERVICES, SENSITIVE = ("ts-auth-service", "ts-user-service"), ("user", "auth", "payment", "order", "contacts")
# the synthetic labels' columns plus `services` (whose incidents count) and `spans` (how many added)
LABELS_SCHEMA = LABEL_SCHEMA.append(pa.field("services", pa.list_(pa.string()))).append(pa.field("spans", pa.int64()))
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


def place(
    kinds: list[str], start_ns: int, end_ns: int, faults: list[tuple[pd.Timestamp, pd.Timestamp]],
    train_s: int, spacing_s: int,
) -> list[tuple[str, int, int]]:  # fmt: skip
    """(kind, start, end) of each attack: in order, after `train_s`, `spacing_s` apart, in free stretches."""
    free, cursor = [], start_ns + train_s * NS
    for lo, hi in [(a.value - MARGIN_S * NS, b.value + MARGIN_S * NS) for a, b in faults] + [(end_ns, end_ns)]:
        if min(lo, end_ns) > cursor:
            free.append((cursor, min(lo, end_ns)))
        cursor = max(cursor, hi)
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


def lateral_movement(replay: Replay, attack: Attack, rng: np.random.Generator, ids: Ids) -> None:
    """Copies of real traces through service A, each with a new call from A to B (an edge never seen)."""
    calls = replay.calls()
    edges = set(zip(calls.caller, calls.svc))
    callers = sorted(set(calls.caller) - replay.entry)
    callees = sorted(set(calls.svc) - replay.entry)
    pairs = [(a, b) for a in callers for b in callees if a != b and (a, b) not in edges]
    if not pairs:
        raise ValueError("lateral_movement: every service already calls every other")
    sensitive = [p for p in pairs if any(w in p[1] for w in SENSITIVE)] or pairs
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
    minutes = (replay.spans.StartTimeUnixNano.max() - replay.spans.StartTimeUnixNano.min()) / NS / 60
    rate = len(login) / max(minutes, 1 / 60)
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


BUILDERS: dict[str, Callable[[Replay, Attack, np.random.Generator, Ids], None]] = dict(
    zip(ATTACK_KINDS, (lateral_movement, credential_stuffing, scraping_amplification, slow_exfiltration))
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
         "request_type": "attack", "rpcs": a.rpcs, "note": a.note, "services": a.services, "spans": len(a.spans)}
        for i, a in enumerate(attacks, 1)
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, LABELS_SCHEMA), path)


def inject_attacks(
    folder: Path, kinds: list[str] | None = None, seed: int = 0, train_s: int = 40 * 60, spacing_s: int = 300
) -> list[Attack]:
    """Add the attacks (in `ATTACK_KINDS` order) to the replay in `folder`; write their spans and labels."""
    unknown = sorted(set(kinds or ATTACK_KINDS) - set(ATTACK_KINDS))
    if unknown:
        raise ValueError(f"unknown attack kind(s) {', '.join(unknown)}; choose from {', '.join(ATTACK_KINDS)}")
    _clear(folder)
    replay = load_replay(folder)
    starts = replay.spans.StartTimeUnixNano
    wanted = [k for k in ATTACK_KINDS if k in (kinds or ATTACK_KINDS)]
    faults = fault_windows(folder / "fault_list.json")
    plan = place(wanted, int(starts.min()), int(starts.max()), faults, train_s, spacing_s)
    attacks = []
    for kind, lo, hi in plan:
        attack = Attack(kind, lo, hi)
        BUILDERS[kind](replay, attack, np.random.default_rng([seed, ATTACK_KINDS.index(kind)]), Ids(seed, kind))
        _write_spans(replay, attack)
        attacks.append(attack)
    write_labels(attacks, folder / "labels.parquet")
    return attacks


def inject_report(attacks: list[Attack], folder: Path) -> str:
    """What `rpcwatch inject` prints: each attack, then where the labels went and what to run next."""
    from tasks.app.report import table

    rows = [[a.kind, _stamp(a.start_ns), _stamp(a.end_ns)[11:], len(a.spans), *a.rpcs, a.note] for a in attacks]
    labels = folder / "labels.parquet"
    run = f"{ENV} rpcwatch run --source {folder} --format spans --mapping nezha-trainticket"
    done = table(["kind", "start", "end", "spans added", "RPC", "what"], rows)
    return f"{done}\nlabels: {labels}\nnext: {run}\n      {ENV} rpcwatch evaluate --labels {labels}"
