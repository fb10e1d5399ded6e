"""Stage 2, patterns: RPC chains rebuilt from calls and grouped into patterns with graphs.

- `traces`: trace reconstruction and canonical shapes. Reads `calls`; writes `shapes`,
  `trace_patterns`, `reconstruction`.
- `clustering`: shape features, HDBSCAN, cluster matching (stable ids), pattern graphs.
- `stage`: `patterns_hour`. Reads `calls`, `rpc_series`, `shapes`, `shape_patterns`, `patterns`;
  writes `shape_patterns`, `patterns`, `pattern_history`, `pattern_nodes`, `pattern_edges`,
  `pattern_series`, `novel_rpcs`, `clustering_runs`.
"""
