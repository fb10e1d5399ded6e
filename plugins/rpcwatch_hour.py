"""One hour rule for rpcwatch's DAGs: the run whose logical date is H processes hour [H, H+1), whoever
starts it (the scheduler, a backfill, the REST API, the UI's Trigger button, `airflow dags test`),
and is named for that hour.

Airflow's hourly data-interval timetable already gives scheduled and backfill runs the interval
[H, H+1) with logical date H, but infers the interval of a *manual* run as the last complete hour
before its logical date (`dags test ... H` would process H-1), names a run after the time it may
start (`scheduled__...T09:00:00+00:00` for hour 08:00) and lets a manual run for any date be
created: one after the DAG's `end_date` gets no task and "succeeds" at once. This timetable:

- gives a manual run the hour that starts at its logical date;
- refuses, before any run exists, a manual run that is not one of the DAG's hours: a logical date
  that is not a whole hour, an hour outside `first .. last` (`RPCWATCH_START .. RPCWATCH_END`), an
  hour that has not ended yet (its files are still arriving; the scheduler runs it when it ends), or
  no logical date at all. Airflow's REST API (so the UI's Trigger dialog) answers 400 with the
  reason, `airflow dags test` stops with it;
- names a run for its hour, `<run type>__<hour>Z`: `scheduled__2026-01-01T08:00Z` and
  `manual__2026-01-01T08:00Z` hold hour 08:00-09:00 UTC. Not Airflow's `...T08:00:00+00:00` look
  on purpose: run ids made before this naming (named for the hour's end) never collide with it.
  Backfill runs keep Airflow's own `backfill__<the hour's end>`: Airflow 3.3 names them without
  asking the timetable.

`HourRerunTimetable` is the same rule for `rpcwatch_rerun`, which never schedules anything: it runs
the hours that `rpcwatch rerun` asks for while `rpcwatch_hourly` is paused.

Airflow loads timetables from plugins, hence this file here (no rpcwatch import)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from airflow.plugins_manager import AirflowPlugin
from airflow.timetables.base import DagRunInfo, DataInterval, TimeRestriction, Timetable
from airflow.timetables.interval import CronDataIntervalTimetable
from airflow.utils.types import DagRunType
from pendulum import UTC, DateTime, instance

HOUR = timedelta(hours=1)
# run types a person (or another DAG) starts: these are checked against the DAG's hours
ASKED_FOR = (DagRunType.MANUAL, DagRunType.OPERATOR_TRIGGERED)


def _utc(value: datetime | str | None) -> DateTime | None:
    if value is None:
        return None
    return instance(datetime.fromisoformat(value) if isinstance(value, str) else value).in_timezone(UTC)


def _show(hour: datetime) -> str:
    return f"{hour:%Y-%m-%dT%H:%M} UTC"


def run_id_for(run_type: DagRunType, hour: datetime) -> str:
    """The run id of the run of `run_type` that processes `hour`, e.g. `scheduled__2026-01-01T08:00Z`."""
    return run_type.generate_run_id(suffix=f"{hour.astimezone(UTC):%Y-%m-%dT%H:%M}Z")


class HourTimetable(CronDataIntervalTimetable):
    """Hourly intervals in UTC; every run's logical date is the start of the hour it processes, and
    its run id names that hour. `first`/`last`: the DAG's first and last hour (logical dates, `last`
    included; None: open), which manual runs must fall in."""

    def __init__(self, first: datetime | None = None, last: datetime | None = None) -> None:
        super().__init__("0 * * * *", timezone=UTC)
        self.first, self.last = _utc(first), _utc(last)
        self.description = "every hour (UTC); a run for hour H has logical date H and processes [H, H+1)"

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> Timetable:
        return cls(_utc(data.get("first")), _utc(data.get("last")))

    def serialize(self) -> dict[str, Any]:
        return {"first": self.first and self.first.isoformat(), "last": self.last and self.last.isoformat()}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HourTimetable) or type(other) is not type(self):
            return NotImplemented
        return (self.first, self.last) == (other.first, other.last)

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.first, self.last))

    def infer_manual_data_interval(self, *, run_after: DateTime) -> DataInterval:
        """The hour that starts at a manual run's logical date (Airflow passes the logical date as
        `run_after` here); ValueError, which the REST API answers with 400, unless it is one of the
        DAG's hours."""
        start = self._align_to_prev(run_after)
        if start != run_after:
            raise ValueError(
                f"rpcwatch: logical date {run_after.isoformat()} is not a whole hour: a run processes the hour "
                f"that starts at its logical date (e.g. {start:%Y-%m-%dT%H}:00:00Z processes "
                f"{start:%H}:00-{start + HOUR:%H}:00 UTC)"
            )
        interval = DataInterval(start=start, end=self._get_next(start))
        self.check_hour(interval)
        return interval

    def check_hour(self, interval: DataInterval) -> None:
        """ValueError, saying why, unless `interval` is one whole hour of this DAG that has ended."""
        start, end = _utc(interval.start), _utc(interval.end)
        assert start is not None and end is not None
        if end - start != HOUR or self._align_to_prev(start) != start:
            raise ValueError(f"rpcwatch: a run processes one whole hour, not {start.isoformat()} .. {end.isoformat()}")
        if (self.first is not None and start < self.first) or (self.last is not None and start > self.last):
            hours = f"{_show(self.first) if self.first else '(open)'} .. {_show(self.last) if self.last else '(open)'}"
            raise ValueError(
                f"rpcwatch: no run for hour {_show(start)}: this DAG processes the hours {hours} "
                "(RPCWATCH_START .. RPCWATCH_END, the last included)"
            )
        if end > DateTime.now(UTC):
            raise ValueError(
                f"rpcwatch: no run for hour {_show(start)} yet: it ends at {end:%H:%M} UTC, its files are still "
                "arriving; the scheduler runs it when it ends (the logical date is the hour to process)"
            )

    def generate_run_id(
        self, *, run_type: DagRunType, run_after: DateTime, data_interval: DataInterval | None, **extra: Any
    ) -> str:
        """`<run type>__<hour>Z` for a run that processes an hour. A manual (or operator-triggered)
        run must be one of the DAG's hours: with no logical date it would have none."""
        if run_type in ASKED_FOR:
            if data_interval is None:
                raise ValueError(
                    "rpcwatch: a run needs a logical date, the hour to process (e.g. 2026-01-01T08:00:00Z "
                    "processes 08:00-09:00 UTC)"
                )
            self.check_hour(data_interval)
        if data_interval is None:
            return super().generate_run_id(run_type=run_type, run_after=run_after, data_interval=None, **extra)
        return run_id_for(run_type, data_interval.start)


class HourRerunTimetable(HourTimetable):
    """`rpcwatch_rerun`'s: never schedules a run; a manual run for hour H processes [H, H+1), as in
    `rpcwatch_hourly`."""

    can_be_scheduled = False
    periodic = False

    def __init__(self, first: datetime | None = None, last: datetime | None = None) -> None:
        super().__init__(first, last)
        self.description = "never on its own: reruns of rpcwatch_hourly's hours while that DAG is paused"

    @property
    def summary(self) -> str:
        return "reruns only"

    def next_dagrun_info(
        self, *, last_automated_data_interval: DataInterval | None, restriction: TimeRestriction
    ) -> DagRunInfo | None:
        return None


class RpcwatchHourPlugin(AirflowPlugin):
    name = "rpcwatch_hour"
    timetables = [HourTimetable, HourRerunTimetable]
