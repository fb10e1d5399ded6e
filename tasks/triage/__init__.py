"""Triage: what people decide about incidents. Acknowledge, mark (false positive, expected, true
positive) and silence (a service or an RPC for a while), stored in the warehouse with who and
when; honoured by alerts (tasks.alerts.webhook) and by training, which never learns a marked
period (tasks.models.series)."""
