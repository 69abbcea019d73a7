"""Incidents: findings grouped by fingerprint (rule + role + implementation + entry point), in SQLite."""

from sidecar.incidents.grouping import add_sample, merge_finding, new_incident, severity_rank
from sidecar.incidents.query import DEFAULT_LIMIT, MAX_LIMIT, IncidentQuery, QueryError, parse_since
from sidecar.incidents.recent import FindingQuery, RecentFindings, finding_to_dict
from sidecar.incidents.schema import SCHEMA_VERSION, SchemaError
from sidecar.incidents.serialize import incident_to_dict, rfc3339
from sidecar.incidents.store import (DEFAULT_MAX_INCIDENTS, IncidentStore, IncidentStoreError,
                                     StoreClosed)

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_MAX_INCIDENTS",
    "FindingQuery",
    "MAX_LIMIT",
    "SCHEMA_VERSION",
    "IncidentQuery",
    "IncidentStore",
    "IncidentStoreError",
    "QueryError",
    "RecentFindings",
    "SchemaError",
    "StoreClosed",
    "add_sample",
    "finding_to_dict",
    "incident_to_dict",
    "merge_finding",
    "new_incident",
    "parse_since",
    "rfc3339",
    "severity_rank",
]
