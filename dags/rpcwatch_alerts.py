"""rpcwatch's failure alert for Airflow: `RpcwatchFailureNotifier` posts a failed task to the alert
webhook (`RPCWATCH_ALERT_WEBHOOK`; unset: nothing is posted).

This file defines no DAG; dags/rpcwatch_hourly.py imports the notifier from it (Airflow puts the
DAGs folder on sys.path). The DAG processor parses every file in this folder, so at module level it
imports only Airflow's notifier base; rpcwatch's modules load when a failure is notified.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from airflow.sdk.bases.notifier import BaseNotifier


def _failed_task(ti: Any, context: Mapping[str, Any]) -> str | None:
    """The task id, with the map index of a mapped task (`train[2]`)."""
    task_id = context.get("task_id") or getattr(ti, "task_id", None) or getattr(context.get("task"), "task_id", None)
    map_index = getattr(ti, "map_index", None)
    return f"{task_id}[{map_index}]" if task_id and isinstance(map_index, int) and map_index >= 0 else task_id


def _log_url(ti: Any) -> str | None:
    try:
        return getattr(ti, "log_url", None)
    except Exception:  # Airflow builds it from its config: a link is optional, the alert is not
        return None


def failure_facts(context: Mapping[str, Any]) -> dict[str, Any]:
    """What the failure message says, from a task's Airflow context (its `ti`, `dag`, `run_id`,
    `data_interval_start`, `exception`) or a plain dict with `dag_id`, `run_id`, `task_id`,
    `data_interval_start`, `exception` (and optionally `log_url`)."""
    ti = context.get("ti") or context.get("task_instance")
    return {
        "dag_id": context.get("dag_id") or getattr(ti, "dag_id", None) or getattr(context.get("dag"), "dag_id", None),
        "run_id": context.get("run_id") or getattr(ti, "run_id", None),
        "task_id": _failed_task(ti, context),
        "hour": context.get("data_interval_start"),
        "exception": context.get("exception"),
        "log_url": context.get("log_url") or _log_url(ti),
    }


def _webhook() -> str | None:
    """The alert webhook from the settings; read on its own when the other settings are bad (a bad
    setting may be why the task failed, and someone should still hear of it)."""
    import os

    from tasks.settings import PREFIX, load_settings

    try:
        return load_settings().alert_webhook
    except ValueError:
        name = PREFIX + "ALERT_WEBHOOK"
        return load_settings(env={name: os.environ.get(name, "")}).alert_webhook


class RpcwatchFailureNotifier(BaseNotifier):
    """Posts a failed task (DAG, task, run, hour, exception, log link) to the alert webhook.

    `on_failure_callback=RpcwatchFailureNotifier()`, on a task or in `default_args`. The webhook is
    read from the worker's settings when a task fails, not when the DAG is parsed: the secret is
    never in DAG code or in the serialized DAG. A post that fails raises WebhookError (the host
    only), which Airflow logs in the failed task's log."""

    template_fields = ()  # nothing is rendered: what a failure says is shown, never templated

    def __init__(self, timeout_s: float = 10.0) -> None:
        super().__init__()
        self.timeout_s = timeout_s

    def notify(self, context: Any) -> None:
        from tasks.alerts.messages import failure_payload
        from tasks.alerts.webhook import host_of, post_json

        url = _webhook()
        if not url:
            self.log.info("alerts are off (RPCWATCH_ALERT_WEBHOOK is not set): failure not posted")
            return
        post_json(url, failure_payload(**failure_facts(context)), self.timeout_s)
        self.log.info("failure posted to the webhook at %s", host_of(url))
