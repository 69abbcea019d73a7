"""What an alert says: the Alertmanager v2 alert and the generic webhook body for one incident.

Labels come from the incident's fingerprint parts only (rule, role, implementation, entry point) —
never a user id; summaries are written by detectors without raw user ids.

The backend service (``service.name``) of the finding that raised the alert is an *annotation*
(``service_name``), not a label: Alertmanager identifies an alert by its whole label set, and one
incident's findings may come from several services (the fingerprint does not include it), so a
label that changed between a page and its refreshes would make a second alert — a second
notification, and a first one that resolves while the bleed goes on.
"""

from __future__ import annotations

import time

from sidecar.incidents.serialize import incident_to_dict, rfc3339
from sidecar.model import Incident
from sidecar import rules
from sidecar.rules import CATALOG

# the runbooks the Prometheus alert rules (dashboards/rules/) link to; a push alert links the same page
DEFAULT_RUNBOOK_URL = "https://github.com/pathwatch/pathwatch/blob/main/docs/runbooks"
DEFAULT_RESOLVE_AFTER_S = 900.0  # alerting.resolve_after_s
#: a resolve's ``endsAt`` is this much before the time it is sent (never before ``startsAt``):
#: Alertmanager merges it with the firing alert and keeps the firing alert's later ``endsAt``
#: unless the resolve's has passed by *its* clock, so an ``endsAt`` of "now" was ignored by an
#: Alertmanager whose clock is a few milliseconds behind the sidecar's, and the alert fired on
RESOLVE_CLOCK_ALLOWANCE_S = 60.0
_RUNBOOKS = {
    "bleed": "PathwatchCrossUserBleed",
    rules.DUPLICATE_EXECUTION: "PathwatchDuplicateExecution",
    rules.DUPLICATE_EMISSION: "PathwatchDuplicateEmission",
    rules.DUPLICATE_RETIRED_INVOKED: "PathwatchRetiredImplementationCalled",
    rules.DUPLICATE_ENTRY_POINT_PATHS: "PathwatchEntryPointPathsAboveOne",
    "duplicate": "PathwatchDuplicateExecution",
    rules.DELIVERY_MISSING_REQUIRED_EVENTS: "PathwatchRunsMissingRequiredEvents",
    "delivery": "PathwatchUndeliveredEventsHigh",
    rules.DEPLOY_REGRESSION: "PathwatchDeployRegression",
    rules.DEPLOY_RETIRED_REVIVED: "PathwatchRetiredImplementationRevived",
    rules.DEPLOY_NEW_PATH: "PathwatchEntryPointPathsAboveOne",
}
SERVICE = "pathwatch"
_ALERTNAMES = {"bleed": "PathwatchBleed", "duplicate": "PathwatchDuplicate",
               "delivery": "PathwatchDelivery", "deploy": "PathwatchDeploy"}
# the alert rules' routing contract: severity, component and category on every alert
_CATEGORIES = {"bleed": "isolation", "duplicate": "consolidation", "delivery": "delivery",
               "deploy": "consolidation"}
_MAX_SAMPLES_IN_TEXT = 3


def _family(rule_id: str) -> str:
    return CATALOG[rule_id].family if rule_id in CATALOG else rule_id.partition(".")[0]


def alertname(rule_id: str) -> str:
    """One alert name per rule family, so Alertmanager routes and groups by family."""
    family = _family(rule_id)
    return _ALERTNAMES.get(family, "Pathwatch" + family.title().replace("_", ""))


def runbook_link(rule_id: str, base_url: str = DEFAULT_RUNBOOK_URL) -> str:
    page = _RUNBOOKS.get(rule_id) or _RUNBOOKS.get(_family(rule_id)) or alertname(rule_id)
    return f"{base_url.rstrip('/')}/{page}.md"


def incident_url(external_url: str, incident_id: str) -> str:
    return f"{external_url.rstrip('/')}/api/v1/incidents/{incident_id}" if external_url else ""


