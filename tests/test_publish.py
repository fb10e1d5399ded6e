"""Analysts read a published snapshot: an open reader never blocks a run, a run never breaks a reader."""

from __future__ import annotations

import subprocess
import sys
import time

import duckdb

from conftest import copy_home
from tasks.publish import analytics_path, publish

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
    reader = subprocess.Popen([sys.executable, "-c", READER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    first = reader.stdout.readline().split()
    assert first[0] == "open" and int(first[1]) > 0
    with duckdb.connect(str(settings.warehouse)) as con:  # the run changes what people will see
        con.execute("DELETE FROM patterns WHERE pattern_id = (SELECT max(pattern_id) FROM patterns)")
    started = time.perf_counter()
    publish(settings)  # with the reader still open on the old snapshot
    assert time.perf_counter() - started < 30
    out, _ = reader.communicate("go\n", timeout=30)
    assert reader.returncode == 0 and out.split() == ["still", first[1]], "the reader keeps its consistent snapshot"
    with duckdb.connect(str(analytics_path(settings)), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM patterns").fetchone()[0] == int(first[1]) - 1
        assert con.execute("SELECT count(*) FROM recent_anomalies").fetchone()[0] >= 0
