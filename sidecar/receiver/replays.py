"""Retried export requests: accepted once, not analysed twice.

An OTLP exporter retries a request it got no answer for (a timeout, a dropped connection), and the
sidecar may already have accepted the first copy. Fed to the detectors a second time, a clean run
looks executed twice, every exactly-once event emitted twice and every event written twice. The
receiver therefore remembers the requests it accepted and answers a replay OK without submitting
it again (``pathwatch_receiver_spans_total{outcome="replayed"}``).

A request is known by its size, its number of valid spans and the ids of its first and last span:
exporters retry the very request they built (the SDK's and the Collector's retry loops resend the
same serialized batch), and two different requests never share those. Only accepted requests are
remembered — one the memory limiter refused is new when it comes back, and a retry racing its first
copy waits for that copy's outcome — and only the last
``capacity`` of them (8,192 requests of a few hundred spans: minutes of traffic, longer than an
exporter keeps retrying), as one 64-bit hash each. Spans re-sent in a different request (re-batched
by a proxy) are not recognised here: the duplicates detector knows an execution or exactly-once
emit it already holds by its span id (docs/rules.md), not a write, and the counters (calls, events
emitted and written, delivery latency) count such spans again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from sidecar.pipeline import Admission
from sidecar.receiver.decode import DecodedBatch

__all__ = ["ReplayGuard"]

DEFAULT_CAPACITY = 8192


class ReplayGuard:
    """Thread-safe: the gRPC and HTTP receivers' threads share one."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity <= 0:
            raise ValueError(f"ReplayGuard: capacity must be > 0, got {capacity}")
        self._capacity = capacity
        self._accepted: dict[int, None] = {}  # insertion-ordered: the oldest first
        self._lock = threading.Lock()

    @staticmethod
    def key(batch: DecodedBatch, body_size: int) -> int | None:
        """The request's identity; None for a request without valid spans (nothing to replay)."""
        spans = batch.spans
        if not spans:
            return None
        first, last = spans[0], spans[-1]
        return hash((body_size, len(spans), first.trace_id, first.span_id, last.trace_id,
                     last.span_id))

    def submit_once(self, key: int, submit: Callable[[], Admission]) -> Admission | None:
        """``submit()`` the request unless one with its key was accepted; None for such a replay.
        Check, submit and remember are one step under the lock (a submit only queues the batch):
        a retry racing its first copy waits for that copy's outcome, so it is never answered OK for a
        copy that is refused after all."""
        with self._lock:
            if key in self._accepted:
                return None
            admission = submit()
            if admission is Admission.ACCEPTED:
                self._accepted[key] = None
                if len(self._accepted) > self._capacity:
                    del self._accepted[next(iter(self._accepted))]
            return admission

    def __len__(self) -> int:
        return len(self._accepted)
