"""Series no forecaster learns anything from (constant, all zero, single-valued, one bucket) and a
pattern whose training raises: each trains or is skipped/failed with its reason, never stopping the
others; undefined ratios are NaN, and zero-variance residuals never give a band of width 0."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import export_pattern_data, synthetic_pattern
from tasks.models.detector import flag_points
from tasks.models.features import CALLS, ERRORS, FEATURES, LATENCIES, RT_MEAN
from tasks.models.fitting import fit
from tasks.models.forecast import TrainConfig
from tasks.models.jobs import Skipped, TrainJob, TrainOutcome
from tasks.models.series import PatternData
from tasks.models.thresholds import calibrate
from tasks.settings import Settings, load_settings

HOUR = datetime(2026, 1, 1, 3, tzinfo=UTC)
CFG = TrainConfig(hidden=8, max_epochs=4, patience=2, batch_size=64)
CONVERGED = TrainConfig(hidden=8, max_epochs=60, patience=10, batch_size=64)  # ~2 s on a constant
STEPS = 160


def _pattern(pid: int, calls: float, rt: float | None, errors: float = 0.0, steps: int = STEPS) -> PatternData:
    """Three RPCs in a chain, every bucket the same: `calls` calls (and `errors` errors) at latency `rt`
    (mean and p95 alike: one value), no latency where there are no calls."""
    values = np.zeros((steps, 3, len(FEATURES)))
    values[:, :, CALLS], values[:, :, ERRORS] = calls, errors
    for f in LATENCIES:
        values[:, :, f] = rt if calls > 0 and rt is not None else np.nan
    buckets = np.arange(np.datetime64("2026-01-01T00:00"), steps, dtype="datetime64[m]").astype("datetime64[s]")
    return PatternData(pid, 1, f"g{pid}", ["a", "b", "c"], [(0, 1), (1, 2)], buckets, values, 60)


@pytest.fixture
def cpu(tmp_path: Path) -> Settings:
    torch.set_num_threads(1)
    return load_settings(env={"RPCWATCH_DEVICE": "cpu", "RPCWATCH_BATCH_TRAINING": "off"}, home=tmp_path / "home")


DEGENERATE = {
    "constant": _pattern(1, calls=60, rt=12.0),  # the same calls every minute at one latency, no error
    "all_zero": _pattern(2, calls=0, rt=None),  # a pattern that went quiet: no call, no latency
    "one_call_a_bucket": _pattern(3, calls=1, rt=7.0, errors=1),  # single-valued: one failing call each bucket
}


@pytest.mark.parametrize("name", DEGENERATE)
def test_a_degenerate_series_fits_with_nan_for_undefined_ratios_and_bands_of_some_width(cpu, name):
    data = DEGENERATE[name]
    fitted = fit(cpu, data, CFG)  # no exception
    scores = fitted.scores
    assert all(isinstance(v, float) for v in scores.values())
    for ratio, (num, den) in {
        "mape_calls_vs_seasonal_naive": ("model_mape_calls", "seasonal_naive_mape_calls"),
        "mape_calls_over_floor": ("model_mape_calls", "poisson_floor_calls"),
    }.items():
        defined = math.isfinite(scores[num]) and math.isfinite(scores[den]) and scores[den] > 0
        assert math.isfinite(scores[ratio]) == defined, (ratio, scores[num], scores[den])
    for bands in fitted.thresholds.nodes.values():
        for count in (bands.calls, bands.errors):
            assert math.isfinite(count.alpha) and count.alpha >= 0 and count.phi >= 1
        for lat in (bands.rt_mean, bands.rt_p95):
            assert lat.sigma > 0 and lat.k > 0 and math.isfinite(lat.sigma * lat.k)


def test_a_constant_series_is_forecast_as_itself_and_only_a_real_change_alarms(cpu):
    """Zero-variance residuals: the count band is Poisson's (never narrower), the latency band has
    its floors; so the constant itself and a small wobble stay inside, a tripled load or doubled
    latency does not."""
    data = DEGENERATE["constant"]
    fitted = fit(cpu, data, CONVERGED)
    assert fitted.scores["seasonal_naive_mape_calls"] == 0.0, "the naive forecast of a constant is exact"
    assert math.isnan(fitted.scores["mape_calls_vs_seasonal_naive"])
    assert fitted.scores["model_mape_calls"] < 0.1
    expected = fitted.pred
    bands = [fitted.thresholds.nodes[n] for n in data.nodes]
    alarm_p = fitted.thresholds.alarm_p
    same = fitted.prep.y[fitted.prep.split :].numpy().astype(np.float64)
    assert flag_points(same, expected, bands, alarm_p) == []
    wobble = same.copy()
    wobble[:, :, CALLS] += 2
    wobble[:, :, list(LATENCIES)] *= 1.02
    assert flag_points(wobble, expected, bands, alarm_p) == []
    changed = same.copy()
    changed[-1, 0, CALLS] *= 3
    changed[-1, 1, RT_MEAN] *= 2
    kinds = {(f.node, f.kind) for f in flag_points(changed, expected, bands, alarm_p)}
    assert kinds == {(0, "traffic_spike"), (1, "latency")}


def test_one_event_on_a_count_forecast_at_zero_scores_one_band_width_not_a_billion():
    """Errors of an RPC that never failed are forecast at ~0: the band is [0, 0]. One error is
    outside it, scored against a band of at least one count (counts are whole), not its width ~0."""
    from tasks.models.thresholds import CountBand, LatencyBand, NodeBands

    quiet = NodeBands(CountBand(0.0), CountBand(0.0), LatencyBand(0.05, 5.0), LatencyBand(0.05, 5.0))
    expected = np.array([[[60.0, 12.0, 12.0, 1e-9]]])
    observed = expected.copy()
    observed[0, 0, ERRORS] = 1
    [flag] = flag_points(observed, expected, [quiet], alarm_p=1e-4)
    assert flag.kind == "errors" and flag.score == pytest.approx(1.0)
    observed[0, 0, ERRORS] = 4
    assert flag_points(observed, expected, [quiet], alarm_p=1e-4)[0].score == pytest.approx(4.0)


def test_a_trace_model_of_single_valued_latencies_has_tails_of_some_width():
    """Every call of a position at one latency: the tails are at least TAIL_FLOOR wide, so the same
    latency and a few percent more are normal and a tripled one is surprising."""
    from helpers import AB, BC, BD, tiny_traces
    from tasks.models.trace_model import TraceModel

    def flat(n: int, seed: int, factor: float = 1.0) -> pd.DataFrame:
        calls = tiny_traces(n, seed)
        server = calls["node"].map({AB: 9.0, BC: 5.0, BD: 2.0}) * factor
        calls["rt_ms"], calls["server_rt_ms"] = server + 0.5, server
        calls["self_ms"] = np.where(calls["node"] == AB, 2.0 * factor, server)
        return calls

    history = flat(600, 1)
    model = TraceModel(trace_p=0.01).fit(history).calibrate(history, window_s=30)
    assert math.isfinite(model.rate) and model.rate < 0.05
    assert not model.score(flat(60, 2)).traces["surprising"].any()
    assert not model.score(flat(60, 3, factor=1.05)).traces["surprising"].any()
    assert model.score(flat(60, 4, factor=3.0)).traces["surprising"].all()


def test_the_train_command_shows_undefined_metrics_and_failures():
    """`rpcwatch train`'s table: a null metric (a ratio to an exact baseline) reads n/a, a failed
    pattern `failed` with its reason."""
    from tasks.app.commands.models import _train_row

    trained = TrainOutcome(1, 1, "g", 1, "r", "champion", "first model", HOUR, {"model_mape_calls": 0.01})
    d = trained.to_dict()
    d["metrics"].update(mape_calls_over_floor=0.02, mape_calls_vs_seasonal_naive=None)
    assert _train_row(d)[4:] == ["0.010", "0.02", "n/a"]
    failure = Skipped(2, "pattern 2: fitting failed: ValueError: boom", "failed", HOUR, "no_champion")
    assert _train_row(failure.to_dict())[:3] == [2, "-", "failed"]


@pytest.mark.parametrize("method", ["quantile", "pot"])
def test_zero_variance_latency_residuals_never_give_a_band_of_width_zero(method):
    """A forecast off a constant latency by float rounding only: the peaks-over-threshold fit of those
    residuals gave a multiplier of ~2e-5, a band no observed value stays inside. The multiplier is at
    least the normal quantile of the alarm probability, over the floored robust scale."""
    from scipy.stats import norm

    data = _pattern(4, calls=20, rt=12.0, steps=200)
    rng = np.random.default_rng(0)
    obs = torch.from_numpy(data.values.astype(np.float32))
    prep = type("P", (), {"y": obs, "split": 100})()
    pred = data.values[100:] * (1 + 1e-7 * rng.standard_normal(data.values[100:].shape))
    thresholds = calibrate(data, prep, pred, alarm_p=1e-4, method=method)  # type: ignore[arg-type]
    for bands in thresholds.nodes.values():
        for lat in (bands.rt_mean, bands.rt_p95):
            assert lat.k >= norm.isf(1e-4 / 2) and lat.sigma >= 0.05


# --- a shard with a pattern whose training raises ------------------------------------------------


NORMAL, POISONED, SHORT = 11, 12, 13


def _shard(tmp_path: Path) -> list[TrainJob]:
    """A normal pattern, one that will be poisoned, and one with a single bucket (too short)."""
    rng = np.random.default_rng(5)
    datas = [
        synthetic_pattern(NORMAL, rng, steps=STEPS, nodes=4),
        synthetic_pattern(POISONED, rng, steps=STEPS, nodes=3),
    ]
    datas.append(_pattern(SHORT, calls=5, rt=3.0, steps=1))
    folder = tmp_path / "exports"
    return [TrainJob(d.pattern_id, ["no_champion"], HOUR, export_pattern_data(d, folder)) for d in datas]


def _poison(monkeypatch: pytest.MonkeyPatch, where: str, jobs: list[TrainJob]) -> str:
    """Make pattern POISONED's training raise `where`; returns the message its reason must name."""
    import tasks.models.fitting as fitting
    import tasks.models.training as training

    if where == "export":  # its exported series is damaged: raises on load
        jobs[1].meta_path.with_suffix(".parquet").write_bytes(b"not parquet")
        return "parquet"
    message = f"poisoned in {where}"
    wrapped = {"fit": (fitting, "calibrate"), "register": (training, "_plots")}[where]
    original = getattr(*wrapped)

    def poisoned(*args, **kwargs):  # the first argument is the pattern's data or its Fitted
        first = args[0]
        pid = first.pattern_id if isinstance(first, PatternData) else first.data.pattern_id
        if pid == POISONED:
            raise ValueError(message)
        return original(*args, **kwargs)

    monkeypatch.setattr(*wrapped, poisoned)
    return message


