"""Scoring's worker processes (`tasks.scoring.parallel`): jobs run in forked workers come back in
submission order, a worker's exception reaches the caller, and few jobs run in this process."""

from __future__ import annotations

import os

import pytest

from tasks.scoring.parallel import MAX_WORKERS, MIN_JOBS, worker_count, worker_jobs


def _twice(shared: list[int], index: int) -> tuple[int, int]:
    return shared[index] * 2, os.getpid()


def _fails(shared: list[int], index: int) -> int:
    raise ValueError(f"job {index} failed")


def test_jobs_in_forked_workers_come_back_in_submission_order():
    shared = list(range(100))  # inherited by the workers, never pickled
    with worker_jobs(_twice, shared, 2) as work:
        work.submit([(i,) for i in range(60)])
        work.submit([(i,) for i in range(60, 100)])
        results = work.results()
    assert [r for r, _ in results] == [2 * i for i in range(100)]
    assert os.getpid() not in {pid for _, pid in results}, "the workers forecast, not this process"


def test_without_workers_the_jobs_run_here():
    with worker_jobs(_twice, [1, 2, 3], 0) as work:
        work.submit([(0,), (2,)])
        assert work.results() == [(2, os.getpid()), (6, os.getpid())]


def test_a_workers_exception_is_raised_by_results():
    with pytest.raises(ValueError, match="job 3 failed"), worker_jobs(_fails, [], 2) as work:
        work.submit([(3,)])
        work.results()


def test_few_patterns_are_scored_in_this_process_many_by_a_worker_per_core():
    cores = len(os.sched_getaffinity(0))
    assert worker_count(MIN_JOBS - 1) == 0
    assert worker_count(10 * MIN_JOBS) == (min(cores, MAX_WORKERS) if cores > 1 else 0)
