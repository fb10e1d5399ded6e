"""Labelled attacks injected into a small real TrainTicket replay (four captures of 2023-01-29, one
fault): new traffic only, where and how much, labels, reruns, and how `evaluate --labels` judges
them against incidents in a real warehouse file."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from helpers import shared_file
from tasks.app.cli import main
from tasks.evaluation import attacks as atk
from tasks.evaluation.labels import evaluate_labels, label_report
from tasks.evaluation.replay import NS, replay_days
from tasks.keys import node_key
from tasks.settings import Settings
from tasks.warehouse import opened

START = datetime(2023, 1, 29, 8, tzinfo=UTC)
FILES = ("08_43", "08_44", "08_45", "08_52", "08_53", "08_54", "08_58", "08_59", "09_00", "09_03", "09_04", "09_05")
TRAIN_S, SPACING_S = 60, 20  # the replay is 13 minutes long; real use keeps 40 min and 5 min


@pytest.fixture(scope="module")
def replay_source(tmp_path_factory) -> Path:
    """Four real captures (12 minute files) back to back from 08:00, with the fault injected at
    08:52:06 (08:04:56 .. 08:06:58 in replay time)."""
    day = tmp_path_factory.mktemp("day") / "2023-01-29"
    (day / "trace").mkdir(parents=True)
    (day / "normal").mkdir()
    for name in FILES:
        shutil.copy(shared_file("nezha-trainticket", "2023-01-29", "trace", f"{name}_trace.csv.gz"), day / "trace")
    faults = json.loads(shared_file("nezha-trainticket", "2023-01-29", "fault_list.json").read_text())
    (day / "fault_list.json").write_text(json.dumps({"08": faults["08"][1:2]}))
    out = day.parent / "replay"
    replay_days([day], out, START, progress=lambda _: None)
    return out


@pytest.fixture
def replay(replay_source: Path, tmp_path: Path, monkeypatch) -> Path:
    """A private copy of the replay; attacks last 60 s so that all six fit in 13 minutes."""
    monkeypatch.setattr(atk, "NOMINAL_S", dict.fromkeys(atk.ATTACK_KINDS, 60))
    return Path(shutil.copytree(replay_source, tmp_path / "replay"))


def _inject(folder: Path, seed: int = 0, kinds: list[str] | None = None) -> list[atk.Attack]:
    return atk.inject_attacks(folder, kinds, seed, train_s=TRAIN_S, spacing_s=SPACING_S)


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.*")}


def _by_kind(folder: Path) -> dict[str, pd.DataFrame]:
    """Each attack's spans as written, with `svc` and `caller` (read back through `load_replay`)."""
    spans = atk.load_replay(folder, with_attacks=True).spans
    out = {}
    for path in folder.glob("dt=*/hour=*/attacks-*.parquet"):
        traces = set(pq.read_table(path, columns=["TraceID"]).column("TraceID").to_pylist())
        out[path.stem.removeprefix("attacks-")] = spans[spans.TraceID.isin(traces)]
    return out


def test_attacks_are_new_traffic_after_training_apart_and_away_from_the_fault(replay):
    before = _digests(replay)
    attacks = _inject(replay)
    after = _digests(replay)
    assert {k: v for k, v in after.items() if k in before} == before, "the replay's own files are untouched"
    assert sorted(set(after) - set(before)) == sorted(
        [f"dt=2023-01-29/hour=08/attacks-{k}.parquet" for k in atk.ATTACK_KINDS] + ["labels.parquet"]
    )
    original = atk.load_replay(replay).spans
    added = pd.concat([a.spans for a in attacks])
    assert not set(added.TraceID) & set(original.TraceID) and not set(added.SpanID) & set(original.SpanID)
    assert added.SpanID.is_unique and added.TraceID.str.fullmatch("[0-9a-f]{32}").all()
    [(fault_start, fault_end)] = atk.fault_windows(replay / "fault_list.json")
    first = int(original.StartTimeUnixNano.min())
    for a, b in zip(attacks, attacks[1:]):
        assert b.start_ns - a.end_ns >= SPACING_S * NS
    for a in attacks:
        assert a.start_ns >= first + TRAIN_S * NS and a.end_ns - a.start_ns == 60 * NS
        assert a.end_ns < fault_start.value or a.start_ns > fault_end.value, f"{a.kind} overlaps the fault"
        starts = a.spans.StartTimeUnixNano
        assert starts.min() >= a.start_ns and starts.max() <= a.end_ns


