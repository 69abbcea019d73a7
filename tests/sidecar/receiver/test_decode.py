import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from google.protobuf.internal.encoder import _VarintBytes
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from instrumentation import attributes as A
from sidecar.model import USER_FIELDS, USER_LIST_FIELDS, SpanRecord, keyed_user
from sidecar.receiver import decode as decode_module
from sidecar.receiver.decode import MalformedRequest, SpanDecoder
from tests.sidecar.receiver.otlp_payloads import (any_value, heartbeat_span, make_request, make_span,
                                                  run_spans, user_pseudonym)

TRACE = bytes(range(1, 17))
SPAN = bytes(range(1, 9))


def decode(request, received_ns=7):
    return SpanDecoder().decode(request.SerializeToString(), received_ns)


def test_realistic_run_decodes_every_contract_attribute():
    spans = run_spans(5, random.Random(1))
    batch = decode(make_request(spans))
    assert [s.kind for s in batch.spans] == ["request", "execute"] + ["emit", "deliver"] * 5
    execute = batch.spans[1]
    assert execute.role == "execution_engine"
    assert execute.implementation == "backend.engines.UserExecutionEngine"
    assert execute.function == "backend.engines.UserExecutionEngine.execute_agent"
    assert execute.canonical is True and execute.retired is False and execute.user_scoped is True
    assert execute.user == execute.owner == execute.subject == user_pseudonym(5)
    assert (execute.run_id, execute.thread_id, execute.instance_id) == ("run-5", "thread-5", "inst-5")
    assert execute.caller == "backend.routes.websocket_endpoint"
    assert execute.parent_span_id == batch.spans[0].span_id
    deliver = batch.spans[3]
    assert (deliver.event_type, deliver.event_id) == ("agent_started", "evt-5-0")
    assert (deliver.connection_id, deliver.connection_user) == ("conn-5", user_pseudonym(5))
    assert (deliver.outcome, deliver.link) == ("written", "context")
    assert batch.spans[2].target == user_pseudonym(5)
    assert {(s.service_name, s.service_version, s.service_instance) for s in batch.spans} == {
        ("backend", "1.2.3", "pod-a")}
    assert {s.received_ns for s in batch.spans} == {7}
    assert batch.rejected == 0 and not batch.invalid_attributes


def test_ids_are_lowercase_hex():
    span = make_span({}, trace_id=bytes.fromhex("ABCDEF" + "00" * 13), span_id=b"\xff" * 8,
                     parent_span_id=b"\x0a" * 8)
    record = decode(make_request([span])).spans[0]
    assert record.trace_id == "abcdef" + "00" * 13
    assert record.span_id == "ff" * 8
    assert record.parent_span_id == "0a" * 8


def test_root_span_has_no_parent():
    assert decode(make_request([make_span({})])).spans[0].parent_span_id is None


def test_an_all_zero_parent_span_id_is_a_root_as_in_the_collector():
    # the OpenTelemetry Collector's pdata reads 8 zero bytes as an empty parent (SpanID.IsEmpty)
    batch = decode(make_request([make_span({}, parent_span_id=bytes(8))]))
    assert batch.rejected == 0
    assert batch.spans[0].parent_span_id is None


def test_foreign_span_is_kept_with_route_as_entry_point():
    span = make_span({"http.route": "/api/runs", "http.method": "POST", "http.status_code": 200})
    record = decode(make_request([span])).spans[0]
    assert record.kind is None
    assert record.entry_point == "/api/runs"


@pytest.mark.parametrize("order", [("route", "entry"), ("entry", "route")])
def test_pathwatch_entry_point_wins_over_route_in_any_order(order):
    values = {"route": ("http.route", "/api/{id}"), "entry": (A.ENTRY_POINT, "/ws")}
    span = make_span(dict(values[name] for name in order))
    assert decode(make_request([span])).spans[0].entry_point == "/ws"


@pytest.mark.parametrize("key_id", [None, "0badc0de"])
@pytest.mark.parametrize("order", [("pseudo", "raw"), ("raw", "pseudo")])
def test_the_pseudonym_wins_over_a_raw_enduser_id_in_any_order(order, key_id):
    """An app that follows the semantic conventions sets ``enduser.id`` (its raw id) on the server
    span pathwatch stamped with ``enduser.pseudo.id``: the raw id must not become the ambient user
    (a request user other than its calls' users is a critical bleed.span_vs_root_user)."""
    values = {"pseudo": (A.ENDUSER_PSEUDO_ID, user_pseudonym(1)), "raw": (A.ENDUSER_ID, "alice")}
    key = {} if key_id is None else {A.PSEUDONYM_KEY_ID: key_id}  # stamped on request spans
    span = make_span({A.SPAN_KIND: "request", **key, **dict(values[name] for name in order)})
    expected = user_pseudonym(1) if key_id is None else keyed_user(user_pseudonym(1), key_id)
    decoder = SpanDecoder()
    for _ in range(2):  # the second time from the cache
        assert decoder.decode(make_request([span]).SerializeToString(), 0).spans[0].user == expected


def test_a_raw_enduser_id_alone_is_the_ambient_user():
    """``PATHWATCH_ALLOW_RAW_USER_IDS=1``: the instrumentation writes ``enduser.id`` instead."""
    decoder = SpanDecoder()
    for _ in range(2):
        span = make_span({A.SPAN_KIND: "execute", A.ENDUSER_ID: "alice"})
        assert decoder.decode(make_request([span]).SerializeToString(), 0).spans[0].user == "alice"


