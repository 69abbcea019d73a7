"""OTLP/JSON -> the protobuf body the decoder reads (sidecar/receiver/otlp_json.py): the JSON
Protobuf Encoding of the OTLP specification, its errors, and one decoder for both encodings."""

import json
import math
import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from instrumentation import attributes as A
from sidecar.model import keyed_user
from sidecar.receiver import otlp_json as otlp_json_module
from sidecar.receiver.decode import MalformedRequest, SpanDecoder
from sidecar.receiver.otlp_json import json_to_protobuf
from tests.sidecar.receiver.otlp_payloads import (any_value, heartbeat_span, make_request,
                                                  make_span, otlp_json, otlp_json_document,
                                                  run_spans)

TRACE_HEX = "5B8EFFF798038103D269B633813FC60C"  # the specification's example, upper case
SPAN_HEX = "eee19b7ec3c1b174"
PARENT_HEX = "0102030405060708"


def decode_json(document) -> "DecodedBatch":  # noqa: F821
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    return SpanDecoder().decode(json_to_protobuf(body).body, 0)


def request_of(*spans: dict, resource: dict | None = None) -> dict:
    resource_spans = {"scopeSpans": [{"scope": {"name": "js"}, "spans": list(spans)}]}
    if resource is not None:
        resource_spans["resource"] = resource
    return {"resourceSpans": [resource_spans]}


def span_of(**fields) -> dict:
    return {"traceId": TRACE_HEX, "spanId": SPAN_HEX, "name": "s", **fields}


def string_attribute(key: str, value: str) -> dict:
    return {"key": key, "value": {"stringValue": value}}


def malformed(document) -> str:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    with pytest.raises(MalformedRequest) as raised:
        json_to_protobuf(body)
    return str(raised.value)


# --- the mapping ---

def test_a_span_in_lower_camel_case_with_hex_ids_decodes():
    (record,) = decode_json(request_of(
        span_of(parentSpanId=PARENT_HEX, kind=2, startTimeUnixNano="1700000000000000000",
                endTimeUnixNano="1700000000001000000", status={"code": 2},
                attributes=[string_attribute(A.SPAN_KIND, "emit"),
                            string_attribute(A.RUN_ID, "run-1"),
                            {"key": A.DISPATCH_WRITES, "value": {"intValue": "3"}},
                            {"key": A.CANONICAL, "value": {"boolValue": True}}]),
        resource={"attributes": [string_attribute("service.name", "js-backend")]})).spans
    assert (record.trace_id, record.span_id, record.parent_span_id) == (
        TRACE_HEX.lower(), SPAN_HEX, PARENT_HEX)
    assert (record.start_ns, record.end_ns) == (1_700_000_000_000_000_000, 1_700_000_000_001_000_000)
    assert (record.kind, record.run_id, record.dispatch_writes, record.canonical) == (
        "emit", "run-1", 3, True)
    assert record.error is True and record.service_name == "js-backend"


def test_the_key_a_scope_names_marks_its_user_ids_as_in_protobuf():
    document = request_of(span_of(attributes=[string_attribute(A.SPAN_KIND, "execute"),
                                              string_attribute(A.ENDUSER_PSEUDO_ID, "u1")]))
    document["resourceSpans"][0]["scopeSpans"][0]["scope"]["attributes"] = [
        string_attribute(A.PSEUDONYM_KEY_ID, "abcd1234")]
    (record,) = decode_json(document).spans
    assert record.user == keyed_user("u1", "abcd1234")


def test_ids_are_case_insensitive_hex():
    lower, upper, mixed = (decode_json(request_of(span_of(traceId=t))).spans[0].trace_id
                           for t in (TRACE_HEX.lower(), TRACE_HEX.upper(), "5b8EfFf798038103d269B633813fc60C"))
    assert lower == upper == mixed == TRACE_HEX.lower()


def test_the_original_snake_case_names_are_accepted_too():
    (record,) = decode_json({"resource_spans": [{"scope_spans": [{"spans": [{
        "trace_id": TRACE_HEX, "span_id": SPAN_HEX, "parent_span_id": PARENT_HEX, "name": "s",
        "start_time_unix_nano": 5, "status": {"code": 2},
        "attributes": [{"key": A.RUN_ID, "value": {"string_value": "run-9"}},
                       {"key": A.DISPATCH_WRITES, "value": {"int_value": 4}}]}]}]}]}).spans
    assert (record.parent_span_id, record.start_ns, record.run_id, record.dispatch_writes,
            record.error) == (PARENT_HEX, 5, "run-9", 4, True)


@pytest.mark.parametrize("written", ["1700000000000000000", 1700000000000000000,
                                     "18446744073709551615"])
def test_64_bit_integers_as_strings_or_numbers(written):
    (record,) = decode_json(request_of(span_of(startTimeUnixNano=written))).spans
    assert record.start_ns == int(written)


def test_enums_as_integers_and_as_names():
    as_int = decode_json(request_of(span_of(status={"code": 2}, kind=3))).spans[0]
    as_name = decode_json(request_of(span_of(status={"code": "STATUS_CODE_ERROR"},
                                             kind="SPAN_KIND_CLIENT"))).spans[0]
    assert as_int.error is as_name.error is True


def test_unknown_fields_are_ignored_at_every_level():
    (record,) = decode_json({
        "resourceSpans": [{"resource": {"attributes": [string_attribute("service.name", "svc")],
                                        "futureField": [1, 2]},
                           "scopeSpans": [{"spans": [span_of(
                               attributes=[{"key": A.RUN_ID, "value": {"stringValue": "r"},
                                            "comment": "x"}],
                               newInV2={"nested": True})], "extra": None}],
                           "someday": "x"}],
        "topLevelUnknown": {"a": 1}}).spans
    assert (record.service_name, record.run_id) == ("svc", "r")


