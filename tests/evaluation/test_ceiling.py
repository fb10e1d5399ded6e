"""The label-using ceiling on hand-built traces: calls into a service are judged apart from the calls
it makes, the statistic does not saturate on busy services, fault-free stretches are invisible, and
with a fault-free fill only the real captures make the null."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.evaluation.ceiling import ceiling_report, fault_free_stretches, fault_visibility, replay_captures

T0 = pd.Timestamp("2026-01-01 00:00:00")
WINDOW = pd.Timedelta(seconds=180)


def _traffic(
    seconds: int,
    seed: int,
    per_s: float = 0.5,
    db_ms: np.ndarray | float = 5.0,
    log_calls: np.ndarray | int = 0,
) -> pd.DataFrame:
    """Poisson root traces: user -> gw (root), gw -> mid (client rt = mid's server rt + ~2 ms of
    network), mid -> db 4 times in a row (db's median latency may vary per second: an array), and mid
    -> log `log_calls` times without waiting (a count per second: an array)."""
    rng = np.random.default_rng(seed)
    n = rng.poisson(per_s * seconds)
    start = np.sort(rng.uniform(0, seconds, n))
    second = start.astype(int)
    db_median = np.broadcast_to(np.asarray(db_ms, dtype=float), (seconds,))[second]
    logs = np.broadcast_to(np.asarray(log_calls), (seconds,))[second]
    db_trace, log_trace = np.repeat(np.arange(n), 4), np.repeat(np.arange(n), logs)
    db_rt = rng.lognormal(0, 0.3, len(db_trace)) * db_median[db_trace]
    mid_server = np.bincount(db_trace, weights=db_rt, minlength=n) + rng.lognormal(np.log(3), 0.3, n)
    mid_client = mid_server + rng.lognormal(np.log(2), 0.3, n)
    gw_rt = mid_client + rng.lognormal(np.log(2), 0.3, n)
    ids = np.char.add("t", np.arange(n).astype(str))
    ts = T0 + pd.to_timedelta(start, unit="s")
    frames = [
        pd.DataFrame(
            {"trace_id": ids, "call_id": "0", "parent_call_id": None, "caller": "user", "callee": "gw"}
        ).assign(interface="/home", ts=ts, rt_ms=gw_rt, server_rt_ms=gw_rt - 0.5),
        pd.DataFrame({"trace_id": ids, "call_id": "1", "parent_call_id": "0", "caller": "gw", "callee": "mid"}).assign(
            interface="op", ts=ts, rt_ms=mid_client, server_rt_ms=mid_server
        ),
    ]
    for callee, trace, rt in (("db", db_trace, db_rt), ("log", log_trace, rng.lognormal(0, 0.3, len(log_trace)))):
        frames.append(
            pd.DataFrame({"trace_id": ids[trace], "parent_call_id": "1", "caller": "mid", "callee": callee}).assign(
                call_id=[f"{callee}-{i}" for i in range(len(trace))], interface="q", ts=ts[trace], rt_ms=rt
            )
        )
    calls = pd.concat(frames, ignore_index=True)
    waited = calls[calls.callee != "log"].groupby(["trace_id", "parent_call_id"]).rt_ms.sum()
    below = pd.MultiIndex.from_arrays([calls.trace_id, calls.call_id])
    calls["self_ms"] = np.maximum(calls.rt_ms - waited.reindex(below).fillna(0).to_numpy(), 0)
    return calls.assign(is_error=False, root=calls.parent_call_id.isna()).sort_values("ts", ignore_index=True)


def _faults(*rows: tuple[int, str, str]) -> pd.DataFrame:
    """(minute of injection, service, type) -> the frame `load_faults` gives."""
    frame = pd.DataFrame(rows, columns=["minute", "service", "inject_type"])
    frame["inject_time"] = T0 + pd.to_timedelta(frame.minute, unit="min")
    return frame.drop(columns="minute").assign(window_end=frame.inject_time + WINDOW)


def _in_window(calls: pd.DataFrame, minute: int) -> pd.Series:
    start = T0 + pd.Timedelta(minutes=minute)
    return (calls.ts >= start) & (calls.ts < start + WINDOW)


def test_a_delay_seen_only_by_the_callers_is_visible_despite_busy_outgoing_calls() -> None:
    """Network delay into `mid`: only its callers' client spans slow down (its own server time and
    its calls out are unchanged), while its calls out to log come in busy and quiet spells (normal traffic)."""
    seconds = 3600
    log_calls = np.where((np.arange(seconds) // 60) % 2 == 1, 30, 2)  # minute-long spells
    calls = _traffic(seconds, seed=1, per_s=1, log_calls=log_calls)
    delayed = _in_window(calls, 40) & (calls.callee == "mid")
    calls.loc[delayed, "rt_ms"] += 20  # about +70 %: client side only
    touching = _in_window(calls, 40) & ((calls.callee == "mid") | (calls.caller == "mid"))
    assert delayed.sum() / touching.sum() < 0.1  # pooled with its calls out, the delay is a small share
    faults = _faults((11, "db", "exception"), (21, "db", "exception"), (31, "db", "exception"), (40, "mid", "net"))
    verdict = fault_visibility(calls, faults).set_index("inject_type").loc["net"]
    assert verdict.visible and verdict.percentile >= 0.95
    assert verdict.statistic == "slow_in"  # the callers' view, not the service's own spans


def test_a_slowed_busy_service_beats_a_drifting_null_instead_of_tying_at_a_cap() -> None:
    """db takes 40 calls a second and its latency drifts by half over the hour (normal load): every
    fault-free stretch differs 'significantly' from the rest, the fault by far more."""
    seconds = 3600
    drift = 5.0 * (1 + 0.5 * np.sin(np.arange(seconds) * 2 * np.pi / seconds))
    calls = _traffic(seconds, seed=2, per_s=10, db_ms=drift)
    slowed = _in_window(calls, 50) & (calls.callee == "db")
    calls.loc[slowed, ["rt_ms", "self_ms"]] *= 5
    faults = _faults((10, "db", "exception"), (30, "db", "exception"), (50, "db", "cpu_contention"))
    verdict = fault_visibility(calls, faults).set_index("inject_type").loc["cpu_contention"]
    assert verdict.visible
    assert verdict.strength > 3 * verdict.null_max  # far beyond every fault-free window, no tie


def test_fault_free_stretches_are_judged_invisible_about_as_often_as_the_budget_allows() -> None:
    calls = _traffic(3600, seed=3)
    faults = _faults(*[(m, "mid", "nothing") for m in range(4, 60, 7)])  # eight windows of unchanged traffic
    verdicts = fault_visibility(calls, faults)
    assert len(verdicts) == 8 and verdicts.visible.sum() <= 1
    assert 0.1 < verdicts.percentile.mean() < 0.9
    assert (verdicts.nulls > 50).all()  # fault-free minutes outside every window, tiled with overlap


def test_calls_that_lose_their_subtree_are_visible_by_structure() -> None:
    calls = _traffic(3600, seed=4)
    truncated = _in_window(calls, 40) & (calls.caller == "mid")
    calls = calls[~truncated]  # mid answers without calling db; its latency stays as it was
    faults = _faults((10, "mid", "return"), (40, "mid", "return"))
    verdict = fault_visibility(calls, faults).iloc[1]
    assert verdict.visible and verdict.statistic in {"short_in", "rate_out"}


def test_with_a_fill_only_the_real_captures_make_the_null() -> None:
    """Three 20-minute captures with fill between; the fill is slower than the captures (it would
    raise the fault-free 95th percentile above the fault's latency if it were used)."""
    calls = _traffic(3600, seed=5)
    captures = pd.DataFrame({"day": "2026-01-01", "start": T0 + pd.to_timedelta([0, 25, 50], unit="min")}).assign(
        end=lambda c: c.start + pd.Timedelta(minutes=10)
    )
    in_capture = np.zeros(len(calls), dtype=bool)
    for c in captures.itertuples():
        in_capture |= ((calls.ts >= c.start) & (calls.ts < c.end)).to_numpy()
    calls.loc[~in_capture & (calls.callee == "mid"), "rt_ms"] *= 3  # the fill: slow
    calls.loc[_in_window(calls, 55) & (calls.callee == "mid"), "rt_ms"] *= 2
    faults = _faults((5, "mid", "net"), (55, "mid", "net"))
    verdict = fault_visibility(calls, faults, captures=captures).iloc[1]
    assert verdict.visible
    # fault-free capture time: 30 minutes less, per fault, the 90 s before it, its window and the minute after
    assert verdict.null_minutes == pytest.approx(30 - 2 * (1.5 + 3 + 1), abs=0.1)


def test_the_time_before_an_injection_is_fault_free_for_other_services_only() -> None:
    """Faults can act up to 90 s before their recorded injection: that stretch leaves the null of the
    fault's own service; each fault's interval stays inside its own capture (back to back replays)."""
    captures = pd.DataFrame({"day": "d", "start": [T0, T0 + pd.Timedelta(minutes=5)]})
    captures["end"] = captures.start + pd.Timedelta(minutes=5)
    faults = _faults((2, "a", "x"))  # window 2:00-5:00, then the minute after: cut at the capture's end
    minute = pd.Timedelta(minutes=1)
    assert fault_free_stretches(captures, faults, "a") == [(T0, T0 + 0.5 * minute), (T0 + 5 * minute, T0 + 10 * minute)]
    assert fault_free_stretches(captures, faults, "b")[0] == (T0, T0 + 2 * minute)


def test_replay_captures_reads_the_runs_of_a_replay_folder(tmp_path) -> None:
    runs = {
        "day": ["2023-01-29", "2023-01-29"],
        "run": [0, 1],
        "replay_start": pd.to_datetime(["2023-01-29 06:00:00", "2023-01-29 07:00:00"]).tz_localize("UTC"),
        "replay_end": pd.to_datetime(["2023-01-29 06:03:00", "2023-01-29 07:03:00"]).tz_localize("UTC"),
    }
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(runs)), tmp_path / "runs.parquet")
    (tmp_path / "fault_list.json").write_text(json.dumps({"faults": []}))
    captures = replay_captures(tmp_path / "fault_list.json")
    assert captures is not None
    assert captures.start.tolist() == [pd.Timestamp("2023-01-29 06:00:00"), pd.Timestamp("2023-01-29 07:00:00")]
    assert captures.end.dt.tz is None and captures.day.tolist() == ["2023-01-29"] * 2
    assert replay_captures(tmp_path / "elsewhere" / "fault_list.json") is None  # a plain fault list


def test_report_counts_by_type_and_states_chance() -> None:
    calls = _traffic(3600, seed=6)
    calls.loc[_in_window(calls, 30) & (calls.callee == "mid"), "rt_ms"] *= 10
    faults = _faults((10, "mid", "exception"), (30, "mid", "cpu_contention"), (50, "mid", "exception"))
    report = ceiling_report(fault_visibility(calls, faults))
    assert "; cpu_contention 1 / 1" in report and "; exception 0 / 2" in report
    assert "by chance ~0.2" in report