def test_span_with_bad_ids_is_rejected_alone():
    good = make_span({A.SPAN_KIND: "execute"}, name="good")
    short_trace = make_span({}, trace_id=b"\x01" * 5, name="short")
    zero_span = make_span({}, span_id=bytes(8), name="zero")
    bad_parent = make_span({}, parent_span_id=b"\x01" * 3, name="parent")
    missing = make_span({}, trace_id=b"", span_id=b"", name="missing")
    batch = decode(make_request([short_trace, good, zero_span, bad_parent, missing]))
    assert [s.name for s in batch.spans] == ["good"]
    assert batch.rejected == 4
    assert "'short'" in batch.rejection and "trace_id must be 16 bytes" in batch.rejection


def test_wrong_value_type_for_known_key_is_ignored_and_counted():
    span = make_span({A.RUN_ID: 42, A.CANONICAL: "yes", A.DISPATCH_WRITES: "3",
                      A.ROLE: "execution_engine", A.SPAN_KIND: "nonsense"})
    batch = decode(make_request([span]))
    record = batch.spans[0]
    assert record.run_id is None and record.canonical is False and record.dispatch_writes is None
    assert record.kind is None
    assert record.role == "execution_engine"
    assert batch.invalid_attributes == {A.RUN_ID: 1, A.CANONICAL: 1, A.DISPATCH_WRITES: 1,
                                        A.SPAN_KIND: 1}


#: the span-id keys that name another span of the trace: (key, record slot, kind of the spans that
#: carry it, kind of the span it names)
SPAN_ID_KEYS = [
    # an emit's execution: the detectors keep it per run
    pytest.param(A.EXECUTION_SPAN_ID, "execution_span_id", "emit", "execute", id="execution"),
    # the request a span ran under: the bleed detector keeps it per request
    pytest.param(A.REQUEST_SPAN_ID, "request_span_id", "deliver", "request", id="request"),
]


@pytest.mark.parametrize("key, slot, kind, named_kind", SPAN_ID_KEYS)
def test_a_named_span_id_is_one_string_with_the_ids_of_that_span(key, slot, kind, named_kind):
    """``pathwatch.execution.span_id`` and ``pathwatch.request.span_id`` name another span of the
    trace: decoded to the same string object as that span's id and its children's parent ids (the
    detectors keep it: no bytes more than the ids they keep anyway), from the request's cache after
    the first."""
    named_id, ids = bytes(range(11, 19)), [bytes([n] * 8) for n in (1, 2)]
    deeper_parent = bytes([7] * 8)  # a span between the named one and the second
    spans = [make_span({A.SPAN_KIND: kind, key: named_id.hex()}, trace_id=TRACE,
                       span_id=ids[0], parent_span_id=named_id, name="first"),
             make_span({A.SPAN_KIND: kind, key: named_id.hex()}, trace_id=TRACE,
                       span_id=ids[1], parent_span_id=deeper_parent, name="deeper"),
             make_span({A.SPAN_KIND: named_kind}, trace_id=TRACE, span_id=named_id, name="named")]
    for order in (spans, spans[::-1]):  # the named span first too (another exporter's order)
        batch = decode(make_request(order))
        by_name = {record.name: record for record in batch.spans}
        first, deeper, named = by_name["first"], by_name["deeper"], by_name["named"]
        assert getattr(first, slot) == getattr(deeper, slot) == named_id.hex()
        assert getattr(first, slot) is getattr(deeper, slot) is named.span_id
        assert first.parent_span_id is named.span_id
        assert getattr(named, slot) is None and not batch.invalid_attributes


@pytest.mark.parametrize("key, slot, kind, named_kind", SPAN_ID_KEYS)
@pytest.mark.parametrize("value", ["ABCDEF0123456789", "abcdef012345678", "abcdef01234567890",
                                   "abcdef012345678g", " abcdef012345678", "0" * 16, "é" * 16,
                                   42, True, b"\x01" * 8])
def test_a_named_span_id_that_is_no_span_id_is_ignored_and_counted(value, key, slot, kind,
                                                                   named_kind):
    # it would name a span that never comes: the emit's copies would wait the longest hold, the
    # work for its request as long as its trace lives
    span = make_span({A.SPAN_KIND: kind, key: value, A.RUN_ID: "r1"})
    decoder = SpanDecoder()
    for _ in range(2):  # never served from a cache
        batch = decoder.decode(make_request([span]).SerializeToString(), 7)
        assert getattr(batch.spans[0], slot) is None and batch.spans[0].run_id == "r1"
        assert batch.invalid_attributes == {key: 1}


@pytest.mark.parametrize("key, slot, kind, named_kind", SPAN_ID_KEYS)
def test_an_empty_named_span_id_is_absent_not_invalid(key, slot, kind, named_kind):
    batch = decode(make_request([make_span({A.SPAN_KIND: kind, key: ""})]))
    assert getattr(batch.spans[0], slot) is None and not batch.invalid_attributes


def test_unknown_attributes_are_ignored_silently():
    batch = decode(make_request([make_span({"custom.thing": [1, 2], "x": 1.5})]))
    assert len(batch.spans) == 1 and not batch.invalid_attributes


def test_long_and_unicode_strings_take_the_general_path():
    long_user = "ü" * 300
    span = make_span({A.ENDUSER_PSEUDO_ID: long_user, A.RUN_ID: "run-✓"})
    record = decode(make_request([span])).spans[0]
    assert (record.user, record.run_id) == (long_user, "run-✓")


