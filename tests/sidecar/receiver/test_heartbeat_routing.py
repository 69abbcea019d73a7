"""Gateway mode with several replicas behind a trace-id router (the chart README: a Collector's
loadbalancing exporter, ``routing_key: traceID``): a backend's heartbeats must all reach one replica,
or each replica counts the rise of the backend's totals between the heartbeats it happened to get and
the replicas' drop counters, summed (the alert's value), read up to N times the drops
(/tmp/s19/hbroute/repro_heartbeat_routing.py).

The real instrumentation (pathwatch's processor and OTLP exporter), real sidecar receivers,
pipelines and detectors; only the router is a stand-in (``TraceIdRouter``)."""

from __future__ import annotations

import contextlib
import zlib
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

from instrumentation.exporting import DropCounter, Heartbeat, configure
from sidecar.detectors import build_detectors
from tests.sidecar.detectors.factory import rules, state
from tests.sidecar.receiver.harness import running_receivers
from tests.support import wait_until

SERVICE = "hb-backend"
REPLICAS = 2
BEATS = 12


class TraceIdRouter(trace_service_pb2_grpc.TraceServiceServicer):
    """Stands in for the Collector's loadbalancing exporter with ``routing_key: traceID``, which
    does not run here (no otelcol-contrib on these machines, /work/shared/TOOLING.md; no package
    of it in the registries they reach). Like it, it splits each export request by trace id and
    sends each span to the replica its trace id picks: a hash of the id modulo the replicas, in
    place of the exporter's consistent-hash ring (what the sidecar relies on is the same: one trace
    id, always one replica)."""

    def __init__(self, endpoints: list[str]) -> None:
        self._channels = [grpc.insecure_channel(endpoint) for endpoint in endpoints]
        self._stubs = [trace_service_pb2_grpc.TraceServiceStub(channel) for channel in self._channels]

    def Export(self, request, context):  # noqa: N802 - gRPC method name
        parts = [trace_service_pb2.ExportTraceServiceRequest() for _ in self._stubs]
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    out = parts[zlib.crc32(span.trace_id) % len(parts)].resource_spans.add()
                    out.resource.CopyFrom(resource_spans.resource)
                    scope = out.scope_spans.add()
                    scope.scope.CopyFrom(scope_spans.scope)
                    scope.spans.add().CopyFrom(span)
        for stub, part in zip(self._stubs, parts):
            if part.resource_spans:
                stub.Export(part, timeout=10)
        return trace_service_pb2.ExportTraceServiceResponse()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()


@contextlib.contextmanager
def router_in_front_of(endpoints: list[str]):
    router = TraceIdRouter(endpoints)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(router, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)
        router.close()


def test_a_backends_heartbeats_reach_one_replica_and_its_drops_count_once():
    with contextlib.ExitStack() as stack:
        replicas = [stack.enter_context(running_receivers(build_detectors(rules(), state())))
                    for _ in range(REPLICAS)]
        endpoint = stack.enter_context(router_in_front_of([r.grpc_endpoint for r in replicas]))
        provider = TracerProvider(resource=Resource.create({"service.name": SERVICE}))
        setup = configure(endpoint, tracer_provider=provider)  # pathwatch's processor and exporter
        stack.callback(setup.shutdown)
        counter = DropCounter()
        heartbeat = Heartbeat(0, provider, counter=counter)
        for beat in range(BEATS):
            if beat:
                counter.add_failed(10)  # the backend dropped 10 spans since its last heartbeat
            heartbeat.beat()
            assert setup.force_flush(10_000)  # one export request per heartbeat

        def through() -> bool:
            accepted = sum(r.metric("pathwatch_receiver_spans_total", protocol="grpc", outcome="accepted")
                           for r in replicas)
            return accepted == BEATS and all(r.metric("pathwatch_receiver_pending_spans") == 0
                                             for r in replicas)

        wait_until(through, message=f"{BEATS} heartbeats accepted and through the replicas' pipelines")
        got = [r.metric("pathwatch_receiver_spans_total", protocol="grpc", outcome="accepted")
               for r in replicas]
        assert sorted(got) == [0] * (REPLICAS - 1) + [BEATS]  # all on one replica
        dropped = [r.metric("pathwatch_backend_dropped_spans_total", service_name=SERVICE)
                   for r in replicas]
        assert sum(dropped) == counter.dropped == 10 * (BEATS - 1)
        # one trace, each heartbeat its own request: none taken for a replay, none a finding
        assert sum(r.metric("pathwatch_receiver_spans_total", protocol="grpc", outcome="replayed")
                   for r in replicas) == 0
        assert [f for r in replicas for f in r.incidents.recorded] == []
