"""Attacks in a filled replay (`rpcwatch replay --fill`), on a tiny hand-built replay folder: placed
in the fill only, whole, with attack-free fill around them; the two kinds that need no persistence
to be seen (a flood on a never-seen internal edge, an endpoint enumeration); the same attacks for
the same seed; and how `evaluate --labels` (table and JSON) judges them: delays from the end of the
first attack trace, false incidents counted around each attack."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.app.cli import main
from tasks.evaluation import attacks as atk
from tasks.evaluation.labels import evaluate_labels
from tasks.evaluation.replay import NS
from tasks.keys import node_key
from tasks.settings import Settings
from tasks.warehouse import opened

START = pd.Timestamp("2023-01-29 02:00")  # naive UTC, the replay's first second
PREFIX_MIN, END_MIN = 30, 160  # the clean prefix ends at 02:30; the replay at 04:40
CAPTURES = [(30, 33), (60, 63), (150, 153)]  # minutes from START where real captures sit
FAULT = (61, 63)  # one fault window, inside the second capture
GW = "ts-gateway-service"
# trace shapes: (span, parent, service, operation, start offset ms, duration ms); parent None: root
SHAPES = [
    [
        ("r", None, GW, "/*", 0, 200),
        ("c1", "r", GW, "HTTP POST", 1, 190),
        ("s1", "c1", "ts-travel-service", "/api/v1/travelservice/trips/left", 2, 180),
        ("i1", "s1", "ts-travel-service", "TravelController.query", 3, 170),
        ("c2", "i1", "ts-travel-service", "HTTP GET", 10, 50),
        ("s2", "c2", "ts-route-service", "/api/v1/routeservice/routes/{routeId}", 11, 45),
        ("c3", "i1", "ts-travel-service", "HTTP GET", 70, 40),
        ("s3", "c3", "ts-route-service", "/api/v1/routeservice/routes/{routeId}", 71, 35),
    ],
    [
        ("r", None, GW, "/*", 0, 120),
        ("c1", "r", GW, "HTTP POST", 1, 110),
        ("s1", "c1", "ts-auth-service", "/api/v1/users/login", 2, 100),
        ("i1", "s1", "ts-auth-service", "UserController.getToken", 3, 90),
        ("c2", "i1", "ts-auth-service", "HTTP GET", 10, 30),
        ("s2", "c2", "ts-user-service", "/api/v1/userservice/users/{userName}", 11, 25),
    ],
    [
        ("r", None, GW, "/*", 0, 90),
        ("c1", "r", GW, "HTTP GET", 1, 80),
        ("s1", "c1", "ts-travel-service", "/api/v1/travelservice/trip_detail", 2, 70),
    ],
    [
        ("r", None, GW, "/*", 0, 150),
        ("c1", "r", GW, "HTTP POST", 1, 140),
        ("s1", "c1", "ts-order-service", "/api/v1/orderservice/order/refresh", 2, 130),
        ("i1", "s1", "ts-order-service", "OrderController.query", 3, 120),
        ("c2", "i1", "ts-order-service", "HTTP POST", 10, 40),
        ("s2", "c2", "ts-station-service", "/api/v1/stationservice/stations/idlist", 11, 35),
    ],
]
SCHEMA = pa.schema(
    [(c, pa.string()) for c in ("TraceID", "SpanID", "ParentID", "PodName", "OperationName")]
    + [(c, pa.int64()) for c in ("StartTimeUnixNano", "EndTimeUnixNano", "Duration")]
)


def _ns(minute: float) -> int:
    return (START + timedelta(minutes=minute)).value


def _id(text: str, size: int = 8) -> str:
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


def _spans() -> pd.DataFrame:
    """A trace every 10 s from 02:00 to 04:40, the shapes in turn."""
    rows = []
    for i, at in enumerate(range(_ns(0), _ns(END_MIN), 10 * NS)):
        trace = _id(f"t{i}", 16)
        for span, parent, service, op, offset_ms, ms in SHAPES[i % len(SHAPES)]:
            start = at + offset_ms * 1_000_000
            rows.append(
                {
                    "TraceID": trace,
                    "SpanID": _id(f"{trace}/{span}"),
                    "ParentID": "root" if parent is None else _id(f"{trace}/{parent}"),
                    "PodName": f"{service}-5d8f7c9b-x{i % 2}k2q",
                    "OperationName": op,
                    "StartTimeUnixNano": start,
                    "EndTimeUnixNano": start + ms * 1_000_000,
                    "Duration": ms * 1000,
                }
            )
    return pd.DataFrame(rows)


def _capture_of(starts: pd.Series) -> pd.Series:
    """Which capture each span start falls in (-1: fill)."""
    out = pd.Series(-1, index=starts.index)
    for k, (lo, hi) in enumerate(CAPTURES):
        out[(starts >= _ns(lo)) & (starts < _ns(hi))] = k
    return out


def _write_replay(folder: Path, fill: bool = True) -> Path:
    """The replay folder as `rpcwatch replay --fill` lays it out: hour partitions with captures
    (`part-<day>-runNN`) and fill (`part-fill-<day>-000`), runs.parquet, fault_list.json, replay.json."""
    spans = _spans()
    spans = spans.assign(capture=_capture_of(spans.StartTimeUnixNano), hour=spans.StartTimeUnixNano // (3600 * NS))
    for (hour, capture), part in spans.groupby(["hour", "capture"]):
        ts = datetime.fromtimestamp(int(hour) * 3600, UTC)
        where = folder / f"dt={ts:%Y-%m-%d}" / f"hour={ts:%H}"
        where.mkdir(parents=True, exist_ok=True)
        name = "part-fill-2023-01-29-000" if capture < 0 else f"part-2023-01-29-run{capture:02d}"
        pq.write_table(
            pa.Table.from_pandas(part[SCHEMA.names], SCHEMA, preserve_index=False), where / f"{name}.parquet"
        )
    runs = [
        {
            "day": "2023-01-29",
            "run": k,
            "files": 3,
            "real_start": (START + timedelta(hours=6, minutes=lo)).tz_localize("UTC"),
            "real_end": (START + timedelta(hours=6, minutes=hi)).tz_localize("UTC"),
            "replay_start": (START + timedelta(minutes=lo)).tz_localize("UTC"),
            "replay_end": (START + timedelta(minutes=hi)).tz_localize("UTC"),
            "offset_s": -6 * 3600.0,
        }
        for k, (lo, hi) in enumerate(CAPTURES)
    ]
    pq.write_table(pa.Table.from_pylist(runs), folder / "runs.parquet")
    stamp = "{:%Y-%m-%d %H:%M:%S}".format
    fault = {
        "inject_time": stamp(START + timedelta(minutes=FAULT[0])),
        "window_end": stamp(START + timedelta(minutes=FAULT[1])),
        "service": "ts-order-service",
        "inject_type": "cpu_contention",
        "observable": True,
    }
    (folder / "fault_list.json").write_text(json.dumps({"faults": [fault]}))
    meta = {
        "fill": fill,
        "start": stamp(START),
        "prefix_end": stamp(START + timedelta(minutes=PREFIX_MIN if fill else 0)),
        "end": stamp(START + timedelta(minutes=END_MIN)),
    }
    (folder / "replay.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    return _write_replay(tmp_path / "replay")


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.*")}


def _added(folder: Path, kind: str) -> pd.DataFrame:
    """The spans an attack wrote, with `svc`, `caller` (read back through `load_replay`)."""
    spans = atk.load_replay(folder, with_attacks=True).spans
    traces = set()
    for path in folder.glob(f"dt=*/hour=*/attacks-{kind}.parquet"):
        traces |= set(pq.read_table(path, columns=["TraceID"]).column("TraceID").to_pylist())
    return spans[spans.TraceID.isin(traces)]


def test_attacks_lie_whole_in_the_fill_with_attack_free_fill_around_them(filled):
    before = _digests(filled)
    attacks = atk.inject_attacks(filled, seed=0)
    after = _digests(filled)
    assert {k: v for k, v in after.items() if k in before} == before, "the replay's own files are untouched"
    assert [a.kind for a in attacks] == list(atk.ATTACK_KINDS) and len(atk.ATTACK_KINDS) == 6
    room = atk.ROOM_S * NS
    blocked = [(_ns(lo), _ns(hi)) for lo, hi in [*CAPTURES, FAULT]]
    labels = pq.read_table(filled / "labels.parquet").to_pylist()
    for attack, label in zip(attacks, labels):
        assert 120 <= atk.NOMINAL_S[attack.kind] <= 420, "2-7 minutes"
        assert attack.end_ns - attack.start_ns == atk.NOMINAL_S[attack.kind] * NS, f"{attack.kind} cut short"
        assert attack.start_ns - room >= _ns(PREFIX_MIN), f"{attack.kind}: its room starts after the prefix"
        assert attack.end_ns + room <= _ns(END_MIN)
        for lo, hi in blocked:
            assert attack.end_ns + room <= lo or attack.start_ns - room >= hi, f"{attack.kind} near {lo}..{hi}"
        spans = attack.spans
        ends = spans.StartTimeUnixNano + spans.Duration * 1000
        assert spans.StartTimeUnixNano.min() >= attack.start_ns and ends.max() <= attack.end_ns + NS
        first = spans[spans.TraceID == spans.TraceID[spans.StartTimeUnixNano.idxmin()]]
        first_end = int((first.StartTimeUnixNano + first.Duration * 1000).max())
        assert label["first_trace_end"] == datetime.fromtimestamp(first_end // 1_000_000 / 1000, UTC)
    for a, b in zip(attacks, attacks[1:]):
        assert b.start_ns - a.end_ns >= room or a.start_ns - b.end_ns >= room, "rooms hold no other attack"


def test_without_fill_attacks_keep_the_back_to_back_placement(tmp_path):
    folder = _write_replay(tmp_path / "replay", fill=False)
    [attack] = atk.inject_attacks(folder, ["credential_stuffing"], train_s=60)
    assert attack.start_ns == _ns(1), "right after `train_s`, in captured traffic: the dirty-history variant"
    assert 60 * NS <= attack.end_ns - attack.start_ns <= 120 * NS


def test_too_little_fill_is_a_clear_error(filled):
    with pytest.raises(ValueError, match="no stretch of fill after the prefix holds lateral_movement"):
        atk.inject_attacks(filled, ["lateral_movement"], room_s=3600)


def test_internal_flood_opens_a_never_seen_edge_into_an_internal_rpc_at_a_flood_rate(filled):
    [attack] = atk.inject_attacks(filled, ["internal_flood"], seed=0)
    original = atk.load_replay(filled)
    calls = original.calls()
    [rpc] = attack.rpcs
    a, b, op = rpc.split(":", 2)
    assert (a, b) not in set(zip(calls.caller, calls.svc)), "a caller never seen calling it"
    assert a not in original.entry and b not in original.entry, "an internal RPC"
    assert op in set(calls.OperationName[calls.svc == b]) and attack.services == [a, b]
    spans = _added(filled, "internal_flood")
    cross = spans[spans.caller.notna() & (spans.caller != spans.svc)]
    assert set(zip(cross.caller, cross.svc)) - set(zip(calls.caller, calls.svc)) == {(a, b)}
    roots = spans[spans.ParentID == "root"]
    assert set(roots.svc) == {a} and roots.TraceID.nunique() == spans.TraceID.nunique(), "each call its own trace"
    flood = ((cross.caller == a) & (cross.svc == b) & (cross.OperationName == op)).sum()
    normal = ((calls.svc == b) & (calls.OperationName == op)).sum() / original.minutes
    minutes = (attack.end_ns - attack.start_ns) / NS / 60
    assert flood / minutes >= atk.FLOOD_FACTOR * normal and flood / minutes >= atk.FLOOD_FACTOR


def test_endpoint_enumeration_calls_many_never_seen_paths_of_one_service_each_minute(filled):
    [attack] = atk.inject_attacks(filled, ["endpoint_enumeration"], seed=0)
    original = atk.load_replay(filled)
    [svc] = attack.services
    known = set(original.spans.OperationName[original.spans.svc == svc])
    spans = _added(filled, "endpoint_enumeration")
    served = spans[spans.svc == svc]
    assert set(served.caller) <= set(original.entry), "from the entry service"
    assert not served.OperationName.isin(known).any(), "every request a never-seen path"
    assert not (spans.caller == svc).any(), "the service calls nothing on: the path does not exist"
    assert served.groupby("OperationName").size().max() <= 2, "each path once or twice"
    assert sorted(attack.rpcs) == sorted(f"{GW}:{svc}:{p}" for p in set(served.OperationName))
    for minute in range(atk.NOMINAL_S["endpoint_enumeration"] // 60):
        lo = attack.start_ns + minute * 60 * NS
        inside = served[(served.StartTimeUnixNano >= lo) & (served.StartTimeUnixNano < lo + 60 * NS)]
        assert inside.OperationName.nunique() >= atk.SCAN_RATE[0], f"minute {minute}"
    common = {"ts-travel-service": "/api/v1/travelservice/"}.get(svc, "/api/v1/")
    assert served.OperationName.str.startswith(common).all(), "under the service's own path"


def test_the_same_seed_gives_the_same_attacks_and_another_seed_others(filled):
    atk.inject_attacks(filled, seed=5)
    written = {p: pq.read_table(filled / p) for p in _digests(filled) if "attacks-" in p or p == "labels.parquet"}
    atk.inject_attacks(filled, seed=5)
    assert all(pq.read_table(filled / p).equals(t) for p, t in written.items())
    atk.inject_attacks(filled, seed=6)
    again = pq.read_table(filled / "labels.parquet").to_pylist()
    first = written["labels.parquet"].to_pylist()
    assert [r["start"] for r in again] == [r["start"] for r in first], "placement does not depend on the seed"
    assert again[-1]["rpcs"] != first[-1]["rpcs"], "the scanner's paths do"


def _incident(start: datetime, *services: tuple[str, str]) -> tuple:
    nodes = [node_key(caller, callee, "op", "rpc") for caller, callee in services]
    return (f"i-{start:%H%M%S}", start, start + timedelta(minutes=1), [1], nodes, 3.0, ["traffic_spike"], 1)


def test_evaluate_times_attacks_from_their_first_trace_and_counts_false_incidents_around_them(
    filled, settings: Settings, capsys
):
    attacks = {a.kind: a for a in atk.inject_attacks(filled, seed=0)}
    lateral, stuffing = attacks["lateral_movement"], attacks["credential_stuffing"]

    def minute_of(ns: int, plus_s: int = 0) -> datetime:  # the start of the bucket holding ns + plus_s
        at = datetime.fromtimestamp(ns // NS + plus_s, UTC).replace(tzinfo=None)
        return at.replace(second=0)

    detect = minute_of(lateral.first_trace_end_ns, 30)
    with opened(settings.warehouse) as con:
        con.executemany(
            "INSERT INTO score_runs (hour, pattern_id, status) VALUES (?, 1, 'scored')",
            [(START.to_pydatetime() + timedelta(hours=h),) for h in range(3)],
        )
        con.executemany(
            "INSERT INTO incidents (incident_id, start_ts, end_ts, patterns, nodes, peak_score, kinds, points) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                _incident(detect, (lateral.services[0], "ts-x")),  # detects lateral movement
                _incident(minute_of(stuffing.start_ns, -150), ("ts-a", "ts-b")),  # false, before stuffing
                _incident(minute_of(stuffing.end_ns, 10), ("ts-a", "ts-b")),  # in its window, elsewhere: not false
                _incident(minute_of(_ns(PREFIX_MIN) + 60 * NS), ("ts-a", "ts-b")),  # false, far from any attack
            ],
        )
    ours, _, _ = evaluate_labels(settings, filled / "labels.parquet")
    bucket_end = detect + timedelta(seconds=settings.bucket_seconds)
    first_end = datetime.fromtimestamp(lateral.first_trace_end_ns / NS, UTC).replace(tzinfo=None)
    expected = (bucket_end - first_end).total_seconds()
    assert 30 <= expected <= 90
    assert main(["evaluate", "--home", str(settings.home), "--labels", str(filled / "labels.parquet"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    events = {e["event"]: e for e in out["rpcwatch"]["events"]}
    assert list(events) == [f"A{i:02d}-{k}" for i, k in enumerate(atk.ATTACK_KINDS, 1)]
    assert events["A01-lateral_movement"]["delay_s"] == pytest.approx(expected, abs=1e-3)
    assert events["A01-lateral_movement"]["detected"] is True
    assert events["A02-credential_stuffing"] == {
        "event": "A02-credential_stuffing",
        "kind": "credential_stuffing",
        "detected": False,
        "delay_s": None,
        "false_incidents_around": 1,
    }
    # the fill between two neighbouring attacks is the room of both; the far one is nobody's
    assert [e["false_incidents_around"] for e in events.values()] == [1, 1, 0, 0, 0, 0], "not the far one"
    assert out["rpcwatch"]["false_incidents"] == 2 and out["naive"]["false_incidents"] == 0
    assert out["rpcwatch"]["detected"] == 1
    assert ours.per_event["A01-lateral_movement"] == f"detected after {expected:.0f} s"
