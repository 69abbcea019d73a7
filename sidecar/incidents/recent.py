"""The most recent findings, one by one: the evidence inside incidents (as Sentry shows the events of an issue).

Incidents fold findings by fingerprint and keep only a few sample trace ids; this ring buffer keeps the
last ``capacity`` findings themselves, each with a sequence number, so a reader can ask "which runs did
this rule fire for since I last looked" (``after=SEQ``). Bounded: the oldest finding is evicted when it
is full, and evictions are counted. ``add`` runs on the pipeline thread, queries on the API thread.

The ring is memory: a restart loses it. A sidecar's ring counts its ``seq`` on from the time it
started, in microseconds (``seq_from_clock``), not from 1, so that a ``seq`` never comes twice: a
poller's ``after`` from before a restart is below the new ring's findings, which it then reads, and
below ``first_seq - 1``, which says that the stopped sidecar's unread findings are gone.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sidecar.incidents.query import parse_int, parse_rule, parse_since, reject_unknown
from sidecar.incidents.serialize import rfc3339, unix_seconds
from sidecar.model import Finding

DEFAULT_CAPACITY = 10_000
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
MAX_SEQ = 2**63 - 1  # the largest ``after``: a seq is a 64-bit integer to a client
_PARAMETERS = ("rule", "since", "after", "run_id", "trace_id", "limit")


@dataclass(frozen=True, slots=True, kw_only=True)
class FindingQuery:
    rule: str | None = None
    since_ns: int | None = None  # detected at or after this unix time
    after: int | None = None  # sequence number strictly greater than this
    run_id: str | None = None
    trace_id: str | None = None
    limit: int = DEFAULT_LIMIT

    @classmethod
    def from_params(cls, params: Mapping[str, str]) -> FindingQuery:
        """Build from URL query parameters; raises ``QueryError`` naming the bad parameter."""
        reject_unknown(params, _PARAMETERS)
        return cls(
            rule=parse_rule(params.get("rule")),
            since_ns=parse_since(params["since"]) if params.get("since") else None,
            after=parse_int("after", params.get("after"), 0, MAX_SEQ),
            run_id=params.get("run_id") or None,
            trace_id=(params.get("trace_id") or "").lower() or None,
            limit=parse_int("limit", params.get("limit"), 1, MAX_LIMIT) or DEFAULT_LIMIT,
        )

    def matches(self, seq: int, finding: Finding) -> bool:
        return ((self.after is None or seq > self.after)
                and (self.rule is None or finding.rule == self.rule)
                and (self.since_ns is None or finding.detected_ns >= self.since_ns)
                and (self.run_id is None or finding.run_id == self.run_id)
                and (self.trace_id is None or finding.trace_id == self.trace_id))


@dataclass(frozen=True, slots=True)
class FindingPage:
    """One answer to a query, read at one instant."""

    findings: list[tuple[int, Finding]]
    #: pass as ``after`` to read on: the last seq returned when the page is full, else the newest
    #: seq at the time of the query (everything up to it was examined)
    cursor: int
    last_seq: int  # the newest seq at the time of the query
    first_seq: int  # the oldest seq still held (0 if none): an ``after`` below it missed some
    evicted: int


class RecentFindings:
    """A bounded ring of (sequence number, finding), oldest first."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, *, seq_from: int = 0) -> None:
        """``seq_from``: the ``seq`` before the first finding's (``last_seq`` while there is none)."""
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not 0 <= seq_from < MAX_SEQ:
            raise ValueError(f"seq_from must be 0..{MAX_SEQ - 1}, got {seq_from}")
        self.capacity = capacity
        self._ring: deque[tuple[int, Finding]] = deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._seq = seq_from
        self.evicted = 0

    def add(self, findings: Sequence[Finding]) -> None:
        if not findings:
            return
        with self._lock:
            ring, capacity = self._ring, self.capacity
            for finding in findings:
                if len(ring) == capacity:
                    self.evicted += 1  # the deque drops the oldest on append
                self._seq += 1
                ring.append((self._seq, finding))

    @property
    def last_seq(self) -> int:
        with self._lock:
            return self._seq

    def query(self, query: FindingQuery = FindingQuery()) -> list[tuple[int, Finding]]:
        """Matching findings, oldest first, at most ``query.limit`` (the oldest ones after ``after``)."""
        return self.page(query).findings

    def page(self, query: FindingQuery = FindingQuery()) -> FindingPage:
        """``query``'s findings with the cursor to read on from, all taken at one instant: a
        finding added meanwhile is after the cursor, never skipped."""
        with self._lock:
            snapshot = list(self._ring)
            cursor = newest = self._seq
            evicted = self.evicted
        found: list[tuple[int, Finding]] = []
        for seq, finding in snapshot:
            if query.matches(seq, finding):
                found.append((seq, finding))
                if len(found) >= query.limit:
                    cursor = seq
                    break
        return FindingPage(found, cursor, newest, snapshot[0][0] if snapshot else 0, evicted)

    def __len__(self) -> int:
        with self._lock:
            return len(self._ring)


def seq_from_clock() -> int:
    """Where a sidecar's ring starts counting: the unix time in microseconds. It grows faster than
    findings are made (a million a second for as long as a sidecar runs), so a restarted sidecar's
    seqs are above its predecessor's; a JSON number holds it exactly until the year 2255 (2**53)."""
    return time.time_ns() // 1000


def finding_to_dict(seq: int, finding: Finding) -> dict[str, Any]:
    return {
        "seq": seq,
        "incident_id": finding.fingerprint,
        "rule": finding.rule,
        "severity": finding.severity.value,
        "summary": finding.summary,
        "role": finding.role,
        "implementation": finding.implementation,
        "entry_point": finding.entry_point,
        "trace_id": finding.trace_id,
        "span_id": finding.span_id,
        "run_id": finding.run_id,
        "event_type": finding.event_type,
        "service_version": finding.service_version,
        "service_name": finding.service_name,
        "detected": rfc3339(finding.detected_ns) if finding.detected_ns else None,
        "detected_unix": unix_seconds(finding.detected_ns),
        "details": finding.details,
    }