def test_overlong_strings_are_ignored_and_counted():
    """The state's bounds count entries: a string kept in them must be bounded too (a 1 MB
    implementation name filled the incident store, the findings ring and /metrics: 2 GB of RSS
    after 200 requests)."""
    limit = decode_module.MAX_STRING_CHARS
    span = make_span({A.IMPLEMENTATION: "m." + "E" * limit, A.ROLE: "r" * limit,
                      A.RUN_ID: "ü" * (limit + 1), A.ENTRY_POINT: "/" * 10**6,
                      A.CALLER: "c" * (10**6), A.HTTP_ROUTE: "/r" * limit})
    request = make_request([span], resource={"service.name": "s" * (limit + 1),
                                             "service.version": "v" * limit})
    batch = decode(request)
    record = batch.spans[0]
    assert record.role == "r" * limit  # at the limit: kept
    assert record.service_version == "v" * limit
    assert (record.implementation, record.run_id, record.entry_point, record.caller,
            record.service_name) == (None,) * 5
    assert batch.invalid_attributes == {A.IMPLEMENTATION: 1, A.RUN_ID: 1, A.ENTRY_POINT: 1,
                                        A.CALLER: 1, A.HTTP_ROUTE: 1, "service.name": 1}


def test_long_span_names_are_not_cached():
    decoder = SpanDecoder()
    for i in range(20):
        name = f"{i}" + "n" * 10**5
        batch = decoder.decode(make_request([make_span(name=name)]).SerializeToString(), 0)
        assert batch.spans[0].name == name[:512]
    assert sum(map(len, decoder._names)) < 10**5


@pytest.mark.parametrize("character", ["n", "é", "\u20ac", "\U0001f600", "\udcff"])
def test_a_long_span_name_is_kept_shortened_to_512_characters(character):
    # the record was kept with its whole name (up to max_message_bytes): the detectors' state and
    # the queue are bounded in spans, not bytes (bleed keeps two spans of each trace whose request
    # has not arrived: 200 requests of 300 KB names took 130 MiB, /tmp/s26_recv/long_span_names.py)
    name = "head:" + character * 10**5
    raw = name.encode("utf-8", "surrogateescape")  # "\udcff": the byte 0xff, not UTF-8
    span_bytes = make_span(name="").SerializeToString() + _length_delimited(5, raw)  # name = 5
    body = _length_delimited(1, _length_delimited(2, _length_delimited(2, span_bytes)))
    (record,) = SpanDecoder().decode(body, 0).spans
    expected = raw.decode("utf-8", "replace")[:512]
    assert record.name == expected and len(record.name) == 512
    assert expected.startswith("head:" + (character if character != "\udcff" else "\ufffd") * 507)
    for short in ("é" * 512, "x" * 512):  # at the limit: whole
        (record,) = decode(make_request([make_span(name=short)])).spans
        assert record.name == short


def test_a_rejected_span_s_long_name_is_shortened_in_the_message():
    batch = decode(make_request([make_span(name="n" * 10**6, trace_id=bytes(16))]))
    assert batch.rejected == 1 and "(1000000 characters)" in batch.rejection
    assert len(batch.rejection) < 1000


def test_large_int_values():
    span = make_span({A.DROPPED_SPANS: 2**40, A.INSTRUMENTATION_ERRORS: 0, A.DISPATCH_WRITES: 3})
    record = decode(make_request([span])).spans[0]
    assert (record.dropped_spans, record.instrumentation_errors, record.dispatch_writes) == (
        2**40, 0, 3)


def test_scope_boundaries_are_recorded_for_the_replay_check():
    """Per ScopeSpans that held spans: where its valid spans end in ``spans``, how many it held (bad
    ids included), and the request's invalid attributes after it (one object while unchanged)."""
    good, bad = make_span({}), make_span({}, span_id=b"\x01")
    typed = make_span({A.RUN_ID: 7})  # a run id of the wrong type
    request = make_request([good, bad])
    request.resource_spans[0].scope_spans.add()  # an empty scope: nothing to know
    second = request.resource_spans.add()
    second.scope_spans.add(spans=[typed, make_span({})])
    second.scope_spans.add(spans=[make_span({})])
    batch = decode(request)
    assert len(batch.spans) == 4 and batch.rejected == 1
    assert [(end, offered) for end, offered, _ in batch.scopes] == [(1, 2), (3, 2), (4, 1)]
    assert batch.scopes[0][2] is None and batch.scopes[1][2] == {A.RUN_ID: 1}
    assert batch.scopes[2][2] is batch.scopes[1][2] and batch.invalid_count == 1
    assert batch.resources == [(1, None), (3, None)]


def test_a_resources_own_invalid_attributes_are_recorded_apart_from_its_scopes():
    """Per ResourceSpans: where its scopes end in ``scopes`` and the invalid attributes after its
    own; a resource's first scope's snapshot then differs from the resource's by the scope's own."""
    request = make_request([make_span({A.RUN_ID: 7})], {"service.name": 42})
    request.resource_spans.add().resource.attributes.add(key="service.version").value.int_value = 1
    batch = decode(request)
    (first_end, first), (second_end, second) = batch.resources
    assert (first_end, second_end) == (1, 1) and first == {"service.name": 1}
    assert batch.scopes[0][2] == {"service.name": 1, A.RUN_ID: 1}
    assert second == {"service.name": 1, A.RUN_ID: 1, "service.version": 1} == batch.invalid_attributes


def test_heartbeats_are_listed_apart():
    batch = decode(make_request([heartbeat_span(3, 1), make_span({A.SPAN_KIND: "emit"})]))
    assert len(batch.spans) == 2
    assert [(h.dropped_spans, h.instrumentation_errors) for h in batch.heartbeats] == [(3, 1)]