def test_null_is_the_default_value():
    (record,) = decode_json(request_of(span_of(parentSpanId=None, name=None, attributes=None,
                                               status=None))).spans
    assert (record.parent_span_id, record.name, record.error) == (None, "", False)


def test_an_empty_request_and_empty_lists_decode_to_nothing():
    assert decode_json({}).spans == []
    assert decode_json({"resourceSpans": []}).spans == []
    assert decode_json({"resourceSpans": [{"scopeSpans": [{"spans": []}]}]}).spans == []


def test_events_links_and_the_other_span_fields_are_read_and_do_not_matter():
    (record,) = decode_json(request_of(span_of(
        traceState="k=v", flags=257, droppedAttributesCount=1, droppedEventsCount=2,
        droppedLinksCount=3,
        events=[{"timeUnixNano": "5", "name": "exception",
                 "attributes": [string_attribute("exception.message", "boom")]}],
        links=[{"traceId": TRACE_HEX, "spanId": PARENT_HEX, "traceState": "", "flags": 1},
               {"traceId": "not hex", "spanId": "0102"}]))).spans
    assert record.span_id == SPAN_HEX


def test_link_ids_are_hex_too():
    link_span = span_of(links=[{"traceId": TRACE_HEX, "spanId": PARENT_HEX}])
    request = ExportTraceServiceRequest.FromString(
        json_to_protobuf(json.dumps(request_of(link_span)).encode()).body)
    (link,) = request.resource_spans[0].scope_spans[0].spans[0].links
    assert (link.trace_id.hex(), link.span_id.hex()) == (TRACE_HEX.lower(), PARENT_HEX)


def test_bytes_values_stay_base64_as_the_protobuf_mapping_says():
    # only trace and span ids are hex in OTLP/JSON; an attribute's bytesValue is base64
    request = ExportTraceServiceRequest.FromString(json_to_protobuf(json.dumps(request_of(span_of(
        attributes=[{"key": "b", "value": {"bytesValue": "AQID"}}]))).encode()).body)
    assert request.resource_spans[0].scope_spans[0].spans[0].attributes[0].value.bytes_value == b"\x01\x02\x03"


def test_a_charset_parameter_and_utf8_text_are_read():
    (record,) = decode_json(json.dumps(request_of(span_of(
        attributes=[string_attribute(A.RUN_ID, "rün-ü ✓")])), ensure_ascii=False).encode()).spans
    assert record.run_id == "rün-ü ✓"


# --- a lone surrogate ("\ud800"): JSON can write it, UTF-8 cannot; one such string must not cost
# the request's other spans (a 400 is not retried) ---

def three_runs(**fields) -> dict:
    """Spans run-0, run-1, run-2; ``fields`` replace the middle one's."""
    spans = [span_of(spanId=f"{i + 1:016x}", attributes=[string_attribute(A.RUN_ID, f"run-{i}")])
             for i in range(3)]
    spans[1].update(fields)
    return request_of(*spans)


@pytest.mark.parametrize("escape", [True, False])  # "\ud800", or its bytes (json.loads reads both)
def test_a_span_name_with_a_lone_surrogate_is_read_with_a_replacement_character(escape):
    body = json.dumps(three_runs(name="role.\ud800m\udc00"), ensure_ascii=escape).encode(
        "utf-8", "surrogatepass")
    batch = decode_json(body)
    assert [s.run_id for s in batch.spans] == ["run-0", "run-1", "run-2"]
    assert batch.spans[1].name == "role.\ufffdm\ufffd"
    assert not batch.invalid_attributes and not batch.rejected


def test_text_no_detector_reads_with_a_lone_surrogate_is_accepted():
    batch = decode_json(three_runs(
        status={"code": 2, "message": "boom \ud800"},
        attributes=[string_attribute(A.RUN_ID, "run-1"), string_attribute("http.user_agent", "\ud800"),
                    string_attribute("k\udfff", "v"),
                    {"key": "list", "value": {"arrayValue": {"values": [{"stringValue": "\ud800"}]}}}],
        events=[{"name": "exception \ud800", "timeUnixNano": "1"}]))
    assert [(s.run_id, s.error) for s in batch.spans] == [
        ("run-0", False), ("run-1", True), ("run-2", False)]
    assert not batch.invalid_attributes


@pytest.mark.parametrize("key", [A.RUN_ID, A.ENDUSER_PSEUDO_ID, A.USER_OWNER, A.SPAN_KIND])
def test_a_value_pathwatch_reads_with_a_lone_surrogate_is_counted_invalid(key):
    # as a protobuf string that is not UTF-8 is: the span kept, the value not taken
    batch = decode_json(three_runs(attributes=[string_attribute(A.RUN_ID, "run-1"),
                                               string_attribute(key, "u-\ud800" * 100)]))
    assert [s.run_id for s in batch.spans] == ["run-0", "run-1", "run-2"]
    assert batch.invalid_attributes == {key: 1}
    assert SpanDecoder().decode(json_to_protobuf(json.dumps(three_runs(attributes=[
        string_attribute(key, "u-\ud800")])).encode()).body, 0).invalid_attributes == {key: 1}


def test_a_resources_service_name_with_a_lone_surrogate_is_counted_invalid():
    batch = decode_json(request_of(span_of(), resource={
        "attributes": [string_attribute("service.name", "svc\ud800")]}))
    assert len(batch.spans) == 1 and batch.spans[0].service_name is None
    assert batch.invalid_attributes == {"service.name": 1}


SURROGATES = three_runs(name="n\ud800", status={"code": 2, "message": "\ud800"},
                        attributes=[string_attribute(A.RUN_ID, "run-\ud800"),
                                    string_attribute("free\ud800", "\udc00")])