@pytest.mark.parametrize(("where", "batch"), [("export", "off"), ("fit", "on"), ("register", "off")])
def test_one_poisoned_pattern_fails_alone_and_the_others_train_and_register(tmp_path, monkeypatch, where, batch):
    from tasks.models.registry import model_name, setup_mlflow
    from tasks.models.retrain import record_outcomes
    from tasks.models.training import train_patterns
    from tasks.warehouse import opened

    torch.set_num_threads(1)
    settings = load_settings(env={"RPCWATCH_DEVICE": "cpu", "RPCWATCH_BATCH_TRAINING": batch}, home=tmp_path / "home")
    jobs = _shard(tmp_path)
    message = _poison(monkeypatch, where, jobs)
    normal, poisoned, short = train_patterns(settings, jobs, CFG)
    assert isinstance(normal, TrainOutcome) and normal.decision == "champion"
    client = setup_mlflow(settings).MlflowClient()
    assert int(client.get_model_version_by_alias(model_name(NORMAL), "champion").version) == normal.model_version
    assert isinstance(poisoned, Skipped) and poisoned.decision == "failed" and message in poisoned.reason.lower()
    assert isinstance(short, Skipped) and short.decision == "skipped" and "windows" in short.reason
    if where == "register":  # its MLflow run ended as failed, not left running
        runs = client.search_runs(
            [client.get_experiment_by_name("rpcwatch").experiment_id], "tags.`rpcwatch.pattern_id` = '12'"
        )
        assert [r.info.status for r in runs] == ["FAILED"]
    record_outcomes(settings, [normal, poisoned, short])
    record_outcomes(settings, [normal, poisoned, short])  # a retried record: the same rows
    with opened(settings.warehouse, read_only=True) as con:
        rows = con.execute(
            "SELECT pattern_id, model_version, decision, reason, stale_reason FROM models ORDER BY pattern_id"
        ).fetchall()
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (NORMAL, normal.model_version, "champion"),
        (POISONED, None, "failed"),
        (SHORT, None, "skipped"),
    ]
    assert message in rows[1][3].lower() and rows[1][4] == "no_champion"


def test_a_retrained_quiet_pattern_replaces_its_champion_that_no_window_can_score(tmp_path):
    """All-zero calls: no busy node, so no calls MAPE for the champion or the retrain. The newer model
    takes over: a champion nothing can beat would keep an aged pattern stale and retrained hourly."""
    from tasks.models.training import train_patterns

    torch.set_num_threads(1)
    settings = load_settings(env={"RPCWATCH_DEVICE": "cpu"}, home=tmp_path / "home")
    [job] = [TrainJob(2, ["age"], HOUR, export_pattern_data(DEGENERATE["all_zero"], tmp_path / "exports"))]
    [first] = train_patterns(settings, [job], CFG)
    [second] = train_patterns(settings, [job], CFG)
    assert isinstance(first, TrainOutcome) and isinstance(second, TrainOutcome)
    assert math.isnan(second.metrics["model_mape_calls"])
    assert (second.model_version, second.decision) == (2, "champion"), second.reason
