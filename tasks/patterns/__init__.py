"""Stage 2, patterns: RPC chains rebuilt from calls and grouped into patterns with graphs.

- `stage`: `patterns_hour` runs the stage for one hour and records `clustering_runs`;
  `pattern_table` reads `patterns`, `pattern_nodes`.
- `traces`: trace reconstruction and canonical shapes. Reads `calls`; writes `shapes`,
  `trace_patterns`, `reconstruction`.
- `assignment`: traces to patterns by shape, or by re-clustering. Reads `shapes`, `shape_patterns`,
  `patterns`, `pattern_nodes`; writes `shape_patterns`.
- `identity`: stable pattern ids, versions and graphs. Reads and writes `patterns`, `pattern_nodes`,
  `pattern_edges`, `pattern_history`.
- `series`: reads `calls`, `trace_patterns`, `rpc_series`; writes `pattern_series`, `novel_rpcs`.
- `clustering`: shape features, HDBSCAN, cluster matching, pattern graphs (no tables).
- `temp_tables`: the names of the TEMP tables these modules share on the stage's connection.
"""
