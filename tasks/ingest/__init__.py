"""Stage 1, ingest: trace files of an hour into the warehouse, checked.

- `files`: find an hour's trace files, fingerprint and inspect them (never raises on a bad file).
- `formats`: the trace formats (Alibaba v2021/v2022, spans + mappings) and their normalising SQL.
- `stage`: `ingest_hour`. Reads trace files; writes `calls`, `quarantine`, `ingest_log`.
- `validate`: `validate_hour` (row checks' results + Great Expectations). Reads `calls`,
  `quarantine`, `ingest_log`; writes `validation_runs`.
- `aggregate`: `aggregate_hour`. Reads `calls`; writes `rpc_series`.
"""
