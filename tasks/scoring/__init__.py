"""Stage 4, scoring: each critical pattern's champion judges the hour.

- `score`: `score_hour`. Reads `patterns`, `models`, `pattern_series`, `novel_rpcs`, `anomalies`;
  writes `anomalies`, `score_runs`, `forecast_errors`, `incidents`.
"""