@pytest.mark.parametrize("unusual", [
    {},  # the fast encoder's
    {"kind": "SPAN_KIND_SERVER"},  # an enum name: the parser's
    {"attributes": [string_attribute(A.RUN_ID, "run-0"),
                    {"key": "b", "value": {"bytesValue": "AQID"}}]},  # the parser's
    {"unknown\ud800": {"x\udc00": ["y\ud800", {"stringValue": "\ud800"}]}},
])
def test_lone_surrogates_are_read_alike_by_the_fast_encoder_and_the_parser(unusual):
    document = json.loads(json.dumps(SURROGATES))
    document["resourceSpans"][0]["scopeSpans"][0]["spans"][0].update(unusual)
    body = json.dumps(document).encode()
    assert_encoded_alike(body)
    assert parsed_encoding(body) is not None
    batch = decode_json(body)
    assert [s.run_id for s in batch.spans] == ["run-0", None, "run-2"]
    assert batch.spans[1].name == "n\ufffd" and batch.spans[1].error
    assert batch.invalid_attributes == {A.RUN_ID: 1}


@pytest.mark.parametrize("fields", [{"kind": "\ud800"}, {"status": {"code": "STATUS_CODE_\ud800"}}])
def test_an_enum_name_with_a_lone_surrogate_is_an_unknown_name(fields):
    # ignored as any unknown enum name is (upb's lookup of it raised SystemError: a 503 once, then
    # a 400 for the whole request)
    assert decode_json(request_of(span_of(**fields))).spans == decode_json(request_of(span_of(
        **{name: ({"code": "STATUS_CODE_OTHER"} if name == "status" else "OTHER")
           for name in fields}))).spans


# --- ids: a bad id rejects its span, as a bad binary id does ---

@pytest.mark.parametrize("fields, expected", [
    ({"traceId": "zz" * 16}, "traceId must be 32 hex digits, not all zero; got 'zzzz"),
    ({"traceId": TRACE_HEX[:-1]}, "traceId must be 32 hex digits, not all zero; got '5B8E"),
    ({"traceId": TRACE_HEX[:-2]}, "traceId must be 32 hex digits"),
    ({"traceId": "00" * 16}, "traceId must be 32 hex digits, not all zero; got '0000"),
    ({"traceId": ""}, "traceId must be 32 hex digits"),
    ({"traceId": None}, "traceId must be 32 hex digits, not all zero; got nothing"),
    ({"traceId": " " + TRACE_HEX[1:]}, "traceId must be"),  # no whitespace, unlike bytes.fromhex
    ({"traceId": "W47/95gDgQPSabYzgT/GDA=="}, "traceId must be"),  # the same id in base64: not hex
    ({"spanId": "EEE19B7EC3C1B17"}, "spanId must be 16 hex digits, not all zero"),
    ({"spanId": "0000000000000000"}, "spanId must be 16 hex digits, not all zero"),
    ({"spanId": "eee19b7ec3c1b174ff"}, "spanId must be 16 hex digits"),
    ({"parentSpanId": "xyz"}, "parentSpanId must be empty or 16 hex digits; got 'xyz'"),
    ({"parentSpanId": "0102"}, "parentSpanId must be empty or 16 hex digits; got '0102'"),
    ({"spanId": "\ud800" * 16}, "spanId must be 16 hex digits, not all zero; got '\\ud800"),
])
def test_a_bad_id_rejects_its_span_alone(fields, expected):
    good = span_of(name="good")
    bad = {**span_of(name="bad"), **fields}
    if fields.get("traceId", "") is None:
        del bad["traceId"]
    converted = json_to_protobuf(json.dumps(request_of(good, bad, dict(good, spanId=PARENT_HEX))).encode())
    batch = SpanDecoder().decode(converted.body, 0)
    assert [s.name for s in batch.spans] == ["good", "good"]
    assert batch.rejected == 1
    assert converted.first_id_problem.startswith("resourceSpans[0].scopeSpans[0].spans[1] 'bad': ")
    assert expected in converted.first_id_problem


@pytest.mark.parametrize("parent", ["00" * 8, "", None])
def test_a_zero_or_empty_parent_is_a_root_as_in_protobuf(parent):
    (record,) = decode_json(request_of(span_of(parentSpanId=parent))).spans
    assert record.parent_span_id is None


def test_the_first_problem_is_the_decoders_first_rejected_span():
    spans = [span_of(name="a"), span_of(name="b", spanId="01"), span_of(name="c", traceId="x")]
    converted = json_to_protobuf(json.dumps(request_of(*spans)).encode())
    assert converted.first_id_problem.startswith("resourceSpans[0].scopeSpans[0].spans[1] 'b': spanId")
    assert SpanDecoder().decode(converted.body, 0).rejected == 2


def test_a_rejected_spans_long_name_is_shortened_in_the_message_as_in_protobuf():
    # it was quoted whole: a 1 MB name made a 1 MB partialSuccess.errorMessage, which exporters log
    name = "n" * 10**6
    converted = json_to_protobuf(json.dumps(request_of(span_of(name=name, traceId="x"))).encode())
    assert len(converted.first_id_problem) < 1000
    assert f"spans[0] {'n' * 512!r}... (1000000 characters): traceId" in converted.first_id_problem
    protobuf = SpanDecoder().decode(make_request([make_span(name=name, trace_id=b"x")])
                                    .SerializeToString(), 0)
    assert f"span {'n' * 512!r}... (1000000 characters): trace_id" in protobuf.rejection


def test_a_very_long_bad_id_is_shortened_in_the_message():
    converted = json_to_protobuf(json.dumps(request_of(span_of(traceId="q" * 100_000))).encode())
    assert len(converted.first_id_problem) < 200


# --- malformed: the request rejected whole, with the path of what is wrong ---

SPANS = "resourceSpans[0].scopeSpans[0].spans"


