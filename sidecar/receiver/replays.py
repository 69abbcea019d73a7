"""Re-sent spans: accepted once, not analysed twice.

An OTLP exporter retries a request it got no answer for (a timeout, a dropped connection), and the
sidecar may already have accepted the first copy. Fed to the detectors a second time, a clean run
looks executed twice, every exactly-once event emitted twice and every event written twice (false
``duplicate.emission``; an emit re-sent without its write, false ``delivery.undelivered``), and the
calls and events counters count it twice. Behind an OpenTelemetry Collector the retry of an SDK's
request (which the Collector had accepted) reaches the sidecar inside another request: the batch
processor appends the whole ResourceSpans of each request it takes to what it sends, and the
loadbalancing exporter (routing by trace id) splits each ScopeSpans, the same way every time, into
one per trace. What a Collector keeps intact is a ScopeSpans, so that is what the receiver
remembers: a ScopeSpans among the recently accepted ones is dropped from the decoded request before
the pipeline, its spans counted as ``pathwatch_receiver_spans_total{outcome="replayed"}``, and the
rest of the request is analysed. A request all of whose scopes are known (an exporter's retry of the
very request, straight from the SDK or from the Collector) is a replay: answered OK, not submitted,
the spans of its scopes counted replayed. A scope whose spans all have bad ids has no identity and
is never known: its spans are counted invalid whenever they come. A scope sent twice within one
request (a Collector batching a request with its retry) is analysed once. A dropped scope's invalid
attributes (``pathwatch_receiver_invalid_attributes``) go with it; its resource's own (a
``service.name`` of the wrong type) are counted once per occurrence of the resource that is taken:
dropped only when every scope of it is (the resource is a replay), kept when one is new or has no
identity, and kept for a resource without spans (counted whenever it comes, as a scope of bad ids).
The decoder records them apart from its scopes' (``DecodedBatch.resources``): crediting them to the
resource's first scope, as it did, lost them when that scope was known and another new.

A scope is known by the number of spans it holds (bad ids included), of its valid spans, the trace
and span ids of its first and last valid span, the first one's start and the last one's end: a
retry re-sends identical spans, and a span id names one span (OTLP: random, unique), so a scope
sharing its first and last span and its count with another is that scope again — a run of spans cut
out of one exporter's sequence, in its order. Its length on the wire would add nothing for a retry
and is not at hand: the decoder's view does not keep it (upb's ``ByteSize()`` serializes the scope
again, +10-17 % of decoding; a view keeping scopes as bytes copies the body, +2 %; walking the
body's framing in Python, +1.7 % with a scope per trace). The times stand in for it, free: a client
reusing fixed span ids for other spans (hand-made requests) is told apart when a time differs (one
sending other spans under the same ids, count and times would see them taken for a replay; the
request memory this replaces told such requests apart only by their size). The identity is computed
per scope from what the decoder recorded (``DecodedBatch.scopes``): no work per span.

Only accepted scopes are remembered — a request the memory limiter refused is new when it comes
back, and a retry racing its first copy waits for that copy's outcome (check, submit and remember
are one step under the lock; a submit only queues the batch) — and only the last ``capacity`` of
them: 65,536 scopes, one 64-bit hash each, 110 bytes a scope: the hash's int object (40), its set
entry and ring slot (72) (6.8 MiB, measured with tracemalloc; a dict, as the request memory was,
takes 80 bytes besides the int and, used as a FIFO this large, ~20 µs to forget its oldest key: it
scans the deleted slots before it). That is
over 20,000 requests of an SDK exporting straight (a scope per instrumentation scope: a few a
request; the request memory kept 8,192), and with a scope per trace (the loadbalancing exporter; a
pathwatch run's trace holds about a dozen spans) some 800,000 spans: over a minute at 10,000
spans/s, while exporters retry within seconds (the Collector's retry queue for up to 5 minutes: a
scope it re-sends after the memory forgot it is analysed again). The check costs ~0.5 µs a scope
(identity, lookup, remembering), under 1 % of decoding a scope of a dozen spans. The memory's size
is ``pathwatch_state_entries{table="receiver_replays"}`` (full by design: no capacity series, and
forgetting the oldest is no lost evidence, not an eviction). The gRPC and HTTP receivers' threads
share one guard; OTLP/JSON is converted to protobuf first and checked alike.

Not recognised: a re-sent scope cut differently (a batch processor or exporter batcher with a
maximum size splits a ScopeSpans where its batch ends, and a retry lands elsewhere in the next
batch): each piece of it is another scope, analysed again (the duplicates detector still knows an
execution or exactly-once emit it holds by its span id, not a write; docs/rules.md).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.pipeline import Admission
from sidecar.receiver.decode import DecodedBatch

__all__ = ["DEFAULT_CAPACITY", "TABLE", "ReplayGuard", "Screened"]

DEFAULT_CAPACITY = 65_536
#: the ``table`` label of its size in ``pathwatch_state_entries``
TABLE = "receiver_replays"


@dataclass(frozen=True, slots=True)
class Screened:
    """What ``ReplayGuard.submit_new`` made of a request."""

    #: what was submitted: the request less its known scopes (the request itself when none was
    #: known); when all were, what is left, not submitted: its scopes without valid spans (their
    #: bad ids and invalid attributes, to be counted)
    batch: DecodedBatch
    admission: Admission | None  # None: every scope was known (a replay), nothing submitted
    replayed: int  # spans of the known scopes, bad ids included


class ReplayGuard:
    """Thread-safe: the gRPC and HTTP receivers' threads share one."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity <= 0:
            raise ValueError(f"ReplayGuard: capacity must be > 0, got {capacity}")
        self._capacity = capacity
        self._known: set[int] = set()
        self._ring: list[int | None] = [None] * capacity  # the oldest at ``_next`` once full
        self._next = 0
        self._lock = threading.Lock()

    @staticmethod
    def keys(batch: DecodedBatch) -> list[int | None]:
        """The identity of each scope in ``batch.scopes``; None for one without valid spans."""
        spans, start = batch.spans, 0
        keys: list[int | None] = []
        for end, offered, _ in batch.scopes:
            if end == start:
                keys.append(None)
            else:
                first, last = spans[start], spans[end - 1]
                keys.append(hash((offered, end - start, first.trace_id, first.span_id,
                                  first.start_ns, last.trace_id, last.span_id, last.end_ns)))
            start = end
        return keys

    def submit_new(self, batch: DecodedBatch,
                   submit: Callable[[DecodedBatch], Admission]) -> Screened:
        """``submit()`` what ``batch`` holds that was not accepted before: the request less the
        scopes known (or repeated within it); nothing when every scope with valid spans is known.
        Empties ``batch.scopes``. For a request with valid spans."""
        scopes, resources, keys = batch.scopes, batch.resources, self.keys(batch)
        batch.scopes, batch.resources = [], []  # not queued with the batch
        repeated, seen = set(), set()
        for index, key in enumerate(keys):
            if key is not None:
                if key in seen:
                    repeated.add(index)
                seen.add(key)
        with self._lock:
            known = self._known
            dropped = repeated.union(index for index, key in enumerate(keys)
                                     if key is not None and key in known)
            if not dropped:
                admission = submit(batch)
                if admission is Admission.ACCEPTED:
                    self._remember(keys)
                return Screened(batch, admission, 0)
            if len(dropped) == sum(key is not None for key in keys):
                if not batch.rejected and not batch.invalid_count:
                    return Screened(DecodedBatch([], []), None, len(batch.spans))
                # a scope of bad ids only is never known (nothing of it was accepted): counted
                # invalid, with its invalid attributes, as whenever it comes; so are those of a
                # resource without spans
                fresh, replayed = _without(batch, scopes, resources, dropped)
                return Screened(fresh, None, replayed)
            fresh, replayed = _without(batch, scopes, resources, dropped)
            admission = submit(fresh)
            if admission is Admission.ACCEPTED:
                self._remember([key for index, key in enumerate(keys) if index not in dropped])
            return Screened(fresh, admission, replayed)

    def _remember(self, keys: list[int | None]) -> None:
        """Under the lock; ``keys`` are new and distinct (a known or repeated one is dropped)."""
        ring, known, at = self._ring, self._known, self._next
        for key in keys:
            if key is None:
                continue
            oldest = ring[at]
            if oldest is not None:
                known.discard(oldest)
            ring[at] = key
            known.add(key)
            at += 1
            if at == self._capacity:
                at = 0
        self._next = at

    def __len__(self) -> int:
        return len(self._known)


