"""OTLP/JSON: an ``application/json`` ExportTraceServiceRequest body -> the binary protobuf body
that ``decode.py`` reads, so that spans sent as JSON are decoded by the very code that decodes
spans sent as protobuf (one decoder, identical ``SpanRecord``s; a property test pins this).

The OTLP specification's JSON Protobuf Encoding is the proto3 JSON mapping with three deviations,
all handled here: ``traceId`` / ``spanId`` (and ``parentSpanId``, and the ids of span links) are
case-insensitive hex strings, not base64; enum values are integers (enum names are accepted too,
as protobuf JSON parsers do); unknown fields are ignored. Field names are lowerCamelCase; the
original snake_case names are accepted as well, as protobuf JSON parsers do. 64-bit integers may
be strings or numbers.

Two ways to the same bytes: a fast encoder writes the protobuf wire format straight from the
parsed JSON for the shapes exporters send (each field of its JSON type, 64-bit integers as numbers
or decimal strings, attribute values other than bytes); anything else — an enum name, ``null``, a
float for an integer, a field under both of its names, a bytes value, an error — goes through
protobuf's own JSON parser (``json_format.ParseDict`` on a copy whose ids are base64), which accepts
it or says what is wrong. Property tests pin that both give the very same bytes; the fast way
takes about 40 µs a span, JSON parsing included, the parser's about 190 (docs/sidecar.md).

A body that is not JSON, or a field of the wrong type, raises ``MalformedRequest`` naming the
field's path (``resourceSpans[0].scopeSpans[1].spans[2].startTimeUnixNano: ...``), and a key given
twice in an object the object's (``resourceSpans[0].resource: key 'attributes' given twice``;
json.loads would keep the last, silently): the request is
rejected whole (400), as a body that is not protobuf is. A span id that is not hex, or not of the
right length, rejects that span alone (partial success), as a bad binary id does: it is replaced
by an id the decoder rejects, and ``first_id_problem`` says what was wrong in JSON terms.
Link ids that are not hex are dropped (the decoder does not read links, in either encoding).

A lone surrogate (``"\\ud800"``, or its three bytes, which json.loads reads the same way) is not
text: UTF-8 cannot encode it, and protobuf's parser refused the whole request for one. One such
string must not cost the request's other spans (a 400 is not retried), so, both ways alike: an
attribute's string value that holds one is no value (an empty AnyValue: a value pathwatch reads
is counted invalid, as a protobuf string that is not UTF-8 is; others are not read), and in
every other string (a span name, a status message, an attribute key, an object's key) each one
is replaced by U+FFFD.

An attribute's value nested deeper than protobuf's parser reads (100 messages from the request's
root: some 47 arrays within arrays) is no value either, in the attributes of a resource, a scope, a
span, an event or a link (``_without_deep_values``, on the parser's way once it failed), where the
parser refused the whole request for one. The span is judged as the same one sent in protobuf: a
value of pathwatch's keys (scalars all) that nests is counted invalid, another instrumentation's
value is not read. A body nested deeper than the json module reads (about 950 levels: some 300
arrays) is still malformed.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from sidecar.receiver.decode import (MAX_ATTRIBUTES_PER_REQUEST, MAX_SPANS_PER_REQUEST,
                                     MalformedRequest, TooManyAttributes, TooManySpans, shown_name)

__all__ = ["JsonRequest", "count_json_spans", "json_to_protobuf", "load_json"]

# the ids the decoder checks, as (JSON name, proto name, bytes wanted, is the parent: may be empty)
_SPAN_IDS: Final = (("traceId", "trace_id", 16, False), ("spanId", "span_id", 8, False),
                    ("parentSpanId", "parent_span_id", 8, True))
_LINK_IDS: Final = (("traceId", "trace_id"), ("spanId", "span_id"))
_HEX: Final = re.compile(r"(?:[0-9a-fA-F]{2})*")
# what replaces an id that is not hex: one the decoder rejects (an empty parent is valid: a root)
_REJECTED_ID: Final = {"traceId": b"", "spanId": b"", "parentSpanId": b"\x00"}
_MAX_DETAIL: Final = 300  # characters of a parser's message (it may quote the client's value)
# a lone surrogate (a pair is one character once loaded)
_SURROGATE: Final = re.compile("[\ud800-\udfff]")
_STRING_VALUES: Final = ("stringValue", "string_value")


@dataclass(frozen=True, slots=True)
class JsonRequest:
    body: bytes  # the request as binary protobuf, for SpanDecoder.decode
    first_id_problem: str = ""  # the first span whose ids the decoder will reject, and why


def json_to_protobuf(body: bytes, max_spans: int = MAX_SPANS_PER_REQUEST,
                     document: dict | None = None,
                     max_attributes: int = MAX_ATTRIBUTES_PER_REQUEST) -> JsonRequest:
    """Raises ``MalformedRequest`` for a body that is not an OTLP/JSON ExportTraceServiceRequest,
    ``TooManySpans`` for one of more than ``max_spans`` spans (or resource and scope entries):
    counted on the loaded document (list lengths, per request), before the conversion, which took
    2.4 s and 180 MB more for a 4 MiB body of 1.4 M ``{}`` spans. json.loads itself cannot be
    spared (the spans are known only once parsed): at most ``max_message_bytes`` of JSON, about
    100 MB for that body. ``document``: the body as ``load_json`` loaded it already.
    ``TooManyAttributes`` likewise for more than ``max_attributes`` attributes, events and links
    (``_count_entries``), counted only in a body longer than twice that (an entry takes 2 bytes at
    least, ``{}``) whose commas and brackets could separate that many (``_may_hold_more``): the
    conversion of a 4 MiB body of 1.4 M ``{}`` attributes or events took 180 MB more than
    json.loads' 100, and 2.5 s."""
    document = _load(body) if document is None else document
    spans, containers = _count_spans(document)
    if spans > max_spans or containers > max_spans:
        raise TooManySpans(spans, containers, max_spans)
    if len(body) > 2 * max_attributes and _may_hold_more(body, max_attributes):
        entries = _count_entries(document)
        if entries > max_attributes:
            raise TooManyAttributes(spans, entries, max_attributes, "attributes, events and links")
    keys = [0]  # the keys of the objects the fast encoder read, counted as it reads them
    try:
        first_problem = _convert_ids(document, _as_bytes)
        encoded = _encode(_REQUEST, document, 0, keys)
    except _Unusual:
        return JsonRequest(_parse(body), first_problem)  # (_parse refuses a key given twice)
    except RecursionError:
        _load(body, keys_once=True)
        raise MalformedRequest("JSON nested too deeply") from None
    except MalformedRequest:
        _load(body, keys_once=True)  # a key given twice is the first thing wrong
        raise
    if keys[0] != body.count(b":") and keys[0] != body.translate(None, _WHITESPACE).count(b'":'):
        _load(body, keys_once=True)  # a key given twice (or a string with '":' in it)
    return JsonRequest(encoded, first_problem)