def test_only_lateral_movement_and_the_internal_flood_add_a_new_edge(replay):
    attacks = {a.kind: a for a in _inject(replay)}
    original = atk.load_replay(replay)
    edges = set(zip(original.calls().caller, original.calls().svc))
    for kind, spans in _by_kind(replay).items():
        cross = spans[spans.caller.notna() & (spans.caller != spans.svc)]
        new = set(zip(cross.caller, cross.svc)) - edges
        if kind in ("lateral_movement", "internal_flood"):
            [rpc] = attacks[kind].rpcs
            caller, callee, op = rpc.split(":", 2)
            assert new == {(caller, callee)} and callee not in original.entry
            assert (cross[cross.caller == caller].OperationName == op).any(), "an operation the callee serves"
            assert op in set(original.calls().OperationName[original.calls().svc == callee])
            assert attacks[kind].services == [caller, callee] and caller not in original.entry
        else:
            assert new == set(), f"{kind} only repeats real calls"


def test_credential_stuffing_floods_the_login_at_ten_times_its_rate(replay):
    [attack] = _inject(replay, kinds=["credential_stuffing"])
    assert attack.rpcs == ["ts-gateway-service:ts-auth-service:/api/v1/users/login"]
    assert attack.services == ["ts-auth-service"], "the gateway every request passes does not count"
    spans = atk.load_replay(replay, with_attacks=True).spans
    login = spans[(spans.svc == "ts-auth-service") & (spans.OperationName == "/api/v1/users/login")]
    original = login[~login.TraceID.isin(set(attack.spans.TraceID))]
    normal = len(original) / ((spans.StartTimeUnixNano.max() - spans.StartTimeUnixNano.min()) / NS / 60)
    inside = login.StartTimeUnixNano.between(attack.start_ns, attack.end_ns)
    flood = inside.sum() / ((attack.end_ns - attack.start_ns) / NS / 60)
    assert flood / normal >= 10, (flood, normal)


def test_scraping_fans_out_beyond_anything_in_the_replay(replay):
    [attack] = _inject(replay, kinds=["scraping_amplification"])
    original = atk.load_replay(replay).spans
    scraped = _by_kind(replay)["scraping_amplification"]
    assert atk.fan_out(scraped) > atk.fan_out(original) >= 2
    [rpc] = attack.rpcs
    caller, callee, op = rpc.split(":", 2)
    per_trace = scraped[(scraped.caller == caller) & (scraped.svc == callee) & (scraped.OperationName == op)]
    assert per_trace.groupby("TraceID").size().min() > atk.fan_out(original)


def test_exfiltration_is_a_few_long_calls_on_a_rare_rpc(replay):
    [attack] = _inject(replay, kinds=["slow_exfiltration"])
    calls = atk.load_replay(replay).calls()
    [rpc] = attack.rpcs
    counts = calls.rpc[~calls.caller.isin(atk.load_replay(replay).entry)].value_counts()
    assert counts[rpc] <= counts.quantile(0.1), "one of the rarest RPCs"
    spans = _by_kind(replay)["slow_exfiltration"]
    caller, callee, op = rpc.split(":", 2)
    transfers = spans[(spans.caller == caller) & (spans.svc == callee) & (spans.OperationName == op)]
    assert 3 <= len(transfers) <= 4 and (transfers.Duration >= 15e6).all()
    assert ((transfers.StartTimeUnixNano + transfers.Duration * 1000) <= attack.end_ns).all()


def test_labels_round_trip_and_a_rerun_gives_the_same_files(replay):
    attacks = _inject(replay, seed=7)
    labels = pq.read_table(replay / "labels.parquet")
    assert labels.schema.equals(atk.LABELS_SCHEMA)
    rows = labels.to_pylist()
    assert [r["kind"] for r in rows] == list(atk.ATTACK_KINDS)
    for row, a in zip(rows, attacks):
        assert (
            abs(row["start"].timestamp() * NS - a.start_ns) < 1e6 and abs(row["end"].timestamp() * NS - a.end_ns) < 1e6
        )
        assert (row["rpcs"], row["services"], row["spans"]) == (a.rpcs, a.services, len(a.spans))
    first = {p: pq.read_table(replay / p) for p in _digests(replay) if "attacks-" in p or p == "labels.parquet"}
    _inject(replay, seed=7)
    assert all(pq.read_table(replay / p).equals(t) for p, t in first.items())
    assert {p for p in _digests(replay) if "attacks-" in p} == {p for p in first if "attacks-" in p}
    _inject(replay, seed=8, kinds=["lateral_movement"])
    assert [p.name for p in replay.rglob("attacks-*")] == ["attacks-lateral_movement.parquet"]
    assert pq.read_table(replay / "labels.parquet").num_rows == 1


def _incident(start: datetime, *rpcs: tuple[str, str], seconds: int = 60) -> tuple:
    nodes = [node_key(caller, callee, "op", "rpc") for caller, callee in rpcs]
    return (f"i-{start:%H%M%S}", start, start + timedelta(seconds=seconds), [1], nodes, 3.0, ["traffic_spike"], 2)


