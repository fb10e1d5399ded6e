"""Stage 3, models: per-pattern forecasters, trained only when stale, tracked in MLflow.

- `features`: the feature axis of every [T, N, F] array and its indices.
- `nn/`: the ST-GCN layers (one per file).
- `series`: a pattern's series exported to Parquet for lock-free training. Reads `pattern_series`,
  `pattern_nodes`, `pattern_edges`, `patterns`.
- `forecast`: windows, the model, its loss, training, forecasts. `baselines`: metrics and naive
  baselines. `thresholds`: calibrated thresholds. No tables.
- `registry`: model names, the champion lookup (reads `models`), MLflow set-up, the verified
  artifact cache, the registry as `models` rows, and runs a dead process left open closed.
- `store`: the embedded MLflow sqlite store, created and upgraded on a copy swapped into place
  (a kill mid-migration never leaves it half-built).
- `jobs`: `TrainJob`, `TrainShard`, `TrainOutcome`, `Skipped`: what plan, train and record hand
  each other. `shards`: the stale patterns split into training shards of similar cost.
- `fitting`: a pattern's model and no-graph twin trained, evaluated and calibrated; many at once
  (`batched`: stacked parameters, padded graphs) on a GPU. No tables.
- `training`: fitted patterns logged and registered (MLflow), the champion policy, the artifact
  files. No tables.
- `staleness`: which champions are stale. Reads `patterns`, `models`, `forecast_errors`.
- `retrain`: plan (exports) → train → record, registry reconciliation. Writes `models`.
- `mlflow_model`: the pyfunc model MLflow serves.
"""