def _without(batch: DecodedBatch, scopes: list[tuple[int, int, Counter[str] | None]],
             resources: list[tuple[int, Counter[str] | None]],
             dropped: set[int]) -> tuple[DecodedBatch, int]:
    """``batch`` less the scopes at ``dropped`` (their spans, heartbeats, bad ids and invalid
    attributes) and the invalid attributes of each resource all of whose scopes are dropped, and
    how many spans those scopes held."""
    spans, kept, gone = batch.spans, [], []
    rejected = replayed = 0
    invalid = batch.invalid_attributes.copy()
    start, before, first = 0, None, 0
    for scopes_end, after_resource in resources:
        if after_resource is not before:  # the resource's own invalid attributes
            if first < scopes_end and dropped.issuperset(range(first, scopes_end)):
                invalid.subtract(after_resource - (before or Counter()))
            before = after_resource
        for index in range(first, scopes_end):
            end, offered, after = scopes[index]
            if index in dropped:
                replayed += offered
                gone.append((start, end))
                if after is not before:  # the scope's own invalid attributes
                    invalid.subtract(after - (before or Counter()))
            else:
                kept.extend(spans[start:end])
                rejected += offered - (end - start)
            start, before = end, after
        first = scopes_end
    heartbeats = batch.heartbeats
    if heartbeats:
        gone_ids = {id(span) for start, end in gone for span in spans[start:end]}
        heartbeats = [span for span in heartbeats if id(span) not in gone_ids]
    invalid = +invalid  # without the counts gone to 0
    fresh = DecodedBatch(kept, heartbeats, rejected, batch.rejection, invalid,
                         sum(invalid.values()))
    return fresh, replayed