def load_json(body: bytes) -> dict:
    """The loaded body, for ``count_json_spans`` and then ``json_to_protobuf`` (loaded once).
    Raises ``MalformedRequest``."""
    return _load(body)


def count_json_spans(document: dict) -> tuple[int, int]:
    """(spans, resourceSpans + scopeSpans entries) of a loaded body: list lengths."""
    return _count_spans(document)


def _count_spans(document: dict) -> tuple[int, int]:
    """(spans, resourceSpans + scopeSpans entries) of a loaded body, under either name of each
    field; members of the wrong type count nothing (the conversion says what is wrong)."""
    spans = containers = 0
    resource_spans = _either(document, "resourceSpans", "resource_spans")
    if isinstance(resource_spans, list):
        containers += len(resource_spans)
        for resource in resource_spans:
            scopes = _either(resource, "scopeSpans", "scope_spans")
            if isinstance(scopes, list):
                containers += len(scopes)
                for scope in scopes:
                    scope_spans = _either(scope, "spans", "spans")
                    if isinstance(scope_spans, list):
                        spans += len(scope_spans)
    return spans, containers


def _may_hold_more(body: bytes, limit: int) -> bool:
    """Whether the body's arrays may hold more than ``limit`` elements in all: an array of n
    elements has n - 1 commas, so they hold at most as many as the body has commas and opening
    brackets (strings' ones included: an overestimate). Two scans of the body in C (~3 ms for
    4 MiB, under 2 % of its conversion): a 4 MiB body of real spans has ~100,000, so the count
    below, a Python loop over every attribute (~7 ms there), is left to the bodies that need it."""
    return body.count(b",") + body.count(b"[") > limit


def _count_entries(document: dict) -> int:
    """The attributes, events and links of a loaded body: its resources', scopes' and spans'
    attributes, an event's and a link's, and a resource's entity refs with their keys; and, in any
    of those attributes, the values of an ``arrayValue`` or ``kvlistValue`` at any depth (list
    lengths). Each of those lists is converted element by element: one uncounted let a 4 MiB body
    of 1.4 M ``{}`` take the conversion's 282 MB. Members of the wrong type count nothing."""
    entries = 0
    resource_spans = _either(document, "resourceSpans", "resource_spans")
    for resource_span in resource_spans if isinstance(resource_spans, list) else ():
        resource = _either(resource_span, "resource", "resource")
        entries += _attribute_entries(_either(resource, "attributes", "attributes"))
        refs = _either(resource, "entityRefs", "entity_refs")
        if isinstance(refs, list):
            entries += len(refs)
            for ref in refs:
                entries += (_length(_either(ref, "idKeys", "id_keys"))
                            + _length(_either(ref, "descriptionKeys", "description_keys")))
        scopes = _either(resource_span, "scopeSpans", "scope_spans")
        for scope in scopes if isinstance(scopes, list) else ():
            entries += _attribute_entries(_either(_either(scope, "scope", "scope"), "attributes",
                                                  "attributes"))
            scope_spans = _either(scope, "spans", "spans")
            for span in scope_spans if isinstance(scope_spans, list) else ():
                entries += _attribute_entries(_either(span, "attributes", "attributes"))
                for name in ("events", "links"):
                    items = _either(span, name, name)
                    if isinstance(items, list):
                        entries += len(items)
                        for item in items:
                            entries += _attribute_entries(_either(item, "attributes",
                                                                  "attributes"))
    return entries


