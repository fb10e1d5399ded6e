"""Stage 1, ingest: trace files of an hour into the warehouse, checked.

- `files`: find an hour's trace files, fingerprint and inspect them (never raises on a bad file), read
  them as one relation (TEMP VIEW `raw`). Reads trace files; writes no table.
- `exports`: JSON span exports (OTLP from the Collector's file exporter, Jaeger) flattened to rows.
- `formats`: the trace formats (Alibaba v2021/v2022, spans + mappings, the mapping schema) and their
  normalising SQL.
- `rows`: the row checks and the hour's replacement. Reads `raw`; writes `calls`, `quarantine`.
- `stage`: `ingest_hour`, batch loading with its fallback for breaking files. Reads trace files and
  `ingest_log`; writes `calls`, `quarantine` (through `rows`) and `ingest_log`.
- `sql`: one-value reads and the validated values formatted into SQL text.
- `validate`: `validate_hour` (row checks' results + Great Expectations). Reads `calls`,
  `quarantine`, `ingest_log`; writes `validation_runs`.
- `aggregate`: `aggregate_hour`. Reads `calls`; writes `rpc_series`.
"""