def test_evaluate_counts_an_attack_detected_when_an_incident_touches_its_services(replay, settings: Settings):
    attacks = {a.kind: a for a in _inject(replay)}
    [(fault_start, _)] = atk.fault_windows(replay / "fault_list.json")

    def at(ns: int, plus_s: int = 0) -> datetime:
        return datetime.fromtimestamp(ns / NS, UTC).replace(tzinfo=None) + timedelta(seconds=plus_s)

    lateral, stuffing = attacks["lateral_movement"], attacks["credential_stuffing"]
    with opened(settings.warehouse) as con:
        con.execute("INSERT INTO score_runs (hour, pattern_id, status) VALUES ('2023-01-29 08:00', 1, 'scored')")
        con.executemany(
            "INSERT INTO incidents (incident_id, start_ts, end_ts, patterns, nodes, peak_score, kinds, points) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                _incident(at(lateral.start_ns, 20), (lateral.services[0], "ts-station-service")),  # detects
                _incident(at(stuffing.start_ns, 10), ("ts-food-service", "ts-delivery-service")),  # elsewhere
                _incident(fault_start.to_pydatetime() + timedelta(seconds=30), ("ts-contacts-service", "x")),
                _incident(at(max(a.end_ns for a in attacks.values()), 2 * atk.SLACK_S), ("a", "b")),  # false
            ],
        )
    ours, naive, extra = evaluate_labels(settings, replay / "labels.parquet")
    ids = {a.kind: f"A{i:02d}-{a.kind}" for i, a in enumerate(attacks.values(), 1)}
    # from the end of the first attack trace to the end of the incident's first (60-s) bucket
    delay = (at(lateral.start_ns, 20 + 60) - at(lateral.first_trace_end_ns)).total_seconds()
    assert 0 < delay <= 80
    assert ours.per_event == {ids[k]: "missed" for k in atk.ATTACK_KINDS} | {
        ids["lateral_movement"]: f"detected after {delay:.0f} s"
    }
    assert (ours.events, ours.detected, ours.incidents, ours.true_incidents) == (6, 1, 4, 3)
    assert ours.median_delay_s == pytest.approx(delay, abs=1e-3) and ours.precision == pytest.approx(1 / 2)
    assert (naive.detected, naive.incidents) == (0, 0), "no rpc_series: the naive rule flags nothing"
    assert extra == {"fault_windows": 1.0, "rpcwatch_incidents_in_fault_windows": 1.0}
    report = label_report(ours, naive, extra)
    rows = {line.split()[0]: line.split()[1:] for line in report.splitlines() if line.strip()}
    assert rows["rpcwatch"][:6] == ["6", "1", "0.17", "4", "1", "0.50"]
    assert rows[ids["lateral_movement"]] == ["detected", "after", f"{delay:.0f}", "s", "missed"]


def test_the_command_line_injects_and_says_why_it_cannot(replay, capsys):
    assert main(["inject", str(replay), "--kinds", "credential_stuffing,bogus"]) == 2
    assert "unknown attack kind(s) bogus" in capsys.readouterr().err
    assert main(["inject", str(replay), "--kinds", "credential_stuffing"]) == 2, "40 min of training do not fit"
    assert "no fault-free stretch of 60 s left for credential_stuffing" in capsys.readouterr().err
    attacks = _inject(replay, kinds=["credential_stuffing"])
    text = atk.inject_report(attacks, replay)
    assert "credential_stuffing" in text and f"labels: {replay / 'labels.parquet'}" in text


def test_dense_faults_leave_short_attacks_in_the_gaps_between_them():
    """As on a whole Nezha day: a fault every 3 minutes, 100 s after the previous window's end."""
    start = pd.Timestamp("2023-01-29 08:25")
    faults = [(start + timedelta(minutes=3 * i, seconds=100), start + timedelta(minutes=3 * i + 3)) for i in range(28)]
    placed = atk.place(list(atk.ATTACK_KINDS), start.value, (start + timedelta(minutes=86)).value, faults, 2400, 300)
    assert [k for k, _, _ in placed] == list(atk.ATTACK_KINDS)
    for (_, lo, hi), (_, nxt, _) in zip(placed, placed[1:] + [("", 10**20, 0)]):
        assert lo >= (start + timedelta(minutes=40)).value and nxt - hi >= 300 * NS
        assert atk.MIN_S * NS <= hi - lo <= (100 - 2 * atk.MARGIN_S) * NS, "at most the gap, less the margins"
        assert all(hi <= a.value - atk.MARGIN_S * NS or lo >= b.value + atk.MARGIN_S * NS for a, b in faults)
    with pytest.raises(ValueError, match="no fault-free stretch of 60 s left for slow_exfiltration"):
        atk.place(list(atk.ATTACK_KINDS), start.value, (start + timedelta(minutes=60)).value, faults, 2400, 300)
