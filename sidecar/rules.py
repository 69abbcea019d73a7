"""The rule catalog: every rule id the detectors may raise, with its severity and meaning.

Metrics, alert rules, dashboards, docs and tests all key on these ids, so they live in one place.
A new rule = one entry here + its detector code + its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from sidecar.model import Severity


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    family: str  # "bleed" | "duplicate" | "delivery" | "deploy"
    severity: Severity
    description: str


BLEED_OWNER_VS_AMBIENT: Final = "bleed.owner_vs_ambient"
BLEED_SUBJECT_VS_AMBIENT: Final = "bleed.subject_vs_ambient"
BLEED_SPAN_VS_ROOT_USER: Final = "bleed.span_vs_root_user"
BLEED_TARGET_VS_SOCKET_OWNER: Final = "bleed.target_vs_socket_owner"
BLEED_SHARED_INSTANCE: Final = "bleed.shared_instance"
BLEED_LEAKED_CONTEXT: Final = "bleed.leaked_context"
DUPLICATE_EXECUTION: Final = "duplicate.execution"
DUPLICATE_EMISSION: Final = "duplicate.emission"
DUPLICATE_ENTRY_POINT_PATHS: Final = "duplicate.entry_point_paths"
DUPLICATE_RETIRED_INVOKED: Final = "duplicate.retired_invoked"
DELIVERY_UNDELIVERED: Final = "delivery.undelivered"
DELIVERY_WRITE_FAILED: Final = "delivery.write_failed"
DELIVERY_NO_CONNECTION: Final = "delivery.no_connection"
DELIVERY_MISSING_REQUIRED_EVENTS: Final = "delivery.missing_required_events"
DEPLOY_REGRESSION: Final = "deploy.regression"
DEPLOY_RETIRED_REVIVED: Final = "deploy.retired_revived"
DEPLOY_NEW_PATH: Final = "deploy.new_path"

_C, _W, _I = Severity.CRITICAL, Severity.WARNING, Severity.INFO

CATALOG: Final[dict[str, Rule]] = {
    r.id: r
    for r in (
        Rule(BLEED_OWNER_VS_AMBIENT, "bleed", _C,
             "a user-scoped instance built for one user serves a request of another"),
        Rule(BLEED_SUBJECT_VS_AMBIENT, "bleed", _C,
             "a call's argument names a user other than the request's user"),
        Rule(BLEED_SPAN_VS_ROOT_USER, "bleed", _C,
             "a span's ambient user differs from the user of its trace's root request"),
        Rule(BLEED_TARGET_VS_SOCKET_OWNER, "bleed", _C,
             "an event addressed to one user was written to a socket another user authenticated on"),
        Rule(BLEED_SHARED_INSTANCE, "bleed", _C,
             "one user-scoped instance served several users"),
        Rule(BLEED_LEAKED_CONTEXT, "bleed", _C,
             "a span started under a request that had already ended (leaked context)"),
        Rule(DUPLICATE_EXECUTION, "duplicate", _W,
             "one run executed by two implementations of a role, or twice"),
        Rule(DUPLICATE_EMISSION, "duplicate", _W,
             "an exactly-once event emitted more than once, or one event written more than once"),
        Rule(DUPLICATE_ENTRY_POINT_PATHS, "duplicate", _I,
             "one entry point reaches several implementations of a role"),
        Rule(DUPLICATE_RETIRED_INVOKED, "duplicate", _W,
             "an implementation marked retired was called"),
        Rule(DELIVERY_UNDELIVERED, "delivery", _W,
             "an emitted event was not written to any socket within the delivery deadline"),
        Rule(DELIVERY_WRITE_FAILED, "delivery", _W,
             "a socket write failed or hit a closed socket, or a dispatch failed before writing"),
        Rule(DELIVERY_NO_CONNECTION, "delivery", _W,
             "an event was addressed to a recipient with no connection"),
        Rule(DELIVERY_MISSING_REQUIRED_EVENTS, "delivery", _W,
             "a run ended without emitting all of its required events"),
        Rule(DEPLOY_REGRESSION, "deploy", _W,
             "a new service.version raises bleed, duplicate or undelivered findings per run above "
             "the previous version's rate on the same entry point"),
        Rule(DEPLOY_RETIRED_REVIVED, "deploy", _W,
             "a retired implementation runs in a new service.version and did not in the previous one"),
        Rule(DEPLOY_NEW_PATH, "deploy", _I,
             "a new service.version takes an execution path the previous one never took"),
    )
}
