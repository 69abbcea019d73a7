"""The sidecar's vocabulary: what the decoder produces and what the detectors emit.

The receiver decodes each OTLP span once, at the edge, into a slotted ``SpanRecord``.
Detectors see only these records; they return ``Finding`` objects; the incident store
groups findings into ``Incident`` rows by fingerprint.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field


class Severity(str, enum.Enum):
    CRITICAL = "critical"  # cross-user bleed: page now
    WARNING = "warning"  # duplicates, undelivered events
    INFO = "info"  # consolidation inventory facts (retired implementation still called, ...)


#: The SpanRecord fields that hold user ids.
USER_FIELDS = ("user", "owner", "subject", "target", "connection_user")
#: The SpanRecord fields that hold tuples of user ids.
USER_LIST_FIELDS = ("connection_users",)
#: Between a user id and the key that made it, in the ids the detectors hold (``keyed_user``).
KEY_MARK = "\x1f"


def keyed_user(user: str, key_id: str) -> str:
    """A user id as the detectors hold it when its span says which key made it (the
    ``pathwatch.pseudonym.key_id`` of its scope or request span): the id, ``KEY_MARK``, the key id.
    Two ids of one key are equal exactly when their users are; ids of two keys never are, and
    ``other_user`` tells the two cases apart."""
    return f"{user}{KEY_MARK}{key_id}"


def process_of(instance_id: str | None) -> str | None:
    """The backend process of a pathwatch instance id, ``i-<process>-<n>`` (docs/conventions.md):
    random per process, forks included. None for an id of another form (another instrumentation)."""
    if instance_id is None or not instance_id.startswith("i-"):
        return None
    end = instance_id.find("-", 2)
    return instance_id[2:end] if end > 2 else None


def other_user(a: str, b: str) -> bool | None:
    """For two user ids the detectors hold that differ (``a != b``): True when they name two users;
    None when they cannot be compared — pseudonyms made with two keys (a rotation, processes with
    different keys) or a raw id and a pseudonym. An id that names no key (an older instrumentation,
    another SDK) is compared by its pseudonym alone. Called on a finding's path only."""
    a_id, a_mark, a_key = a.rpartition(KEY_MARK)
    b_id, b_mark, b_key = b.rpartition(KEY_MARK)
    if a_mark and b_mark:
        return True if a_key == b_key else None
    return (a_id if a_mark else a_key) != (b_id if b_mark else b_key)


