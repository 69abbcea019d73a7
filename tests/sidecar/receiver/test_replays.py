"""The replay memory on real decoded requests (``SpanDecoder`` on serialized OTLP bodies): what a
request submits when some or all of its ScopeSpans were accepted before. The receivers' end-to-end
cases (real gRPC, HTTP and detectors) are in test_grpc_receiver.py and test_http_receiver.py."""

import threading

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans

from instrumentation import attributes as A
from sidecar.pipeline import Admission
from sidecar.receiver import ReplayGuard, SpanDecoder
from sidecar.receiver.decode import DecodedBatch
from tests.sidecar.receiver.otlp_payloads import heartbeat_span, make_request, make_span


def request(*scopes, resource=None) -> ExportTraceServiceRequest:
    """One ResourceSpans holding one ScopeSpans per list of spans."""
    built = make_request([], resource)
    del built.resource_spans[0].scope_spans[:]
    for spans in scopes:
        built.resource_spans[0].scope_spans.append(ScopeSpans(spans=list(spans)))
    return built


def joined(*requests: ExportTraceServiceRequest) -> ExportTraceServiceRequest:
    """What a Collector's batch processor sends: the ResourceSpans of the requests it took, whole."""
    return ExportTraceServiceRequest(resource_spans=[
        resource_spans for r in requests for resource_spans in r.resource_spans])


def decoded(message: ExportTraceServiceRequest) -> DecodedBatch:
    return SpanDecoder().decode(message.SerializeToString(), 0)


class Pipeline:
    """What the guard submits to (the pipeline's ``submit``): records each batch, answers
    ``admission``."""

    def __init__(self, admission: Admission = Admission.ACCEPTED) -> None:
        self.admission = admission
        self.batches: list[DecodedBatch] = []

    def submit(self, batch: DecodedBatch) -> Admission:
        self.batches.append(batch)
        return self.admission

    def span_ids(self, index: int = -1) -> list[str]:
        return [span.span_id for span in self.batches[index].spans]


def spans(count: int, **attributes) -> list:
    return [make_span(dict(attributes), name=f"s{n}") for n in range(count)]


def ids(*span_lists) -> list[str]:
    return [span.span_id.hex() for spans_ in span_lists for span in spans_]


def test_a_request_is_submitted_once_and_its_retry_is_a_replay_not_submitted():
    guard, pipeline = ReplayGuard(), Pipeline()
    first = request(spans(3), spans(2))
    screened = guard.submit_new(decoded(first), pipeline.submit)
    assert screened.admission is Admission.ACCEPTED and screened.replayed == 0
    assert len(pipeline.batches) == 1 and len(guard) == 2
    retry = guard.submit_new(decoded(first), pipeline.submit)
    assert retry.admission is None and retry.replayed == 5
    assert len(pipeline.batches) == 1  # not submitted


def test_a_scope_resent_in_another_request_is_dropped_and_the_rest_submitted():
    """An SDK's retry re-batched by a Collector: the first request's ResourceSpans, whole, in a
    request with another process's spans."""
    guard, pipeline = ReplayGuard(), Pipeline()
    sdk, other = spans(4), spans(3)
    first = request(sdk)
    assert guard.submit_new(decoded(first), pipeline.submit).admission is Admission.ACCEPTED
    rebatched = joined(first, request(other, resource={"service.name": "backend",
                                                       "service.instance.id": "pod-b"}))
    screened = guard.submit_new(decoded(rebatched), pipeline.submit)
    assert screened.admission is Admission.ACCEPTED and screened.replayed == 4
    assert pipeline.span_ids() == ids(other)
    assert {span.service_instance for span in pipeline.batches[-1].spans} == {"pod-b"}
    assert not pipeline.batches[-1].scopes and not pipeline.batches[-1].resources  # not queued
    # the new scope is remembered too: the Collector's request sent again is a replay
    again = guard.submit_new(decoded(rebatched), pipeline.submit)
    assert again.admission is None and again.replayed == 7 and len(pipeline.batches) == 2


def test_a_scope_split_per_trace_is_known_again_split_the_same_way():
    """The loadbalancing exporter splits each ScopeSpans into one per trace, the same way each time:
    the per-trace scope of a retry is the per-trace scope accepted before."""
    guard, pipeline = ReplayGuard(), Pipeline()
    trace_a, trace_b = b"\x0a" * 16, b"\x0b" * 16
    a = [make_span({}, trace_id=trace_a, name=f"a{n}") for n in range(3)]
    b = [make_span({}, trace_id=trace_b, name=f"b{n}") for n in range(2)]
    guard.submit_new(decoded(request(a)), pipeline.submit)
    guard.submit_new(decoded(request(b, spans(1))), pipeline.submit)
    mixed = request(spans(2), b, a)  # the retry's trace scopes, merged with new ones
    screened = guard.submit_new(decoded(mixed), pipeline.submit)
    assert screened.replayed == 5 and pipeline.span_ids() == ids(mixed.resource_spans[0]
                                                                  .scope_spans[0].spans)


@pytest.mark.parametrize("second", [
    "the first span and the count the same, the last another",
    "the first and last span the same, one more between",
    "the first span the same, the last too, the count the same, the first span's start another",
])
def test_different_scopes_sharing_their_first_span_are_both_analysed(second):
    """Only the same scope is a replay. (Two scopes sharing a span happen when a batcher cuts a
    re-sent scope elsewhere: its spans are analysed again, a known limit.)"""
    guard, pipeline = ReplayGuard(), Pipeline()
    s1, s2, s3 = spans(3)
    guard.submit_new(decoded(request([s1, s2])), pipeline.submit)
    if second.startswith("the first span and the count"):
        other = [s1, s3]
    elif second.startswith("the first and last"):
        other = [s1, s3, s2]
    else:
        moved = make_span({}, trace_id=s1.trace_id, span_id=s1.span_id,
                          start_ns=s1.start_time_unix_nano - 1)
        other = [moved, s2]
    screened = guard.submit_new(decoded(request(other)), pipeline.submit)
    assert screened.admission is Admission.ACCEPTED and screened.replayed == 0
    assert pipeline.span_ids() == ids(other)


