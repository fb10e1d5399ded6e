"""Alerts: new incidents above a severity, and task failures, posted to a Slack/Teams webhook.

- `messages`: the JSON messages (a markdown `text` Slack and Teams both render, Slack `blocks`),
  with every value that comes from data neutralised. No tables; standard library only.
- `webhook`: `post_json` (urllib; errors name the host, never the secret URL), `unsent_incidents`,
  and `alert_new_incidents`, the hourly step: each incident posted once (`alerts_sent`), none that
  people acknowledged, marked false positive or expected, or silenced (tasks.triage).

The Airflow side, a failure notifier, is `dags/rpcwatch_alerts.py`.
"""