def test_a_heartbeats_interval_and_whether_it_is_final_are_decoded():
    """What the sidecar judges a process killed outright by: its interval, and whether this is the
    heartbeat of a clean stop; absent (an older instrumentation) stays None, not false."""
    final = make_span({A.SPAN_KIND: A.SpanKinds.HEARTBEAT, A.HEARTBEAT_INTERVAL_S: 2.5,
                       A.HEARTBEAT_FINAL: True}, name=A.HEARTBEAT_SPAN_NAME)
    periodic = make_span({A.SPAN_KIND: A.SpanKinds.HEARTBEAT, A.HEARTBEAT_INTERVAL_S: 2.5,
                          A.HEARTBEAT_FINAL: False}, name=A.HEARTBEAT_SPAN_NAME)
    batch = decode(make_request([final, periodic, heartbeat_span(0, 0)]))
    assert [(h.heartbeat_interval_s, h.heartbeat_final) for h in batch.heartbeats] == [
        (2.5, True), (2.5, False), (10.0, None)]


def test_error_status_is_decoded():
    assert decode(make_request([make_span({}, error=True)])).spans[0].error is True


@pytest.mark.parametrize("message, code, error", [
    ("boom", Status.STATUS_CODE_ERROR, True), ("", Status.STATUS_CODE_OK, False),
    ("why", Status.STATUS_CODE_UNSET, False), ("", Status.STATUS_CODE_UNSET, False)])
def test_any_status_encoding_is_read(message, code, error):
    request = make_request([make_span({})])
    request.resource_spans[0].scope_spans[0].spans[0].status.CopyFrom(Status(message=message, code=code))
    assert decode(request).spans[0].error is error


def _with_bytes(request, placeholder: bytes, raw: bytes) -> bytes:
    body = request.SerializeToString()
    assert body.count(placeholder) == 1
    return body.replace(placeholder, raw)


def test_a_span_name_that_is_not_utf8_is_read_with_replacement_characters():
    # the Collector passes such names on (its protobuf library does not check UTF-8); no detector
    # reads a name, so one such span must not cost the request's others (400: not retried)
    spans = [make_span({A.RUN_ID: f"run-{i}"}) for i in range(3)]
    spans[1].name = "load-XX"
    batch = SpanDecoder().decode(_with_bytes(make_request(spans), b"load-XX", b"load-\xff\xfe"), 0)
    assert [s.run_id for s in batch.spans] == ["run-0", "run-1", "run-2"]
    assert batch.spans[1].name == "load-\ufffd\ufffd"
    assert batch.rejected == 0


LONG = "." * 200  # a value of 126 bytes or more: two bytes of length, beyond the fast paths
NOT_UTF8 = b"\xff\xfe" * 3  # in place of the placeholder QZXQZX


def _spans_with(key: str, value: object, index: int = 1) -> list:
    """Spans run-0..run-2, span ``index`` with ``key`` set to ``value`` (its run id replaced)."""
    spans = [make_span({A.RUN_ID: f"run-{i}"}) for i in range(3)]
    (spans[index].attributes[0] if key == A.RUN_ID else spans[index].attributes.add(key=key)
     ).value.CopyFrom(any_value(value))
    return spans


@pytest.mark.parametrize("long", [False, True])
@pytest.mark.parametrize("key", [A.RUN_ID, A.ENDUSER_PSEUDO_ID, A.SPAN_KIND])
def test_a_known_attribute_that_is_not_utf8_is_counted_invalid_short_or_long(key, long):
    # a long one failed the whole request (the generated KeyValue refused it), a short one not
    request = make_request(_spans_with(key, "v-QZXQZX" + (LONG if long else "")))
    batch = SpanDecoder().decode(_with_bytes(request, b"QZXQZX", NOT_UTF8), 0)
    assert [s.run_id for s in batch.spans] == [
        "run-0", None if key == A.RUN_ID else "run-1", "run-2"]
    assert batch.invalid_attributes == {key: 1}


@pytest.mark.parametrize("where", ["span", "resource", "scope"])
@pytest.mark.parametrize("key", ["k" * 130, "http.user_agent", "process.command_args"])
def test_another_attribute_that_is_not_utf8_is_ignored_however_long(key, where):
    # e.g. a resource's process.command_line: sent with every span of the process
    value = any_value([LONG, "v-QZXQZX"]) if key == "process.command_args" else "v-QZXQZX" + LONG
    spans = _spans_with(key, value) if where == "span" else _spans_with(A.RUN_ID, "run-1")
    request = make_request(spans, resource={"service.name": "svc",
                                            **({key: value} if where == "resource" else {})},
                           scope={key: value} if where == "scope" else None)
    batch = SpanDecoder().decode(_with_bytes(request, b"QZXQZX", NOT_UTF8), 0)
    assert [(s.run_id, s.service_name) for s in batch.spans] == [
        ("run-0", "svc"), ("run-1", "svc"), ("run-2", "svc")]
    assert not batch.invalid_attributes


def test_a_long_attribute_is_read_as_protobuf_reads_it():
    # as the generated class read it: fields in any order, unknown ones skipped, the key's last
    # occurrence, the value's occurrences merged (the oneof's last member wins)
    key = KeyValue(key=A.RUN_ID).SerializeToString()
    value = KeyValue(value=any_value("r" * 200)).SerializeToString()
    unknown = b"\x18\x05" + b"\x22\x02ab" + b"\x29" + bytes(8) + b"\x35" + bytes(4)
    as_int = KeyValue(value=any_value(7)).SerializeToString()
    for raw in (value + key, key + unknown + value, b"\x0a\x01x" + value + key,
                key + as_int + value, key + value + b"\x12\x00"):
        # sent as they are (a KeyValue of the generated class is written in the canonical order)
        batch = SpanDecoder().decode(_body_with_raw_attribute(raw), 0)
        assert batch.spans[0].run_id == "r" * 200 and not batch.invalid_attributes
    batch = SpanDecoder().decode(_body_with_raw_attribute(key + value + as_int), 0)
    assert batch.spans[0].run_id is None and batch.invalid_attributes == {A.RUN_ID: 1}


