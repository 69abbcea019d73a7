"""A wire-compatible *view* of the OTLP trace request, for decoding at speed.

The generated OTLP classes parse every ``KeyValue`` into a nested message; visiting those from
Python costs about 0.5 µs per attribute (TOOLING.md: parse alone 1.3–2.4 M spans/s, parse plus
visiting attributes 84–137 k spans/s). This view declares only the fields the sidecar reads, with
each span attribute kept as the raw bytes of its ``KeyValue``. The decoder then reads the key and
value straight from those bytes, and low-cardinality attributes (role, implementation, kind ...)
come from a cache keyed by those bytes. Field numbers are those of opentelemetry/proto/trace/v1 and
collector/trace/v1; fields not declared here (events, links, the scope's name ...) are skipped as unknown.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_PACKAGE = "pathwatch.otlpview"
_F = descriptor_pb2.FieldDescriptorProto
_OPTIONAL, _REPEATED = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED

# (message, [(field, number, type, label, message type or None)]) — numbers from the OTLP protos
_MESSAGES = (
    ("Span", [
        ("trace_id", 1, _F.TYPE_BYTES, _OPTIONAL, None),
        ("span_id", 2, _F.TYPE_BYTES, _OPTIONAL, None),
        ("parent_span_id", 4, _F.TYPE_BYTES, _OPTIONAL, None),
        # bytes, not string: a string field is checked for UTF-8 by the parser, and one span name
        # that is not UTF-8 (the Collector passes such names on) would fail the whole request;
        # the decoder reads it with replacement characters (no detector reads a name)
        ("name", 5, _F.TYPE_BYTES, _OPTIONAL, None),
        ("start_time_unix_nano", 7, _F.TYPE_FIXED64, _OPTIONAL, None),
        ("end_time_unix_nano", 8, _F.TYPE_FIXED64, _OPTIONAL, None),
        ("attributes", 9, _F.TYPE_BYTES, _REPEATED, None),  # raw KeyValue messages
        # raw Status message(s): see status_is_error. Repeated, because a message field sent twice
        # is merged by protobuf; a view declaring it singular bytes would keep the last one only.
        ("status", 15, _F.TYPE_BYTES, _REPEATED, None),
    ]),
    # the scope's attributes only (``pathwatch.pseudonym.key_id`` on pathwatch's own tracer)
    ("InstrumentationScope", [("attributes", 3, _F.TYPE_BYTES, _REPEATED, None)]),
    ("ScopeSpans", [
        ("scope", 1, _F.TYPE_MESSAGE, _OPTIONAL, "InstrumentationScope"),
        ("spans", 2, _F.TYPE_MESSAGE, _REPEATED, "Span"),
    ]),
    ("Resource", [("attributes", 1, _F.TYPE_BYTES, _REPEATED, None)]),  # raw KeyValue messages
    ("ResourceSpans", [
        ("resource", 1, _F.TYPE_MESSAGE, _OPTIONAL, "Resource"),
        ("scope_spans", 2, _F.TYPE_MESSAGE, _REPEATED, "ScopeSpans"),
    ]),
    ("ExportTraceServiceRequest", [
        ("resource_spans", 1, _F.TYPE_MESSAGE, _REPEATED, "ResourceSpans"),
    ]),
)


# The same request with each span kept as its raw bytes: parsed only to count the spans of a body
# large enough to hold more than ``receiver.max_spans_per_request`` (``count_spans``). upb holds a
# span of the view above in about 120 bytes whatever its size on the wire, so a 4 MiB body of 2 M
# empty spans (2 bytes each) took 240 MB; this view holds one in 16-32 bytes (64 MB for that body,
# freed at once) and parses one in about 25 ns (0.5 % of decoding it).
_COUNT_MESSAGES = (
    ("ScopeSpans", [("spans", 2, _F.TYPE_BYTES, _REPEATED, None)]),
    ("ResourceSpans", [("scope_spans", 2, _F.TYPE_MESSAGE, _REPEATED, "ScopeSpans")]),
    ("ExportTraceServiceRequest", [
        ("resource_spans", 1, _F.TYPE_MESSAGE, _REPEATED, "ResourceSpans"),
    ]),
)


# A span's Status with its code alone: its ``message`` (2) is skipped as an unknown field, so a
# message that is not UTF-8 (an error's text) costs nothing, where the generated class refused it
# and with it the whole request. ``code`` (3) is an enum: read as the int it is on the wire.
_STATUS_MESSAGES = (("Status", [("code", 3, _F.TYPE_INT32, _OPTIONAL, None)]),)


# A KeyValue with its key and value as bytes, for the attributes the decoder's reading of the
# canonical encoding does not take: a length of two bytes (a key of 128 bytes or more, a value of
# 126), fields in another order. The generated class checked every string in it for UTF-8, inside
# the value too (an array's strings), so one such attribute failed the whole request, where a short
# one is judged alone (counted invalid if pathwatch reads it, ignored if not). ``value`` (2) is
# repeated: protobuf merges a message field sent twice (see status_is_error).
_KEY_VALUE_MESSAGES = (("KeyValue", [("key", 1, _F.TYPE_BYTES, _OPTIONAL, None),
                                     ("value", 2, _F.TYPE_BYTES, _REPEATED, None)]),)


def _build_request_view(messages=_MESSAGES, name: str = "pathwatch/otlp_trace_view.proto",
                        package: str = _PACKAGE,
                        root: str = "ExportTraceServiceRequest") -> type:
    file = descriptor_pb2.FileDescriptorProto(name=name, package=package, syntax="proto3")
    for message_name, fields in messages:
        message = file.message_type.add(name=message_name)
        for name, number, type_, label, type_name in fields:
            field = message.field.add(name=name, number=number, type=type_, label=label)
            if type_name:
                field.type_name = f".{package}.{type_name}"
    pool = descriptor_pool.DescriptorPool()  # private pool: no clash with the real OTLP names
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{root}"))


#: ``RequestView.FromString(body)`` parses an ExportTraceServiceRequest body into the view.
RequestView = _build_request_view()
_CountView = _build_request_view(_COUNT_MESSAGES, "pathwatch/otlp_trace_count.proto",
                                 f"{_PACKAGE}.count")
_StatusView = _build_request_view(_STATUS_MESSAGES, "pathwatch/otlp_status_view.proto",
                                  f"{_PACKAGE}.status", "Status")
_KeyValueView = _build_request_view(_KEY_VALUE_MESSAGES, "pathwatch/otlp_key_value_view.proto",
                                    f"{_PACKAGE}.keyvalue", "KeyValue")


def split_key_value(raw: bytes) -> tuple[bytes, bytes]:
    """(key, AnyValue) bytes of a raw KeyValue in any encoding, neither checked for UTF-8: the
    decoder reads the value of a key it knows, as it reads a short one. Raises DecodeError if
    malformed."""
    key_value = _KeyValueView.FromString(raw)
    value = key_value.value
    return key_value.key, value[0] if len(value) == 1 else b"".join(value)


def count_spans(body: bytes) -> tuple[int, int]:
    """(spans, resource_spans + scope_spans) of an ExportTraceServiceRequest body, without building
    the view of its spans. Raises DecodeError if malformed."""
    request = _CountView.FromString(body)
    spans, containers = 0, len(request.resource_spans)
    for resource_spans in request.resource_spans:
        containers += len(resource_spans.scope_spans)
        for scope_spans in resource_spans.scope_spans:
            spans += len(scope_spans.spans)
    return spans, containers

STATUS_CODE_ERROR = 2  # opentelemetry.proto.trace.v1.Status.StatusCode.STATUS_CODE_ERROR
#: the raw Status of a span whose only field is ``code = STATUS_CODE_ERROR`` (what SDKs send)
STATUS_ERROR_ONLY = b"\x18\x02"


def status_is_error(parts) -> bool:
    """Whether a span's raw ``Status`` occurrences (usually one) say STATUS_CODE_ERROR. The status
    is kept as bytes in the view (a sub-message object per span costs more than the whole check);
    occurrences are merged as protobuf merges them (concatenated); anything but the common
    encoding is parsed by a view of the code alone (its message is not read). Raises DecodeError
    if malformed."""
    raw = parts[0] if len(parts) == 1 else b"".join(parts)
    if raw == STATUS_ERROR_ONLY:
        return True
    if not raw:
        return False
    return _StatusView.FromString(raw).code == STATUS_CODE_ERROR