@pytest.mark.parametrize("body, expected", [
    (b"", "malformed JSON: Expecting value: line 1 column 1"),
    (b"{", "malformed JSON: Expecting property name"),
    (b'{"resourceSpans": []} trailing', "malformed JSON: Extra data"),
    (b"\x0a\x04\x12\x02\x12\x00", "malformed JSON"),  # a protobuf body labelled JSON
    (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "\xff"}]}]}]}', "not UTF-8"),
    # json.loads reads UTF-16 and UTF-32 too (found by their BOM or zero bytes): they were accepted
    *((json.dumps(request_of(span_of())).encode(encoding), "not UTF-8 text (it reads as UTF-")
      for encoding in ("utf-16", "utf-16-le", "utf-16-be", "utf-32")),
    (b"NaN", "malformed JSON: NaN is not a JSON value"),
    (b"[" * 100_000, "malformed JSON: nested too deeply"),
    (b"1" * 5000, "malformed JSON"),  # an integer literal too long for Python to convert
    (b"[]", "the body must be a JSON object (an ExportTraceServiceRequest), got an array"),
    (b"null", "got null"),
    (b'"resourceSpans"', "got a string"),
])
def test_bodies_that_are_no_json_object_are_malformed(body, expected):
    assert expected in malformed(body)


@pytest.mark.parametrize("document, path, detail", [
    (request_of(span_of(startTimeUnixNano="soon")), f"{SPANS}[0].startTimeUnixNano", "soon"),
    (request_of(span_of(startTimeUnixNano=1.5)), f"{SPANS}[0].startTimeUnixNano", "1.5"),
    (request_of(span_of(endTimeUnixNano=-1)), f"{SPANS}[0].endTimeUnixNano", "out of range"),
    (request_of(span_of(endTimeUnixNano=str(2**64))), f"{SPANS}[0].endTimeUnixNano", ""),
    (request_of(span_of(), span_of(name=5)), f"{SPANS}[1].name", ""),
    (request_of(span_of(), span_of(attributes=[{"key": "a", "value": {"intValue": "x"}}])),
     f"{SPANS}[1].attributes[0].value.intValue", "invalid literal for int()"),  # not quoted: below
    (request_of(span_of(attributes=[string_attribute("a", "b"), {"key": 5}])),
     f"{SPANS}[0].attributes[1].key", ""),
    (request_of(span_of(attributes=[{"key": "a", "value": {"stringValue": "x", "intValue": 1}}])),
     f"{SPANS}[0].attributes[0].value", "multiple"),
    (request_of(span_of(attributes={"key": "a"})), f"{SPANS}[0].attributes",
     "must be an array, got an object"),
    (request_of(span_of(status={"code": 2, "message": 5})), f"{SPANS}[0].status.message", ""),
    (request_of(span_of(attributes=[{"key": "d", "value": {"doubleValue": 10**400}}])),
     f"{SPANS}[0].attributes[0].value.doubleValue", "too large"),  # the parser's OverflowError
    (request_of(span_of(traceId=5)), f"{SPANS}[0].traceId", "expected a hex string, got a number"),
    (request_of(span_of(spanId=["01"])), f"{SPANS}[0].spanId", "expected a hex string, got an array"),
    (request_of(span_of(links=[{"traceId": True}])), f"{SPANS}[0].links[0].traceId",
     "expected a hex string, got a boolean"),
    (request_of(span_of(), None), f"{SPANS}[1]", "expected an object, got null"),
    (request_of(span_of(), []), f"{SPANS}[1]", "expected an object, got an array"),
    (request_of(span_of(links=[""])), f"{SPANS}[0].links[0]", "expected an object, got a string"),
    ({"resourceSpans": [{"scopeSpans": [5]}]}, "resourceSpans[0].scopeSpans[0]", "got a number"),
    ({"resourceSpans": [[]]}, "resourceSpans[0]", "expected an object, got an array"),
    ({"resourceSpans": [{"scopeSpans": "x"}]}, "resourceSpans[0].scopeSpans", "must be an array, got x"),
    ({"resourceSpans": {}}, "resourceSpans", "must be an array"),
    ({"resourceSpans": [], "resource_spans": []}, "", "field resourceSpans given twice"),
    ({"resourceSpans": [{"scopeSpans": [], "scope_spans": []}]}, "resourceSpans[0]",
     "field scopeSpans given twice (as scopeSpans and scope_spans)"),
    (request_of(span_of(traceId=TRACE_HEX, trace_id=TRACE_HEX)), f"{SPANS}[0]",
     "field traceId given twice"),
    (request_of(span_of(links=[{"spanId": SPAN_HEX, "span_id": SPAN_HEX}])),
     f"{SPANS}[0].links[0]", "field spanId given twice"),
    ({"resourceSpans": [{"resource": {"attributes": [{"key": "service.name",
                                                      "value": {"boolValue": "yes"}}]}}]},
     "resourceSpans[0].resource.attributes[0].value.boolValue", ""),
])
def test_a_wrong_typed_field_is_malformed_and_named_by_its_path(document, path, detail):
    message = malformed(document)
    assert message.startswith(f"{path}: " if path else ""), message
    assert detail in message


USER_ID = "alice@example.com"