def _body_with_raw_attribute(raw: bytes) -> bytes:
    """A request of one span whose attribute is ``raw`` as it is (built from the generated
    classes, a KeyValue would be written in the canonical encoding)."""
    span = make_span({}).SerializeToString() + _length_delimited(9, raw)
    return _length_delimited(1, _length_delimited(2, _length_delimited(2, span)))


@pytest.mark.parametrize("value", ["r", "r" * 200], ids=["short", "long"])
def test_a_key_sent_twice_is_the_last_one_as_protobuf_reads_it(value):
    # the inlined path read the first key alone and skipped the attribute when it was not ours
    run_id = KeyValue(key=A.RUN_ID).SerializeToString()
    other = KeyValue(key="http.method").SerializeToString()
    as_string = KeyValue(value=any_value(value)).SerializeToString()
    as_int = KeyValue(value=any_value(7)).SerializeToString()
    for raw, run, invalid in ((other + run_id + as_string, value, {}),
                              (other + as_string + run_id, value, {}),
                              (other + run_id + as_int, None, {A.RUN_ID: 1}),
                              (run_id + other + as_string, None, {})):  # (the last key: not ours)
        body = _body_with_raw_attribute(raw)
        batch = SpanDecoder().decode(body, 0)
        assert (batch.spans[0].run_id, dict(batch.invalid_attributes)) == (run, invalid)
        assert (batch.spans, dict(batch.invalid_attributes)) == reference_decode(body)[::2]


def test_a_status_message_that_is_not_utf8_is_skipped_and_its_code_read():
    spans = [make_span({A.RUN_ID: f"run-{i}"}) for i in range(2)]
    spans[0].status.CopyFrom(Status(code=Status.STATUS_CODE_ERROR, message="boom-X"))
    batch = SpanDecoder().decode(_with_bytes(make_request(spans), b"boom-X", b"boom-\xff"), 0)
    assert [(s.run_id, s.error) for s in batch.spans] == [("run-0", True), ("run-1", False)]


def test_a_rejected_span_whose_name_is_not_utf8_is_named_in_the_message():
    span = make_span({}, trace_id=b"short")
    span.name = "bad-X"
    batch = SpanDecoder().decode(_with_bytes(make_request([span]), b"bad-X", b"bad-\xff"), 0)
    assert batch.rejected == 1 and "'bad-\ufffd'" in batch.rejection


def test_a_status_sent_in_two_parts_is_merged_as_protobuf_merges_it():
    request = make_request([make_span({})])
    span = request.resource_spans[0].scope_spans[0].spans[0].SerializeToString()
    split = span + b"\x7a\x02\x18\x02" + b"\x7a\x03\x12\x01m"  # {code: ERROR} then {message: "m"}
    body = _reframe(request, split)
    parsed = ExportTraceServiceRequest.FromString(body).resource_spans[0].scope_spans[0].spans[0]
    assert parsed.status.code == Status.STATUS_CODE_ERROR and parsed.status.message == "m"
    assert SpanDecoder().decode(body, 0).spans[0].error is True


def test_malformed_status_is_a_malformed_request():
    request = make_request([make_span({})])
    span = request.resource_spans[0].scope_spans[0].spans[0].SerializeToString()
    broken = span + b"\x7a\x02\x18\x80"  # a status (field 15) whose varint code never ends
    SpanDecoder().decode(_reframe(request, span), 0)  # the framing alone is fine
    with pytest.raises(MalformedRequest, match="status"):
        SpanDecoder().decode(_reframe(request, broken), 0)


def _reframe(request, span_bytes: bytes) -> bytes:
    """The request with its only span replaced by raw ``span_bytes`` (framing rebuilt)."""
    def field(number: int, payload: bytes) -> bytes:
        return _varint(number << 3 | 2) + _varint(len(payload)) + payload
    resource = request.resource_spans[0].resource.SerializeToString()
    scope_spans = field(2, span_bytes)
    resource_spans = field(1, resource) + field(2, scope_spans)
    return field(1, resource_spans)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@pytest.mark.parametrize("body", [b"\xff\xff\xff", b"\x0a\x05abc", b"\x0a\x02\x12\x7f"])
def test_garbage_is_a_malformed_request(body):
    with pytest.raises(MalformedRequest, match="not a protobuf ExportTraceServiceRequest"):
        SpanDecoder().decode(body, 0)