# the AnyValue members holding lists of values, by both names
_NESTED: Final = frozenset(("arrayValue", "array_value", "kvlistValue", "kvlist_value"))


def _attribute_entries(attributes: object) -> int:
    """A list of KeyValues: its length, and the values of the arrays and key-value lists among its
    values at any depth (without recursion: they may be deep)."""
    if not isinstance(attributes, list):
        return 0
    entries = len(attributes)
    lists: list[tuple[bool, list]] = [(True, attributes)]  # (of KeyValues, else of AnyValues)
    while lists:
        of_key_values, items = lists.pop()
        for item in items:
            value = (item.get("value") if type(item) is dict else None) if of_key_values else item
            if type(value) is not dict or _NESTED.isdisjoint(value):
                continue
            array = _either(_either(value, "arrayValue", "array_value"), "values", "values")
            if isinstance(array, list):
                entries += len(array)
                lists.append((False, array))
            pairs = _either(_either(value, "kvlistValue", "kvlist_value"), "values", "values")
            if isinstance(pairs, list):
                entries += len(pairs)
                lists.append((True, pairs))
    return entries


def _length(value: object) -> int:
    return len(value) if isinstance(value, list) else 0


def _either(value: object, json_name: str, proto_name: str) -> object:
    if not isinstance(value, dict):
        return None
    found = value.get(json_name)
    return value.get(proto_name) if found is None else found


# A key given twice: json.loads keeps the last one silently ({"resourceSpans": [...],
# "resourceSpans": []} would drop the spans), and an object_pairs_hook that would see it costs
# about 40 % of json.loads. So the body is loaded with one only where a key may have been given
# twice: each key is followed by a colon, so no key was given twice where the objects' keys (the
# fast encoder counts them as it reads them) are as many as the body's colons; if some string has
# a colon (a URL, a time) as many as the body's colons right after a quote once whitespace is
# dropped (a key's colon follows its closing quote, or whitespace; a string rarely starts with a
# colon or has '\\":' in it).
_WHITESPACE: Final = b" \t\n\r"


