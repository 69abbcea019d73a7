"""Incidents as JSON-ready dicts: one shape for the HTTP API, the webhook and the report.

Times are shown so that ``since=`` with the value shown lists what showed it: never after the time
itself (``sidecar.incidents.query.parse_since`` reads them back exactly)."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from decimal import Decimal

from sidecar.model import Incident

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NS_PER_S = 1_000_000_000


def rfc3339(unix_ns: int) -> str:
    """RFC 3339 in UTC, to the millisecond, truncated (from the integer: no float rounding up)."""
    seconds, ns = divmod(unix_ns, _NS_PER_S)
    moment = _EPOCH + timedelta(seconds=seconds, microseconds=ns // 1000)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def unix_seconds(unix_ns: int) -> float:
    """Unix seconds as a JSON number: the float nearest the time whose shortest decimal form (what
    JSON shows) is not after it — one step lower when that form would be (a float holds about
    0.24 µs at today's times)."""
    value = unix_ns / _NS_PER_S
    while value > 0 and Decimal(repr(value)) * _NS_PER_S > unix_ns:
        value = math.nextafter(value, 0.0)
    return value


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
        "first_seen_unix": unix_seconds(incident.first_seen_ns),
        "last_seen_unix": unix_seconds(incident.last_seen_ns),
        "sample_trace_ids": list(incident.sample_trace_ids),
        "alerted": incident.alerted,
        "status": incident.status,
        "services": list(incident.services),
    }
