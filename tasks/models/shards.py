"""Split an hour's stale patterns into training shards of similar cost.

The DAG maps one training task per shard, not per pattern: the scheduler pays for every mapped task
(Airflow maps at most 1,024), a GPU only pays off on many patterns at once (`fitting.fit_many`), and
a handful of shards still spreads the work over several workers. A pattern's cost is the rows of its
exported series (buckets x nodes, what one epoch touches); patterns go, costliest first, to the
shard with the least so far (longest processing time first: within 4/3 of the best split).
"""

from __future__ import annotations

import heapq
from pathlib import Path

import pyarrow.parquet as pq

from tasks.models.jobs import TrainJob, TrainShard


def export_cost(job: TrainJob) -> int:
    """Rows of the job's exported series (read from the Parquet footer, not the data)."""
    return int(pq.read_metadata(Path(job.meta_path).with_suffix(".parquet")).num_rows)


def shard_jobs(jobs: list[TrainJob], shards: int, costs: list[int] | None = None) -> list[TrainShard]:
    """At most `shards` non-empty shards of similar total cost (`costs[i]` of `jobs[i]`; default:
    `export_cost`); each shard lists its jobs in pattern order, shards numbered from 0."""
    if not jobs:
        return []
    costs = costs if costs is not None else [export_cost(job) for job in jobs]
    bins: list[list[TrainJob]] = [[] for _ in range(min(shards, len(jobs)))]
    lightest = [(0, k) for k in range(len(bins))]  # (cost so far, shard): a heap
    for cost, job in sorted(zip(costs, jobs, strict=True), key=lambda cj: (-cj[0], cj[1].pattern_id)):
        total, k = heapq.heappop(lightest)
        bins[k].append(job)
        heapq.heappush(lightest, (total + cost, k))
    return [TrainShard(k, sorted(b, key=lambda j: j.pattern_id)) for k, b in enumerate(bins)]
