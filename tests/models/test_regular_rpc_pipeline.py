"""A perfectly regular RPC through the real pipeline (`tasks.pipeline.run_hour`, a real DuckDB
warehouse and MLflow sqlite registry): it trains beside a noisy pattern, the later hours are scored
and published, and the hour's training exports are gone once its outcomes are recorded."""

from __future__ import annotations

import gzip
from datetime import timedelta
from pathlib import Path

import duckdb
import numpy as np
import pytest

from helpers import START, V2022_HEADER
from tasks.settings import Settings, load_settings

HOURS = 3  # trained at hour 0 (one hour of history is enough here), scored at hours 1 and 2


def _regular_rows(hour: int) -> list[str]:
    """20 traces a minute, USER -> svc-a -> svc-b, every call at the same latency: the same calls
    every minute (calls constant, errors 0, latency single-valued)."""
    rows = []
    for minute in range(60):
        base = int((START + timedelta(hours=hour, minutes=minute)).timestamp() * 1000)
        for k in range(20):
            trace, ts = f"R{hour}-{minute}-{k}", base + 3000 * k
            rows.append(f"{ts},{trace},svc-a,0.1,http,USER,USER,/regular,svc-a,a-1,5.0")
            rows.append(f"{ts + 1},{trace},svc-a,0.1.1,rpc,svc-a,a-1,get,svc-b,b-1,2.0")
    return rows


def _noisy_rows(hour: int, rng: np.random.Generator) -> list[str]:
    """Poisson(20) traces a minute, USER -> svc-c -> svc-d, lognormal latencies."""
    rows = []
    for minute in range(60):
        base = int((START + timedelta(hours=hour, minutes=minute)).timestamp() * 1000)
        for k in range(int(rng.poisson(20))):
            trace, ts = f"N{hour}-{minute}-{k}", base + int(rng.integers(0, 59_000))
            rows.append(f"{ts},{trace},svc-c,0.1,http,USER,USER,/busy,svc-c,c-1,{rng.lognormal(np.log(8), 0.3):.3f}")
            rows.append(f"{ts + 1},{trace},svc-c,0.1.1,rpc,svc-c,c-1,query,svc-d,d-1,{rng.lognormal(1.1, 0.3):.3f}")
    return rows


def write_source(folder: Path, hours: int) -> Path:
    """One v2022 CSV per hour: the regular pattern and the noisy one."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    for hour in range(hours):
        with gzip.open(folder / f"calls-{hour:02d}.csv.gz", "wt") as handle:
            handle.write("\n".join([V2022_HEADER, *_regular_rows(hour), *_noisy_rows(hour, rng)]) + "\n")
    return folder


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Path, list[dict]]:
    """Three hours through `run_hour`; returns (settings, source, each hour's report)."""
    from tasks.pipeline import run_hour

    root = tmp_path_factory.mktemp("regular")
    source = write_source(root / "traces", HOURS)
    settings = load_settings(
        env={"RPCWATCH_DEVICE": "cpu"},
        home=root / "home",
        critical_coverage=1.0,
        min_train_hours=1.0,
        train_max_epochs=3,
    )
    reports = [run_hour(settings, START + timedelta(hours=h), [source]) for h in range(HOURS)]
    return settings, source, reports


def _rows(path: Path, sql: str, params: list | None = None) -> list[tuple]:
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(sql, params).fetchall()


def test_a_perfectly_regular_rpc_trains_and_later_hours_are_scored_and_published(ran):
    settings, _, reports = ran
    trained = [o for shard in reports[0]["train"] for o in shard]
    assert len(trained) == 2 and all("skipped" not in o for o in trained), trained
    assert all(o["decision"] == "champion" for o in trained)
    assert any(o["metrics"]["seasonal_naive_mape_calls"] == 0.0 for o in trained), "one pattern is perfectly regular"
    regular = next(o for o in trained if o["metrics"]["seasonal_naive_mape_calls"] == 0.0)
    assert regular["metrics"]["mape_calls_vs_seasonal_naive"] is None, "an undefined ratio travels as null"
    for later in reports[1:]:
        assert sorted(later["score"]["scored"]) == sorted(o["pattern_id"] for o in trained)
    published = settings.home / "analytics.duckdb"  # the snapshot of the last hour
    runs = _rows(published, "SELECT hour, status, count(*) FROM score_runs GROUP BY ALL ORDER BY ALL")
    # hour 0 has no window of history before its first bucket; the later hours are scored
    assert [(h.hour, status, n) for h, status, n in runs] == [(0, "skipped", 2), (1, "scored", 2), (2, "scored", 2)]
    assert _rows(published, "SELECT count(*) FROM models WHERE decision = 'champion'") == [(2,)]
    flagged = _rows(published, "SELECT count(*) FROM anomalies WHERE pattern_id = ?", [regular["pattern_id"]])
    assert flagged == [(0,)], "the same calls at the same latency as in training: nothing irregular"


TABLES = {
    "models": "SELECT pattern_id, model_version, run_id, decision, reason FROM models",
    "score_runs": "SELECT * FROM score_runs",
    "anomalies": "SELECT bucket_ts, pattern_id, node, feature, observed, expected, score, kind FROM anomalies",
    "forecasts": "SELECT * FROM forecasts",
}


def _tables(settings: Settings) -> dict[str, list[tuple]]:
    return {name: sorted(_rows(settings.warehouse, sql), key=repr) for name, sql in TABLES.items()}


def _hours_exported(settings: Settings) -> list[str]:
    folder = settings.home / "exports"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_recorded_hours_keep_no_exports_and_rerunning_them_gives_the_same_tables(ran, tmp_path):
    """The hour's Parquet exports go once its outcomes are recorded; a leftover of a crash (plan
    exported, nothing recorded) goes with the next plan; a rerun of `record` without the exports and
    a rerun of the hours heal to the same tables."""
    from helpers import copy_home
    from tasks.models.jobs import outcome_from_dict
    from tasks.models.retrain import plan_training, record_outcomes
    from tasks.pipeline import run_hour

    settings, source, reports = ran
    assert _hours_exported(settings) == [], "every hour's outcomes were recorded"
    home = copy_home(settings, tmp_path)
    before = _tables(home)
    record_outcomes(home, [outcome_from_dict(o) for shard in reports[0]["train"] for o in shard])
    assert _tables(home) == before, "a retried record needs no export"
    plan_training(home, START + timedelta(hours=1), force=True)  # killed after exporting hour 1
    assert _hours_exported(home) == ["20260101T01"]
    for h in range(HOURS):
        run_hour(home, START + timedelta(hours=h), [source])
    assert _hours_exported(home) == []
    assert _tables(home) == before
