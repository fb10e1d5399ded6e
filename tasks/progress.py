"""Progress bars for long work at a terminal (tqdm: synthetic hours, replayed captures, trainings).
Silent under Airflow and whenever stderr is not a terminal: task and CI logs get the summary lines
the commands print anyway, not bar redraws."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def quiet() -> bool:
    """True inside an Airflow task (it sets AIRFLOW_CTX_*) or without a terminal."""
    return "AIRFLOW_CTX_DAG_ID" in os.environ or not sys.stderr.isatty()


def progress(items: Iterable[T], what: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """`items`, with a bar on stderr saying `what` and how far it got."""
    from tqdm import tqdm

    yield from tqdm(items, desc=what, total=total, unit=unit, disable=quiet(), leave=False, file=sys.stderr)