def test_truncated_request_is_malformed():
    body = make_request(run_spans(1, random.Random(3))).SerializeToString()
    with pytest.raises(MalformedRequest):
        SpanDecoder().decode(body[: len(body) // 2], 0)


def test_empty_request_decodes_to_nothing():
    batch = SpanDecoder().decode(b"", 0)
    assert batch.spans == [] and batch.rejected == 0


def test_the_cache_stays_bounded_under_distinct_values():
    decoder = SpanDecoder()
    for chunk in range(3):
        spans = [make_span({A.ROLE: f"role-{chunk}-{i}"}) for i in range(4000)]
        batch = decoder.decode(make_request(spans).SerializeToString(), 0)
        assert [s.role for s in batch.spans] == [f"role-{chunk}-{i}" for i in range(4000)]
        assert len(decoder._cache) <= decode_module._CACHE_LIMIT


def test_cached_values_do_not_leak_between_spans():
    decoder = SpanDecoder()
    first = make_request([make_span({A.ROLE: "a", A.SPAN_KIND: "execute"})]).SerializeToString()
    second = make_request([make_span({A.SPAN_KIND: "emit"})]).SerializeToString()
    decoder.decode(first, 0)
    record = decoder.decode(second, 0).spans[0]
    assert (record.kind, record.role) == ("emit", None)


# --- the fast path changes speed only: compare with a decoder built on the generated classes ---

def reference_decode(body: bytes) -> tuple[list[SpanRecord], int, dict[str, int]]:
    """The obvious decoder: generated OTLP classes, WhichOneof per attribute."""
    request = ExportTraceServiceRequest.FromString(body)
    slots = decode_module._SPAN_SLOTS
    records, rejected, invalid = [], 0, {}
    for resource_spans in request.resource_spans:
        service = {}
        for kv in resource_spans.resource.attributes:
            slot = decode_module._RESOURCE_SLOTS.get(kv.key)
            if (slot and kv.value.WhichOneof("value") == slot[1] and kv.value.string_value
                    and len(kv.value.string_value) <= decode_module.MAX_STRING_CHARS):
                service[slot[0]] = kv.value.string_value
            elif slot:
                invalid[kv.key] = invalid.get(kv.key, 0) + 1
        for scope in resource_spans.scope_spans:
            scope_key = None  # which key made the user ids of its spans, if it names one
            for kv in scope.scope.attributes if scope.spans else ():
                if kv.key == A.PSEUDONYM_KEY_ID:
                    if kv.value.WhichOneof("value") == "string_value" and kv.value.string_value:
                        scope_key = kv.value.string_value
                    elif kv.value.WhichOneof("value") != "string_value":
                        invalid[kv.key] = invalid.get(kv.key, 0) + 1
            for span in scope.spans:
                if (len(span.trace_id) != 16 or len(span.span_id) != 8 or not any(span.trace_id)
                        or not any(span.span_id)
                        or (span.parent_span_id and len(span.parent_span_id) != 8)):
                    rejected += 1
                    continue
                record = SpanRecord(span.trace_id.hex(), span.span_id.hex(),
                                    span.parent_span_id.hex() if any(span.parent_span_id) else None,
                                    span.name,
                                    span.start_time_unix_nano, span.end_time_unix_nano,
                                    error=span.status.code == 2, **service)
                route = raw_user = None
                for kv in span.attributes:
                    if kv.key not in slots:
                        continue
                    field, expected, _ = slots[kv.key]
                    which = kv.value.WhichOneof("value")
                    value = getattr(kv.value, expected)
                    if expected == "array_value":  # user ids: non-empty strings, a few
                        items = list(value.values) if which == expected else []
                        if which == expected and not items:
                            continue  # an empty array means absent
                        if (which != expected or len(items) > A.MAX_CONNECTION_USERS
                                or any(item.WhichOneof("value") != "string_value"
                                       or not item.string_value
                                       or len(item.string_value) > decode_module.MAX_STRING_CHARS
                                       for item in items)):
                            invalid[kv.key] = invalid.get(kv.key, 0) + 1
                        else:
                            setattr(record, field, tuple(item.string_value for item in items))
                        continue
                    if field == decode_module._UNUSED:  # checked as any known one, then skipped
                        if which != expected or (isinstance(value, str)
                                                 and len(value) > decode_module.MAX_STRING_CHARS):
                            invalid[kv.key] = invalid.get(kv.key, 0) + 1
                        continue
                    if which == expected and value == "":
                        continue  # the empty string means absent
                    if (which != expected or (field == "kind" and value not in A.SpanKinds.ALL)
                            or (isinstance(value, str) and len(value) > decode_module.MAX_STRING_CHARS)
                            or (kv.key in (A.EXECUTION_SPAN_ID, A.REQUEST_SPAN_ID)
                                and not re.fullmatch(r"(?!0{16})[0-9a-f]{16}", value))):
                        invalid[kv.key] = invalid.get(kv.key, 0) + 1
                    elif field == "http.route":
                        route = value
                    elif kv.key == A.ENDUSER_ID:  # the pseudonym wins, in any order
                        raw_user = value
                    else:
                        setattr(record, field, value)
                if route is not None and record.entry_point is None:
                    record.entry_point = route
                if raw_user is not None and record.user is None:
                    record.user = raw_user
                key = scope_key or record.user_key  # the scope's, else the span's own
                for field in USER_FIELDS if key is not None else ():
                    if getattr(record, field) is not None:
                        setattr(record, field, keyed_user(getattr(record, field), key))
                for field in USER_LIST_FIELDS if key is not None else ():
                    if getattr(record, field) is not None:
                        setattr(record, field, tuple(keyed_user(user, key)
                                                     for user in getattr(record, field)))
                records.append(record)
    return records, rejected, invalid


KNOWN_KEYS = sorted(decode_module._SPAN_SLOTS) + ["http.method", "other"]
values = st.one_of(
    st.text(max_size=3), st.text(min_size=100, max_size=200),
    st.text(min_size=decode_module.MAX_STRING_CHARS - 1, max_size=decode_module.MAX_STRING_CHARS + 1),
    st.sampled_from(sorted(A.SpanKinds.ALL)),
    st.sampled_from([SPAN.hex(), "ab" * 8, "0" * 16, "AB" * 8]),  # span ids (an emit's execution, a request)
    st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False), st.binary(max_size=5), st.just(None),
    st.lists(st.one_of(st.text(max_size=3), st.integers(0, 3)), max_size=3),  # user id arrays
    st.lists(st.just("u"), min_size=A.MAX_CONNECTION_USERS, max_size=A.MAX_CONNECTION_USERS + 1))


spans_strategy = st.lists(st.tuples(
    st.sampled_from([TRACE, b"", b"\x01" * 15, bytes(16)]),
    st.sampled_from([SPAN, b"", b"\x02" * 9]),
    st.sampled_from([b"", SPAN, b"\x03"]),
    st.lists(st.tuples(st.sampled_from(KNOWN_KEYS), values), max_size=12),
    st.booleans()), max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spans=spans_strategy,
       service=st.sampled_from([None, "svc", 5, "s" * (decode_module.MAX_STRING_CHARS + 1)]),
       scope_key=st.sampled_from([None, "k1", "", 5]))
def test_fast_decoder_matches_the_reference(spans, service, scope_key):
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    if service is not None:
        resource_spans.resource.attributes.append(KeyValue(key="service.name", value=any_value(service)))
    scope = resource_spans.scope_spans.add()
    if scope_key is not None:
        scope.scope.attributes.append(KeyValue(key=A.PSEUDONYM_KEY_ID, value=any_value(scope_key)))
    for trace_id, span_id, parent, attributes, error in spans:
        span = scope.spans.add(trace_id=trace_id, span_id=span_id, parent_span_id=parent, name="s")
        if error:
            span.status.code = 2
        for key, value in attributes:
            span.attributes.append(KeyValue(key=key, value=any_value(value)))
    body = request.SerializeToString()
    decoder = SpanDecoder()
    for _ in range(2):  # the second pass is served from the cache
        batch = decoder.decode(body, 0)
        expected, rejected, invalid = reference_decode(body)
        assert batch.spans == expected
        assert batch.rejected == rejected
        assert dict(batch.invalid_attributes) == invalid


def _length_delimited(number: int, data: bytes) -> bytes:
    return _VarintBytes(number << 3 | 2) + _VarintBytes(len(data)) + data


# AnyValues of every member, nested, with strings and keys about the lengths where a length takes
# one more byte (127/128, 16383/16384) and MAX_STRING_CHARS
_LENGTHS = [0, 1, 125, 126, 127, 128, 511, 512, 513, 16383, 16384]
_leaf_values = st.one_of(
    st.one_of(st.text(max_size=4), st.sampled_from(_LENGTHS).map("x".__mul__),
              st.sampled_from(sorted(A.SpanKinds.ALL)), st.just("é" * 300),
              st.sampled_from([SPAN.hex(), "0" * 16, "AB" * 8])).map(any_value),
    st.booleans().map(any_value), st.integers(-(2**63), 2**63 - 1).map(any_value),
    st.floats(allow_nan=False).map(any_value), st.binary(max_size=200).map(any_value),
    st.just(any_value(None)))
_any_values = st.recursive(_leaf_values, lambda children: st.one_of(
    st.lists(children, max_size=3).map(lambda values: AnyValue(array_value=ArrayValue(values=values))),
    st.lists(st.tuples(st.text(max_size=4), children), max_size=3).map(lambda pairs: AnyValue(
        kvlist_value=KeyValueList(values=[KeyValue(key=k, value=v) for k, v in pairs])))),
    max_leaves=6)
_raw_keys = st.one_of(st.sampled_from(KNOWN_KEYS + [""]),
                      st.sampled_from([126, 127, 128, 16383, 16384]).map("k".__mul__))
_unknown_fields = st.sampled_from([b"", b"\x18\x05", b"\x22\x03abc", b"\x3d" + bytes(4)])


@st.composite
def _raw_key_values(draw) -> bytes:
    """A KeyValue's bytes in any encoding protobuf reads: fields in any order, unknown ones, the
    key sent twice (the last one counts), the value sent in two parts (merged), no value."""
    key = _length_delimited(1, draw(_raw_keys).encode())
    value = _length_delimited(2, draw(_any_values).SerializeToString() + draw(_unknown_fields))
    return draw(st.sampled_from([
        key + value, value + key, draw(_unknown_fields) + key + value,
        key + value + draw(_unknown_fields), _length_delimited(1, draw(_raw_keys).encode()) + key + value,
        key + _length_delimited(2, b"") + value, key]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spans=st.lists(st.lists(_raw_key_values(), max_size=6), min_size=1, max_size=3),
       resource=st.lists(_raw_key_values(), max_size=3))
def test_fast_decoder_matches_the_reference_in_any_encoding(spans, resource):
    span_bytes = [_length_delimited(1, TRACE) + _length_delimited(2, SPAN) + _length_delimited(5, b"s")
                  + b"".join(_length_delimited(9, raw) for raw in attributes) for attributes in spans]
    scope = b"".join(_length_delimited(2, span) for span in span_bytes)
    body = _length_delimited(1, _length_delimited(1, b"".join(
        _length_delimited(1, raw) for raw in resource)) + _length_delimited(2, scope))
    decoder = SpanDecoder()
    for _ in range(2):  # the second pass is served from the cache
        batch = decoder.decode(body, 0)
        expected, _, invalid = reference_decode(body)
        assert batch.spans == expected
        assert dict(batch.invalid_attributes) == invalid


def _scoped(spans_by_key: list[tuple[str | None, list]]) -> ExportTraceServiceRequest:
    """One resource, a scope per (key id named on the scope or None, its spans)."""
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
    from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans

    request = make_request([])
    del request.resource_spans[0].scope_spans[:]
    for key_id, spans in spans_by_key:
        attributes = [] if key_id is None else [KeyValue(key=A.PSEUDONYM_KEY_ID, value=any_value(key_id))]
        request.resource_spans[0].scope_spans.append(ScopeSpans(
            scope=InstrumentationScope(name="pathwatch", version="1", attributes=attributes),
            spans=spans))
    return request


def test_user_ids_are_marked_with_the_key_their_scope_names():
    """The same pseudonym bytes under two keys (spans started before and after a key rotation, in
    one export) are two ids; under no key, the id as it is."""
    user = user_pseudonym(3)
    ids = {A.ENDUSER_PSEUDO_ID: user, A.USER_OWNER: user, A.USER_SUBJECT: user, A.USER_TARGET: user,
           A.CONNECTION_USER: user}
    span = lambda: make_span({A.SPAN_KIND: "execute", A.RUN_ID: "run-3", **ids})  # noqa: E731
    batch = decode(_scoped([("aaaa0001", [span(), span()]), ("bbbb0002", [span()]), (None, [span()])]))
    fields = ("user", "owner", "subject", "target", "connection_user")
    assert [{getattr(s, f) for f in fields} for s in batch.spans] == [
        {keyed_user(user, "aaaa0001")}, {keyed_user(user, "aaaa0001")}, {keyed_user(user, "bbbb0002")},
        {user}]
    assert {s.run_id for s in batch.spans} == {"run-3"}  # no other attribute is marked
    assert batch.spans[0].user is batch.spans[1].user  # cached per key: one string per id
    assert not batch.invalid_attributes


def test_a_request_span_marks_its_users_with_its_own_key_attribute():
    user = user_pseudonym(4)
    request = make_span({A.SPAN_KIND: "request", A.ENDUSER_PSEUDO_ID: user, A.PSEUDONYM_KEY_ID: "cccc0003"})
    before = make_span({A.SPAN_KIND: "request", A.PSEUDONYM_KEY_ID: "cccc0003", A.ENDUSER_PSEUDO_ID: user})
    batch = decode(_scoped([(None, [request, before])]))
    assert [(s.user, s.user_key) for s in batch.spans] == [(keyed_user(user, "cccc0003"), "cccc0003")] * 2


def test_a_socket_request_span_lists_its_users_marked_with_its_key():
    """``pathwatch.connection.users``: every user a socket had (a logout and a login as another
    user), on its request span, marked as its other user ids are."""
    alice, bob = user_pseudonym(5), user_pseudonym(6)
    request = make_span({A.SPAN_KIND: "request", A.ENDUSER_PSEUDO_ID: bob, A.PSEUDONYM_KEY_ID: "dddd0004",
                         A.CONNECTION_USERS: [alice, bob]})
    unkeyed = make_span({A.SPAN_KIND: "request", A.CONNECTION_USERS: (alice,)})
    batch = decode(_scoped([(None, [request, unkeyed]), ("eeee0005", [unkeyed])]))
    assert [s.connection_users for s in batch.spans] == [
        (keyed_user(alice, "dddd0004"), keyed_user(bob, "dddd0004")), (alice,),
        (keyed_user(alice, "eeee0005"),)]
    assert not batch.invalid_attributes


def test_a_request_span_says_it_lists_only_some_of_its_users():
    """``pathwatch.connection.users_truncated``: the socket had more users than it lists."""
    alice = user_pseudonym(5)
    truncated = make_span({A.SPAN_KIND: "request", A.CONNECTION_USERS: [alice],
                           A.CONNECTION_USERS_TRUNCATED: True})
    whole = make_span({A.SPAN_KIND: "request", A.CONNECTION_USERS: [alice]})
    wrong = make_span({A.SPAN_KIND: "request", A.CONNECTION_USERS_TRUNCATED: "yes"})
    batch = decode(make_request([truncated, whole, wrong]))
    assert [s.connection_users_truncated for s in batch.spans] == [True, False, False]
    assert batch.invalid_attributes == {A.CONNECTION_USERS_TRUNCATED: 1}


def test_an_execute_span_says_its_task_was_cancelled():
    """``pathwatch.cancelled``: the app stopped the run (docs/rules.md, missing required events)."""
    cancelled = make_span({A.SPAN_KIND: "execute", A.RUN_ID: "r1", A.CANCELLED: True})
    ran = make_span({A.SPAN_KIND: "execute", A.RUN_ID: "r2"})
    wrong = make_span({A.SPAN_KIND: "execute", A.RUN_ID: "r3", A.CANCELLED: "yes"})
    batch = decode(make_request([cancelled, ran, wrong]))
    assert [s.cancelled for s in batch.spans] == [True, False, False]
    assert batch.invalid_attributes == {A.CANCELLED: 1}


@pytest.mark.parametrize("value", [[""], [1], ["u"] * (A.MAX_CONNECTION_USERS + 1), "alice", ["x" * 513]])
def test_a_users_list_that_is_not_a_few_user_ids_is_ignored_and_counted(value):
    batch = decode(make_request([make_span({A.SPAN_KIND: "request", A.CONNECTION_USERS: value})]))
    assert batch.spans[0].connection_users is None
    assert batch.invalid_attributes == {A.CONNECTION_USERS: 1}


def test_a_scope_key_of_the_wrong_type_is_ignored_and_counted():
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope

    request = _scoped([(None, [make_span({A.SPAN_KIND: "execute", A.ENDUSER_PSEUDO_ID: "u1"})])])
    request.resource_spans[0].scope_spans[0].scope.CopyFrom(InstrumentationScope(
        attributes=[KeyValue(key=A.PSEUDONYM_KEY_ID, value=any_value(7))]))
    batch = decode(request)
    assert batch.spans[0].user == "u1"
    assert batch.invalid_attributes == {A.PSEUDONYM_KEY_ID: 1}
