"""Evaluation: how well rpcwatch finds what was injected (never used in training or calibration).

- `labels`: synthetic injected events vs incidents (rpcwatch and the naive median/MAD rule).
- `faults`: real fault-injection lists (TrainTicket) vs incidents and points.
- `naive`: the naive per-RPC median/MAD reference detector both evaluations print.
- `replay`: captures with gaps laid back to back as hour partitions.

Incidents, for every detector, come from the product's one rule (`tasks.scoring.incidents`).
"""
