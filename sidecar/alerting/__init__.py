"""Alerting: push incidents to Alertmanager (v2 API) and/or a JSON webhook, once each, paced and retried."""

from sidecar.alerting.dispatcher import AlertDispatcher, AlertLedger, MemoryLedger
from sidecar.alerting.payload import (DEFAULT_RUNBOOK_URL, alert_labels, alertmanager_alert, alertname,
                                      runbook_link, webhook_body)
from sidecar.alerting.ratelimit import TokenBucket
from sidecar.alerting.sinks import (AlertmanagerSink, PermanentSinkError, RetryableSinkError, Sink,
                                    SinkError, WebhookSink)

__all__ = [
    "DEFAULT_RUNBOOK_URL",
    "AlertDispatcher",
    "AlertLedger",
    "AlertmanagerSink",
    "MemoryLedger",
    "PermanentSinkError",
    "RetryableSinkError",
    "Sink",
    "SinkError",
    "TokenBucket",
    "WebhookSink",
    "alert_labels",
    "alertmanager_alert",
    "alertname",
    "runbook_link",
    "webhook_body",
]
