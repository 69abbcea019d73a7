"""Incidents as JSON-ready dicts: one shape for the HTTP API, the webhook and the report."""

from __future__ import annotations

from datetime import datetime, timezone

from sidecar.model import Incident


def rfc3339(unix_ns: int) -> str:
    moment = datetime.fromtimestamp(unix_ns / 1e9, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def incident_to_dict(incident: Incident) -> dict[str, object]:
    return {
        "id": incident.id,
        "rule": incident.rule,
        "severity": incident.severity.value,
        "role": incident.role,
        "implementation": incident.implementation,
        "entry_point": incident.entry_point,
        "summary": incident.summary,
        "count": incident.count,
        "first_seen": rfc3339(incident.first_seen_ns),
        "last_seen": rfc3339(incident.last_seen_ns),
        "first_seen_unix": incident.first_seen_ns / 1e9,
        "last_seen_unix": incident.last_seen_ns / 1e9,
        "sample_trace_ids": list(incident.sample_trace_ids),
        "alerted": incident.alerted,
        "status": incident.status,
    }
