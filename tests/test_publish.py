"""Analysts read a published snapshot: an open reader never blocks a run, a run never breaks a reader."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime, timedelta

import duckdb

from helpers import add_anomaly, copy_home
from tasks.publish import analytics_path, publish

LATEST = datetime(2026, 1, 2, 12, 0)  # naive UTC: after every bucket the trained home holds

READER = """
import duckdb, sys, time
con = duckdb.connect(sys.argv[1], read_only=True)
first = con.execute("SELECT count(*) FROM patterns").fetchone()[0]
print("open", first, flush=True)
sys.stdin.readline()                      # hold the file open while the other process publishes
again = con.execute("SELECT count(*) FROM patterns").fetchone()[0]
print("still", again, flush=True)
"""


def test_an_open_reader_neither_blocks_nor_breaks_when_the_pipeline_publishes(trained, tmp_path):
    settings = copy_home(trained[0], tmp_path)
    path = publish(settings)
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    first = reader.stdout.readline().split()
    assert first[0] == "open" and int(first[1]) > 0
    with duckdb.connect(str(settings.warehouse)) as con:  # the run changes what people will see
        con.execute("DELETE FROM patterns WHERE pattern_id = (SELECT max(pattern_id) FROM patterns)")
    for bucket in (LATEST - timedelta(hours=7), LATEST - timedelta(hours=6), LATEST):  # the first is not recent
        add_anomaly(settings, bucket)
    started = time.perf_counter()
    publish(settings)  # with the reader still open on the old snapshot
    assert time.perf_counter() - started < 30
    out, _ = reader.communicate("go\n", timeout=30)
    assert reader.returncode == 0 and out.split() == ["still", first[1]], "the reader keeps its consistent snapshot"
    with duckdb.connect(str(analytics_path(settings)), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM patterns").fetchone()[0] == int(first[1]) - 1
        recent = con.execute("SELECT * FROM recent_anomalies").fetchall()
        direct = con.execute(
            "SELECT * FROM anomalies WHERE bucket_ts >= ? ORDER BY bucket_ts DESC, score DESC",
            [LATEST - timedelta(hours=6)],
        ).fetchall()
        buckets = [r[0] for r in con.execute("SELECT bucket_ts FROM recent_anomalies").fetchall()]
    assert recent == direct, "the view: every anomaly of the last 6 hours before the newest one"
    assert buckets == [LATEST, LATEST - timedelta(hours=6)], "newest first; 7 hours before is not recent"


def _staging(home):
    return sorted(p.name for p in home.glob(".analytics-*"))


def test_a_crashed_publish_leaves_nothing_behind_after_the_next_one(settings):
    from tasks.warehouse import opened

    with opened(settings.warehouse):
        pass
    for leftover in (".analytics-20200101T000000000000.duckdb", ".analytics-20200101T000000000000.duckdb.wal"):
        (settings.home / leftover).write_bytes(b"half a snapshot")
    publish(settings)
    assert _staging(settings.home) == [], "stale staging files of a crashed publish are removed"
    assert analytics_path(settings).exists()


def test_a_failed_publish_removes_its_own_staging_file_and_keeps_the_last_snapshot(settings, monkeypatch):
    import pytest

    import tasks.publish as publish_module

    publish(settings)
    before = analytics_path(settings).read_bytes()
    monkeypatch.setattr(publish_module, "PUBLISHED", publish_module.PUBLISHED + ("no_such_table",))
    with pytest.raises(duckdb.CatalogException):
        publish(settings)
    assert _staging(settings.home) == []
    assert analytics_path(settings).read_bytes() == before


def test_publish_takes_a_home_whose_path_has_a_quote(tmp_path):
    from tasks.settings import load_settings

    settings = load_settings(env={}, home=tmp_path / "it's home")
    path = publish(settings)
    with duckdb.connect(str(path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM published").fetchone()[0] == 1


def test_recent_anomalies_is_the_same_view_in_warehouse_and_snapshot(settings):
    from tasks.publish import RECENT_ANOMALIES_SQL
    from tasks.warehouse import RECENT_ANOMALIES_SQL as WAREHOUSE_VIEW

    assert RECENT_ANOMALIES_SQL is WAREHOUSE_VIEW, "defined once, in tasks.warehouse"
    views = []
    for path in (settings.warehouse, publish(settings)):
        with duckdb.connect(str(path), read_only=True) as con:
            views.append(
                con.execute("SELECT sql FROM duckdb_views() WHERE view_name = 'recent_anomalies'").fetchone()[0]
            )
    assert views[0] == views[1] and "recent_anomalies" in views[0]  # as DuckDB normalised them
