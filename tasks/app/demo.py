"""`make demo`: synthetic hours with injected anomalies through the real Airflow DAG on embedded
defaults, then what the warehouse holds, the incidents found, and the evaluation against the labels.

Writes the synthetic hours (and labels.parquet) into the incoming folder; the DAG runs write every
pipeline table. Reads `incidents`, `anomalies` and `rpc_series` from the published snapshot, and the
hour summary, `patterns` and `models` through tasks.app.report."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tasks.app.airflow_env import login_hint
from tasks.app.report import hour_summary, model_table, table, table_of
from tasks.app.stack import stack_env
from tasks.keys import rpc_label
from tasks.patterns.stage import PATTERNS_SQL
from tasks.publish import analytics_path
from tasks.settings import Settings

DEMO_START = datetime(2026, 1, 1, tzinfo=UTC)
DAG_ID = "rpcwatch_hourly"
DRIFT_MIN_HOURS = 8  # synth injects its slow drift event only from this many hours on
TOP_INCIDENTS = 15
RUN_TIMEOUT_S = 600  # one hour's DAG run, at most

INCIDENTS_SQL = """
SELECT strftime(start_ts, '%m-%d %H:%M') AS start, strftime(end_ts, '%H:%M') AS "end",
       CAST(round(epoch(end_ts - start_ts) / 60) AS INTEGER) AS minutes,
       CASE WHEN len(patterns) > 0 THEN 'pattern ' || array_to_string(list_sort(patterns), ',')
            ELSE 'new RPC ' || replace(regexp_replace(nodes[1], '\\|[^|]*$', ''), '|', ':') END AS "where",
       array_to_string(list_sort(kinds), ',') AS kinds, round(peak_score, 1) AS peak_score,
       CAST(points AS INTEGER) AS points, CAST(len(nodes) AS INTEGER) AS nodes,
       array_to_string(coalesce(culprits, [])[:2], ', ') AS suspects
FROM incidents ORDER BY peak_score DESC, start_ts LIMIT ?
"""

# the strongest flagged `calls` point of a pattern incident (the strongest such incident first): a node
# whose plot shows irregular points; a latency-only incident would show a normal calls curve
EXAMPLE_NODE_SQL = """
SELECT a.pattern_id, a.caller, a.callee, coalesce(a.interface, ''), i.start_ts, (SELECT max(bucket_ts) FROM rpc_series)
FROM incidents i JOIN anomalies a
  ON list_contains(i.patterns, a.pattern_id) AND a.bucket_ts >= i.start_ts AND a.bucket_ts < i.end_ts
ORDER BY a.feature = 'calls' DESC, i.peak_score DESC, a.score DESC LIMIT 1
"""


@dataclass(frozen=True)
class ExampleNode:
    """A pattern node of a real incident, with how many hours back `rpcwatch plot` must look."""

    pattern_id: int
    node: str  # CALLER:CALLEE:INTERFACE
    hours: int


def _synthesize(settings: Settings, hours: int, spans_per_hour: int, seed: int) -> dict[str, int]:
    """Write labelled synthetic hours (with injected events) into the incoming folder."""
    from tasks.synth.generate import generate

    if isinstance(warehouse := settings.warehouse, Path) and warehouse.exists():  # a lake: see its tables
        print(
            f"note: {settings.warehouse} exists: earlier runs' models and rows stay in it "
            "(`make clean`, or another RPCWATCH_HOME, for a fresh start)"
        )
    print(
        f"1/4 generating {hours} synthetic hours (~{spans_per_hour:,} spans each, injected anomalies) "
        f"into {settings.incoming}"
    )
    if hours < DRIFT_MIN_HOURS:
        print(f"    note: fewer than {DRIFT_MIN_HOURS} hours, so no slow drift event is injected")
    summary = generate(
        DEMO_START,
        hours,
        settings.incoming,
        seed=seed,
        spans_per_hour=spans_per_hour,
        anomalies=True,
        progress=lambda line: print("    " + line),
    )
    print(f"    {summary.events} injected events, ground truth in {settings.incoming / 'labels.parquet'}")
    return summary.rows_per_hour


def demo_settings(settings: Settings, hours: int) -> Settings:
    """The demo's schedule: exactly its synthetic hours (caught up in order by the scheduler)."""
    last = DEMO_START + timedelta(hours=hours - 1)
    return settings.with_(source=settings.incoming, start=DEMO_START, end=last, catchup=True)


