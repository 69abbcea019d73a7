"""The span contract: every attribute name pathwatch writes, in one place.

Both sides import this module: ``instrumentation`` writes these keys and the
sidecar's decoder reads them, so the two cannot drift. ``docs/conventions.md``
documents each name and a test pins that the document and this module agree.

OpenTelemetry semantic conventions are used where they exist; the rest lives
under ``pathwatch.``. User ids are pseudonymized (HMAC) before they are set.
"""

from __future__ import annotations

from typing import Final

# --- semantic conventions -------------------------------------------------------
CODE_FUNCTION_NAME: Final = "code.function.name"  # "module.Class.method"
ENDUSER_PSEUDO_ID: Final = "enduser.pseudo.id"  # ambient user (pseudonymized)
ENDUSER_ID: Final = "enduser.id"  # ambient user, raw: only with allow_raw_user_ids
MESSAGING_OPERATION_TYPE: Final = "messaging.operation.type"  # "create" (emit) / "send" (write)
MESSAGING_MESSAGE_ID: Final = "messaging.message.id"  # event id, on emit and write
HTTP_ROUTE: Final = "http.route"  # set by the FastAPI instrumentation on request spans
THREAD_ID: Final = "thread.id"  # OS thread ident of the call (semconv)

# --- what ran --------------------------------------------------------------------
SPAN_KIND: Final = "pathwatch.kind"  # one of SpanKinds below
ROLE: Final = "pathwatch.role"  # role name from the path map, e.g. "execution_engine"
IMPLEMENTATION: Final = "pathwatch.implementation"  # "module.Class" that defines the instance's type
CANONICAL: Final = "pathwatch.canonical"  # bool: the implementation is the role's canonical one
RETIRED: Final = "pathwatch.retired"  # bool: the implementation is marked retired
INSTANCE_ID: Final = "pathwatch.instance.id"  # stable per-object token (survives id() reuse)
ENTRY_POINT: Final = "pathwatch.entry_point"  # route template or socket path of the request
CALLER: Final = "pathwatch.caller"  # "module.function" of the nearest non-pathwatch caller frame
NESTED: Final = "pathwatch.nested"  # bool: runs inside another wrapped call of the same role
#: the span id (16 hex digits) of that call of the same role, on nested calls: spans of other roles or
#: foreign spans (an LLM client, a manual span) may sit between the two
NESTED_OUTER: Final = "pathwatch.nested.outer_span_id"
#: on emit spans: the span id (16 hex digits) of the execution the emit is part of — the innermost
#: execute call still running around it in its task's context that names the emit's run and is not
#: nested in a call of its own role. The sidecar tells which execution made a copy of an event by it
#: (not by time: two executions of one run may overlap in one trace)
EXECUTION_SPAN_ID: Final = "pathwatch.execution.span_id"
#: bool, set only when true, on an execute span: its task was cancelled while the call ran
#: (``asyncio.CancelledError`` went through it: a run its user cancelled, its socket closed, a
#: timeout around it). Its status is ERROR too, as any call that raised. A generator or async
#: generator method closed while its consumer's task was being cancelled says it too (its status
#: as it was: nothing raised through it)
CANCELLED: Final = "pathwatch.cancelled"
#: on every span made under a request whose server span pathwatch stamped: that request span's id
#: (16 hex digits), its parent or not. A task started in the request names it for its whole life,
#: also after the request ended. The sidecar judges the span against that request (not by time
#: among a trace's requests): a socket's request span arrives only when the socket closes
REQUEST_SPAN_ID: Final = "pathwatch.request.span_id"

# --- for whom ----------------------------------------------------------------------
USER_OWNER: Final = "pathwatch.user.owner"  # user the instance was built for (captured at construction)
USER_SUBJECT: Final = "pathwatch.user.subject"  # user found in the call's arguments
USER_TARGET: Final = "pathwatch.user.target"  # user an event is addressed to
USER_SCOPED: Final = "pathwatch.user_scoped"  # bool: instances of this role must serve one user
#: which key made the user ids (8 hex digits of an HMAC of a constant under it; ``raw`` when raw ids
#: are allowed): on request spans with a user, and on the instrumentation scope of pathwatch's own
#: spans. Pseudonyms made with two keys (a rotation, two processes with different keys) cannot be
#: compared: the sidecar judges users only within one key.
PSEUDONYM_KEY_ID: Final = "pathwatch.pseudonym.key_id"

# --- the work --------------------------------------------------------------------
RUN_ID: Final = "pathwatch.run.id"  # agent run id
CONVERSATION_THREAD_ID: Final = "pathwatch.thread.id"  # conversation thread id (not an OS thread)
EVENT_TYPE: Final = "pathwatch.event.type"  # e.g. "agent_started"

# --- delivery --------------------------------------------------------------------
CONNECTION_ID: Final = "pathwatch.connection.id"  # socket connection id given by the middleware
CONNECTION_USER: Final = "pathwatch.connection.user"  # the connection's user at the write
#: string[], on a request span: every user the connection (or HTTP request) had, in order, when its
#: user changed after it connected (a first-message login, a logout and a login as another user, an
#: HTTP request's account switch)
CONNECTION_USERS: Final = "pathwatch.connection.users"
MAX_CONNECTION_USERS: Final = 16  # users CONNECTION_USERS lists at most (more are not added)
#: bool, set only when true, with CONNECTION_USERS: the connection had more users than it lists (the
#: later ones were not added): a span of a user not listed may have run for one of them
CONNECTION_USERS_TRUNCATED: Final = "pathwatch.connection.users_truncated"
#: int, on an HTTP request span: how long (ns) the request's ASGI call went on after its response
#: was complete (background tasks); set when 1 ms or more, or
#: when one of the request's spans started after the response. The sidecar takes the request as
#: running until its end plus this
REQUEST_AFTER_RESPONSE_NS: Final = "pathwatch.request.after_response_ns"
DELIVERY_OUTCOME: Final = "pathwatch.delivery.outcome"  # one of DeliveryOutcomes below
DISPATCH_WRITES: Final = "pathwatch.dispatch.writes"  # int: socket writes made inside a dispatch call
DELIVERY_LINK: Final = "pathwatch.delivery.link"  # how the write found its emit: "context" / "message_key" / "none"
#: bool, set only when true: a dispatch call of a method the path map declares a fan-out (one message
#: to several users by design: a room, a thread's participants, everyone), and every write made
#: while it runs; such a call names no target
DELIVERY_FAN_OUT: Final = "pathwatch.delivery.fan_out"

