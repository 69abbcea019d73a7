import random
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from instrumentation import attributes as A
from sidecar.config import RulesConfig, StateConfig
from sidecar.detectors import build_detectors
from sidecar.pipeline import Admission
from sidecar.receiver import ExportHandler, GrpcReceiver, SpanDecoder
from sidecar.receiver.export import RETRY_DELAYS_S
from sidecar.telemetry import Telemetry
from tests.sidecar.receiver.fakes import BlockingDetector, RecordingDetector
from tests.sidecar.receiver.harness import GRPC_METHOD, running_receivers, stalled_requests
from tests.sidecar.receiver.otlp_payloads import export_order, make_request, make_span, run_spans
from tests.support import wait_until


@pytest.fixture
def detector():
    return RecordingDetector()


def stub_for(endpoint):
    channel = grpc.insecure_channel(endpoint)
    return channel, trace_service_pb2_grpc.TraceServiceStub(channel)


def sdk_spans(count):
    """Finished SDK spans as the pathwatch instrumentation would make them."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "backend",
                                                        "service.version": "9.9"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("pathwatch")
    for index in range(count):
        with tracer.start_as_current_span("/ws", attributes={
                A.SPAN_KIND: "request", A.ENDUSER_PSEUDO_ID: f"user-{index}", A.ENTRY_POINT: "/ws"}):
            with tracer.start_as_current_span("execution_engine.execute_agent", attributes={
                    A.SPAN_KIND: "execute", A.ROLE: "execution_engine", A.CANONICAL: True,
                    A.IMPLEMENTATION: "app.Engine", A.RUN_ID: f"run-{index}", A.THREAD_ID: 7,
                    A.ENDUSER_PSEUDO_ID: f"user-{index}"}):
                pass
    return memory.get_finished_spans()


def retry_delay_s(error: grpc.RpcError) -> float | None:
    """The ``google.rpc.RetryInfo`` delay in the call's ``grpc-status-details-bin`` (None: none),
    which the Collector's exporter and the Go SDK read; the Python SDK's exporter reads it from the
    ``google.rpc.retryinfo-bin`` trailer alone: the same delay must be there (and none where the
    status has none)."""
    trailer = dict(error.trailing_metadata() or ()).get("google.rpc.retryinfo-bin")
    in_trailer = (None if trailer is None else
                  error_details_pb2.RetryInfo.FromString(trailer).retry_delay.ToTimedelta()
                  .total_seconds())
    status = rpc_status.from_call(error)
    delay = None
    if status is not None:
        assert status.code == error.code().value[0] and status.message == error.details()
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                info = error_details_pb2.RetryInfo()
                detail.Unpack(info)
                delay = info.retry_delay.ToTimedelta().total_seconds()
    assert in_trailer == delay
    return delay


def test_official_otlp_exporter_spans_arrive_decoded(detector):
    with running_receivers([detector]) as receivers:
        exporter = OTLPSpanExporter(endpoint=receivers.grpc_endpoint, insecure=True)
        assert exporter.export(sdk_spans(3)) is SpanExportResult.SUCCESS
        exporter.shutdown()
        wait_until(lambda: len(detector.seen) == 6, message="six spans through the pipeline")
        assert receivers.metric("pathwatch_receiver_spans_total", protocol="grpc",
                                outcome="accepted") == 6
        assert receivers.metric("pathwatch_receiver_requests_total", protocol="grpc",
                                status="OK") == 1
    engine = [s for s in detector.seen if s.kind == "execute"]
    assert sorted(s.run_id for s in engine) == ["run-0", "run-1", "run-2"]
    assert {(s.role, s.implementation, s.canonical, s.service_name, s.service_version)
            for s in engine} == {("execution_engine", "app.Engine", True, "backend", "9.9")}
    requests = {s.span_id: s for s in detector.seen if s.kind == "request"}
    assert all(s.parent_span_id in requests and requests[s.parent_span_id].trace_id == s.trace_id
               for s in engine)


def test_the_official_exporter_refused_over_budget_retries_after_the_sidecars_delay():
    # it retries RESOURCE_EXHAUSTED without RetryInfo too, but after its own 1, 2, 4 s (+-20 %),
    # giving up after 4 attempts (7 s of its 10 s timeout); it reads the sidecar's delay from the
    # google.rpc.retryinfo-bin trailer only (not from the status details the Collector reads)
    blocker = BlockingDetector()
    with running_receivers([blocker], max_pending_spans=10) as receivers:
        channel, stub = stub_for(receivers.grpc_endpoint)
        stub.Export(make_request([make_span({}) for _ in range(6)]), timeout=10)
        channel.close()
        assert blocker.entered.wait(10)  # 6 spans pending: 6 more do not fit
        exporter = OTLPSpanExporter(endpoint=receivers.grpc_endpoint, insecure=True)
        results: list[tuple[SpanExportResult, float]] = []

        def export() -> None:
            start = time.monotonic()
            results.append((exporter.export(sdk_spans(3)), time.monotonic() - start))
        exporting = threading.Thread(target=export)
        exporting.start()
        wait_until(lambda: receivers.metric("pathwatch_receiver_requests_total", protocol="grpc",
                                            status="RESOURCE_EXHAUSTED") == 1,
                   message="the exporter's first call refused")
        blocker.release.set()  # the queue drains: its retry fits
        exporting.join(30)
        exporter.shutdown()
        ((result, took),) = results
        assert result is SpanExportResult.SUCCESS
        # the sidecar's delay (1.5 s at least: drawn per answer); its own first wait is 1.2 s at most
        assert took >= min(RETRY_DELAYS_S) - 0.05
        assert receivers.metric("pathwatch_receiver_requests_total", protocol="grpc",
                                status="RESOURCE_EXHAUSTED") == 1
        wait_until(lambda: len(blocker.seen) == 12, message="all spans processed")


def test_a_retried_export_is_answered_ok_and_analysed_once(detector):
    """The exporter timed out after the sidecar had accepted the request, and sends it again: a clean
    run must not look executed twice, nor its events emitted and written twice."""
    # held findings come out soon; these runs emit no events
    rules = RulesConfig(delivery_deadline_s=0.05, run_idle_s=0.05, required_events=())
    detectors = build_detectors(rules, StateConfig())
    spans = sdk_spans(2)
    with running_receivers([detector, *detectors]) as receivers:
        exporter = OTLPSpanExporter(endpoint=receivers.grpc_endpoint, insecure=True)
        assert exporter.export(spans) is SpanExportResult.SUCCESS
        assert exporter.export(spans) is SpanExportResult.SUCCESS  # the retry: the same request
        exporter.shutdown()
        ticks = detector.ticks
        wait_until(lambda: detector.ticks >= ticks + 5, message="deadlines passed")
        assert len(detector.seen) == 4
        assert receivers.metric("pathwatch_receiver_spans_total", protocol="grpc",
                                outcome="accepted") == 4
        assert receivers.metric("pathwatch_receiver_spans_total", protocol="grpc",
                                outcome="replayed") == 4
        assert receivers.metric("pathwatch_receiver_requests_total", protocol="grpc",
                                status="OK") == 2
        assert receivers.incidents.recorded == []
        # the same spans in another request are another request (and here a real duplicate)
        channel, stub = stub_for(receivers.grpc_endpoint)
        again = make_request([make_span({A.SPAN_KIND: "execute", A.ROLE: "execution_engine",
                                         A.IMPLEMENTATION: "app.Other", A.RUN_ID: "run-0",
                                         A.ENDUSER_PSEUDO_ID: "user-0"})])
        stub.Export(again, timeout=10)
        channel.close()
        wait_until(lambda: receivers.incidents.recorded, message="the duplicate execution found")
    assert [f.rule for f in receivers.incidents.recorded] == ["duplicate.execution"]


def rebatched(*parts):
    """What a Collector's batch processor sends: the ResourceSpans of the requests it took, whole
    and in order (a request the SDK retried among them)."""
    return ExportTraceServiceRequest(resource_spans=[
        resource_spans for part in parts for resource_spans in part.resource_spans])


POD_B = {"service.name": "backend", "service.version": "1.2.3", "service.instance.id": "pod-b"}


def test_a_retry_rebatched_by_a_collector_is_not_analysed_twice(detector):
    """SDK -> Collector -> sidecar: the SDK timed out after the Collector took its request and sent it
    again; the Collector's next request to the sidecar carries that request's ResourceSpans with
    other spans. Its scope was accepted before: dropped (replayed), the rest analysed. Before, run 1's
    writes were 'written 2 times' (duplicate.emission x5) and run 3's emits, re-sent without their
    writes, delivery.undelivered (x5); calls and events counted twice."""
    rules = RulesConfig(delivery_deadline_s=0.05, run_idle_s=0.05)
    rng = random.Random(11)
    run = {index: export_order(run_spans(index, rng)) for index in range(1, 5)}
    first = make_request(run[1])
    second = rebatched(first, make_request(run[2], POD_B))
    writes = [span for span in run[3] if span.name == "websocket.send_json"]
    third = make_request(writes)  # exported before the rest of run 3 (they end first)
    fourth = make_request([span for span in run[3] if span not in writes])
    fifth = rebatched(fourth, make_request(run[4], POD_B))
    known = rebatched(make_request(run[4], POD_B), first)  # every scope accepted before
    with running_receivers([detector, *build_detectors(rules, StateConfig())]) as receivers:
        channel, stub = stub_for(receivers.grpc_endpoint)
        for message in (first, second, third, fourth, fifth):
            stub.Export(message, timeout=10)
        wait_until(lambda: receivers.pipeline.pending_spans == 0, message="queue drained")
        processed = receivers.pipeline.processed_spans
        assert processed == 48  # each of the 48 spans once (before: 67)
        response = stub.Export(known, timeout=10)
        channel.close()
        assert not response.HasField("partial_success")
        ticks = detector.ticks
        wait_until(lambda: detector.ticks >= ticks + 5, message="deadlines passed")
        metric = receivers.metric
        assert receivers.pipeline.processed_spans == processed  # the all-known one not submitted
        assert len(detector.seen) == 48 == len({span.span_id for span in detector.seen})
        assert {span.run_id for span in detector.seen} - {None} == {f"run-{index}" for index in run}
        assert metric("pathwatch_receiver_spans_total", protocol="grpc", outcome="accepted") == 48
        assert metric("pathwatch_receiver_spans_total", protocol="grpc",
                      outcome="replayed") == 12 + 7 + 24
        assert metric("pathwatch_receiver_requests_total", protocol="grpc", status="OK") == 6
        assert metric("pathwatch_state_entries", table="receiver_replays") == 5  # scopes
    assert receivers.incidents.recorded == []


def with_scopes(resource, *scopes):
    """One ResourceSpans of ``resource`` holding one ScopeSpans per list of spans (none: none)."""
    request = make_request([], resource)
    del request.resource_spans[0].scope_spans[:]
    for spans in scopes:
        request.resource_spans[0].scope_spans.add(spans=spans)
    return request


BAD_NAME = {"service.name": 42, "service.instance.id": "pod-a"}  # service.name of the wrong type


@pytest.mark.parametrize("case", [
    "its first scope known, another new", "its first scope new, another known",
    "the retry of the request", "re-sent whole beside another resource", "sent twice in one request",
    "a resource without spans", "a resource without spans beside a known one"])
def test_a_resources_invalid_attributes_count_once_per_resource_taken(detector, case):
    """Reproducer /tmp/s21/recv/repro_resource_invalid_replay.py: the decoder credited a resource's
    invalid attributes to its first scope with spans (a resource without spans: to the next
    resource's), so when that scope was known (dropped as replayed) they went uncounted though the
    resource's new scope was taken. Counted once per resource occurrence with a scope taken (or
    with no spans: whenever it comes); not when the whole resource is a replay."""
    rng = random.Random(5)
    known, new, other = ([make_span({}, rng=rng, name=f"s{n}") for n in range(count)]
                         for count in (2, 3, 1))
    first = with_scopes(BAD_NAME, known)
    elsewhere = with_scopes(POD_B, other)
    second, counted = {
        "its first scope known, another new": (with_scopes(BAD_NAME, known, new), 2),
        "its first scope new, another known": (with_scopes(BAD_NAME, new, known), 2),
        "the retry of the request": (first, 1),
        "re-sent whole beside another resource": (rebatched(first, elsewhere), 1),
        "sent twice in one request": (rebatched(elsewhere, with_scopes(BAD_NAME, new),
                                                with_scopes(BAD_NAME, new)), 2),
        "a resource without spans": (rebatched(with_scopes(BAD_NAME), first), 2),
        "a resource without spans beside a known one": (
            rebatched(with_scopes(BAD_NAME), with_scopes(POD_B, known), elsewhere), 2),
    }[case]
    with running_receivers([detector]) as receivers:
        channel, stub = stub_for(receivers.grpc_endpoint)
        for message in (first, second):
            assert not stub.Export(message, timeout=10).HasField("partial_success")
        channel.close()
        assert receivers.metric("pathwatch_receiver_invalid_attributes_total",
                                attribute="service.name") == counted
        offered = sum(len(scope.spans) for message in (first, second)
                      for resource in message.resource_spans for scope in resource.scope_spans)
        accepted = receivers.metric("pathwatch_receiver_spans_total", protocol="grpc",
                                    outcome="accepted")
        replayed = receivers.metric("pathwatch_receiver_spans_total", protocol="grpc",
                                    outcome="replayed")
        assert accepted + replayed == offered and replayed >= 2  # the known scope was dropped


def test_bad_ids_are_a_partial_success(detector):
    good = [make_span({A.SPAN_KIND: "execute"}, name=f"good-{i}") for i in range(2)]
    bad = make_span({}, trace_id=b"\x01" * 4, name="bad")
    with running_receivers([detector]) as receivers:
        channel, stub = stub_for(receivers.grpc_endpoint)
        response = stub.Export(make_request([good[0], bad, good[1]]), timeout=10)
        channel.close()
        assert response.partial_success.rejected_spans == 1
        assert "trace_id must be 16 bytes" in response.partial_success.error_message
        wait_until(lambda: len(detector.seen) == 2, message="the good spans processed")
        assert receivers.metric("pathwatch_receiver_spans_total", protocol="grpc",
                                outcome="invalid") == 1
        assert receivers.metric("pathwatch_receiver_spans_total", protocol="grpc",
                                outcome="accepted") == 2


def test_garbage_is_invalid_argument_and_counted():
    with running_receivers() as receivers:
        channel = grpc.insecure_channel(receivers.grpc_endpoint)
        export = channel.unary_unary(GRPC_METHOD)
        with pytest.raises(grpc.RpcError) as caught:
            export(b"\xff\x00garbage", timeout=10)
        channel.close()
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "not a protobuf ExportTraceServiceRequest" in caught.value.details()
        assert receivers.metric("pathwatch_receiver_requests_total", protocol="grpc",
                                status="INVALID_ARGUMENT") == 1


def test_message_over_the_size_limit_is_resource_exhausted():
    with running_receivers(max_message_bytes=2048) as receivers:
        channel, stub = stub_for(receivers.grpc_endpoint)
        big = make_request([make_span({A.RUN_ID: "r" * 4096})])
        for _ in range(10):  # grpc refuses it; the sidecar sees the call end without its body
            with pytest.raises(grpc.RpcError) as caught:
                stub.Export(big, timeout=10)
            assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert retry_delay_s(caught.value) is None  # permanent: the same request never fits
        assert stub.Export(make_request([make_span({})]), timeout=10) is not None  # still serving
        channel.close()
        count = lambda status: receivers.metric(  # noqa: E731
            "pathwatch_receiver_requests_total", protocol="grpc", status=status)
        # never taken for a client that closed its call without a message (INVALID_ARGUMENT)
        wait_until(lambda: count("CANCELLED") == 10, message="the ten counted")
        assert count("INVALID_ARGUMENT") == 0 and count("OK") == 1


def test_memory_limiter_refuses_and_counts_then_recovers():
    blocker = BlockingDetector()
    with running_receivers([blocker], max_pending_spans=10) as receivers:
        channel, stub = stub_for(receivers.grpc_endpoint)
        six = lambda: make_request([make_span({}) for _ in range(6)])  # noqa: E731
        stub.Export(six(), timeout=10)
        assert blocker.entered.wait(10)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Export(six(), timeout=10)
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_pending_spans=10" in caught.value.details()
        # OTLP: RESOURCE_EXHAUSTED is retryable only with a RetryInfo (the Collector's exporter and
        # the Go SDK drop the batch without one)
        assert retry_delay_s(caught.value) in RETRY_DELAYS_S
        assert receivers.metric("pathwatch_receiver_spans_total", protocol="grpc",
                                outcome="refused") == 6
        assert receivers.metric("pathwatch_receiver_requests_total", protocol="grpc",
                                status="RESOURCE_EXHAUSTED") == 1
        refused = six()
        with pytest.raises(grpc.RpcError):
            stub.Export(refused, timeout=10)
        blocker.release.set()
        wait_until(lambda: receivers.pipeline.pending_spans == 0, message="queue drained")
        stub.Export(refused, timeout=10)  # refused before: new now, not a replay
        wait_until(lambda: len(blocker.seen) == 12, message="accepted spans processed")
        assert receivers.metric("pathwatch_receiver_spans_total", protocol="grpc",
                                outcome="replayed") == 0
        channel.close()


def test_stopping_pipeline_answers_unavailable():
    with running_receivers() as receivers:
        receivers.pipeline.stop(10)
        channel, stub = stub_for(receivers.grpc_endpoint)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Export(make_request([make_span({})]), timeout=10)
        channel.close()
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert rpc_status.from_call(caught.value).code == code_pb2.UNAVAILABLE
        assert retry_delay_s(caught.value) in RETRY_DELAYS_S
        assert receivers.metric("pathwatch_receiver_spans_total", protocol="grpc",
                                outcome="refused") == 1


def test_refusals_spread_their_retry_delays_around_two_seconds():
    # the exporters wait exactly the delay they are told: pods refused together must not all come
    # back together (one delay for all made every retry wave as large as the first)
    with running_receivers() as receivers:
        receivers.pipeline.stop(10)
        channel, stub = stub_for(receivers.grpc_endpoint)
        delays = []
        for _ in range(60):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Export(make_request([make_span({})]), timeout=10)
            delays.append(retry_delay_s(caught.value))
        channel.close()
    assert set(delays) <= set(RETRY_DELAYS_S) and len(set(delays)) >= 8
    assert min(RETRY_DELAYS_S) == 1.5 and max(RETRY_DELAYS_S) == 2.5
    assert 1.75 <= sum(delays) / len(delays) <= 2.25


def test_gzip_compressed_calls_and_concurrent_futures(detector):
    rng = random.Random(4)
    requests = [make_request(run_spans(i, rng)) for i in range(8)]
    with running_receivers([detector]) as receivers:
        channel = grpc.insecure_channel(receivers.grpc_endpoint,
                                        compression=grpc.Compression.Gzip)
        stub = trace_service_pb2_grpc.TraceServiceStub(channel)
        futures = [stub.Export.future(request, timeout=20) for request in requests]
        for future in futures:
            future.result()
        channel.close()
        wait_until(lambda: len(detector.seen) == 8 * 12, message="every span processed")
    assert len({s.run_id for s in detector.seen if s.run_id}) == 8


class GatedConsumer:
    """Takes every batch, but holds each submitting thread until ``release`` is set."""

    def __init__(self):
        self.release = threading.Event()
        self.entered = 0
        self._lock = threading.Lock()

    def submit(self, batch):
        with self._lock:
            self.entered += 1
        assert self.release.wait(30), "test never released the consumer"
        return Admission.ACCEPTED

    def admits(self, spans):
        return Admission.ACCEPTED  # takes every batch (asked before decoding)


@contextmanager
def gated_receiver(consumer, **options):
    """(endpoint, requests, receiver): ``requests(status)`` reads
    pathwatch_receiver_requests_total{protocol="grpc", status}."""
    telemetry = Telemetry(CollectorRegistry())
    handler = ExportHandler(SpanDecoder(), consumer, telemetry, max_pending_spans=100_000)
    receiver = GrpcReceiver("127.0.0.1:0", handler, max_message_bytes=4 * 1024 * 1024, **options)

    def requests(status: str) -> float | None:
        return telemetry.registry.get_sample_value(
            "pathwatch_receiver_requests_total", {"protocol": "grpc", "status": status})

    try:
        yield receiver.start(), requests, receiver
    finally:
        consumer.release.set()
        receiver.stop(1)


def test_calls_beyond_sixteen_at_once_wait_and_are_served_not_refused_uncounted():
    """grpc's maximum_concurrent_rpcs=16 answered the 17th concurrent call RESOURCE_EXHAUSTED
    "Concurrent RPC limit exceeded!" itself: without RetryInfo (dropped by the Collector's exporter)
    and counted nowhere. Calls now wait for a reader. With 8 streams per connection, the 20 calls
    on each connection beyond them are queued by the client (a connection that knows the limit:
    streams opened before the server's SETTINGS arrive are refused, see GrpcReceiver)."""
    consumer = GatedConsumer()
    with gated_receiver(consumer, max_streams_per_connection=8) as (endpoint, requests, _):
        channels = [grpc.insecure_channel(endpoint) for _ in range(2)]
        for channel in channels:
            grpc.channel_ready_future(channel).result(timeout=10)
        calls = [channel.unary_unary(GRPC_METHOD) for channel in channels]
        futures = [calls[i % 2].future(make_request([make_span({}, name=f"s{i}")])
                                       .SerializeToString(), timeout=30) for i in range(40)]
        wait_until(lambda: consumer.entered == 1, message="a call decoded, held in submit")
        # while it is held (submitting is serialized), no call may end: the old cap refused the
        # 17th at once
        ended = threading.Event()
        for future in futures:
            future.add_done_callback(lambda _: ended.set())
        assert not ended.wait(1.0), [f.exception() for f in futures if f.done()]
        consumer.release.set()
        for future in futures:
            future.result()
        for channel in channels:
            channel.close()
        assert requests("OK") == 40


def test_a_call_closed_without_a_message_is_invalid_argument_and_counted():
    with running_receivers() as receivers:
        channel = grpc.insecure_channel(receivers.grpc_endpoint)
        export = channel.stream_unary(GRPC_METHOD)  # unary on the wire is a stream of one message
        with pytest.raises(grpc.RpcError) as caught:
            export(iter(()), timeout=10)
        channel.close()
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "no request message" in caught.value.details()
        assert receivers.metric("pathwatch_receiver_requests_total", protocol="grpc",
                                status="INVALID_ARGUMENT") == 1


def test_a_call_of_two_messages_is_invalid_argument_not_half_taken(detector):
    """The method is registered client-streaming (unary on the wire is a stream of one message): a
    raw client sending two messages on one call was answered OK while only the first was taken,
    the second's spans lost uncounted. The call is refused whole, counted once."""
    with running_receivers([detector]) as receivers:
        channel = grpc.insecure_channel(receivers.grpc_endpoint)
        export = channel.stream_unary(GRPC_METHOD)
        first = make_request([make_span({A.RUN_ID: "first"})]).SerializeToString()
        second = make_request([make_span({A.RUN_ID: "second"})]).SerializeToString()
        with pytest.raises(grpc.RpcError) as caught:
            export(iter([first, second]), timeout=10)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "more than one request message" in caught.value.details()
        assert export(iter([second]), timeout=10) == b""  # one message: served as before
        channel.close()
        wait_until(lambda: len(detector.seen) == 1, message="the one-message call's span")
        assert [span.run_id for span in detector.seen] == ["second"]
        count = lambda status: receivers.metric(  # noqa: E731
            "pathwatch_receiver_requests_total", protocol="grpc", status=status)
        assert (count("INVALID_ARGUMENT"), count("OK"), count("CANCELLED")) == (1, 1, 0)
        assert receivers.metric("pathwatch_receiver_spans_total", protocol="grpc",
                                outcome="accepted") == 1


def test_a_call_taken_up_after_its_read_deadline_is_given_a_moment_for_a_body_already_there():
    """Deadlines run from a call's start; one that waited that long for a reader (a burst of live
    exporters: 52 of 1,000 at read_timeout_s=1) would be cancelled before its body, there already,
    was read. It gets LATE_GRACE_NS, no more (a stalled one costs a reader that long)."""
    from sidecar.receiver.grpc_server import LATE_GRACE_NS, ReadDeadlines

    class Context:
        def __init__(self):
            self.cancelled = threading.Event()

        def cancel(self):
            self.cancelled.set()

    deadlines = ReadDeadlines(1.0)
    deadlines.start()
    try:
        late, now = Context(), Context()
        started = time.monotonic_ns()
        late_token = deadlines.set(late, started_ns=started - 10 * 10**9)  # started 10 s ago
        deadlines.set(now, started_ns=started)
        assert late.cancelled.wait(5)
        assert time.monotonic_ns() - started >= LATE_GRACE_NS
        assert not now.cancelled.is_set()  # its own second runs on
        assert not deadlines.clear(late_token)  # passed: the reader counts it CANCELLED
        assert now.cancelled.wait(5)
        assert time.monotonic_ns() - started >= 10**9
    finally:
        deadlines.stop()


def test_metadata_up_to_16_kib_is_served_every_time_and_above_it_never():
    """grpc refuses a call whose metadata passes a soft limit (8 KiB by default) at random, more
    often the nearer it is to the hard one (16 KiB): an exporter sending a 12 KiB header (a long
    bearer token) had about half its exports refused RESOURCE_EXHAUSTED without RetryInfo, which the
    Collector's exporter and the Go SDK drop for good. One limit, 16 KiB, as OTLP/HTTP's head."""
    with running_receivers() as receivers:
        channel = grpc.insecure_channel(receivers.grpc_endpoint)
        export = channel.unary_unary(GRPC_METHOD)
        body = make_request([make_span({})]).SerializeToString()
        for _ in range(30):
            assert export(body, timeout=10, metadata=[("authorization", "a" * 12_000)]) == b""
        with pytest.raises(grpc.RpcError) as caught:
            export(body, timeout=10, metadata=[("authorization", "a" * 17_000)])
        assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        channel.close()
        count = lambda status: receivers.metric(  # noqa: E731
            "pathwatch_receiver_requests_total", protocol="grpc", status=status)
        wait_until(lambda: count("CANCELLED") == 1, message="the refused call counted")
        assert count("OK") == 30


def test_a_call_whose_body_never_comes_is_cancelled_at_the_read_timeout_and_frees_its_reader():
    """A client that opened the call and never sent its message (no deadline of its own) held a
    worker for ever; with one reader every later export waited behind it."""
    consumer = GatedConsumer()
    consumer.release.set()
    with gated_receiver(consumer, readers=1, read_timeout_s=0.5) as (endpoint, requests, _):
        channel = grpc.insecure_channel(endpoint)
        never = threading.Event()

        stalled = channel.stream_unary(GRPC_METHOD).future(stalled_requests(never))
        try:
            wait_until(stalled.done, message="the stalled call ended by the sidecar")
            assert stalled.code() is grpc.StatusCode.CANCELLED
            export = channel.unary_unary(GRPC_METHOD)
            export(make_request([make_span({})]).SerializeToString(), timeout=10)  # the reader is free
        finally:
            never.set()
            channel.close()
        assert requests("CANCELLED") == 1 and requests("OK") == 1


def test_stalled_calls_however_many_hold_ingestion_back_read_timeout_s_not_a_multiple():
    """The read deadline ran from when a reader took the call up: 40 stalled calls on one
    connection, two readers, held every other export back 40 / 2 x read_timeout_s (20 min with the
    default 30 s, from one client). It runs from the call's start: they all end read_timeout_s
    after they came (those taken up later are given 0.1 s each), and an export that came a second
    after them is served then."""
    consumer = GatedConsumer()
    consumer.release.set()
    never = threading.Event()
    with gated_receiver(consumer, read_timeout_s=2.0) as (endpoint, requests, receiver):
        channel = grpc.insecure_channel(endpoint)
        stalled = [channel.stream_unary(GRPC_METHOD).future(stalled_requests(never))
                   for _ in range(40)]
        try:
            wait_until(lambda: receiver.reading == 2, message="both readers on a stalled call")
            started = time.monotonic()
            # the scenario, not a synchronization: an exporter coming a second after them
            never.wait(1.0)
            served = channel.unary_unary(GRPC_METHOD)(
                make_request([make_span({})]).SerializeToString(), timeout=15)
            waited = time.monotonic() - started
        finally:
            never.set()
        # 2 s for the first two, 0.1 s for each other one picked late, on two readers: 40 s before
        assert served == b"" and waited < 8, waited
        wait_until(lambda: all(call.done() for call in stalled), message="the stalled calls ended")
        assert {call.code() for call in stalled} == {grpc.StatusCode.CANCELLED}
        wait_until(lambda: requests("CANCELLED") == 40, message="each counted once")
        assert requests("OK") == 1
        channel.close()


_FROZEN_CLIENT = """
import sys, threading, grpc
channel = grpc.insecure_channel(sys.argv[1])
never = threading.Event()
def stalled():
    never.wait()
    yield from ()
call = channel.stream_unary(sys.argv[2]).future(stalled())
never.wait()
"""


def test_keepalive_ends_the_calls_of_a_peer_that_stopped_answering():
    """A frozen client (or a dead host, a half-open connection) never ends its call: without
    keepalive pings the server waited on it until the read timeout, and an idle dead connection
    for ever."""
    consumer = GatedConsumer()
    consumer.release.set()
    with gated_receiver(consumer, read_timeout_s=300, keepalive_time_s=0.5,
                        keepalive_timeout_s=0.5) as (endpoint, requests, receiver):
        client = subprocess.Popen([sys.executable, "-c", _FROZEN_CLIENT, endpoint, GRPC_METHOD])
        try:
            wait_until(lambda: receiver.reading == 1, message="the client's call taken up")
            client.send_signal(signal.SIGSTOP)  # its process answers no ping from now on
            wait_until(lambda: receiver.reading == 0, message="the frozen client's call ended")
        finally:
            client.kill()
            client.wait(10)
        assert requests("CANCELLED") == 1


def test_clients_may_keep_alive_idle_connections_without_a_goaway():
    """grpc's server default allows a client's ping only every 5 minutes, and none on an idle
    connection: a client keeping alive (the Collector's exporter: every 30 s) was sent a GOAWAY
    'too_many_pings' at its fourth ping. Scaled down: the server allows one every 0.1 s, the client
    pings as often as grpc lets it (once a second)."""
    consumer = GatedConsumer()
    consumer.release.set()
    with gated_receiver(consumer, min_client_ping_interval_s=0.1) as (endpoint, _, _):
        channel = grpc.insecure_channel(endpoint, options=[
            ("grpc.keepalive_time_ms", 200), ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0)])
        went_away = threading.Event()
        states = []

        def watch(state):
            states.append(state)
            if grpc.ChannelConnectivity.READY in states and state is not grpc.ChannelConnectivity.READY:
                went_away.set()

        channel.subscribe(watch, try_to_connect=True)
        try:
            grpc.channel_ready_future(channel).result(timeout=10)
            assert not went_away.wait(5.0), states  # five pings on an idle connection
            channel.unary_unary(GRPC_METHOD)(make_request([make_span({})]).SerializeToString(),
                                             timeout=10)
        finally:
            channel.unsubscribe(watch)
            channel.close()


def test_connections_that_never_send_are_closed_at_the_read_timeout_not_held_for_two_minutes():
    """A TCP connection that never sends the HTTP/2 preface counts against
    receiver.grpc_max_connections until grpc's handshake timeout, 120 s by default: 1024 silent
    sockets (3 here) locked every exporter out for two minutes at a time. It is read_timeout_s, as
    OTLP/HTTP's for a request head."""
    consumer = GatedConsumer()
    consumer.release.set()
    with gated_receiver(consumer, max_connections=3, read_timeout_s=1.0) as (endpoint, requests, _):
        host, port = endpoint.rsplit(":", 1)
        silent = [socket.create_connection((host, int(port))) for _ in range(3)]
        try:
            for client in silent:
                client.settimeout(10)  # the server's SETTINGS, then its close (a timeout before)
                while client.recv(1024):
                    pass
        finally:
            for client in silent:
                client.close()
        channel = grpc.insecure_channel(endpoint)
        channel.unary_unary(GRPC_METHOD)(make_request([make_span({})]).SerializeToString(),
                                         timeout=10, wait_for_ready=True)
        channel.close()
        assert requests("OK") == 1


def test_a_connection_without_calls_is_let_go_at_the_read_timeout_and_reconnects_for_its_next():
    """A connection that opened and sends no call, but answers the keepalive pings (a live client),
    held a place in receiver.grpc_max_connections for ever: 1024 of them locked every exporter out.
    It is sent a GOAWAY read_timeout_s after its last call ended, as OTLP/HTTP closes an idle
    kept-alive connection; a client's next call connects again (grpc does it unasked)."""
    consumer = GatedConsumer()
    consumer.release.set()
    with gated_receiver(consumer, read_timeout_s=1.0,
                        min_client_ping_interval_s=0.1) as (endpoint, requests, _):
        channel = grpc.insecure_channel(endpoint, options=[
            ("grpc.keepalive_time_ms", 200), ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0)])
        left = threading.Event()
        states = []

        def watch(state):
            states.append(state)
            if grpc.ChannelConnectivity.READY in states and state is not grpc.ChannelConnectivity.READY:
                left.set()

        channel.subscribe(watch, try_to_connect=True)
        try:
            grpc.channel_ready_future(channel).result(timeout=10)
            assert left.wait(10), states  # kept READY for ever before
            channel.unary_unary(GRPC_METHOD)(make_request([make_span({})]).SerializeToString(),
                                             timeout=10)
        finally:
            channel.unsubscribe(watch)
            channel.close()
        assert requests("OK") == 1


def test_a_call_whose_deadline_passed_as_its_body_arrived_is_cancelled_not_answered_ok():
    """The deadline thread takes a call's entry under its lock and cancels the call after it; a body
    arriving in between made the reader count the call CANCELLED and return the empty response,
    which grpc sent as OK: the client took the spans as delivered, the pipeline never saw them."""
    from sidecar.receiver.grpc_server import ReadDeadlines, TraceService

    class PassedDeadlines(ReadDeadlines):
        def clear(self, token):  # the deadline thread had already taken the entry
            super().clear(token)
            return False

    class Context:
        cancelled = False

        def cancel(self):
            self.cancelled = True

        def is_active(self):
            return not self.cancelled

    exported = []

    class Handler:
        def refuse_unread(self, protocol):
            return None  # room in the pipeline: the body is read

        def export(self, body, protocol):
            exported.append(body)

        def count_request(self, protocol, status):
            exported.append(status) if status != "CANCELLED" else None

    context = Context()
    service = TraceService(Handler(), PassedDeadlines(30.0))
    service.Export(iter([make_request([make_span({})]).SerializeToString()]), context)
    assert context.cancelled and exported == []