@pytest.mark.parametrize("document, path, detail", [
    # attributes written as an object, as a client made by hand may: every key and value in it
    (request_of(span_of(attributes={"enduser.id": USER_ID})), f"{SPANS}[0].attributes",
     "must be an array, got an object"),
    (request_of(span_of(), resource={"attributes": {"enduser.id": USER_ID}}),
     "resourceSpans[0].resource.attributes", "must be an array, got an object"),
    (request_of(span_of(events=[{"name": "login", "attributes": f"enduser.id={USER_ID}"}])),
     f"{SPANS}[0].events[0].attributes", "must be an array, got a string"),
    (request_of(span_of(links=[{"traceId": TRACE_HEX, "spanId": SPAN_HEX,
                                "attributes": {"enduser.id": USER_ID}}])),
     f"{SPANS}[0].links[0].attributes", "must be an array, got an object"),
    ({"resource_spans": [{"scope_spans": [{"scope": {"attributes": {"enduser.id": USER_ID}}}]}]},
     "resource_spans[0].scope_spans[0].scope.attributes", "must be an array, got an object"),
    # a value of the wrong member: the parser's message quotes it
    (request_of(span_of(attributes=[{"key": "enduser.id", "value": {"intValue": USER_ID}}])),
     f"{SPANS}[0].attributes[0].value.intValue", "invalid literal for int() with base 10"),
    (request_of(span_of(attributes=[{"key": "enduser.id", "value": {"doubleValue": USER_ID}}])),
     f"{SPANS}[0].attributes[0].value.doubleValue", "Couldn't parse float"),
    (request_of(span_of(attributes=[{"key": "user", "value": {"arrayValue": {"values": USER_ID}}}])),
     f"{SPANS}[0].attributes[0].value.arrayValue.values", "must be an array, got a string"),
    (request_of(span_of(attributes=[{"key": "user", "value": {"kvlistValue": {"values": [
        {"key": "id", "value": {"intValue": USER_ID}}]}}}])),
     f"{SPANS}[0].attributes[0].value", "invalid literal for int() with base 10"),
])
def test_a_malformed_attribute_is_named_by_its_path_never_by_its_value(document, path, detail):
    """The message is the 400's answer, which the client's exporter may log (a Collector in front
    does), and an attribute's value may be a user id in clear (``enduser.id`` from another SDK):
    its path and what is wrong, by JSON type, never the value."""
    message = malformed(document)
    assert message == f"{path}: {detail}"
    assert "alice" not in message


@pytest.mark.parametrize("kind", [2, "SPAN_KIND_SERVER"], ids=["fast way", "parser's way"])
@pytest.mark.parametrize("literal", [b"1e400", b"-1e400", b"2e308"])
def test_a_double_literal_beyond_a_doubles_range_is_malformed_either_way(kind, literal):
    # json.loads reads it as infinity, which the fast encoder wrote as such, where the parser (the
    # reference) refuses it, as it refuses 10**400: which a body met depended on its other fields
    document = request_of(span_of(), span_of(kind=kind, attributes=[
        {"key": "d", "value": {"doubleValue": "LITERAL"}}]))
    message = malformed(json.dumps(document).encode().replace(b'"LITERAL"', literal))
    assert message.startswith(f"{SPANS}[1].attributes[0].value.doubleValue: "), message
    assert "value too large" in message or "value too small" in message


def twice(document: dict, key: str) -> bytes:
    """The document as JSON with its "DUP" keys written as ``key``: a key given twice."""
    body = json.dumps(document).encode()
    assert b'"DUP"' in body
    return body.replace(b'"DUP"', json.dumps(key).encode())


VALID_SPAN = span_of(attributes=[string_attribute("http.url", "http://a:80/b")])


@pytest.mark.parametrize("body, message", [
    # json.loads keeps the last: the spans accepted before would be dropped without a word
    (twice({"resourceSpans": request_of(VALID_SPAN)["resourceSpans"], "DUP": []}, "resourceSpans"),
     "key 'resourceSpans' given twice"),
    (twice(request_of(span_of(attributes=[{"key": "a", "value": {"stringValue": "x"}, "DUP": "b"}])),
           "key"), f"{SPANS}[0].attributes[0]: key 'key' given twice"),
    (twice(request_of(span_of(attributes=[{"key": "a", "value": {"stringValue": "x", "DUP": "y"}}])),
           "stringValue"), f"{SPANS}[0].attributes[0].value: key 'stringValue' given twice"),
    (twice(request_of(VALID_SPAN, resource={"attributes": [string_attribute("service.name", "a")],
                                            "DUP": []}), "attributes"),
     "resourceSpans[0].resource: key 'attributes' given twice"),
    (twice(request_of(VALID_SPAN, span_of(name="a", DUP="b")), "name"),
     f"{SPANS}[1]: key 'name' given twice"),
    # a field the fast way leaves to the parser (an enum name), an unknown field, a bad value
    (twice(request_of(span_of(kind="SPAN_KIND_SERVER", name="a", DUP="b")), "name"),
     f"{SPANS}[0]: key 'name' given twice"),
    (twice(request_of(span_of(future={"x": [{"a": 1, "DUP": 2}]})), "a"),
     f"{SPANS}[0].future.x[0]: key 'a' given twice"),
    (twice(request_of(span_of(startTimeUnixNano="soon", DUP="1")), "startTimeUnixNano"),
     f"{SPANS}[0]: key 'startTimeUnixNano' given twice"),
    (twice(request_of(span_of(traceId=TRACE_HEX, DUP=5)), "traceId"),
     f"{SPANS}[0]: key 'traceId' given twice"),
    # the outer object first; the same value twice is as malformed
    (b'{"resourceSpans": [{"a": 1, "a": 2}], "resourceSpans": []}', "key 'resourceSpans' given twice"),
    (twice({"resourceSpans": [], "DUP": []}, "resourceSpans"), "key 'resourceSpans' given twice"),
    (b'{"resourceSpans" : [] , "resourceSpans"\n:\t[]}', "key 'resourceSpans' given twice"),
])
def test_a_key_given_twice_is_malformed_and_named_with_its_objects_path(body, message):
    assert malformed(body) == message


@pytest.mark.parametrize("dumps", [
    lambda document: json.dumps(document),
    lambda document: json.dumps(document, separators=(",", ":")),
    lambda document: json.dumps(document, indent="\t", separators=(" , ", " : ")),
])
def test_a_body_with_every_key_once_is_loaded_once(monkeypatch, dumps):
    # colons in strings, whitespace before a key's colon: still no second load, with a hook (a
    # string starting with a colon, or with '\\":' in it, would cost one: it looks like a key)
    loads = []
    load = otlp_json_module._load
    monkeypatch.setattr(otlp_json_module, "_load",
                        lambda body, **kwargs: loads.append(kwargs) or load(body, **kwargs))
    document = request_of(VALID_SPAN, span_of(name="12:00", future={"x": [{"a": "b:"}]}),
                          resource={"attributes": [string_attribute("service.name", "a:b")]})
    assert len(decode_json(dumps(document).encode()).spans) == 2
    assert loads == [{}]


