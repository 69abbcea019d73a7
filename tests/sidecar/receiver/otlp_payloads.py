"""Builders for OTLP trace requests: realistic pathwatch runs (as the instrumentation emits them)
and hand-made spans for bad-input tests. Used by the receiver tests and by the throughput benchmark.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Iterable, Mapping

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from instrumentation import attributes as A

REQUIRED_EVENTS = ("agent_started", "agent_thinking", "tool_executing", "tool_completed",
                   "agent_completed")
DEFAULT_RESOURCE = {"service.name": "backend", "service.version": "1.2.3",
                    "service.instance.id": "pod-a"}


def any_value(value: object) -> AnyValue:
    """A Python value as an OTLP AnyValue; None is the empty value (no field set)."""
    if value is None:
        return AnyValue()
    if isinstance(value, AnyValue):
        return value
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, (list, tuple)):
        return AnyValue(array_value=ArrayValue(values=[any_value(item) for item in value]))
    return AnyValue(string_value=str(value))


def key_values(attributes: Mapping[str, object]) -> list[KeyValue]:
    return [KeyValue(key=key, value=any_value(value)) for key, value in attributes.items()]


def make_span(attributes: Mapping[str, object] | None = None, *, trace_id: bytes | None = None,
              span_id: bytes | None = None, parent_span_id: bytes = b"", name: str = "span",
              start_ns: int = 1_700_000_000_000_000_000, duration_ns: int = 1_000_000,
              error: bool = False, rng: random.Random | None = None) -> Span:
    rng = rng or random.Random()
    span = Span(
        trace_id=trace_id if trace_id is not None else rng.randbytes(16),
        span_id=span_id if span_id is not None else rng.randbytes(8),
        parent_span_id=parent_span_id, name=name,
        start_time_unix_nano=start_ns, end_time_unix_nano=start_ns + duration_ns,
        attributes=key_values(attributes or {}))
    if error:
        span.status.code = 2
    return span


def make_request(spans: Iterable[Span], resource: Mapping[str, object] | None = None,
                 scope: Mapping[str, object] | None = None) -> ExportTraceServiceRequest:
    """One resource, one scope (with the attributes ``scope``, e.g. pathwatch's key id)."""
    resource_attributes = DEFAULT_RESOURCE if resource is None else resource
    scope_spans = ScopeSpans(spans=list(spans))
    if scope:
        scope_spans.scope.attributes.extend(key_values(scope))
    return ExportTraceServiceRequest(resource_spans=[ResourceSpans(
        resource=Resource(attributes=key_values(resource_attributes)),
        scope_spans=[scope_spans])])


def user_pseudonym(index: int) -> str:
    return f"{index:032x}"


def run_spans(run_index: int, rng: random.Random, *, users: int = 1000,
              bleed: bool = False, key_id: str | None = None) -> list[Span]:
    """One agent run over a WebSocket, as the instrumentation would report it: the request span,
    one engine call, the five required events emitted and each written to the user's socket.
    With ``bleed`` the engine instance was built for another user (bleed.owner_vs_ambient).
    ``key_id``: the request span names the key of its user id (pathwatch's other spans name it on
    their scope: ``make_request(scope=...)``)."""
    user = user_pseudonym(run_index % users)
    owner = user_pseudonym((run_index + 1) % users) if bleed else user
    trace_id = rng.randbytes(16)
    run_id = f"run-{run_index}"
    connection = f"conn-{run_index % users}"
    start = 1_700_000_000_000_000_000 + run_index * 1_000_000
    request_id = rng.randbytes(8)
    common = {A.ENTRY_POINT: "/ws", A.ENDUSER_PSEUDO_ID: user}
    keyed = {} if key_id is None else {A.PSEUDONYM_KEY_ID: key_id}
    spans = [make_span({A.SPAN_KIND: A.SpanKinds.REQUEST, A.HTTP_ROUTE: "/ws",
                        A.CONNECTION_ID: connection, **common, **keyed},
                       trace_id=trace_id, span_id=request_id, name="/ws", start_ns=start,
                       duration_ns=50_000_000)]
    common[A.REQUEST_SPAN_ID] = request_id.hex()  # every span under the request names it
    engine_id = rng.randbytes(8)
    spans.append(make_span({
        A.SPAN_KIND: A.SpanKinds.EXECUTE, **common,
        A.CODE_FUNCTION_NAME: "backend.engines.UserExecutionEngine.execute_agent",
        A.ROLE: "execution_engine", A.IMPLEMENTATION: "backend.engines.UserExecutionEngine",
        A.CANONICAL: True, A.RETIRED: False, A.INSTANCE_ID: f"inst-{run_index}",
        A.CALLER: "backend.routes.websocket_endpoint", A.THREAD_ID: 140000000 + run_index % 8,
        A.USER_SCOPED: True, A.USER_OWNER: owner, A.USER_SUBJECT: user, A.RUN_ID: run_id,
        A.CONVERSATION_THREAD_ID: f"thread-{run_index}",
    }, trace_id=trace_id, span_id=engine_id, parent_span_id=request_id,
        name="execution_engine.execute_agent", start_ns=start + 1000, duration_ns=40_000_000))
    for number, event_type in enumerate(REQUIRED_EVENTS):
        event_id = f"evt-{run_index}-{number}"
        emit_id = rng.randbytes(8)
        at = start + 2000 + number * 1_000_000
        spans.append(make_span({
            A.SPAN_KIND: A.SpanKinds.EMIT, **common,
            A.CODE_FUNCTION_NAME: f"backend.bridge.AgentWebSocketBridge.notify_{event_type}",
            A.ROLE: "event_emitter", A.IMPLEMENTATION: "backend.bridge.AgentWebSocketBridge",
            A.CANONICAL: True, A.RETIRED: False, A.INSTANCE_ID: "inst-bridge",
            A.USER_TARGET: user, A.RUN_ID: run_id, A.EVENT_TYPE: event_type,
            A.MESSAGING_OPERATION_TYPE: "create", A.MESSAGING_MESSAGE_ID: event_id,
            A.EXECUTION_SPAN_ID: engine_id.hex(),
        }, trace_id=trace_id, span_id=emit_id, parent_span_id=engine_id,
            name=f"event_emitter.notify_{event_type}", start_ns=at))
        spans.append(make_span({
            A.SPAN_KIND: A.SpanKinds.DELIVER, **common,
            A.CODE_FUNCTION_NAME: "starlette.websockets.WebSocket.send_json",
            A.ROLE: "transport", A.IMPLEMENTATION: "starlette.websockets.WebSocket",
            A.CANONICAL: True, A.RETIRED: False, A.RUN_ID: run_id, A.EVENT_TYPE: event_type,
            A.MESSAGING_OPERATION_TYPE: "send", A.MESSAGING_MESSAGE_ID: event_id,
            A.CONNECTION_ID: connection, A.CONNECTION_USER: user,
            A.DELIVERY_OUTCOME: A.DeliveryOutcomes.WRITTEN, A.DELIVERY_LINK: "context",
        }, trace_id=trace_id, span_id=rng.randbytes(8), parent_span_id=emit_id,
            name="websocket.send_json", start_ns=at + 1000))
    return spans


def export_order(spans: list[Span]) -> list[Span]:
    """The order the SDK's BatchSpanProcessor exports a run in: spans are queued as they end, and a
    call ends after every call made inside it (the write inside its emit, the emits inside the
    engine call, all of them inside the request). ``run_spans`` lists them in start order."""
    children: dict[bytes, list[Span]] = {}
    for span in spans:
        children.setdefault(span.parent_span_id, []).append(span)
    ordered: list[Span] = []

    def visit(span: Span) -> None:
        for child in children.get(span.span_id, ()):
            visit(child)
        ordered.append(span)

    for root in children.get(b"", ()):
        visit(root)
    return ordered


def heartbeat_span(dropped: int, errors: int, rng: random.Random | None = None) -> Span:
    return make_span({A.SPAN_KIND: A.SpanKinds.HEARTBEAT, A.DROPPED_SPANS: dropped,
                      A.INSTRUMENTATION_ERRORS: errors, A.HEARTBEAT_INTERVAL_S: 10.0},
                     name=A.HEARTBEAT_SPAN_NAME, rng=rng)


# --- OTLP/JSON: the same requests as the OpenTelemetry JSON Protobuf Encoding writes them ---

_ID_KEYS = {"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"}
_INT64_KEYS = {"startTimeUnixNano", "endTimeUnixNano", "timeUnixNano", "intValue",
               "start_time_unix_nano", "end_time_unix_nano", "time_unix_nano", "int_value"}


def otlp_json_document(request: ExportTraceServiceRequest, *, snake_case: bool = False,
                       upper_hex: bool = False, int64_as_numbers: bool = False) -> dict:
    """``request`` as an OTLP/JSON document: the proto3 JSON mapping with hex ids (of spans and
    links) and integer enums. ``snake_case`` writes the original field names (which protobuf JSON
    parsers accept too), ``int64_as_numbers`` 64-bit integers as JSON numbers, not strings."""
    document = json_format.MessageToDict(request, use_integers_for_enums=True,
                                         preserving_proto_field_name=snake_case)

    def visit(node: object) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item)
        elif isinstance(node, dict):
            for key, value in node.items():
                if key in _ID_KEYS and isinstance(value, str):
                    hex_id = base64.b64decode(value).hex()
                    node[key] = hex_id.upper() if upper_hex else hex_id
                elif key in _INT64_KEYS and int64_as_numbers and isinstance(value, str):
                    node[key] = int(value)
                else:
                    visit(value)

    visit(document)
    return document


def otlp_json(request: ExportTraceServiceRequest, **options: bool) -> bytes:
    """``request`` as an OTLP/JSON body (see ``otlp_json_document``)."""
    return json.dumps(otlp_json_document(request, **options)).encode()
