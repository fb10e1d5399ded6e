"""One hour rule for rpcwatch's DAG: the run whose logical date is H processes hour [H, H+1), whoever
starts it (the scheduler, a backfill, the REST API, the UI's Trigger button, `airflow dags test`).

Airflow's hourly data-interval timetable already gives scheduled and backfill runs the interval
[H, H+1) with logical date H, but infers the interval of a *manual* run as the last complete hour
before its logical date: `dags test ... H` would process H-1. This timetable changes only that
inference: a manual run's interval is the hour that starts at its logical date (floored to the
hour). Airflow loads timetables from plugins, hence this file here (no rpcwatch import)."""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin
from airflow.timetables.base import DataInterval, Timetable
from airflow.timetables.interval import CronDataIntervalTimetable
from pendulum import UTC, DateTime


class HourTimetable(CronDataIntervalTimetable):
    """Hourly intervals in UTC; every run's logical date is the start of the hour it processes."""

    description = "every hour (UTC); a run for hour H has logical date H and processes [H, H+1)"

    def __init__(self) -> None:
        super().__init__("0 * * * *", timezone=UTC)

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> Timetable:
        return cls()

    def serialize(self) -> dict[str, Any]:
        return {}

    def infer_manual_data_interval(self, *, run_after: DateTime) -> DataInterval:
        start = self._align_to_prev(run_after)  # the hour that contains (or starts at) run_after
        return DataInterval(start=start, end=self._get_next(start))


class RpcwatchHourPlugin(AirflowPlugin):
    name = "rpcwatch_hour"
    timetables = [HourTimetable]