def alert_labels(incident: Incident) -> dict[str, str]:
    labels = {
        "alertname": alertname(incident.rule),
        "severity": incident.severity.value,
        "rule": incident.rule,
        "role": incident.role,
        "implementation": incident.implementation,
        "entry_point": incident.entry_point,
        "incident_id": incident.id,
        "service": SERVICE,
        "component": SERVICE,
        "category": _CATEGORIES.get(_family(incident.rule)),
    }
    return {name: value for name, value in labels.items() if value}  # empty = absent in Alertmanager


def backend_service(incident: Incident) -> str | None:
    """The service (``service.name``) of the incident's most recent finding that named one: the
    finding that raised this page or refresh."""
    return incident.services[-1] if incident.services else None


def alert_annotations(incident: Incident, runbook_url: str = DEFAULT_RUNBOOK_URL) -> dict[str, str]:
    rule = CATALOG.get(incident.rule)
    meaning = rule.description if rule else incident.rule
    samples = ", ".join(incident.sample_trace_ids[:_MAX_SAMPLES_IN_TEXT]) or "none"
    services = f"service(s) {', '.join(incident.services)}; " if incident.services else ""
    description = (f"{meaning}. {incident.count} finding(s) since {rfc3339(incident.first_seen_ns)}; "
                   f"{services}role {incident.role or '-'}, implementation "
                   f"{incident.implementation or '-'}, entry point {incident.entry_point or '-'}; "
                   f"sample trace ids: {samples}.")
    annotations = {"summary": incident.summary, "description": description,
                   "runbook_url": runbook_link(incident.rule, runbook_url)}
    service = backend_service(incident)
    if service:
        annotations["service_name"] = service
    return annotations


def alertmanager_alert(incident: Incident, *, external_url: str = "",
                       runbook_url: str = DEFAULT_RUNBOOK_URL,
                       resolve_after_s: float | None = DEFAULT_RESOLVE_AFTER_S,
                       now_ns: int | None = None, ended_ns: int | None = None) -> dict[str, object]:
    """One element of the ``POST /api/v2/alerts`` body. ``endsAt`` = the last finding (or now, for
    an incident paged late) + ``resolve_after_s``: the alert fires that long after the incident's
    last finding, and the dispatcher sends it again while findings keep coming (None: no
    ``endsAt``, Alertmanager's ``resolve_timeout`` after each send). ``ended_ns``: the incident was
    resolved then (``endsAt``; never before ``startsAt``, which Alertmanager refuses)."""
    alert: dict[str, object] = {
        "labels": alert_labels(incident),
        "annotations": alert_annotations(incident, runbook_url),
        "startsAt": rfc3339(incident.first_seen_ns),
    }
    if ended_ns is not None:
        alert["endsAt"] = rfc3339(max(ended_ns, incident.first_seen_ns))
    elif resolve_after_s is not None:
        now_ns = time.time_ns() if now_ns is None else now_ns
        alert["endsAt"] = rfc3339(max(incident.last_seen_ns, now_ns) + int(resolve_after_s * 1e9))
    link = incident_url(external_url, incident.id)
    if link:
        alert["generatorURL"] = link
    return alert


def webhook_body(incident: Incident, *, external_url: str = "",
                 runbook_url: str = DEFAULT_RUNBOOK_URL,
                 resolve_after_s: float = DEFAULT_RESOLVE_AFTER_S) -> dict[str, object]:
    """The generic webhook's JSON: the alert as Alertmanager would get it, the backend service of
    the finding that raised it (None: its findings named none), and the incident."""
    return {
        "version": "1",
        "source": SERVICE,
        "service_name": backend_service(incident),
        "alert": alertmanager_alert(incident, external_url=external_url, runbook_url=runbook_url,
                                    resolve_after_s=resolve_after_s),
        "incident": incident_to_dict(incident),
    }