def nested_value(arrays: int = 0, kvlists: int = 0) -> dict:
    """A string value within ``kvlists`` key-value lists, within ``arrays`` arrays."""
    value: dict = {"stringValue": "leaf"}
    for _ in range(kvlists):
        value = {"kvlistValue": {"values": [{"key": "inner", "value": value}]}}
    for _ in range(arrays):
        value = {"arrayValue": {"values": [value]}}
    return value


def length_delimited(number: int, data: bytes) -> bytes:
    """A protobuf field of wire type 2."""
    size, length = len(data), bytearray()
    while size >= 0x80:
        length.append(size & 0x7F | 0x80)
        size >>= 7
    return bytes([number << 3 | 2, *length, size]) + data


def nested_bytes(arrays: int) -> bytes:
    """``nested_value(arrays)`` as the AnyValue's protobuf bytes (the generated classes cannot
    hold a value this deep: they copy it through their parser)."""
    value = length_delimited(1, b"leaf")
    for _ in range(arrays):  # AnyValue{array_value: ArrayValue{values: [value]}}
        value = length_delimited(5, length_delimited(1, value))
    return value


@pytest.mark.parametrize("deep", [nested_value(arrays=60), nested_value(arrays=200),
                                  nested_value(kvlists=40), nested_value(arrays=20, kvlists=20)])
@pytest.mark.parametrize("kind", [1, "SPAN_KIND_SERVER"])  # the fast way first, the parser's
def test_an_attribute_nested_too_deep_for_protobufs_parser_is_no_value_the_span_kept(deep, kind):
    # protobuf's JSON parser refused the whole request for one (100 messages from its root): a
    # foreign value is now ignored and pathwatch's counted invalid, as the decoder judges a binary
    # one it cannot parse, and the span, the other attributes and the request are kept
    deep_attributes = [{"key": "foreign.deep", "value": deep}, {"key": A.RUN_ID, "value": deep}]
    document = request_of(
        span_of(kind=kind, attributes=[*deep_attributes, string_attribute(A.ROLE, "agent")],
                events=[{"name": "e", "attributes": deep_attributes}],
                links=[{"traceId": TRACE_HEX, "spanId": PARENT_HEX,
                        "attributes": deep_attributes}]),
        resource={"attributes": [*deep_attributes, string_attribute("service.name", "web")]})
    batch = decode_json(document)
    (record,) = batch.spans
    assert (record.role, record.service_name, record.run_id) == ("agent", "web", None)
    assert batch.invalid_attributes == {A.RUN_ID: 1}  # the span's (events and links are not read)
    (resource,) = decode_json(request_of(span_of(), resource={"attributes": [
        {"key": "service.name", "value": deep}]})).spans
    assert resource.service_name is None


def test_a_deep_attribute_is_judged_as_the_same_one_in_protobuf():
    spans, keys = [make_span({A.ROLE: "agent"}), make_span({A.ROLE: "agent"})], ("x.deep", A.RUN_ID)
    # each span with a KeyValue appended (a message's fields may come in any order)
    scope = b"".join(length_delimited(2, span.SerializeToString() + length_delimited(
        9, length_delimited(1, key.encode()) + length_delimited(2, nested_bytes(60))))
        for span, key in zip(spans, keys))
    as_protobuf = SpanDecoder().decode(length_delimited(1, length_delimited(2, scope)), 0)
    document = otlp_json_document(make_request(spans, resource={}))
    for span, key in zip(document["resourceSpans"][0]["scopeSpans"][0]["spans"], keys):
        span["attributes"].append({"key": key, "value": nested_value(arrays=60)})
    as_json = decode_json(document)
    assert [(s.role, s.run_id) for s in as_json.spans] == [("agent", None)] * 2
    assert comparable(as_json.spans) == comparable(as_protobuf.spans)
    assert as_json.invalid_attributes == as_protobuf.invalid_attributes == {A.RUN_ID: 1}


def test_another_error_is_named_beside_a_deep_attribute():
    document = request_of(span_of(attributes=[{"key": "k", "value": nested_value(arrays=60)}]),
                          span_of(startTimeUnixNano="soon"))
    assert malformed(document).startswith("resourceSpans[0].scopeSpans[0].spans[1]."
                                          "startTimeUnixNano: ")


