"""OTLP/JSON: an ``application/json`` ExportTraceServiceRequest body -> the binary protobuf body
that ``decode.py`` reads, so that spans sent as JSON are decoded by the very code that decodes
spans sent as protobuf (one decoder, identical ``SpanRecord``s; a property test pins this).

The OTLP specification's JSON Protobuf Encoding is the proto3 JSON mapping with three deviations,
all handled here: ``traceId`` / ``spanId`` (and ``parentSpanId``, and the ids of span links) are
case-insensitive hex strings, not base64; enum values are integers (enum names are accepted too,
as protobuf JSON parsers do); unknown fields are ignored. Field names are lowerCamelCase; the
original snake_case names are accepted as well, as protobuf JSON parsers do. 64-bit integers may
be strings or numbers.

A body that is not JSON, or a field of the wrong type, raises ``MalformedRequest`` naming the
field's path (``resourceSpans[0].scopeSpans[1].spans[2].startTimeUnixNano: ...``): the request is
rejected whole (400), as a body that is not protobuf is. A span id that is not hex, or not of the
right length, rejects that span alone (partial success), as a bad binary id does: it is replaced
by an id the decoder rejects, and ``first_id_problem`` says what was wrong in JSON terms.
Link ids that are not hex are dropped (the decoder does not read links, in either encoding).
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import Final

from google.protobuf import json_format, message_factory
from google.protobuf.descriptor import Descriptor
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar.receiver.decode import MalformedRequest

__all__ = ["JsonRequest", "json_to_protobuf"]

# the ids the decoder checks, as (JSON name, proto name, bytes wanted, is the parent: may be empty)
_SPAN_IDS: Final = (("traceId", "trace_id", 16, False), ("spanId", "span_id", 8, False),
                    ("parentSpanId", "parent_span_id", 8, True))
_LINK_IDS: Final = (("traceId", "trace_id"), ("spanId", "span_id"))
_HEX: Final = re.compile(r"(?:[0-9a-fA-F]{2})*")
# what replaces an id that is not hex: one the decoder rejects (an empty parent is valid: a root)
_REJECTED_ID: Final = {"traceId": "", "spanId": "", "parentSpanId": base64.b64encode(b"\x00").decode()}
_MAX_DETAIL: Final = 300  # characters of a parser's message (it may quote the client's value)


@dataclass(frozen=True, slots=True)
class JsonRequest:
    body: bytes  # the request as binary protobuf, for SpanDecoder.decode
    first_id_problem: str = ""  # the first span whose ids the decoder will reject, and why


def json_to_protobuf(body: bytes) -> JsonRequest:
    """Raises ``MalformedRequest`` for a body that is not an OTLP/JSON ExportTraceServiceRequest."""
    try:
        document = json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise MalformedRequest("malformed JSON: nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise MalformedRequest(f"malformed JSON: not UTF-8 text ({exc.reason} at byte {exc.start})"
                               ) from None
    except ValueError as exc:  # JSONDecodeError, or an integer literal too long to convert
        raise MalformedRequest(f"malformed JSON: {exc}") from None
    if not isinstance(document, dict):
        raise MalformedRequest("the body must be a JSON object (an ExportTraceServiceRequest), "
                               f"got {_json_type(document)}")
    first_problem = _convert_ids(document)
    request = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(document, request, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise MalformedRequest(_describe(document, exc)) from None
    except RecursionError:
        raise MalformedRequest("JSON nested too deeply") from None
    return JsonRequest(request.SerializeToString(), first_problem)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON value")


def _convert_ids(document: dict) -> str:
    """Replaces the hex ids of spans and links by base64 (what protobuf's JSON parser reads for
    bytes) in place; returns the first span id problem. Anything of an unexpected shape is left
    as it is for the parser to report."""
    first_problem = ""
    resource_key, resource_spans = _member(document, "resourceSpans", "resource_spans", "")
    if not isinstance(resource_spans, list):
        return ""
    for r, resource in enumerate(resource_spans):
        resource_path = f"{resource_key}[{r}]"
        _object(resource, resource_path)
        scope_key, scope_spans = _member(resource, "scopeSpans", "scope_spans", resource_path)
        if not isinstance(scope_spans, list):
            continue
        for s, scope in enumerate(scope_spans):
            scope_path = f"{resource_path}.{scope_key}[{s}]"
            _object(scope, scope_path)
            spans = scope.get("spans")
            if not isinstance(spans, list):
                continue
            for i, span in enumerate(spans):
                path = f"{scope_path}.spans[{i}]"
                _object(span, path)
                problem = _convert_span_ids(span, path)
                if problem and not first_problem:
                    first_problem = problem
                links = span.get("links")
                if isinstance(links, list):
                    for j, link in enumerate(links):
                        _object(link, f"{path}.links[{j}]")
                        _convert_link_ids(link, f"{path}.links[{j}]")
    return first_problem


def _object(value: object, path: str) -> None:
    """The messages whose ids are converted must be JSON objects (Python's protobuf parser would
    take ``[]`` or ``""`` for an empty message, and those spans would escape the id checks)."""
    if not isinstance(value, dict):
        raise MalformedRequest(f"{path}: expected an object, got {_json_type(value)}")


def _member(parent: object, json_name: str, proto_name: str, path: str) -> tuple[str, object]:
    """(the name it was given under, the value) of a field of a JSON object."""
    if not isinstance(parent, dict):
        return json_name, None
    if json_name in parent:
        _once(parent, json_name, proto_name, path)
        return json_name, parent[json_name]
    return proto_name, parent.get(proto_name)


def _once(parent: dict, json_name: str, proto_name: str, path: str) -> None:
    """A field given under both of its names is malformed (protobuf's C++ and Java parsers say
    so; Python's would keep the last one, and then the ids converted might not be the ones read)."""
    if json_name in parent and proto_name in parent:
        where = f"{path}: " if path else ""
        raise MalformedRequest(f"{where}field {json_name} given twice (as {json_name} and "
                               f"{proto_name})")


def _convert_span_ids(span: dict, path: str) -> str:
    """Converts the span's ids; returns why the decoder will reject the span, or ''. The checks
    and their order are the decoder's (``decode._id_problem``): a trace id of 16 bytes and a span
    id of 8, neither all zero; a parent span id empty or of 8 bytes."""
    problem = ""
    for json_name, proto_name, size, is_parent in _SPAN_IDS:
        _once(span, json_name, proto_name, path)
        present = False
        for key in (json_name, proto_name):
            value = span.get(key)
            if value is None:
                continue  # absent, or null: the default, an empty id
            present = True
            id_bytes = _hex_bytes(value, f"{path}.{key}")
            if id_bytes is None:
                span[key] = _REJECTED_ID[json_name]
            else:
                span[key] = base64.b64encode(id_bytes).decode()
                if is_parent:
                    if not id_bytes or len(id_bytes) == size:
                        continue
                elif len(id_bytes) == size and any(id_bytes):
                    continue
            problem = problem or _id_problem(span, path, key, value, size, is_parent)
        if not present and not is_parent:
            problem = problem or _id_problem(span, path, json_name, None, size, is_parent)
    return problem


def _convert_link_ids(link: dict, path: str) -> None:
    for json_name, proto_name in _LINK_IDS:
        _once(link, json_name, proto_name, path)
        for key in (json_name, proto_name):
            value = link.get(key)
            if value is not None:
                id_bytes = _hex_bytes(value, f"{path}.{key}")
                link[key] = "" if id_bytes is None else base64.b64encode(id_bytes).decode()


def _hex_bytes(value: object, path: str) -> bytes | None:
    """The bytes of a hex id; None when the string is not hex. Any other JSON type is malformed."""
    if not isinstance(value, str):
        raise MalformedRequest(f"{path}: expected a hex string, got {_json_type(value)}")
    if _HEX.fullmatch(value) is None:
        return None
    return bytes.fromhex(value)


def _id_problem(span: dict, path: str, key: str, value: str | None, size: int,
                is_parent: bool) -> str:
    name = span.get("name")
    where = f"{path} {name!r}" if isinstance(name, str) else path
    wanted = f"empty or {2 * size} hex digits" if is_parent else f"{2 * size} hex digits, not all zero"
    shown = "nothing" if value is None else repr(value if len(value) <= 40 else value[:40] + "...")
    return f"{where}: {key} must be {wanted}; got {shown}"


def _describe(document: dict, error: json_format.ParseError) -> str:
    """A parser error as '<field path>: <what is wrong>'. The parser names the fields but not
    always the index in a repeated field: the path is found by parsing the parts again (only ever
    on the error path)."""
    detail = re.sub(r"^(Failed to parse \w+ field: )+", "", str(error))
    detail = re.sub(r" at \"?ExportTraceServiceRequest[^ ]*$", "", detail).rstrip(".")
    if len(detail) > _MAX_DETAIL:
        detail = detail[:_MAX_DETAIL] + "..."
    path = _locate(document, ExportTraceServiceRequest.DESCRIPTOR, "")
    return f"{path}: {detail}" if path else detail


def _locate(value: object, descriptor: Descriptor, path: str) -> str:
    """The path of the innermost part of ``value`` (a JSON object of message ``descriptor``) that
    does not parse."""
    if not isinstance(value, dict):
        return path
    fields = {field.name: field for field in descriptor.fields}
    fields.update({field.json_name: field for field in descriptor.fields})
    message_class = message_factory.GetMessageClass(descriptor)
    for key, item in value.items():
        field = fields.get(key)
        if field is None or _parses({key: item}, message_class):
            continue
        where = f"{path}.{key}" if path else key
        if field.message_type is None or item is None:
            return where
        element_class = message_factory.GetMessageClass(field.message_type)
        if field.is_repeated:
            if not isinstance(item, list):
                return where
            for index, element in enumerate(item):
                if element is None or not _parses(element, element_class):
                    return _locate(element, field.message_type, f"{where}[{index}]")
            return where
        return _locate(item, field.message_type, where)
    return path  # e.g. one field given under both of its names


def _parses(value: object, message_class: type) -> bool:
    if not isinstance(value, dict):
        return False  # (the parser's own TypeError, unwrapped at the top level)
    try:
        json_format.ParseDict(value, message_class(), ignore_unknown_fields=True)
    except (json_format.ParseError, RecursionError):
        return False
    return True


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