def test_a_scope_sent_twice_within_one_request_is_analysed_once():
    """A Collector's batch holding an SDK's request and its retry."""
    guard, pipeline = ReplayGuard(), Pipeline()
    sdk = request(spans(3))
    screened = guard.submit_new(decoded(joined(sdk, sdk)), pipeline.submit)
    assert screened.admission is Admission.ACCEPTED and screened.replayed == 3
    assert pipeline.span_ids() == ids(sdk.resource_spans[0].scope_spans[0].spans)


def test_what_a_dropped_scope_held_is_dropped_with_it():
    """Its heartbeats (the pipeline counts their dropped spans), bad ids and invalid attributes are
    not counted again; the request's own ones are kept."""
    guard, pipeline = ReplayGuard(), Pipeline()
    bad = make_span({}, span_id=b"\x01", name="bad")
    known = [heartbeat_span(5, 0), *spans(2, **{A.RUN_ID: 7}), bad]  # run id of the wrong type
    guard.submit_new(decoded(request(known)), pipeline.submit)
    fresh = [heartbeat_span(1, 0), make_span({A.CANONICAL: "yes"}), bad]
    batch = decoded(joined(request(fresh), request(known)))
    assert batch.rejected == 2 and batch.invalid_attributes == {A.RUN_ID: 2, A.CANONICAL: 1}
    screened = guard.submit_new(batch, pipeline.submit)
    assert screened.replayed == 4  # the known scope's three valid spans and its bad one
    submitted = pipeline.batches[-1]
    assert submitted is screened.batch
    assert [span.span_id for span in submitted.heartbeats] == [fresh[0].span_id.hex()]
    assert submitted.rejected == 1 and submitted.invalid_attributes == {A.CANONICAL: 1}


def test_a_scope_without_valid_spans_has_no_identity():
    bad = make_span({}, trace_id=b"", name="bad")
    batch = decoded(request([bad], spans(1)))
    assert ReplayGuard.keys(batch)[0] is None and ReplayGuard.keys(batch)[1] is not None


def test_a_refused_request_is_new_when_it_comes_back():
    guard, pipeline = ReplayGuard(), Pipeline(Admission.OVER_BUDGET)
    first = request(spans(2))
    assert guard.submit_new(decoded(first), pipeline.submit).admission is Admission.OVER_BUDGET
    assert len(guard) == 0
    pipeline.admission = Admission.ACCEPTED
    assert guard.submit_new(decoded(first), pipeline.submit).admission is Admission.ACCEPTED
    # a re-batched request whose new part is refused: its new scope is not remembered either
    known, new = first, request(spans(1))
    pipeline.admission = Admission.OVER_BUDGET
    refused = guard.submit_new(decoded(joined(known, new)), pipeline.submit)
    assert refused.admission is Admission.OVER_BUDGET and refused.replayed == 2
    pipeline.admission = Admission.ACCEPTED
    assert guard.submit_new(decoded(new), pipeline.submit).admission is Admission.ACCEPTED


def test_a_retry_racing_its_first_copy_waits_for_that_copys_outcome():
    """The first copy is being submitted (and will be refused) when its retry, re-batched with
    other spans, arrives: the retry must not take the first copy's scope for accepted."""
    guard = ReplayGuard()
    first = request(spans(2))
    rebatched = joined(first, request(spans(1)))
    entered, release = threading.Event(), threading.Event()
    outcomes = {}

    def slow_refusal(batch) -> Admission:
        entered.set()
        release.wait(10)
        return Admission.OVER_BUDGET

    submitted = []

    def accept(batch) -> Admission:
        submitted.append(len(batch.spans))
        return Admission.ACCEPTED

    one = threading.Thread(target=lambda: outcomes.setdefault(
        "first", guard.submit_new(decoded(first), slow_refusal)))
    one.start()
    assert entered.wait(10)
    two = threading.Thread(target=lambda: outcomes.setdefault(
        "retry", guard.submit_new(decoded(rebatched), accept)))
    two.start()
    release.set()
    one.join(10)
    two.join(10)
    assert outcomes["first"].admission is Admission.OVER_BUDGET
    assert outcomes["retry"].admission is Admission.ACCEPTED and outcomes["retry"].replayed == 0
    assert submitted == [3]


def test_memory_is_bounded_the_oldest_scope_forgotten_first():
    guard, pipeline = ReplayGuard(capacity=3), Pipeline()
    scopes = [spans(1) for _ in range(4)]
    guard.submit_new(decoded(request(*scopes[:2])), pipeline.submit)
    guard.submit_new(decoded(request(*scopes[2:])), pipeline.submit)
    assert len(guard) == 3
    forgotten = guard.submit_new(decoded(request(scopes[0])), pipeline.submit)
    assert forgotten.admission is Admission.ACCEPTED  # new again; remembered, forgetting scopes[1]
    assert len(guard) == 3
    for index, replayed in ((3, True), (2, True), (0, True), (1, False)):
        screened = guard.submit_new(decoded(request(scopes[index])), pipeline.submit)
        assert (screened.admission is None) is replayed, index
    with pytest.raises(ValueError, match="capacity"):
        ReplayGuard(0)
