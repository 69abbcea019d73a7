"""Folding findings into incidents: one incident per fingerprint, bounded sample trace ids.

Pure functions on ``sidecar.model`` objects; the store decides where they live.
"""

from __future__ import annotations

import time

from sidecar.model import Finding, Incident, Severity

#: the services an incident remembers (``Incident.services``): the most recently seen ones
MAX_SERVICES = 10
_SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}


def severity_rank(severity: Severity | str) -> int:
    return _SEVERITY_RANK[Severity(severity)]


def new_incident(finding: Finding, sample_limit: int) -> Incident:
    seen_ns = _seen_ns(finding)
    incident = Incident(
        id=finding.fingerprint,
        rule=finding.rule,
        severity=Severity(finding.severity),
        role=finding.role,
        implementation=finding.implementation,
        entry_point=finding.entry_point,
        summary=finding.summary,
        count=0,
        first_seen_ns=seen_ns,
        last_seen_ns=seen_ns,
        sample_trace_ids=[],
    )
    merge_finding(incident, finding, sample_limit)
    return incident


def merge_finding(incident: Incident, finding: Finding, sample_limit: int) -> None:
    """Count one more finding. The first summary stays: alerts and links keep pointing at it."""
    seen_ns = _seen_ns(finding)
    incident.count += 1
    incident.first_seen_ns = min(incident.first_seen_ns, seen_ns)
    incident.last_seen_ns = max(incident.last_seen_ns, seen_ns)
    # one fingerprint has one rule, hence one severity; keep the highest should a detector vary it
    if severity_rank(finding.severity) > severity_rank(incident.severity):
        incident.severity = Severity(finding.severity)
    if finding.trace_id:
        add_sample(incident.sample_trace_ids, finding.trace_id, sample_limit)
    if finding.service_name:
        add_service(incident.services, finding.service_name)


def add_service(services: list[str], name: str) -> None:
    """``name`` becomes the most recent service (the last); at most ``MAX_SERVICES`` are kept, the
    least recently seen dropped first. A finding without ``service.name`` leaves the list as it is."""
    if services and services[-1] == name:
        return
    if name in services:
        services.remove(name)
    services.append(name)
    if len(services) > MAX_SERVICES:
        del services[:len(services) - MAX_SERVICES]


def add_sample(samples: list[str], trace_id: str, limit: int) -> None:
    """Keep distinct trace ids: the first ``limit // 2`` ever seen and the latest ones after them.

    The first samples show how the incident began, the latest show it still happens; the list never
    exceeds ``limit`` once a trace id is added, even one kept under a higher limit (the setting
    lowered, the store reopened): it is cut back to the first ``limit // 2`` and the newest.
    """
    if trace_id in samples:
        return
    if len(samples) >= limit:  # drop the oldest of the "latest" part: one, or more after a lower limit
        keep_latest = limit - limit // 2 - 1  # with the new one, ``limit``
        del samples[limit // 2:len(samples) - keep_latest]
    samples.append(trace_id)


def _seen_ns(finding: Finding) -> int:
    return finding.detected_ns or time.time_ns()
