import sidecar.alerting


def test_alerting_public_names():
    assert sorted(sidecar.alerting.__all__) == sorted([
        "DEFAULT_RUNBOOK_URL", "AlertDispatcher", "AlertLedger", "AlertmanagerSink", "MemoryLedger",
        "PermanentSinkError", "RetryableSinkError", "Sink", "SinkError", "TokenBucket", "WebhookSink",
        "alert_labels", "alertmanager_alert", "alertname", "runbook_link", "webhook_body"])
    assert all(hasattr(sidecar.alerting, name) for name in sidecar.alerting.__all__)
