"""`make demo`: synthetic hours through the real Airflow DAG on embedded defaults, then a summary."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

from tasks.airflow_env import airflow_env, dag_test, prepare_airflow
from tasks.patterns import pattern_table
from tasks.report import hour_summary, model_table, table
from tasks.settings import Settings

DEMO_START = datetime(2026, 1, 1, tzinfo=timezone.utc)
DAG_ID = "rpcwatch_hourly"


def _synthesize(settings: Settings, hours: int, spans_per_hour: int, seed: int) -> dict[str, int]:
    from tasks.synth import generate

    print(f"1/3 generating {hours} synthetic hours (~{spans_per_hour:,} spans each) into {settings.incoming}")
    summary = generate(DEMO_START, hours, settings.incoming, seed=seed, spans_per_hour=spans_per_hour,
                       progress=lambda line: print("    " + line))
    return summary.rows_per_hour


def _run_dag(settings: Settings, hours: int) -> list[str]:
    env = airflow_env(settings.with_(source=settings.incoming))
    print(f"2/3 preparing Airflow (AIRFLOW_HOME={env['AIRFLOW_HOME']}) and running `{DAG_ID}` per hour")
    prepare_airflow(env, settings.airflow_pool)
    failed = []
    log_dir = settings.home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    for i in range(hours):
        hour = DEMO_START + timedelta(hours=i)
        started = time.perf_counter()
        result = dag_test(env, DAG_ID, hour + timedelta(hours=1))
        log_file = log_dir / f"dags-test-{hour:%Y%m%dT%H}.log"
        log_file.write_text(result.stdout + result.stderr)
        state = "success" if result.returncode == 0 else f"FAILED (see {log_file})"
        print(f"    hour {hour:%Y-%m-%d %H:00}: airflow dags test {state} in {time.perf_counter() - started:.1f} s")
        if result.returncode:
            failed.append(f"{hour:%Y-%m-%dT%H:00}")
    return failed


def _summarise(settings: Settings, manifest_rows: dict[str, int], hours: int) -> bool:
    print("3/3 what the warehouse holds now\n")
    headers, rows = hour_summary(settings)
    wanted = {(DEMO_START + timedelta(hours=i)).strftime("%Y-%m-%d %H:00") for i in range(hours)}
    rows = [r for r in rows if r[0] in wanted]
    expected = {k.replace("T", " "): v for k, v in manifest_rows.items()}
    table_rows = [list(r) + [expected.get(r[0], 0), "yes" if r[4] == expected.get(r[0]) else "NO"] for r in rows]
    landed = all(r[-1] == "yes" for r in table_rows) and len(table_rows) == hours
    print(table(headers + ["manifest_rows", "all_landed"], table_rows))
    print("\nRPC chain patterns (critical ones get a model each):\n")
    print(table(*pattern_table(settings)))
    print("\nPer-pattern forecasters (validation calls MAPE; x = ratio to the Poisson floor and to each baseline):\n")
    print(table(*model_table(settings)))
    return landed


def _next_steps(settings: Settings) -> None:
    warehouse = settings.warehouse.resolve()
    print(f"""
Next:
  query the warehouse (read-only, while nothing writes it):
    .venv/bin/python -c "import duckdb; print(duckdb.connect('{warehouse}', read_only=True).sql(
      'SELECT caller, callee, sum(calls) AS calls, round(avg(rt_p95), 1) AS p95_ms FROM rpc_series '
      'GROUP BY ALL ORDER BY calls DESC LIMIT 10'))"
  see rows that failed checks:   SELECT reason, count(*) FROM quarantine GROUP BY 1
  see every expectation result:  SELECT * FROM validation_runs
  a pattern's graph:             SELECT parent_node, child_node, weight FROM pattern_edges WHERE pattern_id = 1
  per-pattern traffic:           SELECT * FROM pattern_series WHERE pattern_id = 1 ORDER BY bucket_ts
  patterns as a table:           .venv/bin/rpcwatch patterns
  which models are stale, why:   .venv/bin/rpcwatch stale
  compare model versions:        .venv/bin/mlflow ui --backend-store-uri {settings.mlflow_tracking_uri}
                                 (http://127.0.0.1:5000: experiment 'rpcwatch', models 'rpcwatch-pattern-<id>',
                                  alias 'champion'; each run has metrics of model vs baselines and forecast PNGs)
  the Airflow UI on these runs:  make airflow   (then http://localhost:8080)
  one hour without Airflow:      .venv/bin/rpcwatch run --hour 2026-01-01T01:00 --source {settings.incoming}""")


def run_demo(settings: Settings, hours: int = 4, spans_per_hour: int = 200_000, seed: int = 7) -> int:
    started = time.perf_counter()
    manifest_rows = _synthesize(settings, hours, spans_per_hour, seed)
    failed = _run_dag(settings, hours)
    landed = _summarise(settings, manifest_rows, hours)
    _next_steps(settings)
    verdict = "OK" if landed and not failed else f"PROBLEMS: failed runs {failed}" if failed else "PROBLEMS: rows missing"
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s: {verdict}")
    return 0 if verdict == "OK" else 1
