import sidecar.incidents


def test_incidents_public_names():
    assert sorted(sidecar.incidents.__all__) == sorted([
        "DEFAULT_LIMIT", "DEFAULT_MAX_INCIDENTS", "MAX_LIMIT", "SCHEMA_VERSION", "FindingQuery", "IncidentQuery",
        "IncidentStore", "IncidentStoreError", "QueryError", "RecentFindings", "SchemaError", "StoreClosed",
        "add_sample",
        "finding_to_dict", "incident_to_dict", "merge_finding", "new_incident", "parse_since", "rfc3339", "severity_rank"])
    assert all(hasattr(sidecar.incidents, name) for name in sidecar.incidents.__all__)


def test_the_store_and_the_dispatcher_satisfy_the_sidecar_protocols():
    from sidecar.alerting import AlertDispatcher
    from sidecar.config import AlertingConfig
    from sidecar.incidents import IncidentStore
    from sidecar.types import AlertSink, IncidentSink

    store = IncidentStore(":memory:")
    alerts = AlertDispatcher(AlertingConfig(), ledger=store)
    assert isinstance(store, IncidentSink) and isinstance(alerts, AlertSink)
    alerts.close()
    store.close()
