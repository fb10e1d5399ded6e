"""Stage 3, models: per-pattern forecasters, trained only when stale, tracked in MLflow.

- `nn/`: the ST-GCN layers (one per file).
- `series`: a pattern's series exported to Parquet for lock-free training. Reads `pattern_series`,
  `pattern_nodes`, `pattern_edges`, `patterns`.
- `forecast`: windows, training, baselines, calibrated thresholds.
- `training`: one pattern trained, evaluated, logged and registered (MLflow), champion policy,
  verified artifact cache.
- `staleness`: which champions are stale. Reads `patterns`, `models`, `forecast_errors`.
- `retrain`: plan (exports) → train → record, registry reconciliation. Writes `models`.
- `mlflow_model`: the pyfunc model MLflow serves.
"""
