"""Stage 4, scoring: each critical pattern's champion judges the hour.

- `score`: `score_hour`. Reads `patterns`, `models`, `pattern_series`, `novel_rpcs`, `calls`, `anomalies`;
  writes `anomalies`, `score_runs`, `forecast_errors`, `incidents`.
- `grid`: a pattern's series and earlier flags on a bucket grid. Reads `pattern_series`, `anomalies`.
- `sequential`: a `tasks.models.detector.Detector` run over a span with flagged points cleaned
  (`forecast_span` reads through `grid`).
- `store`: writes `anomalies`, `forecasts`, `forecast_errors`, `score_runs` of the scored patterns.
- `parallel`: the patterns forecast in forked worker processes, one per core. No tables.
- `novel`: RPCs in no pattern graph. Reads `novel_rpcs`; writes `anomalies`.
- `extreme`: single calls far beyond anything their RPC did (decisive). Reads `calls`; writes `anomalies`.
- `incidents`: flagged points grouped. Reads `anomalies`, `incidents`; writes `incidents`.
"""