class _KeyGivenTwice(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _keys_once(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are all different, else ``_KeyGivenTwice`` (as the API's PATCH
    body, the YAML config and query parameters refuse a key given twice)."""
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _KeyGivenTwice(key)
            seen.add(key)
    return document


def _load(body: bytes, keys_once: bool = False) -> dict:
    """The parsed body; with ``keys_once`` an object with a key given twice is malformed (an
    object_pairs_hook costs about 40 % of json.loads: only where a key may be given twice)."""
    encoding = json.detect_encoding(body)  # the first 4 bytes: its BOM or its zero bytes
    if encoding != "utf-8" and encoding != "utf-8-sig":  # (a BOM RFC 8259 lets parsers ignore)
        # json.loads reads UTF-16 and UTF-32 too, which OTLP/JSON is not (UTF-8: RFC 8259 8.1)
        raise MalformedRequest(f"malformed JSON: not UTF-8 text (it reads as "
                               f"{encoding.upper().replace('-LE', '').replace('-BE', '')})")
    try:
        document = json.loads(body, parse_constant=_no_constant,
                              object_pairs_hook=_keys_once if keys_once else None)
    except _KeyGivenTwice:
        raise MalformedRequest(_given_twice(body)) from None
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
    return document


def _given_twice(body: bytes) -> str:
    """'<path of the object>: key '<key>' given twice', for the first such object in document
    order (the body is loaded again, remembering the objects with a key given twice)."""
    twice: dict[int, tuple[str, dict]] = {}  # (the object kept: its id is not reused meanwhile)

    def remember(pairs: list[tuple[str, object]]) -> dict:
        document = dict(pairs)
        if len(document) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    twice.setdefault(id(document), (key, document))
                seen.add(key)
        return document

    document = json.loads(body, parse_constant=_no_constant, object_pairs_hook=remember)
    try:
        found = _first_remembered(document, twice, "")
    except RecursionError:
        found = None
    if found is None:  # (not reached: an object with a key given twice is in the document)
        return f"key {next(iter(twice.values()))[0]!r} given twice"
    path, key = found
    return f"{path}: key {key!r} given twice" if path else f"key {key!r} given twice"


def _first_remembered(value: object, twice: dict[int, tuple[str, dict]], path: str
                      ) -> tuple[str, str] | None:
    if isinstance(value, dict):
        if id(value) in twice:
            return path, twice[id(value)][0]
        items = ((f"{path}.{key}" if path else key, item) for key, item in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{index}]", item) for index, item in enumerate(value))
    else:
        return None
    for where, item in items:
        found = _first_remembered(item, twice, where)
        if found is not None:
            return found
    return None


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON value")


# what protobuf's JSON parser raises, besides ParseError, for some values (a number too large for
# a double: OverflowError; a message given as something it cannot iterate: TypeError)
_PARSER_ERRORS: Final = (json_format.ParseError, ValueError, TypeError, OverflowError, RecursionError)


def _parse(body: bytes) -> bytes:
    """The slow way, and the reference: protobuf's JSON parser on the document with base64 ids."""
    document = _load(body, keys_once=True)
    _convert_ids(document, _as_base64)
    if b"\\ud" in body or b"\\uD" in body or b"\xed" in body:  # may hold a lone surrogate: an
        _without_lone_surrogates(document)  # escape or its first byte (the pass: ~15 % of a parse)
    request = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(document, request, ignore_unknown_fields=True)
    except _PARSER_ERRORS as exc:
        if not _without_deep_values(document):  # (only once it failed: no cost to other bodies)
            if isinstance(exc, RecursionError):
                raise MalformedRequest("JSON nested too deeply") from None
            raise MalformedRequest(_describe(request, document, exc)) from None
        request = ExportTraceServiceRequest()  # again, without them: the error may be another
        try:
            json_format.ParseDict(document, request, ignore_unknown_fields=True)
        except RecursionError:
            raise MalformedRequest("JSON nested too deeply") from None
        except _PARSER_ERRORS as exc:
            raise MalformedRequest(_describe(request, document, exc)) from None
    return request.SerializeToString()


#: the most messages an attribute's value may nest (the AnyValue itself, and each ArrayValue,
#: KeyValueList, KeyValue and AnyValue within it): one nested deeper is no value, as protobuf's
#: parser would refuse the whole request for it (its limit is 100 messages from the request's
#: root, an event's attribute value sitting at the seventh). 64: 31 arrays within arrays, or 21
#: key-value lists
_MAX_VALUE_DEPTH: Final = 64


def _without_deep_values(document: dict) -> bool:
    """In place: each attribute value (of a resource, a scope, a span, an event or a link) nested
    more than ``_MAX_VALUE_DEPTH`` messages deep replaced by no value (an empty AnyValue): a value
    pathwatch reads is counted invalid, as the same nested value sent in protobuf is, another
    instrumentation's is not read, and the span and the request are kept. Returns whether there was
    one. Without recursion: the values may be deep."""
    found = False
    for attributes in _attribute_lists(document):
        for key_value in attributes:
            value = key_value.get("value") if type(key_value) is dict else None
            if type(value) is dict and _nested_deeper(value, _MAX_VALUE_DEPTH):
                key_value["value"] = {}
                found = True
    return found


def _attribute_lists(document: dict) -> Iterator[list]:
    """The attribute lists of a loaded body (members of the wrong type are the parser's to name)."""
    resource_spans = _either(document, "resourceSpans", "resource_spans")
    for resource_span in resource_spans if isinstance(resource_spans, list) else ():
        holders = [_either(resource_span, "resource", "resource")]
        scopes = _either(resource_span, "scopeSpans", "scope_spans")
        for scope in scopes if isinstance(scopes, list) else ():
            holders.append(_either(scope, "scope", "scope"))
            spans = _either(scope, "spans", "spans")
            for span in spans if isinstance(spans, list) else ():
                holders.append(span)
                for name in ("events", "links"):
                    items = _either(span, name, name)
                    if isinstance(items, list):
                        holders.extend(items)
        for holder in holders:
            attributes = _either(holder, "attributes", "attributes")
            if isinstance(attributes, list):
                yield attributes


def _nested_deeper(value: dict, limit: int) -> bool:
    """Whether an AnyValue nests more than ``limit`` messages (itself included)."""
    pending = [(value, 1)]
    while pending:
        any_value, depth = pending.pop()
        if depth > limit:
            return True
        array = _either(_either(any_value, "arrayValue", "array_value"), "values", "values")
        if isinstance(array, list):
            pending.extend((item, depth + 2) for item in array if type(item) is dict)
        pairs = _either(_either(any_value, "kvlistValue", "kvlist_value"), "values", "values")
        if isinstance(pairs, list):
            for pair in pairs:
                item = pair.get("value") if type(pair) is dict else None
                if type(item) is dict:
                    pending.append((item, depth + 3))
    return False


def _without_lone_surrogates(document: dict) -> None:
    """In place, as the fast encoder writes them (see the module's docstring): a ``stringValue``
    holding a lone surrogate removed, every other string and key holding one replaced. The parser
    refused them (upb's lookup of a field or enum name with one even raised SystemError). Without
    recursion: the document may be deep."""
    pending: list[dict | list] = [document]
    while pending:
        value = pending.pop()
        if type(value) is list:
            for index, item in enumerate(value):
                if type(item) is str:
                    if _SURROGATE.search(item):
                        value[index] = _text(item)
                elif type(item) is dict or type(item) is list:
                    pending.append(item)
            continue
        if any(_SURROGATE.search(key) for key in value):
            items = [(_text(key), item) for key, item in value.items()]
            value.clear()
            value.update(items)  # (order kept: the parser's errors depend on it)
        for key in _STRING_VALUES:
            item = value.get(key)
            if type(item) is str and _SURROGATE.search(item):
                del value[key]  # no value
        for key, item in value.items():
            if type(item) is str:
                if _SURROGATE.search(item):
                    value[key] = _text(item)
            elif type(item) is dict or type(item) is list:
                pending.append(item)


def _as_bytes(id_bytes: bytes) -> bytes:
    return id_bytes


def _as_base64(id_bytes: bytes) -> str:
    return base64.b64encode(id_bytes).decode()


def _convert_ids(document: dict, encode: Callable[[bytes], object]) -> str:
    """Replaces the hex ids of spans and links in place by ``encode(their bytes)`` (the bytes for
    the fast encoder, base64 for protobuf's JSON parser); returns the first span id problem.
    Anything of an unexpected shape is left as it is for the encoders to report."""
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
                problem = _convert_span_ids(span, path, encode)
                if problem and not first_problem:
                    first_problem = problem
                links = span.get("links")
                if isinstance(links, list):
                    for j, link in enumerate(links):
                        _object(link, f"{path}.links[{j}]")
                        _convert_link_ids(link, f"{path}.links[{j}]", encode)
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


def _convert_span_ids(span: dict, path: str, encode: Callable[[bytes], object]) -> str:
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
                span[key] = encode(_REJECTED_ID[json_name])
            else:
                span[key] = encode(id_bytes)
                if is_parent:
                    if not id_bytes or len(id_bytes) == size:
                        continue
                elif len(id_bytes) == size and any(id_bytes):
                    continue
            problem = problem or _id_problem(span, path, key, value, size, is_parent)
        if not present and not is_parent:
            problem = problem or _id_problem(span, path, json_name, None, size, is_parent)
    return problem


def _convert_link_ids(link: dict, path: str, encode: Callable[[bytes], object]) -> None:
    for json_name, proto_name in _LINK_IDS:
        _once(link, json_name, proto_name, path)
        for key in (json_name, proto_name):
            value = link.get(key)
            if value is not None:
                id_bytes = _hex_bytes(value, f"{path}.{key}")
                link[key] = encode(b"" if id_bytes is None else id_bytes)


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
    where = f"{path} {shown_name(name)}" if isinstance(name, str) else path
    wanted = f"empty or {2 * size} hex digits" if is_parent else f"{2 * size} hex digits, not all zero"
    shown = "nothing" if value is None else repr(value if len(value) <= 40 else value[:40] + "...")
    return f"{where}: {key} must be {wanted}; got {shown}"


_FAILED_FIELD: Final = re.compile(r"Failed to parse (\w+) field: ")
_AT_PATH: Final = re.compile(r' at "?ExportTraceServiceRequest\.?([^ "]*)"?$')
_NOT_A_LIST: Final = re.compile(r"repeated field (\w+) must be in \[\] which is (.*)", re.S)
#: a field inside the attributes of a resource, a scope, a span, an event or a link (or that list)
_IN_ATTRIBUTES: Final = re.compile(r"(?:^|\.)attributes(?:[.\[]|$)")


def _describe(partial: ExportTraceServiceRequest, document: dict, error: Exception) -> str:
    """A parser error as '<field path>: <what is wrong>', at the cost of the error's depth (a large
    bad body must not cost more than a good one). The parser's message names the fields on the way
    down, as written (``Failed to parse spans field: Failed to parse name field: ...``) but not
    always the index in a repeated field: that is where the parser stopped, the last element it
    added to the request it was filling (``partial``)."""
    text, chain = str(error), []
    while match := _FAILED_FIELD.match(text):
        chain.append(match.group(1))
        text = text[match.end():]
    text = text.rstrip(".")
    where = _AT_PATH.search(text)  # some messages end with the whole path: the best there is
    detail = text[:where.start()] if where else text
    if isinstance(error, OverflowError):  # not wrapped by the parser: no names on the way down
        detail, path = f"a number too large for a double ({detail})", _too_large_double(document)
    elif where and where.group(1):
        path = where.group(1)
    else:
        path = _path_of(partial, chain)
    not_a_list = _NOT_A_LIST.match(detail)
    if not_a_list:
        name = not_a_list.group(1)
        if not (path == name or path.endswith(f".{name}")):  # the parser named the parent
            path = f"{path}.{name}" if path else name
        detail = f"must be an array, got {not_a_list.group(2)}"
    if _IN_ATTRIBUTES.search(path):
        detail = _without_value(detail, bool(not_a_list), document, path)
    if len(detail) > _MAX_DETAIL:
        detail = detail[:_MAX_DETAIL] + "..."
    return f"{path}: {detail}" if path else detail


def _without_value(detail: str, not_a_list: bool, document: dict, path: str) -> str:
    """A parser's complaint about a field inside attributes, without the value it quotes: the
    message is the 400's answer, which the client's exporter logs (an OpenTelemetry Collector's
    otlphttp exporter logs the body of a permanent error), and an attribute's value may be a user id
    in clear — an ``enduser.id`` another SDK sent, attributes written as an object
    (``{"enduser.id": "alice"}``).
    The parser's messages and Python's ``int()`` put the value after the first ``": "`` (``invalid
    literal for int() with base 10: 'alice'``, ``Couldn't parse float: alice``); an array that is
    not one is named by its JSON type."""
    if not_a_list:
        value = _value_at(document, path)
        return "must be an array" if value is _NOT_FOUND else f"must be an array, got {_json_type(value)}"
    return detail.partition(": ")[0]


_NOT_FOUND: Final = object()
_STEP: Final = re.compile(r"([^.\[\]]+)((?:\[\d+\])*)")


def _value_at(document: object, path: str) -> object:
    """The value at a message's path (``a[0].b``) in the parsed body, its fields under either of
    their names; ``_NOT_FOUND`` when the path does not lead to one."""
    value = document
    for name, indexes in _STEP.findall(path):
        if not isinstance(value, dict):
            return _NOT_FOUND
        other = (re.sub(r"_([a-z])", lambda m: m.group(1).upper(), name) if "_" in name
                 else re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name))
        value = value.get(name, value.get(other, _NOT_FOUND))
        for index in re.findall(r"\d+", indexes):
            if not isinstance(value, list) or int(index) >= len(value):
                return _NOT_FOUND
            value = value[int(index)]
    return value


def _path_of(message: object, chain: list[str]) -> str:
    path = ""
    for name in chain:
        fields = _FIELDS_BY_NAME[message.DESCRIPTOR.full_name]
        field = fields.get(name)
        if field is None:
            break
        path = f"{path}.{name}" if path else name
        if field.type != _T.TYPE_MESSAGE:
            if field.is_repeated:  # a scalar element is appended once converted
                path += f"[{len(getattr(message, field.name))}]"
            break
        if field.is_repeated:  # a message element is added, then filled
            elements = getattr(message, field.name)
            if not elements:
                break
            path += f"[{len(elements) - 1}]"
            message = elements[-1]
        else:
            message = getattr(message, field.name)
    return path


def _too_large_double(value: object, path: str = "") -> str:
    """The path of the first attribute double value too large for a double, in the order the
    parser reads them ('' if none)."""
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if key in ("doubleValue", "double_value") and type(item) is int:
                try:
                    float(item)
                except OverflowError:
                    return where
            found = _too_large_double(item, where)
            if found:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _too_large_double(item, f"{path}[{index}]")
            if found:
                return found
    return ""


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


# --- the fast encoder: the protobuf wire format straight from the parsed JSON ---

class _Unusual(Exception):
    """Something the fast encoder leaves to protobuf's JSON parser."""


_INT32: Final = (-(1 << 31), (1 << 31) - 1)
_UINT32: Final = (0, (1 << 32) - 1)
_INT64: Final = (-(1 << 63), (1 << 63) - 1)
_UINT64: Final = (0, (1 << 64) - 1)
_INTEGER: Final = re.compile(r"-?[0-9]+")
_DOUBLE: Final = struct.Struct("<d")
_FIXED64: Final = struct.Struct("<Q")
_FIXED32: Final = struct.Struct("<I")
_SMALL: Final = [bytes([n]) for n in range(128)]
_ZERO_DOUBLE: Final = bytes(8)
_T: Final = FieldDescriptor


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # negative int32/int64/enum values: ten bytes, as protobuf writes them
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _integer(value: object, bounds: tuple[int, int]) -> int:
    """A JSON integer (a number, or a string of decimal digits) within ``bounds``."""
    if type(value) is int:
        number = value
    elif type(value) is str and _INTEGER.fullmatch(value):
        number = int(value)
    else:
        raise _Unusual  # a float, a bool, an exponent, "NaN" ...: the parser's rules
    if not bounds[0] <= number <= bounds[1]:
        raise _Unusual
    return number


def _utf8(value: object) -> bytes:
    if type(value) is not str:
        raise _Unusual
    try:
        return value.encode()
    except UnicodeEncodeError:  # a lone surrogate: not text (see the module's docstring)
        return _text(value).encode()


def _text(value: str) -> str:
    """``value`` with each lone surrogate replaced by U+FFFD, as a decoder replaces bytes that are
    not UTF-8."""
    return _SURROGATE.sub("\ufffd", value)


def _scalar_encoder(field: FieldDescriptor) -> Callable[[object], bytes]:
    """value -> its wire bytes without the tag; b"" for a default value of a field without
    presence (proto3 leaves those out; oneof members and repeated elements are always written)."""
    written_always = field.has_presence or field.is_repeated
    kind = field.type
    if kind == _T.TYPE_STRING and field.full_name == _STRING_VALUE:
        def encode(value: object) -> bytes:
            if type(value) is not str:
                raise _Unusual
            try:
                data = value.encode()
            except UnicodeEncodeError:  # a lone surrogate: no value (see the module's docstring)
                return b""
            return _varint(len(data)) + data
    elif kind == _T.TYPE_STRING:
        def encode(value: object) -> bytes:
            data = _utf8(value)
            return _varint(len(data)) + data if data or written_always else b""
    elif kind == _T.TYPE_BYTES:
        def encode(value: object) -> bytes:
            if type(value) is not bytes:
                raise _Unusual  # base64 text (a bytesValue): the parser's rules
            return _varint(len(value)) + value if value or written_always else b""
    elif kind == _T.TYPE_BOOL:
        def encode(value: object) -> bytes:
            if type(value) is not bool:
                raise _Unusual
            return b"\x01" if value else (b"\x00" if written_always else b"")
    elif kind == _T.TYPE_DOUBLE:
        def encode(value: object) -> bytes:
            if type(value) is not float and type(value) is not int:
                raise _Unusual  # "NaN", "Infinity", a bool ...
            if value in _INFINITIES:  # a literal beyond a double's range (1e400), which json.loads
                raise _Unusual  # reads as infinity: the parser refuses it, as it does 10**400
            try:
                data = _DOUBLE.pack(value)
            except (OverflowError, struct.error):
                raise _Unusual from None
            return data if data != _ZERO_DOUBLE or written_always else b""
    elif kind in _INTEGERS:
        bounds, packer = _INTEGERS[kind]

        def encode(value: object) -> bytes:
            number = _integer(value, bounds)
            return packer(number) if number or written_always else b""
    else:  # float, sint, sfixed: not in the OTLP trace messages
        def encode(value: object) -> bytes:
            raise _Unusual
    return encode


_INFINITIES: Final = (float("inf"), float("-inf"))
_INTEGERS: Final = {
    _T.TYPE_FIXED64: (_UINT64, _FIXED64.pack), _T.TYPE_FIXED32: (_UINT32, _FIXED32.pack),
    _T.TYPE_INT64: (_INT64, _varint), _T.TYPE_UINT64: (_UINT64, _varint),
    _T.TYPE_INT32: (_INT32, _varint), _T.TYPE_UINT32: (_UINT32, _varint),
    _T.TYPE_ENUM: (_INT32, _varint),  # as a number; enum names are the parser's
}
_WIRE_TYPE: Final = {_T.TYPE_FIXED64: 1, _T.TYPE_DOUBLE: 1, _T.TYPE_FIXED32: 5, _T.TYPE_STRING: 2,
                     _T.TYPE_BYTES: 2, _T.TYPE_MESSAGE: 2}
_MAX_DEPTH: Final = 32  # messages within messages; deeper is the parser's (its limit is 100)

# a message: JSON name and proto name -> (number, oneof index or -1, encoder: (value, depth, keys)
# -> bytes; keys[0] counts the keys of the objects read)
_Encoder = Callable[[object, int, list[int]], bytes]
_Table = dict[str, tuple[int, int, _Encoder]]
_TABLES: dict[str, _Table] = {}


def _table(descriptor: Descriptor) -> _Table:
    table = _TABLES.get(descriptor.full_name)
    if table is not None:
        return table
    table = _TABLES[descriptor.full_name] = {}  # registered first: messages nest recursively
    oneofs = {oneof.name: index for index, oneof in enumerate(descriptor.oneofs)}
    for field in descriptor.fields:
        tag = _varint(field.number << 3 | _WIRE_TYPE.get(field.type, 0))
        oneof = oneofs[field.containing_oneof.name] if field.containing_oneof else -1
        table[field.json_name] = table[field.name] = (field.number, oneof, _field_encoder(field, tag))
    return table


def _field_encoder(field: FieldDescriptor, tag: bytes) -> _Encoder:
    """(value, depth, keys) -> the field's wire bytes, tag(s) included."""
    if field.type == _T.TYPE_MESSAGE:
        table = _table(field.message_type)

        def encode_one(value: object, depth: int, keys: list[int]) -> bytes:
            data = _encode(table, value, depth + 1, keys)
            return tag + _varint(len(data)) + data
    elif field.is_repeated and field.type not in (_T.TYPE_STRING, _T.TYPE_BYTES):
        def encode_one(value: object, depth: int, keys: list[int]) -> bytes:
            raise _Unusual  # packed numbers: not in the OTLP trace messages
    else:
        scalar = _scalar_encoder(field)

        def encode_one(value: object, depth: int, keys: list[int]) -> bytes:
            data = scalar(value)
            return tag + data if data else b""
    if not field.is_repeated:
        return encode_one
    if field.type == _T.TYPE_MESSAGE and field.message_type.full_name == _KEY_VALUE:
        return _key_values_encoder(tag, encode_one)

    def encode_all(values: object, depth: int, keys: list[int]) -> bytes:
        if type(values) is not list:
            raise _Unusual
        return b"".join([encode_one(value, depth, keys) for value in values])
    return encode_all


_KEY_VALUE: Final = "opentelemetry.proto.common.v1.KeyValue"
_STRING_VALUE: Final = "opentelemetry.proto.common.v1.AnyValue.string_value"
# AnyValue members of scalar values, by both names -> their AnyValue field number
_SCALAR_MEMBERS: Final = {"stringValue": 1, "string_value": 1, "boolValue": 2, "bool_value": 2,
                          "intValue": 3, "int_value": 3, "doubleValue": 4, "double_value": 4}


def _key_values_encoder(tag: bytes, encode_one: _Encoder) -> _Encoder:
    """Attributes, the bulk of a span: ``{"key": k, "value": {"stringValue": v}}`` and the other
    scalar values written inline (KeyValue key = 1, value = 2; AnyValue string = 1, bool = 2,
    int = 3, double = 4, always written: a oneof); any other shape through ``encode_one``."""
    def encode_all(values: object, depth: int, keys: list[int]) -> bytes:
        if type(values) is not list:
            raise _Unusual
        out = []
        for key_value in values:
            if type(key_value) is dict and len(key_value) == 2:
                key, value = key_value.get("key"), key_value.get("value")
                if type(key) is str and type(value) is dict and len(value) == 1:
                    ((member, scalar),) = value.items()
                    which = _SCALAR_MEMBERS.get(member)
                    if which == 1 and type(scalar) is str:
                        try:
                            data = scalar.encode()
                            any_value = b"\x0a" + _varint(len(data)) + data
                        except UnicodeEncodeError:  # a lone surrogate: no value (see the
                            any_value = b""  # module's docstring)
                    elif which == 2 and type(scalar) is bool:
                        any_value = b"\x10\x01" if scalar else b"\x10\x00"
                    elif which == 3:
                        any_value = b"\x18" + _varint(_integer(scalar, _INT64))
                    else:
                        out.append(encode_one(key_value, depth, keys))
                        continue
                    key_data = _utf8(key)
                    keys[0] += 3
                    payload = ((b"\x0a" + _varint(len(key_data)) + key_data if key_data else b"")
                               + b"\x12" + _varint(len(any_value)) + any_value)
                    out.append(tag + _varint(len(payload)) + payload)
                    continue
            out.append(encode_one(key_value, depth, keys))
        return b"".join(out)
    return encode_all


def _encode(table: _Table, value: object, depth: int, keys: list[int]) -> bytes:
    """A JSON object as the wire bytes of the message ``table`` describes, fields in number order
    as protobuf writes them; unknown names skipped. Adds the keys of the objects read (unknown
    fields' included) to ``keys[0]``."""
    if type(value) is not dict or depth > _MAX_DEPTH:
        raise _Unusual  # (the parser takes a list or a string for an empty message)
    keys[0] += len(value)
    pieces: list[tuple[int, bytes]] = []
    numbers: list[int] = []
    oneof_seen = -1
    for key, item in value.items():
        entry = table.get(key)
        if entry is None:
            if key[:1] == "[":
                raise _Unusual  # an extension's name: the parser has a word for it
            if type(item) is dict or type(item) is list:
                keys[0] += _keys_in(item)
            continue  # an unknown field: ignored
        if item is None:
            raise _Unusual  # null: the default, by the parser's rules
        number, oneof, encode = entry
        numbers.append(number)
        if oneof >= 0:
            if oneof_seen >= 0:
                raise _Unusual  # two members of one oneof: the parser's error
            oneof_seen = oneof
        data = encode(item, depth, keys)
        if data:
            pieces.append((number, data))
    if len(numbers) > 1:
        if len(set(numbers)) != len(numbers):
            raise _Unusual  # one field under both of its names: the parser keeps the last
        pieces.sort(key=_first)
    return b"".join([data for _, data in pieces])


def _keys_in(value: dict | list) -> int:
    """The keys of the objects in an unknown field's value (without recursion: it may be deep)."""
    count, pending = 0, [value]
    while pending:
        item = pending.pop()
        if type(item) is dict:
            count += len(item)
            pending.extend(item.values())
        elif type(item) is list:
            pending.extend(item)
    return count


def _first(piece: tuple[int, bytes]) -> int:
    return piece[0]


_REQUEST: Final = _table(ExportTraceServiceRequest.DESCRIPTOR)


def _fields_by_name(descriptor: Descriptor, into: dict[str, dict[str, FieldDescriptor]]) -> None:
    if descriptor.full_name in into:
        return
    fields = into[descriptor.full_name] = {}
    for field in descriptor.fields:
        fields[field.json_name] = fields[field.name] = field
        if field.message_type is not None:
            _fields_by_name(field.message_type, into)


# every message of the request: JSON name and proto name -> field (for the paths of errors)
_FIELDS_BY_NAME: Final[dict[str, dict[str, FieldDescriptor]]] = {}
_fields_by_name(ExportTraceServiceRequest.DESCRIPTOR, _FIELDS_BY_NAME)
