"""The sidecar's component interfaces: the one data path is
receive -> decode once -> detectors -> findings -> incidents / metrics / alerts.

Components are small and report their own counts; none calls another's internals.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from sidecar.model import Finding, Incident, SpanRecord


@runtime_checkable
class Detector(Protocol):
    """One detector family (bleed, duplicates, delivery, ...). Spans in, findings out.

    ``consume`` is the hot path: no I/O, little allocation, never blocks. ``tick`` is called
    periodically (about every 100 ms) for time-based rules such as delivery deadlines.
    Both run on the pipeline thread only, so detectors need no locks. Raising is allowed but
    counted as a detector error; the other detectors still see the batch. ``spans`` may be several
    requests' batches merged into one call (a backed-up queue): a ``consume`` that raises
    ``ConsumeInterrupted`` from the error a span made it meet, saying which span, costs only that
    span's batch (see ``ConsumeInterrupted``); any other exception, the rest of the call.

    A detector that holds findings back for more evidence (an enclosing request, an explaining
    duplicate execution) may also have ``drain(now_ns) -> list[Finding]``: called once, after the
    last tick at shutdown, it returns them judged with what is known — accepted spans never lose
    their findings. Evidence still incomplete (an event not yet due) is not judged.
    """

    name: str

    def consume(self, spans: Sequence[SpanRecord], now_ns: int) -> list[Finding]: ...

    def tick(self, now_ns: int) -> list[Finding]: ...


class ConsumeInterrupted(Exception):
    """Raised by a detector's ``consume``, from the error it met on ``span``, to say how far it got:
    the spans before ``span`` were consumed, those after it were not, and ``findings`` are those it
    had raised. The pipeline keeps them and feeds the detector again each batch it had merged into
    the call after ``span``'s, one call each: the error costs the rest of ``span``'s batch (one
    request), as in a call of its own, and no span is fed twice. Raised from a try around the loop
    over the spans, which costs nothing per span. Another exception says nothing of how far the
    detector got: the rest of the call is lost (feeding it again could feed spans twice)."""

    def __init__(self, span: SpanRecord, findings: list[Finding]) -> None:
        super().__init__("consume met an error on a span")  # its cause says which (and why)
        self.span = span
        self.findings = findings


@runtime_checkable
class IncidentSink(Protocol):
    """Groups findings into incidents and persists them. Returns the incidents that were touched,
    with ``is_new`` true the first time a fingerprint is ever seen (across restarts)."""

    def record(self, findings: Sequence[Finding]) -> list[tuple[Incident, bool]]: ...


@runtime_checkable
class FindingObserver(Protocol):
    """Sees every finding the pipeline keeps (disabled rules dropped), after it was recorded.

    Runs on the pipeline thread, like the detectors: e.g. the deploy comparison counts findings per
    ``service.version``. Must not block; raising is counted as a detector error under ``name``.
    """

    name: str

    def observe(self, findings: Sequence[Finding]) -> None: ...


@runtime_checkable
class SpanLossObserver(Protocol):
    """An observer that also hears of span loss the sidecar knows of (pipeline thread): spans a
    backend dropped (its heartbeat's total rose) between ``start_s`` and ``end_s`` (wall clock).
    Batches the memory limiter refused are none: exporters retry them. Must not block."""

    def spans_lost(self, start_s: float, end_s: float, reason: str) -> None: ...


@runtime_checkable
class HeartbeatObserver(Protocol):
    """An observer that also gets the backends' heartbeat spans (pipeline thread; ``now_ns`` wall
    clock): the consolidation ledger persists each instance's dropped-spans total, so that spans
    dropped while the sidecar restarted are a span loss (the pipeline's own baselines start
    afresh with each process). Must not block."""

    def heartbeats_seen(self, heartbeats: Sequence[SpanRecord], now_ns: int) -> None: ...

    # optional: ``held_dropped_total(service, instance, counts_since_s) -> int | None``, the
    # dropped-spans total it holds of that process (before this batch): the heartbeat tracker
    # counts from it a process it first hears late (``sidecar.heartbeats.HeartbeatTracker``)


@runtime_checkable
class RefusalObserver(Protocol):
    """A detector or observer that also hears of requests the receivers refused for overload (the
    memory limiter, OTLP/HTTP's requests in flight: retried by their exporters, for up to
    ``rules.export_retry_window_s`` as the detectors count), on the pipeline thread, before the batch or tick it precedes:
    refusals were made from ``first_ns`` to ``last_ns`` (the pipeline's clock) since the last call.
    A judgement waiting for spans (a deadline, an idle time) that ended after a refusal may wait
    for its retry. Refusals for good and while shutting down are not told. Must not block."""

    def requests_refused(self, first_ns: int, last_ns: int) -> None: ...


@runtime_checkable
class AlertSink(Protocol):
    """Pushes alerts for incidents; must return at once (delivery happens on its own thread)."""

    def notify(self, incidents: Sequence[Incident]) -> None: ...
