"""Decode once, at the edge: an OTLP ExportTraceServiceRequest body -> ``SpanRecord`` objects.

This is the sidecar's hot path. The body is parsed into a wire-compatible view (``wire.py``) whose
span attributes are raw ``KeyValue`` bytes; each one is matched to a ``SpanRecord`` slot through a
key -> slot dispatch table built from ``instrumentation/attributes.py`` (the shared contract), and
its value is read from the bytes directly. Low-cardinality attributes (kind, role, implementation,
entry point ...) are decoded once and then served from a bounded cache keyed by their raw bytes.
Anything unusual (long strings, odd encodings) falls back to views with bytes for strings
(wire.py) and to the generated OTLP classes for values, so the fast path changes speed only,
never results (a property test pins this).

Per span: a trace id that is not 16 bytes (or all zero), a span id that is not 8 bytes (or all
zero) or a parent span id that is neither empty nor 8 bytes rejects that span alone (OTLP partial
success). A parent span id of 8 zero bytes is no parent, as empty is: a root (the OpenTelemetry
Collector reads it so; OTLP/JSON's ``"0000000000000000"`` is the same bytes).
A known attribute whose value has the wrong type, or is a string longer than
``MAX_STRING_CHARS``, or is not UTF-8 (short or long), or (an emit's execution, a span's request)
is no span id, is ignored and counted; unknown attributes
are ignored, UTF-8 or not. A span name that is not UTF-8 is read with replacement characters, a
status message is not read at all (no detector reads either): one such span must not fail the
request. A span name longer than 512 characters is kept shortened to those (the detectors' state
and the queue hold spans, bounded in number, not bytes). A body that is not a protobuf ExportTraceServiceRequest raises ``MalformedRequest``.

Per request: a body that holds more than ``max_spans_per_request`` spans (or resource and scope
entries) raises ``TooManySpans`` before any span is parsed into the view: upb holds a span of the
view in about 120 bytes however small it is on the wire (2 bytes empty), so a 4 MiB body of 2 M
empty spans took 240 MB. Only a body longer than twice the cap can hold more (a span takes 2 bytes
at least); its spans are counted by a parse that keeps each as raw bytes (``wire.count_spans``,
about 25 ns a span in C, 0.5 % of decoding it; 64 MB for that body, freed at once).
Attributes are not counted here: the view keeps each as raw bytes (about 28 bytes in upb: 56-64 MB
for the 2 M empty ones a 4 MiB body can hold, as much as the count above takes), and a count
before the view would hold them the same way; events and links (and their attributes) are not in
the view at all (upb skips them as unknown fields, at no cost). OTLP/JSON bodies are bounded in
attributes, events and links before their conversion (``max_attributes_per_request``, otlp_json.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Final

from google.protobuf.message import DecodeError
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from instrumentation import attributes as A
from sidecar.model import USER_FIELDS, USER_LIST_FIELDS, SpanRecord, keyed_user
from sidecar.receiver.wire import RequestView, count_spans, split_key_value, status_is_error

__all__ = ["DecodedBatch", "MalformedRequest", "SpanDecoder", "TooManyAttributes", "TooManySpans",
           "shown_name"]

SERVICE_NAME: Final = "service.name"
SERVICE_VERSION: Final = "service.version"
SERVICE_INSTANCE_ID: Final = "service.instance.id"

# AnyValue oneof members (also the names ``WhichOneof`` returns)
_STR: Final = "string_value"
_BOOL: Final = "bool_value"
_INT: Final = "int_value"

_DOUBLE: Final = "double_value"
_STRINGS: Final = "array_value"  # of non-empty strings (read on the slow path: request spans only)

_ROUTE: Final = "http.route"  # pseudo-slot: entry point fallback for foreign request spans
#: pseudo-slot: the ambient user only where the span has no ``enduser.pseudo.id``. An app that
#: follows the semantic conventions sets ``enduser.id`` (its raw id) on the server span pathwatch
#: stamped with the pseudonym, after it or before it: the raw id must not replace the pseudonym the
#: span's calls carry (a critical bleed.span_vs_root_user). Never cached, as ``_ROUTE``.
_RAW_USER: Final = "<enduser.id>"
_UNUSED: Final = "<unused>"  # pseudo-slot: a contract attribute the sidecar does not keep
#: an emit's execution: a span id, checked (16 lowercase hex digits, not all zero: anything else
#: would name an execution that never comes, and hold the emit's duplicates for the longest wait)
#: and interned with the ids of its scope, then cached for the request (set by the span loop)
_EXECUTION: Final = "execution_span_id"
#: the request span the work ran under (``pathwatch.request.span_id``): checked and interned as
#: ``_EXECUTION`` (anything else would name a request that never comes, and keep the work waiting)
_REQUEST_SPAN: Final = "request_span_id"
_SPAN_ID_SLOTS: Final = (_EXECUTION, _REQUEST_SPAN)
_HEX_DIGITS: Final = "0123456789abcdef"
_ZERO_HEX_SPAN_ID: Final = "0" * 16
# What a cache hit of an unused attribute does: nothing. ``error`` comes from the span status,
# which is read after the attributes, so setting it False here can never hide an error; this keeps
# the hit path free of any test (it is the hottest line of the sidecar).
_NO_OP_HIT: Final = ("error", False)
_INVALID: Final = object()  # a value of the wrong type
_ABSENT: Final = object()  # a value that means "not set" (the empty string)

_ZERO_TRACE_ID: Final = bytes(16)
_ZERO_SPAN_ID: Final = bytes(8)
# Attribute values are cached by their raw bytes at two scopes. Low-cardinality ones (kind, role,
# implementation, entry point ...) in a small cache shared by every request (cleared if it ever
# fills); values that repeat within a run (users, run, thread, instance, connection and event ids)
# in a cache of the request alone, seeded with the shared one: a run's spans are exported together,
# and a small dict stays in the CPU cache where one holding every user and run id would not. The
# detectors' state then also holds one string object per value instead of one per span.
SHARED: Final = "shared"
REQUEST: Final = "request"
_CACHE_LIMIT: Final = 4096  # the shared cache
_CACHE_MAX_ATTRIBUTE_BYTES: Final = 512
_NAMES_LIMIT: Final = 4096
#: longer span names are neither cached nor kept whole: a record keeps the first this many
#: characters. No detector reads a name, but they keep records in their state (bleed keeps two
#: spans of each trace whose request has not arrived: a WebSocket's arrives when it closes), and
#: so does the queue, bounded in spans, not bytes: a name of up to max_message_bytes was kept whole
_NAME_MAX_CHARS: Final = 512
#: A string value longer than this is refused like a value of the wrong type (ignored, counted in
#: ``invalid_attributes``): the detectors keep these strings in their state, the incident store
#: and the metrics' label values, whose bounds count entries, not bytes. Never reached by the fast
#: path, whose values are shorter than 128 bytes.
MAX_STRING_CHARS: Final = 512


#: ``receiver.max_spans_per_request``'s default: far above real batches (an SDK's
#: BatchSpanProcessor sends 512 at most, the Collector's batch processor about 8192) and beyond what
#: 4 MiB of real spans hold (ids, name and times alone take 60 bytes of a span)
MAX_SPANS_PER_REQUEST: Final = 65_536


#: ``receiver.max_attributes_per_request``'s default (OTLP/JSON: attributes, events and links): 8 a
#: span of ``MAX_SPANS_PER_REQUEST``, far above what real requests within 4 MiB hold (a JSON
#: attribute with a key and a value takes 30 bytes at least); a body of ``{}`` ones holds 1.4 M
MAX_ATTRIBUTES_PER_REQUEST: Final = 524_288


class MalformedRequest(ValueError):
    """The body is not a valid protobuf ExportTraceServiceRequest (a permanent error)."""


class TooManySpans(Exception):
    """The request holds more spans (or resource and scope entries) than one request may: refused
    whole, permanently (the same request would be refused again)."""

    def __init__(self, spans: int, containers: int, limit: int) -> None:
        self.spans = spans
        what = (f"{spans} spans" if spans > limit else
                f"{containers} resourceSpans and scopeSpans entries ({spans} spans)")
        super().__init__(f"{what} in one request, more than receiver.max_spans_per_request="
                         f"{limit}; send smaller batches")


class TooManyAttributes(TooManySpans):
    """The OTLP/JSON request holds more attributes, events and links than one request may: refused
    whole, permanently, as ``TooManySpans`` is."""

    def __init__(self, spans: int, entries: int, limit: int, what: str) -> None:
        Exception.__init__(self, f"{entries} {what} in one request, more than "
                                 f"receiver.max_attributes_per_request={limit}; send smaller "
                                 "batches, or spans with fewer attributes")
        self.spans = spans


# key -> (SpanRecord field, AnyValue member expected, cache scope: SHARED, REQUEST or None)
_Slot = tuple[str, str, str | None]
_SPAN_SLOTS: Final[dict[str, _Slot]] = {
    A.SPAN_KIND: ("kind", _STR, SHARED),
    A.CODE_FUNCTION_NAME: ("function", _STR, SHARED),
    A.ROLE: ("role", _STR, SHARED),
    A.IMPLEMENTATION: ("implementation", _STR, SHARED),
    A.CANONICAL: ("canonical", _BOOL, SHARED),
    A.RETIRED: ("retired", _BOOL, SHARED),
    A.INSTANCE_ID: ("instance_id", _STR, REQUEST),
    A.NESTED: ("nested", _BOOL, SHARED),
    A.NESTED_OUTER: ("outer_span_id", _STR, None),  # one per call: never cached
    A.EXECUTION_SPAN_ID: (_EXECUTION, _STR, None),  # cached by the span loop, interned
    A.REQUEST_SPAN_ID: (_REQUEST_SPAN, _STR, None),  # as _EXECUTION
    A.CANCELLED: ("cancelled", _BOOL, None),  # an execute span whose task was cancelled: rare
    A.ENTRY_POINT: ("entry_point", _STR, SHARED),
    _ROUTE: (_ROUTE, _STR, None),  # never cached: cache hits are set directly
    A.CALLER: ("caller", _STR, SHARED),
    A.ENDUSER_PSEUDO_ID: ("user", _STR, REQUEST),
    A.ENDUSER_ID: (_RAW_USER, _STR, None),  # raw ids allowed (or the app's own): see _RAW_USER
    A.USER_OWNER: ("owner", _STR, REQUEST),
    A.USER_SUBJECT: ("subject", _STR, REQUEST),
    A.USER_TARGET: ("target", _STR, REQUEST),
    A.USER_SCOPED: ("user_scoped", _BOOL, SHARED),
    A.PSEUDONYM_KEY_ID: ("user_key", _STR, SHARED),  # on request spans (see _mark_users)
    A.RUN_ID: ("run_id", _STR, REQUEST),
    A.CONVERSATION_THREAD_ID: ("thread_id", _STR, REQUEST),
    A.EVENT_TYPE: ("event_type", _STR, SHARED),
    A.MESSAGING_MESSAGE_ID: ("event_id", _STR, REQUEST),  # on the emit and on its write(s)
    A.CONNECTION_ID: ("connection_id", _STR, REQUEST),
    A.CONNECTION_USER: ("connection_user", _STR, REQUEST),
    A.CONNECTION_USERS: ("connection_users", _STRINGS, None),  # a socket's request span: rare
    A.CONNECTION_USERS_TRUNCATED: ("connection_users_truncated", _BOOL, None),  # rarer still
    A.DELIVERY_OUTCOME: ("outcome", _STR, SHARED),
    A.DELIVERY_LINK: ("link", _STR, SHARED),
    A.DELIVERY_FAN_OUT: ("fan_out", _BOOL, SHARED),
    A.DISPATCH_WRITES: ("dispatch_writes", _INT, None),
    A.REQUEST_AFTER_RESPONSE_NS: ("after_response_ns", _INT, None),  # a request span: rare
    A.DROPPED_SPANS: ("dropped_spans", _INT, None),
    A.INSTRUMENTATION_ERRORS: ("instrumentation_errors", _INT, None),
    A.PENDING_EMITS_EVICTED: ("pending_emits_evicted", _INT, None),
    A.HEARTBEAT_INTERVAL_S: ("heartbeat_interval_s", _DOUBLE, None),
    A.HEARTBEAT_SEQUENCE: ("heartbeat_sequence", _INT, None),
    A.COUNTS_SINCE_S: ("counts_since_s", _DOUBLE, None),
    A.HEARTBEAT_FINAL: ("heartbeat_final", _BOOL, None),  # a heartbeat: rare
    # contract keys the detectors do not need: type-checked, cached, then skipped
    A.MESSAGING_OPERATION_TYPE: (_UNUSED, _STR, SHARED),
    A.THREAD_ID: (_UNUSED, _INT, SHARED),
}
_RESOURCE_SLOTS: Final[dict[str, _Slot]] = {
    SERVICE_NAME: ("service_name", _STR, SHARED),
    SERVICE_VERSION: ("service_version", _STR, SHARED),
    SERVICE_INSTANCE_ID: ("service_instance", _STR, SHARED),
}
#: The scope's: which key made the user ids of its spans (pathwatch's own tracer sets it). Read
#: once per scope and never cached: the same bytes on a request span are its ``user_key``.
_SCOPE_SLOTS: Final[dict[str, _Slot]] = {A.PSEUDONYM_KEY_ID: ("key_id", _STR, None)}
#: Values a slot accepts, where the contract fixes them (the canonical string objects are reused).
_ALLOWED: Final[dict[str, dict[str, str]]] = {"kind": {kind: kind for kind in A.SpanKinds.ALL}}



def _table(slots: dict[str, _Slot]) -> dict[bytes, tuple[str, str, str, str | None, bool, bool]]:
    """Keyed by the UTF-8 bytes of the key as it appears on the wire. The fifth member says the
    value is a plain string that the inlined fast path may set without further checks; the last
    that it is a user id (marked with its scope's key, ``keyed_user``)."""
    return {key.encode(): (key, slot, expected, cacheable,
                           expected is _STR and slot not in _ALLOWED
                           and slot not in (_ROUTE, _RAW_USER, _UNUSED, *_SPAN_ID_SLOTS),
                           slot in USER_FIELDS or slot is _RAW_USER or slot in USER_LIST_FIELDS)
            for key, (slot, expected, cacheable) in slots.items()}


_SPAN_TABLE: Final = _table(_SPAN_SLOTS)
_RESOURCE_TABLE: Final = _table(_RESOURCE_SLOTS)
_SCOPE_TABLE: Final = _table(_SCOPE_SLOTS)


@dataclass(slots=True)
class DecodedBatch:
    """What one request decoded to."""

    spans: list[SpanRecord]
    heartbeats: list[SpanRecord]  # the heartbeat spans among ``spans``
    rejected: int = 0  # spans rejected for missing or invalid ids
    rejection: str = ""  # why the first one was rejected (for partial_success.error_message)
    invalid_attributes: Counter[str] = field(default_factory=Counter)  # known key -> wrong-typed values
    invalid_count: int = 0  # the sum of ``invalid_attributes``
    #: Per ScopeSpans that held spans, in order: (the end of its valid spans in ``spans``, the spans
    #: it held, bad ids included, ``invalid_attributes`` as it was after it — None while empty, the
    #: previous snapshot's object while unchanged). For the receiver's replay check (``replays.py``),
    #: which empties it and ``resources`` before the batch is queued.
    scopes: list[tuple[int, int, Counter[str] | None]] = field(default_factory=list)
    #: Per ResourceSpans, in order: (the end of its entries in ``scopes``, ``invalid_attributes`` as
    #: it was after the resource's own attributes, the snapshot before its first scope's). A scope's
    #: invalid attributes are its snapshot less the one before it, in the order resource, its
    #: scopes, next resource: a resource's own are not its first scope's.
    resources: list[tuple[int, Counter[str] | None]] = field(default_factory=list)


class SpanDecoder:
    """Turns request bodies into decoded batches. Thread-safe: the cache is a plain dict whose
    single operations are atomic, and a lost insert only costs a later miss."""

    def __init__(self, max_spans_per_request: int = MAX_SPANS_PER_REQUEST,
                 max_attributes_per_request: int = MAX_ATTRIBUTES_PER_REQUEST) -> None:
        self.max_spans_per_request = max_spans_per_request
        #: OTLP/JSON's (``json_to_protobuf``), kept here with the other request bound
        self.max_attributes_per_request = max_attributes_per_request
        self._cache: dict[bytes, tuple[str, object]] = {}
        #: span names ("{role}.{method}") as sent -> as text: few, repeated
        self._names: dict[bytes, str] = {}

    def decode(self, body: bytes, received_ns: int,
               counted: tuple[int, int] | None = None) -> DecodedBatch:
        """Raises ``MalformedRequest``, or ``TooManySpans`` before the spans are parsed.
        ``counted``: the body's (spans, resource and scope entries), if the caller counted them
        already (``wire.count_spans``): not counted again."""
        limit = self.max_spans_per_request
        try:
            if counted is not None or len(body) > 2 * limit:  # else it cannot hold more: 2 bytes
                # a span at least
                spans, containers = counted if counted is not None else count_spans(body)
                if spans > limit or containers > limit:
                    raise TooManySpans(spans, containers, limit)
            request = RequestView.FromString(body)
        except DecodeError as exc:
            raise MalformedRequest(f"not a protobuf ExportTraceServiceRequest: {exc}") from None
        batch = DecodedBatch([], [])
        cache = self._cache.copy()  # this request's cache, seeded with the shared entries
        # scope key id -> the cache of spans whose scope names that key: their user ids are marked
        # with it (``keyed_user``), the same bytes under another key are another id
        keyed: dict[str, dict[bytes, tuple[str, object]]] | None = None
        scopes, resources, invalid, invalid_count = batch.scopes, batch.resources, None, 0
        try:
            for resource_index, resource_spans in enumerate(request.resource_spans):
                service = self._decode_resource(resource_spans.resource.attributes, batch, cache)
                if batch.invalid_count != invalid_count:  # rare: copied only then
                    invalid, invalid_count = batch.invalid_attributes.copy(), batch.invalid_count
                after_resource = invalid
                for scope_spans in resource_spans.scope_spans:
                    spans = scope_spans.spans
                    if not spans:
                        continue
                    key_id = self._scope_key(scope_spans.scope.attributes, batch, cache)
                    if key_id is None:
                        span_cache, key_mark = cache, None
                    else:
                        if keyed is None:
                            keyed = {}
                        span_cache = keyed.get(key_id)
                        if span_cache is None:
                            span_cache = keyed[key_id] = self._cache.copy()
                        key_mark = keyed_user("", key_id)
                    self._decode_spans(spans, service, received_ns, batch, resource_index,
                                       span_cache, key_mark)
                    if batch.invalid_count != invalid_count:  # rare: copied only then
                        invalid, invalid_count = batch.invalid_attributes.copy(), batch.invalid_count
                    scopes.append((len(batch.spans), len(spans), invalid))
                resources.append((len(scopes), after_resource))
        except DecodeError as exc:  # a span's status (kept raw, read per span)
            raise MalformedRequest(f"malformed span status: {exc}") from None
        return batch

    def _decode_resource(self, raw_attributes, batch: DecodedBatch,
                         cache: dict[bytes, tuple[str, object]]) -> tuple[str | None, ...]:
        values: dict[str, object] = {}
        for raw in raw_attributes:
            decoded = self._decode_attribute(raw, _RESOURCE_TABLE, batch, cache)
            if decoded is not None:
                values[decoded[0]] = decoded[1]
        return (values.get("service_name"), values.get("service_version"),
                values.get("service_instance"))

    def _scope_key(self, raw_attributes, batch: DecodedBatch,
                   cache: dict[bytes, tuple[str, object]]) -> str | None:
        """The key id the scope names for its spans' user ids, if any (once per scope)."""
        key_id = None
        for raw in raw_attributes:
            decoded = self._decode_attribute(raw, _SCOPE_TABLE, batch, cache)
            if decoded is not None:
                key_id = decoded[1]
        return key_id  # type: ignore[return-value]

    def _decode_spans(self, spans, service: tuple[str | None, ...], received_ns: int,
                      batch: DecodedBatch, resource_index: int,
                      cache: dict[bytes, tuple[str, object]], key_mark: str | None = None) -> None:
        """One scope's spans. Written as one flat loop with local names on purpose: this is
        where the sidecar spends its time (see benchmarks/sidecar_throughput.py). ``key_mark``:
        what marks the user ids of a scope that names their key (``keyed_user``); ``cache`` is
        then that key's, so a cached user id is marked once per request."""
        service_name, service_version, service_instance = service
        cache_get, table_get, remember = cache.get, _SPAN_TABLE.get, self._remember
        names_get, remember_name = self._names.get, self._remember_name
        hex_of: dict[bytes, str] = {}  # ids of this call only: bounded by the request
        hex_get = hex_of.get
        append, heartbeat = batch.spans.append, A.SpanKinds.HEARTBEAT
        for span in spans:
            trace_id, span_id, parent_id = span.trace_id, span.span_id, span.parent_span_id
            if (len(trace_id) != 16 or len(span_id) != 8 or (parent_id and len(parent_id) != 8)
                    or trace_id == _ZERO_TRACE_ID or span_id == _ZERO_SPAN_ID):
                _reject(batch, span, resource_index)
                continue
            # One string object per id and per span name, shared by every span that names it:
            # detectors keep many of these, and a shared string also keeps its cached hash.
            trace_hex = hex_get(trace_id)
            if trace_hex is None:
                trace_hex = hex_of[trace_id] = trace_id.hex()
            span_hex = hex_get(span_id)
            if span_hex is None:
                span_hex = hex_of[span_id] = span_id.hex()
            parent_hex = None
            if parent_id:
                parent_hex = hex_get(parent_id)
                if parent_hex is None and parent_id != _ZERO_SPAN_ID:  # all zero: a root
                    parent_hex = hex_of[parent_id] = parent_id.hex()
            name = span.name
            name = names_get(name) or remember_name(name)
            record = SpanRecord(trace_hex, span_hex, parent_hex, name,
                                span.start_time_unix_nano, span.end_time_unix_nano)
            route = raw_user = None
            for raw in span.attributes:
                hit = cache_get(raw)
                if hit is not None:
                    setattr(record, hit[0], hit[1])
                    continue
                # The common miss, inlined: a short string of a known key in the canonical
                # encoding  0A klen key 12 vlen 0A slen string  (users, run ids, event ids).
                size = len(raw)
                if size > 6 and raw[0] == 0x0A and raw[1] < 0x80:
                    at = raw[1] + 2
                    entry = table_get(raw[2:at])
                    if entry is None:
                        if (at + 2 > size or raw[at] == 0x12 and raw[at + 1] < 0x80
                                and at + 2 + raw[at + 1] == size
                                or not _names_another_key(raw, at)):
                            continue  # another instrumentation's attribute
                    elif (entry[4] and size > at + 3 and raw[at] == 0x12 and raw[at + 2] == 0x0A
                            and raw[at + 1] < 0x80 and raw[at + 1] == size - at - 2
                            and raw[at + 3] == size - at - 4):
                        try:
                            value = raw[at + 4:].decode()
                        except UnicodeDecodeError:
                            value = None  # the general path below counts it
                        if value:
                            if entry[5] and key_mark is not None:
                                value += key_mark
                            scope = entry[3]
                            if scope is REQUEST:
                                cache[raw] = (entry[1], value)
                            elif scope is SHARED:
                                cache[raw] = hit = (entry[1], value)
                                remember(raw, hit)
                            setattr(record, entry[1], value)
                            continue
                        if value is not None:
                            continue  # the empty string: absent
                hit = self._decode_attribute(raw, _SPAN_TABLE, batch, cache, key_mark)
                if hit is None:
                    continue
                if hit[0] is _ROUTE:
                    route = hit[1]
                elif hit[0] is _RAW_USER:
                    raw_user = hit[1]
                elif hit[0] is _EXECUTION or hit[0] is _REQUEST_SPAN:
                    # one string object per id: the execute (request) span's own id, its
                    # children's parent ids, and the spans naming it (from the request's cache
                    # after this)
                    span_bytes = bytes.fromhex(hit[1])  # type: ignore[arg-type]
                    named = hex_get(span_bytes)
                    if named is None:
                        named = hex_of[span_bytes] = hit[1]  # type: ignore[assignment]
                    setattr(record, hit[0], named)
                    if len(raw) <= _CACHE_MAX_ATTRIBUTE_BYTES:
                        cache[raw] = (hit[0], named)
                else:
                    setattr(record, hit[0], hit[1])
            if route is not None and record.entry_point is None:
                record.entry_point = route
            if raw_user is not None and record.user is None:
                record.user = raw_user  # (marked with the scope's key already, if it names one)
            if record.user_key is not None and key_mark is None:
                _mark_users(record)  # a request span: the key is its own attribute
            after = record.after_response_ns
            if after is not None and after > 0 and record.kind == A.SpanKinds.REQUEST:
                # its ASGI call went on after the response (background tasks): it ran until then
                record.end_ns += after
            status = span.status
            if status and status_is_error(status):
                record.error = True
            record.service_name = service_name
            record.service_version = service_version
            record.service_instance = service_instance
            record.received_ns = received_ns
            append(record)
            if record.kind is heartbeat:
                batch.heartbeats.append(record)

    def _decode_attribute(self, raw: bytes, table: dict, batch: DecodedBatch,
                          cache: dict[bytes, tuple[str, object]],
                          key_mark: str | None = None) -> tuple[str, object] | None:
        """The slow path: one attribute not in the cache. Returns (slot, value) or None to skip."""
        key_bytes, value_bytes = _split_key_value(raw)
        entry = table.get(key_bytes)
        if entry is None:
            return None  # not ours (another instrumentation's attribute): ignored
        key, slot, expected, scope, _, is_user = entry
        value = _read_value(value_bytes, expected)
        if value.__class__ is str and (len(value) > MAX_STRING_CHARS or slot in _SPAN_ID_SLOTS and (
                len(value) != 16 or value.strip(_HEX_DIGITS)  # type: ignore[union-attr]
                or value == _ZERO_HEX_SPAN_ID)):
            value = _INVALID
        allowed = _ALLOWED.get(slot)
        if allowed is not None and value is not _ABSENT and value is not _INVALID:
            value = allowed.get(value, _INVALID)
        if value is _INVALID:
            batch.invalid_attributes[key] += 1
            batch.invalid_count += 1
            return None
        if value is _ABSENT:
            return None
        if is_user and key_mark is not None:
            value = (value + key_mark if value.__class__ is str  # type: ignore[operator]
                     else tuple(user + key_mark for user in value))  # type: ignore[union-attr]
        hit = _NO_OP_HIT if slot is _UNUSED else (slot, value)
        if scope is not None and len(raw) <= _CACHE_MAX_ATTRIBUTE_BYTES:
            cache[raw] = hit
            if scope is SHARED:
                self._remember(raw, hit)
        return hit

    def _remember_name(self, raw: bytes) -> str:
        if len(raw) > _NAME_MAX_CHARS:  # not cached: a flood of long distinct names must not grow
            # memory; shortened (see _NAME_MAX_CHARS): the first 4 bytes a character hold them
            return _name_text(raw[:4 * _NAME_MAX_CHARS])[:_NAME_MAX_CHARS]
        name = _name_text(raw)
        if len(self._names) >= _NAMES_LIMIT:
            self._names.clear()
        self._names[raw] = name
        return name

    def _remember(self, raw: bytes, hit: tuple[str, object]) -> None:
        """Into the shared cache. Callers pass short attributes only (at most
        ``_CACHE_MAX_ATTRIBUTE_BYTES``: checked by the slow path, implied by the fast path's
        one-byte lengths)."""
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()  # a flood of distinct values must not grow memory
        self._cache[raw] = hit


def _mark_users(record: SpanRecord) -> None:
    """Mark the user ids of a span that names their key itself (a request span) with it."""
    mark = keyed_user("", record.user_key)  # type: ignore[arg-type]
    for name in USER_FIELDS:
        user = getattr(record, name)
        if user is not None:
            setattr(record, name, user + mark)
    for name in USER_LIST_FIELDS:
        users = getattr(record, name)
        if users is not None:
            setattr(record, name, tuple(user + mark for user in users))


def _reject(batch: DecodedBatch, span, resource_index: int) -> None:
    batch.rejected += 1
    if not batch.rejection:
        batch.rejection = (f"resource_spans[{resource_index}] span {_shown(span.name)}: "
                           f"{_id_problem(span.trace_id, span.span_id, span.parent_span_id)}")


def _name_text(raw: bytes) -> str:
    """A span name as sent (the view keeps it as bytes: see wire.py); bytes that are not UTF-8 are
    read as replacement characters (U+FFFD)."""
    return raw.decode("utf-8", "replace")


def _shown(raw: bytes) -> str:
    return shown_name(_name_text(raw))


def shown_name(name: str) -> str:
    """A span name for a message: quoted, at most ``_NAME_MAX_CHARS`` of it (OTLP/JSON's too)."""
    if len(name) <= _NAME_MAX_CHARS:
        return repr(name)
    return f"{name[:_NAME_MAX_CHARS]!r}... ({len(name)} characters)"


def _id_problem(trace_id: bytes, span_id: bytes, parent_id: bytes) -> str:
    if len(trace_id) != 16 or trace_id == _ZERO_TRACE_ID:
        return f"trace_id must be 16 bytes and not all zero, got {len(trace_id)} bytes"
    if len(span_id) != 8 or span_id == _ZERO_SPAN_ID:
        return f"span_id must be 8 bytes and not all zero, got {len(span_id)} bytes"
    return f"parent_span_id must be empty or 8 bytes, got {len(parent_id)} bytes"


def _split_key_value(raw: bytes) -> tuple[bytes, bytes]:
    """KeyValue bytes -> (key bytes, AnyValue bytes). Fast path for the canonical encoding
    (key field, then value field, short lengths); anything else (a long key or value) goes through
    a view of the KeyValue whose strings are not checked for UTF-8 (wire.py): a long attribute that
    is not UTF-8 is judged alone, as a short one is, not refused with the whole request."""
    size = len(raw)
    if size >= 2 and raw[0] == 0x0A and raw[1] < 0x80:
        value_at = 2 + raw[1]
        if value_at == size:
            return raw[2:value_at], b""
        if (value_at + 2 <= size and raw[value_at] == 0x12 and raw[value_at + 1] < 0x80
                and value_at + 2 + raw[value_at + 1] == size):
            return raw[2:value_at], raw[value_at + 2:]
    try:
        return split_key_value(raw)
    except DecodeError as exc:
        raise MalformedRequest(f"malformed span attribute: {exc}") from None


def _names_another_key(raw: bytes, at: int) -> bool:
    """Whether a KeyValue whose first key (``raw[2:at]``) is not ours names another key after it:
    protobuf keeps the last of a field sent twice, so the attribute may be ours after all (the
    general path reads it). Asked only where the key is not followed by one value with a length of
    one byte, the canonical encoding of a short attribute; a long one (two bytes) is answered
    here too, without a parse. Malformed: no (skipped, as it always was)."""
    size = len(raw)
    if (raw[at] == 0x12 and at + 3 <= size and raw[at + 1] >= 0x80 and raw[at + 2] < 0x80
            and at + 3 + (raw[at + 1] & 0x7F | raw[at + 2] << 7) == size):
        return False
    try:
        return split_key_value(raw)[0] != raw[2:at]
    except DecodeError:
        return False


def _read_value(value: bytes, expected: str) -> object:
    """AnyValue bytes -> the value of the expected member, ``_ABSENT`` or ``_INVALID``."""
    size = len(value)
    if expected is _STR:
        if size >= 2 and value[0] == 0x0A and value[1] < 0x80 and size == 2 + value[1]:
            try:
                return value[2:].decode() or _ABSENT
            except UnicodeDecodeError:
                return _INVALID
    elif expected is _BOOL:
        if value == b"\x10\x01":
            return True
        if value == b"\x10\x00":
            return False
    elif expected is _INT and size == 2 and value[0] == 0x18 and value[1] < 0x80:  # small int_value
        return value[1]
    return _read_value_slowly(value, expected)


def _read_value_slowly(value: bytes, expected: str) -> object:
    try:
        any_value = AnyValue.FromString(value)
    except DecodeError:
        return _INVALID
    if any_value.WhichOneof("value") != expected:
        return _INVALID
    if expected is _STRINGS:
        return _strings(any_value.array_value.values)
    result = getattr(any_value, expected)
    return _ABSENT if result == "" else result


def _strings(values) -> object:
    """An array of user ids (``pathwatch.connection.users``) as a tuple: each a non-empty string
    of at most ``MAX_STRING_CHARS``, at most ``MAX_CONNECTION_USERS`` of them (else invalid, as a
    value of the wrong type); an empty array is absent."""
    if len(values) > A.MAX_CONNECTION_USERS:
        return _INVALID
    users = []
    for value in values:
        if value.WhichOneof("value") != _STR or not value.string_value:
            return _INVALID
        text = value.string_value
        if len(text) > MAX_STRING_CHARS:
            return _INVALID
        users.append(text)
    return tuple(users) if users else _ABSENT
