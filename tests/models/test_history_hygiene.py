"""History hygiene on a real warehouse: an incident's stretch is left out of what training reads."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pandas as pd
import pytest

from helpers import START, copy_home
from tasks.models.series import export_pattern, load_pattern, load_trace_calls
from tasks.warehouse import opened


def test_the_export_leaves_out_the_patterns_incidents(trained: Any, tmp_path) -> None:
    settings = copy_home(trained[0], tmp_path)
    pid = trained[2][0]["pattern_id"]
    start, end = START, START + timedelta(hours=3)
    lo, hi = START + timedelta(hours=1, minutes=10), START + timedelta(hours=1, minutes=40)
    naive_lo, naive_hi = pd.Timestamp(lo.replace(tzinfo=None)), pd.Timestamp(hi.replace(tzinfo=None))
    with opened(settings.warehouse) as con:
        con.execute(
            "INSERT INTO incidents (incident_id, start_ts, end_ts, patterns, nodes, peak_score, kinds, points) "
            "VALUES ('mine', ?, ?, [?], [], 5.0, ['traffic_spike'], 3), "
            "('other', ?, ?, [-1], ['nobody|nowhere|x|rpc'], 5.0, ['traffic_spike'], 3)",
            [naive_lo, naive_hi, pid, start.replace(tzinfo=None), end.replace(tzinfo=None)],
        )
        meta = export_pattern(con, pid, start, end, tmp_path / "exports")
    stretches = json.loads(meta.read_text())["excluded"]
    assert stretches == [[naive_lo.isoformat(), naive_hi.isoformat()]]
    data = load_pattern(meta)
    assert data.excluded is not None and int(data.excluded.sum()) == 30  # 30 one-minute buckets
    assert pd.Timestamp(data.buckets[data.excluded][0]) == naive_lo
    calls = load_trace_calls(meta)
    assert calls is not None and len(calls)
    root = pd.to_datetime(calls["root_ts"])
    assert not ((root >= naive_lo) & (root < naive_hi)).any()
    assert (root < naive_lo).any() and (root >= naive_hi).any()


def _flood_flagged(settings, node: str, start, minutes: int = 10) -> int:
    """Irregular points of `node` in the flood's ten minutes."""
    lo = start.replace(tzinfo=None)
    with opened(settings.warehouse, read_only=True) as con:
        sql = "SELECT count(*) FROM anomalies WHERE node = ? AND bucket_ts >= ? AND bucket_ts < ?"
        return int(con.execute(sql, [node, lo, lo + timedelta(minutes=minutes)]).fetchone()[0])


@pytest.mark.slow
def test_a_forced_retrain_cannot_learn_a_flood_even_as_champion(trained: Any, tmp_path) -> None:
    """`rpcwatch train --force` during an attack: a flood in a scored hour (an incident) and one in
    the hour being run (train comes before score, so it is not judged yet). The forced version
    learns neither: made champion by hand, it still flags both, and the incident keeps its id."""
    from helpers import flood_user_rpc
    from tasks.ingest.aggregate import aggregate_hour
    from tasks.ingest.stage import ingest_hour
    from tasks.models.registry import model_name, setup_mlflow
    from tasks.models.retrain import plan_training, reconcile_models, train_stale
    from tasks.patterns.stage import patterns_hour
    from tasks.scoring.score import score_hour

    settings, source = copy_home(trained[0], tmp_path), trained[1]
    h3, h4 = START + timedelta(hours=3), START + timedelta(hours=4)
    pid = trained[2][0]["pattern_id"]
    node = flood_user_rpc(settings, pid, h3 + timedelta(minutes=20))
    score_hour(settings, h3)
    assert _flood_flagged(settings, node, h3 + timedelta(minutes=20)), "the champion flags the scored flood"
    with opened(settings.warehouse, read_only=True) as con:
        [(incident,)] = con.execute(
            "SELECT incident_id FROM incidents WHERE list_contains(patterns, ?)", [pid]
        ).fetchall()
    ingest_hour(settings, h4, [source])
    aggregate_hour(settings, h4)
    patterns_hour(settings, h4)
    flood_user_rpc(settings, pid, h4 + timedelta(minutes=20))

    [job] = plan_training(settings, h4, force=True, patterns=[pid])
    assert json.loads(job.meta_path.read_text())["end"].startswith(f"{h4:%Y-%m-%dT%H:%M}"), (
        "the unjudged hour is not read"
    )
    [forced] = train_stale(settings, h4, force=True, patterns=[pid])
    setup_mlflow(settings).MlflowClient().set_registered_model_alias(
        model_name(pid), "champion", forced["model_version"]
    )
    with opened(settings.warehouse) as con:
        reconcile_models(settings, con)
    for hour in (h3, h4):
        report = score_hour(settings, hour)
        assert pid in report.scored
        assert _flood_flagged(settings, node, hour + timedelta(minutes=20)), (
            f"the forced version learnt the flood at {hour}"
        )
    with opened(settings.warehouse, read_only=True) as con:
        ids = [
            r[0]
            for r in con.execute("SELECT incident_id FROM incidents WHERE list_contains(patterns, ?)", [pid]).fetchall()
        ]
    assert incident in ids, "the scored flood's incident keeps its id"