# --- coverage honesty (on the periodic heartbeat span) ----------------------------
DROPPED_SPANS: Final = "pathwatch.sdk.dropped_spans"  # cumulative spans the SDK dropped in this process
INSTRUMENTATION_ERRORS: Final = "pathwatch.sdk.instrumentation_errors"  # cumulative errors caught
# cumulative emits forgotten by the bounded emit table before a write could find them by key
PENDING_EMITS_EVICTED: Final = "pathwatch.sdk.pending_emits_evicted"
HEARTBEAT_INTERVAL_S: Final = "pathwatch.sdk.heartbeat_interval_s"  # seconds between heartbeats
# int: 1 on the first heartbeat of the process (its counts), +1 on each one after
HEARTBEAT_SEQUENCE: Final = "pathwatch.sdk.heartbeat_sequence"
COUNTS_SINCE_S: Final = "pathwatch.sdk.counts_since_s"  # double: unix time the counts started
#: bool, on every heartbeat: true on the one the process sends as it stops cleanly (the app's ASGI
#: lifespan shutdown, ``uninstrument()``, the exit), false on the others. A process whose heartbeats
#: carry it and that stops heartbeating without a true one was killed outright (SIGKILL, an OOM
#: kill): the sidecar counts the spans its exporter still held as lost
HEARTBEAT_FINAL: Final = "pathwatch.sdk.heartbeat_final"

# --- resource --------------------------------------------------------------------
RESOURCE_SDK_VERSION: Final = "pathwatch.sdk.version"


class SpanKinds:
    """Values of ``pathwatch.kind``."""

    REQUEST: Final = "request"  # the HTTP / WebSocket server span (root of the work)
    EXECUTE: Final = "execute"  # an engine / supervisor call
    EMIT: Final = "emit"  # an event emitter call that produces one event
    DISPATCH: Final = "dispatch"  # a user-addressed send that fans out to that user's sockets
    DELIVER: Final = "deliver"  # one socket write
    HEARTBEAT: Final = "heartbeat"  # periodic coverage report
    ALL: Final = frozenset({REQUEST, EXECUTE, EMIT, DISPATCH, DELIVER, HEARTBEAT})
    #: kinds a path-map role may declare
    ROLE_KINDS: Final = frozenset({EXECUTE, EMIT, DISPATCH, DELIVER})


class DeliveryOutcomes:
    """Values of ``pathwatch.delivery.outcome``."""

    WRITTEN: Final = "written"
    FAILED: Final = "failed"
    CLOSED: Final = "closed"
    NO_CONNECTION: Final = "no_connection"  # a user-addressed send found no socket to write to
    #: its task was cancelled while it ran (asyncio.CancelledError: the run cancelled, a timeout
    #: around it): stopped by the app, not failed
    CANCELLED: Final = "cancelled"
    ALL: Final = frozenset({WRITTEN, FAILED, CLOSED, NO_CONNECTION, CANCELLED})


HEARTBEAT_SPAN_NAME: Final = "pathwatch.heartbeat"

#: Every attribute key pathwatch itself may set on a span (the contract; pinned by tests).
SPAN_ATTRIBUTES: Final = frozenset(
    {
        CODE_FUNCTION_NAME,
        ENDUSER_PSEUDO_ID,
        ENDUSER_ID,
        MESSAGING_OPERATION_TYPE,
        MESSAGING_MESSAGE_ID,
        THREAD_ID,
        SPAN_KIND,
        ROLE,
        IMPLEMENTATION,
        CANONICAL,
        RETIRED,
        INSTANCE_ID,
        ENTRY_POINT,
        CALLER,
        NESTED,
        NESTED_OUTER,
        EXECUTION_SPAN_ID,
        CANCELLED,
        REQUEST_SPAN_ID,
        DISPATCH_WRITES,
        USER_OWNER,
        USER_SUBJECT,
        USER_TARGET,
        USER_SCOPED,
        PSEUDONYM_KEY_ID,
        RUN_ID,
        CONVERSATION_THREAD_ID,
        EVENT_TYPE,
        CONNECTION_ID,
        CONNECTION_USER,
        CONNECTION_USERS,
        CONNECTION_USERS_TRUNCATED,
        REQUEST_AFTER_RESPONSE_NS,
        DELIVERY_OUTCOME,
        DELIVERY_LINK,
        DELIVERY_FAN_OUT,
        DROPPED_SPANS,
        INSTRUMENTATION_ERRORS,
        PENDING_EMITS_EVICTED,
        HEARTBEAT_INTERVAL_S,
        HEARTBEAT_SEQUENCE,
        COUNTS_SINCE_S,
        HEARTBEAT_FINAL,
    }
)

RESOURCE_ATTRIBUTES: Final = frozenset({RESOURCE_SDK_VERSION})
#: Attributes of the instrumentation scope of pathwatch's own tracer (not its heartbeat's).
SCOPE_ATTRIBUTES: Final = frozenset({PSEUDONYM_KEY_ID})
