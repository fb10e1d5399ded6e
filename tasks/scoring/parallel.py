"""Scoring's worker processes. The patterns of an hour are independent (each its own model, series
and earlier flags), so on a host with several cores they are forecast in worker processes while
this one reads the next patterns' rows. Each pattern is still computed by the same code on one
torch thread: the results are those of one process, in the same order.

Forked, not spawned: a worker starts with the hour's loaded detectors (`shared`, inherited, never
pickled) and every import (a spawned one would import torch and load them again: seconds). Few
patterns, one core, a daemonic process (which may not start children) or a platform without fork:
the jobs run here, one by one. Reads and writes no table.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import torch

R = TypeVar("R")
S = TypeVar("S")

MIN_JOBS = 64  # fewer patterns: forking and sending their rows back cost more than the second core gives
MAX_WORKERS = 8
BATCH = 8  # jobs per message to a worker: fewer round trips, still an even spread of the last ones

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)

_inherited: Any = None  # in a worker: the `shared` value of its pool


def worker_count(jobs: int) -> int:
    """Worker processes for `jobs` patterns: one per usable core, or 0 (run them here) when forking
    does not pay or is not allowed."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if jobs < MIN_JOBS or cores < 2 or multiprocessing.current_process().daemon:
        return 0
    return min(cores, MAX_WORKERS) if "fork" in multiprocessing.get_all_start_methods() else 0


def _adopt(shared: Any) -> None:
    """A worker's start: keep what the pool shares; torch on one thread, as scoring runs."""
    global _inherited
    _inherited = shared
    torch.set_num_threads(1)
    _keep_freed_memory()


def _keep_freed_memory() -> None:
    """glibc gives a freed block of more than 128 KB back to the system, and the next forward pass
    faults it in again page by page: 1,200 page faults and a third of a 60-window pass, measured.
    A worker (it lives for one hour's scoring) keeps blocks up to 32 MB and freed memory up to
    256 MB instead; elsewhere (not glibc) the allocator is left as it is."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)


def _run_batch(fn: Callable[..., R], jobs: list[tuple]) -> list[R]:
    """In a worker: `fn(shared, *job)` of every job of a batch."""
    return [fn(_inherited, *job) for job in jobs]


class Jobs(Generic[S, R]):
    """`fn(shared, *job)` of every submitted job, in forked workers or here; `results` in the order
    of submission."""

    def __init__(self, fn: Callable[..., R], shared: S, pool: ProcessPoolExecutor | None) -> None:
        self.fn, self.shared, self.pool = fn, shared, pool
        self.pending: list[Future[list[R]] | list[R]] = []

    def submit(self, jobs: list[tuple]) -> None:
        """Start the jobs (in batches of BATCH), or run them now when there is no pool."""
        for i in range(0, len(jobs), BATCH):
            batch = jobs[i : i + BATCH]
            if self.pool is None:
                self.pending.append([self.fn(self.shared, *job) for job in batch])
            else:
                self.pending.append(self.pool.submit(_run_batch, self.fn, batch))

    def results(self) -> list[R]:
        """Every job's result in submission order (a worker's exception is raised here)."""
        return [r for part in self.pending for r in (part if isinstance(part, list) else part.result())]


@contextmanager
def worker_jobs(fn: Callable[..., R], shared: S, workers: int) -> Iterator[Jobs[S, R]]:
    """A `Jobs` over `workers` forked processes (none: here), shut down on leaving."""
    if workers < 1:
        yield Jobs(fn, shared, None)
        return
    context = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_adopt, initargs=(shared,))
    try:
        yield Jobs(fn, shared, pool)
    except BaseException:
        pool.shutdown(cancel_futures=True)  # the hour fails: no need to finish the other patterns
        raise
    pool.shutdown()
