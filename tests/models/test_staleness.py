"""Each staleness reason on a real DuckDB warehouse: no champion, graph changed, drift, age, forced."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from tasks.models.staleness import stale_patterns
from tasks.warehouse import connect

NOW = datetime(2026, 1, 10, 12)


@pytest.fixture
def con(settings):
    con = connect(settings.warehouse)
    for pid, critical in [(1, True), (2, True), (3, False)]:
        con.execute(
            "INSERT INTO patterns (pattern_id, version, graph_hash, status, critical, calls) "
            "VALUES (?, 1, ?, 'active', ?, ?)",
            [pid, f"g{pid}", critical, 1000 - pid],
        )
    yield con
    con.close()


def _champion(con, pid: int, graph_hash: str, trained_for: datetime, version: int = 1, calibrated: float = 0.1):
    con.execute(
        "INSERT INTO models (pattern_id, model_version, graph_hash, trained_for, decision, calibrated_mape_calls) "
        "VALUES (?, ?, ?, ?, 'champion', ?)",
        [pid, version, graph_hash, trained_for, calibrated],
    )


def _reasons(con, settings, **kw) -> dict[int, list[str]]:
    return {s.pattern_id: s.reasons for s in stale_patterns(con, settings, NOW, **kw)}


def test_critical_patterns_without_champion_are_stale(con, settings):
    assert _reasons(con, settings) == {1: ["no_champion"], 2: ["no_champion"]}


def test_fresh_champions_are_not_stale(con, settings):
    _champion(con, 1, "g1", NOW - timedelta(hours=5))
    _champion(con, 2, "g2", NOW - timedelta(hours=5))
    assert _reasons(con, settings) == {}


def test_graph_changed(con, settings):
    _champion(con, 1, "g1-old", NOW - timedelta(hours=5))
    _champion(con, 2, "g2", NOW - timedelta(hours=5))
    assert _reasons(con, settings) == {1: ["graph_changed"]}


def test_a_challenger_does_not_count_as_champion(con, settings):
    _champion(con, 1, "g1", NOW - timedelta(hours=5))
    _champion(con, 2, "g2", NOW - timedelta(hours=5))
    con.execute(
        "INSERT INTO models (pattern_id, model_version, graph_hash, trained_for, decision) "
        "VALUES (2, 2, 'other', ?, 'challenger')",
        [NOW],
    )
    assert _reasons(con, settings) == {}


def test_age(con, settings):
    _champion(con, 1, "g1", NOW - timedelta(hours=settings.model_max_age_hours + 1))
    _champion(con, 2, "g2", NOW - timedelta(hours=settings.model_max_age_hours - 1))
    assert _reasons(con, settings) == {1: ["age"]}


@pytest.mark.parametrize("errors, drifting", [([0.2, 0.2, 0.2], True), ([0.2, 0.12, 0.2], False), ([0.2, 0.2], False)])
def test_drift_needs_enough_consecutive_hours_above_the_calibrated_level(con, settings, errors, drifting):
    _champion(con, 1, "g1", NOW - timedelta(hours=5), calibrated=0.1)
    _champion(con, 2, "g2", NOW - timedelta(hours=5))
    for i, mape in enumerate(errors):  # newest hour first; factor 1.5 x 0.1 = 0.15
        con.execute(
            "INSERT INTO forecast_errors (pattern_id, hour, model_version, mape_calls, calibrated_mape_calls) "
            "VALUES (1, ?, 1, ?, 0.1)",
            [NOW - timedelta(hours=i), mape],
        )
    assert _reasons(con, settings) == ({1: ["drift"]} if drifting else {})


def test_forced_and_explicit_patterns(con, settings):
    _champion(con, 1, "g1", NOW - timedelta(hours=5))
    _champion(con, 2, "g2", NOW - timedelta(hours=5))
    assert _reasons(con, settings, force=True) == {1: ["forced"], 2: ["forced"]}
    assert _reasons(con, settings, only=[3]) == {3: ["no_champion"]}, "an explicit non-critical pattern counts"
    with pytest.raises(ValueError, match="no such pattern"):
        stale_patterns(con, settings, NOW, only=[99])


@pytest.mark.parametrize(
    "errors, drifting",
    [
        ([None, None, None], False),  # a quiet pattern: no scored calls, no evidence of drift
        ([0.2, None, 0.2, 0.2], True),  # a quiet hour between drifting hours is skipped, not a reset
        ([0.2, None, 0.12, 0.2], False),  # the scored hours still decide
        ([0.2, 0.2, None], False),  # two scored hours are not three
    ],
)
def test_quiet_hours_with_null_errors_neither_crash_nor_count_as_drift(con, settings, errors, drifting):
    _champion(con, 1, "g1", NOW - timedelta(hours=5), calibrated=0.1)
    _champion(con, 2, "g2", NOW - timedelta(hours=5))
    for i, mape in enumerate(errors):  # newest hour first
        con.execute(
            "INSERT INTO forecast_errors (pattern_id, hour, model_version, mape_calls, calibrated_mape_calls) "
            "VALUES (1, ?, 1, ?, 0.1)",
            [NOW - timedelta(hours=i), mape],
        )
    con.execute(
        "INSERT INTO forecast_errors (pattern_id, hour, model_version, mape_calls, calibrated_mape_calls) "
        "VALUES (2, ?, 1, 0.9, NULL)",
        [NOW],
    )  # no calibrated level: not evidence either
    assert _reasons(con, settings) == ({1: ["drift"]} if drifting else {})