@dataclass(slots=True)
class SpanRecord:
    """One decoded span. Ids are lowercase hex strings; users are pseudonyms; absent = None."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    start_ns: int
    end_ns: int
    kind: str | None = None  # attributes.SpanKinds value; None for foreign spans
    error: bool = False  # span status ERROR
    # what ran
    function: str | None = None
    role: str | None = None
    implementation: str | None = None
    canonical: bool = False
    retired: bool = False
    instance_id: str | None = None
    nested: bool = False
    outer_span_id: str | None = None  # nested calls: the same-role call they run inside
    # an emit: the span id of the execution it is part of (``pathwatch.execution.span_id``), the
    # same string object as that id's elsewhere in its scope (the decoder interns it)
    execution_span_id: str | None = None
    # the request span the work ran under (``pathwatch.request.span_id``), interned as
    # ``execution_span_id``: the bleed detector judges it against that request
    request_span_id: str | None = None
    # an execute span whose task was cancelled while it ran (the app stopped the run)
    cancelled: bool = False
    entry_point: str | None = None
    caller: str | None = None
    # for whom
    user: str | None = None  # ambient (enduser.pseudo.id / enduser.id)
    owner: str | None = None
    subject: str | None = None
    target: str | None = None
    user_scoped: bool = False
    # the key a request span's user ids were made with (``pathwatch.pseudonym.key_id``), as the
    # span says it; the decoder has marked its users with it (``keyed_user``)
    user_key: str | None = None
    # the work
    run_id: str | None = None
    thread_id: str | None = None
    event_type: str | None = None
    event_id: str | None = None
    # delivery
    connection_id: str | None = None
    connection_user: str | None = None
    # a socket's request span whose user changed after it connected: every user it had
    connection_users: tuple[str, ...] | None = None
    # it had more users than ``connection_users`` lists (the later ones not listed)
    connection_users_truncated: bool = False
    outcome: str | None = None
    link: str | None = None
    # a write made while a call the path map declares a fan-out ran (one message to several users)
    fan_out: bool = False
    dispatch_writes: int | None = None
    # an HTTP request span: how long its ASGI call went on after the response (background tasks),
    # already added to ``end_ns`` by the decoder (the request ran until then)
    after_response_ns: int | None = None
    # heartbeat
    dropped_spans: int | None = None
    instrumentation_errors: int | None = None
    pending_emits_evicted: int | None = None
    heartbeat_sequence: int | None = None  # 1: the process's first heartbeat (None: older ones)
    counts_since_s: float | None = None  # backend's wall clock: when its counts started
    heartbeat_interval_s: float | None = None  # seconds between the process's heartbeats
    # True: the process stops cleanly (its last heartbeat); False: it lives on; None: not sent (an
    # older instrumentation, whose processes are not judged gone when their heartbeats stop)
    heartbeat_final: bool | None = None
    # resource
    service_name: str | None = None
    service_version: str | None = None
    service_instance: str | None = None
    # when the sidecar received it (monotonic ns), for receipt-to-finding latency
    received_ns: int = 0
    # the compact copy detectors keep instead of the whole record (``detectors._findings.culprit_of``);
    # made once per span and shared by every detector that keeps it
    culprit: object = field(default=None, compare=False, repr=False)


@dataclass(slots=True)
class Finding:
    """One rule violation, produced by a detector."""

    rule: str  # rule id, e.g. "bleed.owner_vs_ambient"
    severity: Severity
    summary: str  # one line, no raw user ids
    role: str | None = None
    implementation: str | None = None
    entry_point: str | None = None
    trace_id: str | None = None
    span_id: str | None = None
    run_id: str | None = None
    event_type: str | None = None
    service_version: str | None = None
    # the service (``service.name``) of the span whose version it carries: a gateway sees several
    # services, and two may run the same version string (a monorepo commit)
    service_name: str | None = None
    detected_ns: int = 0  # time.time_ns() at detection
    received_ns: int = 0  # monotonic receipt time of the span that completed the evidence
    details: dict[str, object] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """Incidents group findings by rule + role + implementation + entry point."""
        key = "\x1f".join(
            (self.rule, self.role or "", self.implementation or "", self.entry_point or "")
        )
        return hashlib.sha256(key.encode()).hexdigest()[:16]


ALL_SINKS = "*"


@dataclass(slots=True)
class Incident:
    """Findings that share a fingerprint."""

    id: str  # = fingerprint
    rule: str
    severity: Severity
    role: str | None
    implementation: str | None
    entry_point: str | None
    summary: str
    count: int
    first_seen_ns: int
    last_seen_ns: int
    sample_trace_ids: list[str]
    alerted: bool = False  # paged to at least one sink
    status: str = "open"
    #: the sinks that accepted its page (``ALL_SINKS``: every one — a store written before pages
    #: were kept per sink)
    alerted_sinks: tuple[str, ...] = ()
    #: the backend services (``service.name``) its findings came from, the most recent last, at
    #: most ``grouping.MAX_SERVICES`` (the least recently seen goes first): one fingerprint may
    #: fire in several services (a gateway, a shared library)
    services: list[str] = field(default_factory=list)
    #: the sinks that were configured (and took its severity) when a finding of it came: each of
    #: them owes its page until it has it, however long ago that was (``IncidentStore.owe_pages``)
    owed_sinks: tuple[str, ...] = ()

    def paged_to(self, sink: str) -> bool:
        return sink in self.alerted_sinks or ALL_SINKS in self.alerted_sinks

    def owes_page(self) -> bool:
        """A sink configured when one of its findings came has not got its page yet."""
        return any(not self.paged_to(sink) for sink in self.owed_sinks)