def test_json_nested_deeper_than_the_json_module_reads_is_malformed_not_a_crash():
    # 4,000 arrays: 12,000 levels, past what json reads on 3.11 (326 arrays here), 3.12 (495) and
    # 3.13 (3,328; its json module's C recursion limit is 10,000 levels)
    body = (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"attributes": [{"key": "k", "value": '
            + b'{"arrayValue": {"values": [' * 4000 + b'{}' + b']}}' * 4000 + b'}]}]}]}]}')
    assert "nested too deeply" in malformed(body)


def test_a_long_bad_value_is_shortened_in_the_message():
    assert len(malformed(request_of(span_of(startTimeUnixNano="9x" * 100_000)))) < 600


# --- one decoder for both encodings: identical SpanRecords (property) ---

ids = st.one_of(st.binary(min_size=16, max_size=16), st.sampled_from([b"", b"\x01" * 15, bytes(16),
                                                                      b"\x07" * 17]))
span_ids = st.one_of(st.binary(min_size=8, max_size=8), st.sampled_from([b"", b"\x02" * 9, bytes(8)]))
parent_ids = st.one_of(st.just(b""), st.binary(min_size=8, max_size=8), st.just(b"\x03"))
CONTRACT_KEYS = sorted(A.SPAN_ATTRIBUTES) + ["http.route", "http.method", "other", ""]
scalars = st.one_of(
    st.text(max_size=3), st.text(min_size=100, max_size=200), st.sampled_from(sorted(A.SpanKinds.ALL)),
    st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(),
    st.binary(max_size=5), st.just(None))


def nested(value):
    return AnyValue(array_value=ArrayValue(values=[any_value(value), AnyValue()]))


attribute_values = st.one_of(scalars.map(any_value), scalars.map(nested), scalars.map(
    lambda v: AnyValue(kvlist_value=KeyValueList(values=[KeyValue(key="k", value=any_value(v))]))))


@st.composite
def spans(draw):
    span = Span(trace_id=draw(ids), span_id=draw(span_ids), parent_span_id=draw(parent_ids),
                name=draw(st.text(max_size=8)), kind=draw(st.integers(0, 5)),
                start_time_unix_nano=draw(st.integers(0, 2**64 - 1)),
                end_time_unix_nano=draw(st.integers(0, 2**64 - 1)),
                flags=draw(st.integers(0, 2**32 - 1)), trace_state=draw(st.sampled_from(["", "a=b"])))
    for key, value in draw(st.lists(st.tuples(st.sampled_from(CONTRACT_KEYS), attribute_values),
                                    max_size=12)):
        span.attributes.append(KeyValue(key=key, value=value))
    code = draw(st.sampled_from([None, 0, 1, 2]))
    if code is not None:
        span.status.CopyFrom(Status(code=code, message=draw(st.sampled_from(["", "boom"]))))
    if draw(st.booleans()):
        span.events.add(time_unix_nano=draw(st.integers(0, 2**64 - 1)), name="exception")
        span.links.add(trace_id=draw(ids), span_id=draw(span_ids))
    return span


@st.composite
def requests(draw):
    request = ExportTraceServiceRequest()
    for _ in range(draw(st.integers(0, 3))):
        resource_spans = request.resource_spans.add()
        for key in ("service.name", "service.version", "service.instance.id"):
            value = draw(st.one_of(st.none(), st.text(max_size=4), st.integers(0, 3)))
            if value is not None:
                resource_spans.resource.attributes.append(KeyValue(key=key, value=any_value(value)))
        for _ in range(draw(st.integers(0, 2))):
            scope = resource_spans.scope_spans.add()
            scope.scope.name = draw(st.sampled_from(["", "js"]))
            scope.spans.extend(draw(st.lists(spans(), max_size=4)))
    return request


def fast_encoding(body: bytes) -> bytes | None:
    """What the fast encoder makes of ``body``; None where it leaves the body to the parser."""
    document = otlp_json_module._load(body)
    otlp_json_module._convert_ids(document, otlp_json_module._as_bytes)
    try:
        return otlp_json_module._encode(otlp_json_module._REQUEST, document, 0, [0])
    except otlp_json_module._Unusual:
        return None


def parsed_encoding(body: bytes) -> bytes | None:
    """What protobuf's JSON parser makes of ``body`` (the reference); None where it is malformed."""
    try:
        return otlp_json_module._parse(body)
    except MalformedRequest:
        return None


def assert_encoded_alike(body: bytes) -> bytes | None:
    """The fast encoder, where it takes the body, writes the very bytes the parser's request
    serializes to; returns them (None where the fast encoder left the body to the parser)."""
    try:
        fast = fast_encoding(body)
    except MalformedRequest:  # found before either encoder (the ids, JSON itself): for both
        assert parsed_encoding(body) is None
        return None
    if fast is not None:
        assert fast == parsed_encoding(body)
    return fast


def comparable(records: list) -> list:
    """The records with a NaN ``counts_since_s`` (a double attribute the decoder keeps as sent) made
    comparable: NaN equals nothing, not even the NaN decoded from the other encoding."""
    return [replace(record, counts_since_s="nan") if record.counts_since_s != record.counts_since_s
            else record for record in records]


def assert_decoded_alike(request: ExportTraceServiceRequest, json_body: bytes) -> None:
    as_protobuf = SpanDecoder().decode(request.SerializeToString(), 42)
    as_json = SpanDecoder().decode(json_to_protobuf(json_body).body, 42)
    assert comparable(as_json.spans) == comparable(as_protobuf.spans)
    assert comparable(as_json.heartbeats) == comparable(as_protobuf.heartbeats)
    assert as_json.rejected == as_protobuf.rejected
    assert as_json.invalid_attributes == as_protobuf.invalid_attributes


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=requests(), snake_case=st.booleans(), upper_hex=st.booleans(),
       int64_as_numbers=st.booleans())
@example(request=make_request([make_span({A.SPAN_KIND: "heartbeat", A.COUNTS_SINCE_S: math.nan})]),
         snake_case=False, upper_hex=False, int64_as_numbers=False)  # NaN == NaN is False
def test_the_same_spans_as_protobuf_and_as_json_decode_to_identical_records(
        request, snake_case, upper_hex, int64_as_numbers):
    body = otlp_json(request, snake_case=snake_case, upper_hex=upper_hex,
                     int64_as_numbers=int64_as_numbers)
    assert_decoded_alike(request, body)
    assert_encoded_alike(body)
    converted = json_to_protobuf(body)
    rejected = SpanDecoder().decode(converted.body, 0).rejected
    assert bool(converted.first_id_problem) == bool(rejected)  # every rejection explained


def test_realistic_runs_and_heartbeats_decode_alike_and_take_the_fast_way():
    rng = random.Random(7)
    request = make_request([span for run in range(5) for span in run_spans(run, rng, bleed=run == 3)]
                           + [heartbeat_span(3, 1, rng)])
    for options in ({}, {"snake_case": True, "int64_as_numbers": True}, {"upper_hex": True}):
        body = otlp_json(request, **options)
        assert_decoded_alike(request, body)
        assert assert_encoded_alike(body) == request.SerializeToString()


@pytest.mark.parametrize("fields", [
    {"kind": "SPAN_KIND_SERVER"},  # an enum name
    {"name": None},  # null
    {"startTimeUnixNano": 1.0},  # an integral float
    {"startTimeUnixNano": "1e3"},  # an exponent
    {"startTimeUnixNano": "1_000"},  # Python's int() would take it; the parser too
    {"kind": 2**40},  # beyond int32
    {"start_time_unix_nano": "5", "startTimeUnixNano": "0"},  # both names: the parser keeps the last
    {"attributes": [{"key": "b", "value": {"bytesValue": "AQID"}}]},
    {"attributes": [{"key": "d", "value": {"doubleValue": "NaN"}}]},
    {"attributes": [{"key": "d", "value": {"doubleValue": True}}]},
    {"attributes": [{"key": "s", "value": {"stringValue": "x", "boolValue": None}}]},
    {"status": []},  # the parser takes an empty list for an empty message
    {"status": {"[x.y]": 1}},  # an extension's name
])
def test_what_the_fast_encoder_leaves_to_the_parser(fields):
    body = json.dumps(request_of(span_of(**fields))).encode()
    assert fast_encoding(body) is None
    parsed = parsed_encoding(body)
    if parsed is None:
        with pytest.raises(MalformedRequest):
            json_to_protobuf(body)
    else:
        assert json_to_protobuf(body).body == parsed


def test_deep_values_are_left_to_the_parser_and_its_limit():
    def nested(depth: int) -> bytes:
        value: dict = {"stringValue": "leaf"}
        for _ in range(depth):
            value = {"arrayValue": {"values": [value]}}
        return json.dumps(request_of(span_of(attributes=[{"key": "k", "value": value}]))).encode()
    assert fast_encoding(nested(5)) == parsed_encoding(nested(5)) is not None
    assert fast_encoding(nested(20)) is None and parsed_encoding(nested(20)) is not None
    # deeper than the parser reads: no value (see test_an_attribute_nested_too_deep_for_...)
    assert fast_encoding(nested(60)) is None
    assert parsed_encoding(nested(60)) == parsed_encoding(json.dumps(request_of(span_of(
        attributes=[{"key": "k", "value": {}}]))).encode())


def test_the_json_body_converts_to_the_very_protobuf_request():
    request = make_request(run_spans(1, random.Random(2)))
    assert ExportTraceServiceRequest.FromString(json_to_protobuf(otlp_json(request)).body) == request


# --- anything at all: a result or MalformedRequest, never another exception ---

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6),
              st.sampled_from([TRACE_HEX, SPAN_HEX, "AQID", "1700000000000000000", "-5", "1e3",
                               "NaN", "Infinity", "", "STATUS_CODE_ERROR", "\ud800",
                               str(2**64), 10**400])),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.sampled_from(sorted(
                                   {"resourceSpans", "scopeSpans", "spans", "traceId", "spanId",
                                    "parentSpanId", "attributes", "key", "value", "stringValue",
                                    "intValue", "arrayValue", "values", "status", "code", "links",
                                    "resource", "name", "kind", "startTimeUnixNano",
                                    "resource_spans", "trace_id", "other"})), children, max_size=4)),
    max_leaves=20)