def _run_dag(settings: Settings, hours: int) -> list[str]:
    """The local stack (`make up`), then the real scheduler runs `rpcwatch_hourly` for each
    synthetic hour, oldest first; returns the hours whose run failed. The stack stays up."""
    from tasks.app.stack import AirflowApi, down, up

    demo = demo_settings(settings, hours)
    print("2/4 the local stack (Airflow scheduler, DAG processor, API server; MLflow), then one DAG run per hour")
    down(demo, say=lambda line: None)  # a previous demo's stack on this home
    for old in demo.airflow_home.glob("airflow.db*"):  # its runs would count as done: start afresh
        old.unlink()
    up(demo, say=lambda line: print("    " + line))
    api = AirflowApi.of(demo)
    api.wait_parsed()
    api.unpause()  # catch-up: the scheduler runs each hour of [start, end] in order, one at a time
    started = time.perf_counter()

    def finished(run: dict) -> None:
        hour = run["logical_date"][:13].replace("T", " ")
        print(f"    hour {hour}:00: {run['state']} ({time.perf_counter() - started:.0f} s since the first run)")

    dates = [(DEMO_START + timedelta(hours=i)).strftime("%Y-%m-%dT%H:%M:%SZ") for i in range(hours)]
    runs = api.wait_for(dates, timeout_s=RUN_TIMEOUT_S * hours, finished=finished)
    # paused again: a stack started later without the demo's RPCWATCH_END would catch up every hour
    # since RPCWATCH_START, and the demo's data ends here
    api.unpause(paused=True)
    return [r["logical_date"][:16] for r in runs if r["state"] != "success"]


def _summarise(settings: Settings, manifest_rows: dict[str, int], hours: int) -> bool:
    """Print hours, patterns and models; True when every hour landed with all its rows."""
    print("3/4 what the warehouse holds now\n")
    headers, rows = hour_summary(settings)
    wanted = {(DEMO_START + timedelta(hours=i)).strftime("%Y-%m-%d %H:00") for i in range(hours)}
    rows = [r for r in rows if r[0] in wanted]
    expected = {k.replace("T", " "): v for k, v in manifest_rows.items()}
    table_rows = [list(r) + [expected.get(r[0], 0), "yes" if r[4] == expected.get(r[0]) else "NO"] for r in rows]
    landed = all(r[-1] == "yes" for r in table_rows) and len(table_rows) == hours
    print(table(headers + ["manifest_rows", "all_landed"], table_rows))
    print("\nRPC chain patterns (critical ones get a model each):\n")
    print(table(*table_of(settings, PATTERNS_SQL)))
    print("\nPer-pattern forecasters (validation calls MAPE; x = ratio to the Poisson floor and to each baseline):\n")
    print(table(*model_table(settings)))
    return landed


def incident_table(db: Path, limit: int = TOP_INCIDENTS) -> tuple[list[str], list[tuple], int]:
    """The `limit` strongest incidents of a DuckDB file (read-only): headers, rows, total count."""
    from tasks.warehouse import open_sandboxed_reader

    with open_sandboxed_reader(db) as con:
        cursor = con.execute(INCIDENTS_SQL, [limit])
        headers, rows = [d[0] for d in cursor.description], cursor.fetchall()
        count = con.execute("SELECT count(*) FROM incidents").fetchone()
    return headers, rows, count[0] if count else 0


def incidents_text(db: Path, limit: int = TOP_INCIDENTS) -> str:
    """Incidents, strongest first, as a table plus a line on the ones left out."""
    headers, rows, total = incident_table(db, limit)
    if not rows:
        return "no incident: no pattern or novel RPC was irregular long enough"
    more = total - len(rows)
    rest = f"\n... and {more} weaker one{'s' if more > 1 else ''} (query them below)" if more else ""
    return table(headers, rows) + rest


def example_node(db: Path, max_hours: int) -> ExampleNode | None:
    """The strongest flagged calls node of the strongest pattern incident that has one, for `rpcwatch plot`."""
    from tasks.warehouse import open_sandboxed_reader

    with open_sandboxed_reader(db) as con:
        row = con.execute(EXAMPLE_NODE_SQL).fetchone()
    if row is None:
        return None
    pattern_id, caller, callee, interface, start, last = row
    back = math.ceil((last - start).total_seconds() / 3600) + 1  # the incident plus some normal before it
    return ExampleNode(int(pattern_id), rpc_label(caller, callee, interface), max(1, min(back, max_hours)))


def _incidents(snapshot: Path) -> None:
    """Print the incidents of the published snapshot."""
    print(
        f"\nIncidents (table `incidents` in {snapshot}), strongest first; points = flagged (node, feature, bucket)s:\n"
    )
    print(incidents_text(snapshot))


def _evaluate(settings: Settings) -> float:
    """Print rpcwatch vs the naive median/MAD rule on the injected events; returns rpcwatch's event F1."""
    from tasks.evaluation.labels import evaluate_labels, label_report

    ours, naive, extra = evaluate_labels(settings, settings.incoming / "labels.parquet")
    print(
        "\n4/4 evaluation against the injected events (drift excluded from recall; "
        "false = incidents matching no event):\n"
    )
    print(label_report(ours, naive, extra))
    return ours.f1


