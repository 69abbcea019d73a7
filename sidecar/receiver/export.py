"""The receiver's one piece of logic, shared by gRPC and HTTP: body -> decode -> submit -> status.

Like the OpenTelemetry Collector's receivers it only decodes, forwards and maps errors: a body that
is not a protobuf request is permanent (INVALID_ARGUMENT / 400), a full pending-span budget is
overload (RESOURCE_EXHAUSTED / 429), shutting down or a bug of ours (decoding, or queueing after
it) is retryable (UNAVAILABLE / 503).
A request of more spans than ``receiver.max_spans_per_request`` is refused whole before its spans
are parsed, permanently as one above ``max_message_bytes`` is (RESOURCE_EXHAUSTED without RetryInfo
/ 413), and its spans counted as refused; so is an OTLP/JSON one of more attributes,
events and links than ``receiver.max_attributes_per_request`` (``TooManyAttributes``, before the
conversion: otlp_json.py).
A request the pending-span budget cannot take is refused before it is decoded (or, OTLP/JSON,
converted), with the same answer and counters as ``Pipeline.submit``'s refusal after decoding:
under overload the one core would otherwise go to decoding batches that are then refused. The
pipeline is asked ``admits(n)`` once per request, first for the most spans the body can hold
(``len(body) // MIN_SPAN_BYTES``: nothing more to do while that fits, the usual case), and only
when that does not fit for the request's real count (``wire.count_spans``: a parse keeping each
span as raw bytes, about 25 ns a span, 0.5 % of decoding it; OTLP/JSON: ``json.loads`` and list
lengths, the loaded document then going to the conversion, which loads it no more), which is the
number the refusal counts (spans with bad ids included). ``submit`` stays the authority for what is
accepted. A retry of an accepted request that comes while the queue is full is refused too (a
replay is known only once decoded); when it comes back it is answered OK as a replay.
While the pipeline cannot take a single span, a request is refused before its body is even read
(``refuse_unread``, asked by both receivers: one more read of the queue's size per request), so a
full queue does not make the receivers hold bodies of up to ``max_message_bytes`` only to refuse
them; its spans are unknown, it counts one refused span (the fewest an export carries).
Spans with bad ids are rejected one by one (partial success). Scopes (ScopeSpans) already accepted
are not analysed again, and a request all of whose scopes were accepted before (a retry) is
answered OK without being submitted (``replays.py``). Every span offered is counted as accepted,
refused, invalid or replayed in ``pathwatch_receiver_spans``. An OTLP/JSON body is turned into the
binary protobuf body first (``otlp_json.py``) and then goes the same way: one decoder for both.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.message import DecodeError

from sidecar.logsetup import log_error_scrubbed
from sidecar.pipeline import Admission
from sidecar.receiver.decode import (DecodedBatch, MalformedRequest, SpanDecoder, TooManyAttributes,
                                     TooManySpans)
from sidecar.receiver.otlp_json import count_json_spans, json_to_protobuf, load_json
from sidecar.receiver.refusals import (OVER_BUDGET, REASONS, SHUTTING_DOWN, TOO_MANY_ATTRIBUTES,
                                       TOO_MANY_SPANS, Refusals)
from sidecar.receiver.replays import TABLE as REPLAYS_TABLE
from sidecar.receiver.replays import ReplayGuard
from sidecar.receiver.wire import count_spans
from sidecar.telemetry import Telemetry

log = logging.getLogger(__name__)

# pathwatch_receiver_spans_total{outcome}: every span offered is counted once under one of these
# (dashboards and alert rules match on them; tests/dashboards checks their matchers against this set)
ACCEPTED, REFUSED, INVALID, REPLAYED = "accepted", "refused", "invalid", "replayed"
SPAN_OUTCOMES = (ACCEPTED, REFUSED, INVALID, REPLAYED)

#: how long an exporter is told to wait before it retries a RESOURCE_EXHAUSTED / UNAVAILABLE answer:
#: gRPC's ``google.rpc.RetryInfo`` (without it OTLP clients drop a RESOURCE_EXHAUSTED batch for
#: good) and HTTP's ``Retry-After``. The Python SDK's exporters take it as their every wait, in
#: place of their own 1, 2, 4, 8 s, within 6 attempts and their timeout (10 s by default): 1 s
#: had them give up after 5 s, sooner than without it (7 s); 2 s keeps them trying for 8 s, 5
#: attempts. Each answer carries a delay drawn from ``RETRY_DELAYS_S`` (gRPC, 1.5 to 2.5 s in
#: steps of 50 ms: mean 2 s; any run of draws keeps them trying 7.5 s at least) or ``RETRY_AFTER_S``
#: (HTTP, whole seconds: ``Retry-After`` takes no fraction; 2 or 3 s, not 1: a run of 1 s draws had
#: them give up after 5 or 6 s, any run of 2 and 3 keeps them trying 7 s at least), because the
#: exporters wait exactly the delay they are given, adding no jitter of their own (the Python
#: SDK's does so for its own backoff only): every pod refused in the same moment
#: (a burst, a restart) would otherwise come back in the same moment, and be refused together again.
RETRY_DELAY_S = 2
RETRY_DELAYS_S = tuple(round(RETRY_DELAY_S * (0.75 + step / 40), 2) for step in range(21))
RETRY_AFTER_S = (RETRY_DELAY_S, RETRY_DELAY_S + 1)

#: the fewest bytes a span the pipeline would queue (valid ids) takes in a protobuf body: its
#: ``spans`` entry's tag and length (2), ``trace_id`` (18) and ``span_id`` (10) with theirs; an
#: OTLP/JSON span takes more. ``len(body) // MIN_SPAN_BYTES`` bounds what a body adds to the queue.
MIN_SPAN_BYTES = 30


class ExportStatus(enum.Enum):
    OK = "OK"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True, slots=True)
class ExportResult:
    status: ExportStatus
    message: str = ""  # the error, or for OK the partial-success error message
    rejected_spans: int = 0  # OK only: spans rejected for bad ids
    #: RESOURCE_EXHAUSTED only: the same request would be refused again (gRPC: no RetryInfo; 413)
    permanent: bool = False


class SpanConsumer(Protocol):
    """Where decoded batches go (the pipeline)."""

    def submit(self, batch: DecodedBatch) -> Admission: ...

    def admits(self, spans: int) -> Admission:
        """What ``submit`` would answer a batch of ``spans`` spans now (asked before decoding; a
        cheap read, ``submit`` decides)."""
        ...

    # optional: ``overload_refused()``, told of each request refused for overload (the pipeline's)


class ExportHandler:
    def __init__(self, decoder: SpanDecoder, consumer: SpanConsumer, telemetry: Telemetry,
                 max_pending_spans: int, replays: ReplayGuard | None = None) -> None:
        self._decoder = decoder
        self._replays = replays if replays is not None else ReplayGuard()
        telemetry.state_entries.labels(table=REPLAYS_TABLE).set_function(self._replays.__len__)
        self._consumer = consumer
        self._telemetry = telemetry
        self._max_pending_spans = max_pending_spans
        self._internal_error_logged = False
        #: why requests were refused (counted by reason; an overload logged as a state)
        self.refusals = Refusals(telemetry,
                                 on_overload=getattr(consumer, "overload_refused", None))

    def export(self, body: bytes, protocol: str) -> ExportResult:
        if not self._may_fit(body):
            try:
                counted = count_spans(body)
            except DecodeError:
                counted = None  # the decoder says what is wrong with it (INVALID_ARGUMENT / 400)
            refused = None if counted is None else self._refusal(*counted, protocol)
            if refused is not None:
                return refused
            return self._export(body, protocol, counted)
        return self._export(body, protocol)

    def _export(self, body: bytes, protocol: str,
                counted: tuple[int, int] | None = None) -> ExportResult:
        try:
            batch = self._decoder.decode(body, time.monotonic_ns(), counted)
        except MalformedRequest as exc:
            return ExportResult(ExportStatus.INVALID_ARGUMENT, str(exc))
        except TooManySpans as exc:
            return self._too_many(exc, protocol)
        except Exception:  # a bug of ours must not look like the client's fault
            self._log_internal_error()
            return ExportResult(ExportStatus.UNAVAILABLE, "internal error while decoding")
        try:
            return self._submit(batch, protocol)
        except Exception:  # retryable, as while decoding: uvicorn's 500 and grpc's UNKNOWN
            self._log_internal_error()  # made exporters drop the batch, uncounted
            return ExportResult(ExportStatus.UNAVAILABLE, "internal error while queueing the spans")

    def _submit(self, batch: DecodedBatch, protocol: str) -> ExportResult:
        # a request of spans with bad ids only (or none) has nothing to queue, nor to replay
        screened = (None if not batch.spans else
                    self._replays.submit_new(batch, self._consumer.submit))
        if screened is not None and screened.replayed:
            # counted once, when they were accepted; the exporter gets the same answer as then
            self._telemetry.receiver_spans.labels(protocol=protocol, outcome=REPLAYED).inc(
                screened.replayed)
        admission = None if screened is None else screened.admission
        new = batch if screened is None else screened.batch  # less the scopes replayed
        self._count_attributes(new)
        if new.rejected:
            self._telemetry.receiver_spans.labels(protocol=protocol, outcome=INVALID).inc(
                new.rejected)
        if admission is not None:
            result = self._outcome(admission, len(new.spans), protocol)
            if result is not None:
                return result
        if batch.rejected:  # the answer is the request's, replayed scopes included
            return ExportResult(ExportStatus.OK, f"{batch.rejected} span(s) rejected: "
                                f"{batch.rejection}", batch.rejected)
        return ExportResult(ExportStatus.OK)

    def export_json(self, body: bytes, protocol: str) -> ExportResult:
        """An OTLP/JSON body: converted to the protobuf body, then exported as one. Rejected spans
        are explained in JSON terms (``traceId`` as sent, the span's path in the JSON)."""
        try:
            document = None
            if not self._may_fit(body):
                document = load_json(body)  # loaded once: the conversion takes it
                refused = self._refusal(*count_json_spans(document), protocol)
                if refused is not None:
                    return refused
            converted = json_to_protobuf(body, self._decoder.max_spans_per_request, document,
                                         self._decoder.max_attributes_per_request)
        except MalformedRequest as exc:
            return ExportResult(ExportStatus.INVALID_ARGUMENT, str(exc))
        except TooManySpans as exc:
            return self._too_many(exc, protocol)
        except Exception:  # a bug of ours must not look like the client's fault
            self._log_internal_error()
            return ExportResult(ExportStatus.UNAVAILABLE, "internal error while decoding")
        result = self._export(converted.body, protocol)
        if result.rejected_spans and converted.first_id_problem:
            result = dataclasses.replace(result, message=f"{result.rejected_spans} span(s) rejected: "
                                                         f"{converted.first_id_problem}")
        return result

    def count_request(self, protocol: str, status: str) -> None:
        self._telemetry.receiver_requests.labels(protocol=protocol, status=status).inc()

    def declare(self, protocol: str, statuses: Iterable[str],
                reasons: tuple[str, ...] = REASONS) -> None:
        """A receiver's series of ``pathwatch_receiver_spans`` (every outcome),
        ``pathwatch_receiver_requests`` (every status it answers) and
        ``pathwatch_receiver_refused_requests`` (every reason it refuses for), at 0 from its start:
        a series born at its first count is invisible to rate() and increase() (the dashboard's
        panels, the alert on refused spans and rejected requests)."""
        for outcome in SPAN_OUTCOMES:
            self._telemetry.receiver_spans.labels(protocol=protocol, outcome=outcome)
        for status in statuses:
            self._telemetry.receiver_requests.labels(protocol=protocol, status=status)
        self.refusals.declare(protocol, reasons)

    def _may_fit(self, body: bytes) -> bool:
        """The pipeline has room now for the most spans the body can hold: decode it, no count
        needed (one read of the queue's size per request)."""
        return self._consumer.admits(len(body) // MIN_SPAN_BYTES) is Admission.ACCEPTED

    def refuse_unread(self, protocol: str) -> ExportResult | None:
        """Before a request's body is read (OTLP/HTTP, gRPC): its refusal while the pipeline cannot
        take a single span (the budget full, or shutting down), answered as the refusal after
        reading; None: read the body. Counted with one refused span: how many the unread body holds
        is unknown, and one is the fewest an export carries, so ``outcome="refused"`` (and the alert
        on it) still sees an overload in which every request is refused unread."""
        admission = self._consumer.admits(1)
        if admission is Admission.ACCEPTED:
            return None
        self._telemetry.receiver_spans.labels(protocol=protocol, outcome=REFUSED).inc()
        if admission is Admission.OVER_BUDGET:
            result = ExportResult(ExportStatus.RESOURCE_EXHAUSTED,
                                  f"pending span budget full (receiver.max_pending_spans="
                                  f"{self._max_pending_spans}); request refused before its body "
                                  "was read, retry later")
            self.refusals.refused(protocol, OVER_BUDGET, 1, result.message)
            return result
        self.refusals.refused(protocol, SHUTTING_DOWN, 1)
        return ExportResult(ExportStatus.UNAVAILABLE, "the sidecar is shutting down; retry later")

    def _refusal(self, spans: int, containers: int, protocol: str) -> ExportResult | None:
        """Before decoding: the refusal of a request of ``spans`` spans that the pipeline cannot
        take now, answered and counted as after decoding; None: decode it."""
        limit = self._decoder.max_spans_per_request
        if spans > limit or containers > limit:  # refused for good, whatever the budget
            return self._too_many(TooManySpans(spans, containers, limit), protocol)
        if not spans:
            return None  # nothing to queue (the decoder answers it)
        admission = self._consumer.admits(spans)
        if admission is Admission.ACCEPTED:
            return None
        return self._outcome(admission, spans, protocol)

    def _outcome(self, admission: Admission, count: int, protocol: str) -> ExportResult | None:
        if admission is Admission.ACCEPTED:
            self._telemetry.receiver_spans.labels(protocol=protocol, outcome=ACCEPTED).inc(count)
            self.refusals.accepted()
            return None
        self._telemetry.receiver_spans.labels(protocol=protocol, outcome=REFUSED).inc(count)
        if admission is Admission.OVER_BUDGET:
            result = ExportResult(ExportStatus.RESOURCE_EXHAUSTED,
                                  f"pending span budget full (receiver.max_pending_spans="
                                  f"{self._max_pending_spans}); {count} span(s) refused, retry "
                                  "later")
            self.refusals.refused(protocol, OVER_BUDGET, count, result.message)
            return result
        self.refusals.refused(protocol, SHUTTING_DOWN, count)
        return ExportResult(ExportStatus.UNAVAILABLE, "the sidecar is shutting down; retry later")

    def _too_many(self, refusal: TooManySpans, protocol: str) -> ExportResult:
        self._telemetry.receiver_spans.labels(protocol=protocol, outcome=REFUSED).inc(refusal.spans)
        reason = TOO_MANY_ATTRIBUTES if isinstance(refusal, TooManyAttributes) else TOO_MANY_SPANS
        self.refusals.refused(protocol, reason, refusal.spans, str(refusal))
        return ExportResult(ExportStatus.RESOURCE_EXHAUSTED, str(refusal), permanent=True)

    def _count_attributes(self, batch: DecodedBatch) -> None:
        for key, count in batch.invalid_attributes.items():
            self._telemetry.receiver_invalid_attributes.labels(attribute=key).inc(count)

    def _log_internal_error(self) -> None:
        if not self._internal_error_logged:
            self._internal_error_logged = True
            log_error_scrubbed(log, "internal error while handling an export request (answered "
                               "UNAVAILABLE; logged once)")