def replace_somewhere(document: object, path: list[int], value: object) -> object:
    """``document`` with the node reached by following ``path`` (indices taken modulo the
    children) replaced by ``value``."""
    if not path or not isinstance(document, (dict, list)) or not document:
        return value
    keys = list(document) if isinstance(document, dict) else list(range(len(document)))
    key = keys[path[0] % len(keys)]
    copy = dict(document) if isinstance(document, dict) else list(document)
    copy[key] = replace_somewhere(document[key], path[1:], value)
    return copy


VALID_DOCUMENT = otlp_json_document(make_request(run_spans(1, random.Random(3))[:3]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.lists(st.integers(0, 50), max_size=10), value=json_values)
def test_any_mutation_of_a_valid_body_is_decoded_or_malformed(path, value):
    body = json.dumps(replace_somewhere(VALID_DOCUMENT, path, value)).encode()
    assert_encoded_alike(body)
    try:
        converted = json_to_protobuf(body)
    except MalformedRequest as exc:
        assert str(exc)
        return
    batch = SpanDecoder().decode(converted.body, 0)
    assert bool(converted.first_id_problem) == bool(batch.rejected)


@settings(max_examples=200, deadline=None)
@given(document=json_values)
def test_any_json_is_decoded_or_malformed(document):
    if isinstance(document, dict):
        assert_encoded_alike(json.dumps(document).encode())
    try:
        converted = json_to_protobuf(json.dumps(document).encode())
    except MalformedRequest as exc:
        assert str(exc)  # says what is wrong
        return
    # what is taken decodes, and the id problem found on the way is the decoder's rejection
    batch = SpanDecoder().decode(converted.body, 0)
    assert bool(converted.first_id_problem) == bool(batch.rejected)


def test_not_a_number_doubles_are_read_as_protobuf_json_writes_them():
    span = make_span({"x": math.nan, "y": math.inf})
    assert_decoded_alike(make_request([span]), otlp_json(make_request([span])))


def test_a_large_bad_body_is_parsed_once_and_its_error_found_where_the_parser_stopped(monkeypatch):
    # finding the path must not cost more than the parse (no parsing of the parts again)
    spans = [span_of(name=f"s{i}", startTimeUnixNano=str(i)) for i in range(2000)]
    spans[-1]["startTimeUnixNano"] = "soon"
    spans[-1]["kind"] = "SPAN_KIND_SERVER"  # (an enum name: the parser's, not the fast way's)
    body = json.dumps(request_of(*spans)).encode()
    calls = []
    parse = otlp_json_module.json_format.ParseDict
    monkeypatch.setattr(otlp_json_module.json_format, "ParseDict",
                        lambda *args, **kwargs: calls.append(1) or parse(*args, **kwargs))
    assert malformed(body).startswith(f"{SPANS}[1999].startTimeUnixNano: ")
    assert len(calls) == 1