QUERIES = (
    "SELECT start_ts, end_ts, patterns, kinds, culprits, round(peak_score, 1) AS peak, points '\n"
    "      'FROM incidents ORDER BY peak_score DESC LIMIT 10",
    "SELECT bucket_ts, pattern_id AS p, kind, callee, interface, feature, round(observed, 1) AS obs, '\n"
    "      'round(expected, 1) AS exp, round(score, 1) AS score FROM recent_anomalies LIMIT 20",
    "SELECT pattern_id, kind, feature, count(*) AS points, round(max(score), 1) AS peak '\n"
    "      'FROM anomalies GROUP BY ALL ORDER BY points DESC",
)


def _duckdb_examples(snapshot: Path) -> str:
    """Copy-pastable commands that query the snapshot read-only."""
    connect = f".venv/bin/python -c \"import duckdb; print(duckdb.connect('{snapshot}', read_only=True).sql("
    return "\n".join(f"    {connect}\n      '{query}'))\"" for query in QUERIES)


def _plot_example(home: str, example: ExampleNode | None) -> str:
    """`rpcwatch plot` on a real node when there is one, else the template."""
    if example is None:
        return f".venv/bin/rpcwatch plot{home} --pattern ID --node CALLER:CALLEE:INTERFACE"
    return f".venv/bin/rpcwatch plot{home} --pattern {example.pattern_id} --node {example.node} --hours {example.hours}"


def _next_steps(settings: Settings, snapshot: Path, example: ExampleNode | None) -> None:
    """How to look further: DuckDB queries on the snapshot, CLI commands, MLflow and Airflow UIs."""
    home = "" if settings.home.resolve() == Path(".rpcwatch").resolve() else f" --home {settings.home}"
    rpcwatch = ".venv/bin/rpcwatch"
    env = stack_env(demo_settings(settings, 1))
    print(f"""
Next:
  query the anomalies in DuckDB (a read-only snapshot, replaced after each run, never blocks one):
{_duckdb_examples(snapshot)}
    (also there: patterns, pattern_nodes, pattern_edges, models, score_runs, rpc_series, validation_runs)
  irregular points of the last 6 h:  {rpcwatch} anomalies{home} --since 6h
  plot a node of a traffic incident: {_plot_example(home, example)}
                                     (observed vs predicted calls, threshold band, irregular points marked;
                                      PNG under {settings.home}/plots)
  the evaluation again:              {rpcwatch} evaluate{home} --labels {settings.incoming / "labels.parquet"}
  patterns / stale models:           {rpcwatch} patterns{home}   {rpcwatch} stale{home}
  compare model versions in MLflow:  {settings.mlflow_url}  (experiment 'rpcwatch', models 'rpcwatch-pattern-<id>',
                                     aliases 'champion' / 'challenger'; tick two versions, Compare)
  the runs, their task logs, and the incidents with pictures (still running):
    {login_hint(env)}
    {env["AIRFLOW__API__BASE_URL"]}/rpcwatch/?since=all   (nav entry 'rpcwatch anomalies')
  stop the stack:                    make down   ({rpcwatch} down{home})
  one hour without Airflow:          {rpcwatch} run{home} --hour 2026-01-01T01:00 --source {settings.incoming}""")


def verdict(failed: list[str], landed: bool, f1: float | None) -> str:
    """OK only when every DAG run succeeded and every row landed; the event F1 either way."""
    score = "event F1 n/a" if f1 is None else f"event F1 {f1:.2f}"
    if failed:
        return f"PROBLEMS: failed runs {failed}; {score}"
    return f"OK, {score}" if landed else f"PROBLEMS: rows missing; {score}"


def run_demo(settings: Settings, hours: int = 10, spans_per_hour: int = 200_000, seed: int = 7) -> int:
    """Generate, run the DAG per hour, summarise, list incidents, evaluate; 0 when all went well."""
    started = time.perf_counter()
    manifest_rows = _synthesize(settings, hours, spans_per_hour, seed)
    failed = _run_dag(settings, hours)
    landed = _summarise(settings, manifest_rows, hours)
    snapshot = analytics_path(settings).resolve()
    f1, example = None, None
    if snapshot.exists():
        _incidents(snapshot)
        example = example_node(snapshot, hours - 1)
        f1 = _evaluate(settings)
    else:
        print(f"\nno analytics snapshot at {snapshot}: no hour was scored (see {settings.home / 'logs'})")
    _next_steps(settings, snapshot, example)
    outcome = verdict(failed, landed, f1)
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s: {outcome}")
    return 0 if outcome.startswith("OK") else 1
