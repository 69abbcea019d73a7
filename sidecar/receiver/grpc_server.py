"""OTLP/gRPC: ``opentelemetry.proto.collector.trace.v1.TraceService/Export``.

The servicer implements the generated ``TraceServiceServicer``, but is registered with a raw-bytes
request deserializer instead of ``add_TraceServiceServicer_to_server``: the generated one parses
into the full OTLP classes before we see the request (about four times slower than our decode view,
see wire.py), and a body it cannot parse would be answered INTERNAL by grpc itself, uncounted,
where OTLP wants INVALID_ARGUMENT. It is registered as a client-streaming method (the wire is the
same for a unary call) so that the body is read by the servicer, not by grpc before it: a call whose
message has not arrived ``read_timeout_s`` after the call started (when grpc handed it to the
readers' pool, ``_Readers``, however long it then waited for a reader) is cancelled (the client sees
CANCELLED, which OTLP exporters retry) and counted, so a stalled upload holds a reader thread until
then at most, not for ever. The servicer reads until the client half-closes (a unary client
does so with its message): a call of two messages or more — a raw streaming client; unary has one
— is INVALID_ARGUMENT, none of it taken (taking the first alone answered OK for spans never read; a
client that sends one and never half-closes waits for ``read_timeout_s``, as a stalled one). That
read costs a call 70-90 us of round trip (sequential 512-span calls: 1.37 ms against 1.28 ms).
Requests above ``max_message_bytes`` are refused by grpc with RESOURCE_EXHAUSTED before they reach
us (permanent: no RetryInfo, a retry would be refused again).

RESOURCE_EXHAUSTED and UNAVAILABLE of ours carry a ``google.rpc.Status`` with a
``google.rpc.RetryInfo`` (``grpc-status-details-bin``): the OTLP specification makes
RESOURCE_EXHAUSTED retryable only with it, and the Collector's otlp exporter and the Go SDK drop the
batch for good without it. The Python SDK's exporter (opentelemetry-exporter-otlp-proto-grpc)
retries both codes without it, but reads the delay from a trailer of its own,
``google.rpc.retryinfo-bin`` (the RetryInfo alone), never from the status: so the RetryInfo goes
in both (without it, that exporter waited 1, 2, 4 s of its own and gave up after 4 attempts).

Threads: grpc hands a call to a thread when it starts, before its message arrives, so the threads
are readers: ``readers`` (2) of them, each decoding the body it read. A stalled upload holds one
until ``read_timeout_s`` after its call started at most (it held one for ever); stalled clients,
however many calls they open, can therefore hold gRPC ingestion back for that long, and 50 ms more
per call that waited past it (``LATE_GRACE_NS``, on 2 readers: 100 stalled calls, 5 s) (lower
``receiver.read_timeout_s`` where clients are not trusted). The deadline ran from when a reader took
the call up: 40 stalled calls on one connection held every other export back 20 x read_timeout_s.
More readers cost the data path: with 4 and 16 (decoding at most 2 at once),
benchmarks/sidecar_throughput.py measured 8-12 % and 15 % fewer spans/s and 10 and 35 MiB more RSS
(more bodies and batches in flight at once, more GIL hand-offs), against the same figures as before
with 2.

Memory: bodies are read by at most ``readers`` threads at once, each at most
``max_message_bytes``. Calls waiting for a reader are not refused (grpc's ``maximum_concurrent_rpcs`` refused
them with an uncounted RESOURCE_EXHAUSTED without RetryInfo); what each holds is what HTTP/2 flow
control lets its client send ahead, the 64 KiB initial stream window, because BDP probing is off
(with it, grpc widened the window and buffered whole bodies of waiting calls). Each connection may
have at most 100 streams open at once (HTTP/2's recommended minimum; clients queue the rest once
they have the server's SETTINGS — streams a new connection opens beyond it before then are refused
and fail UNAVAILABLE, which OTLP clients retry), and at most ``max_connections`` connections are
served (``receiver.grpc_max_connections``, 1024 by default: a gateway needs one per exporting
pod, or Collector replica; more are closed at once by grpc, the client sees UNAVAILABLE and
retries, and nothing counts them: grpc does not tell; one that has not sent the HTTP/2 preface
and SETTINGS ``read_timeout_s`` after it opened is closed, not after grpc's 120 s, which let
silent sockets hold the cap that long). Waiting calls thus hold at most 6.4 MiB per
connection, and their metadata 1.6 MiB more (``METADATA_BYTES`` each).

Keepalive: the server pings every connection (idle ones too) every ``keepalive_time_s`` and closes
one whose peer has not answered within ``keepalive_timeout_s`` — a dead host, a frozen process, a
half-open TCP connection — cancelling its calls, which would otherwise wait for ever (or, idle,
count against ``max_connections`` for ever). The wait for the ping's ack is
``grpc.http2.ping_timeout_ms`` (60 s by default): ``grpc.keepalive_timeout_ms`` alone did not
shorten it (grpc 1.85, measured). grpc sends a server's pings at most once a minute whatever
``keepalive_time_s``. It keeps pinging while it sends nothing (no cap on pings without data: a
stalled upload gets no data). Clients may ping too:
every ``min_client_ping_interval_s`` (5 s) at most, with or without calls (grpc's server default,
5 minutes and none while idle, answers a client that keeps alive every 30 s with a GOAWAY
"too_many_pings"). A connection without a call for ``read_timeout_s`` is sent a GOAWAY (its client
connects again for its next call, by itself): a live client opening none, answering the pings,
held its place among ``max_connections`` for ever.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent import futures

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from sidecar.receiver.export import RETRY_DELAYS_S, ExportHandler, ExportStatus
from sidecar.receiver.refusals import (OVER_BUDGET, SHUTTING_DOWN, TOO_MANY_ATTRIBUTES,
                                       TOO_MANY_SPANS)
from sidecar.threads import WatchedThread, name_os_thread

log = logging.getLogger(__name__)

PROTOCOL = "grpc"
#: pathwatch_receiver_requests_total{status} of a call that ended before its body was read
CANCELLED = grpc.StatusCode.CANCELLED.name
SERVICE_NAME = trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name
#: the permanent errors; the retryable ones (``_RETRYABLE``) are answered with a RetryInfo
_CODES = {ExportStatus.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
          # permanent only (more spans than receiver.max_spans_per_request): no RetryInfo
          ExportStatus.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED}
_EMPTY_RESPONSE = trace_service_pb2.ExportTraceServiceResponse()
_RETRYABLE = {ExportStatus.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
              ExportStatus.UNAVAILABLE: code_pb2.UNAVAILABLE}
#: pathwatch_receiver_requests_total{status} of every call the servicer answers or sees end
STATUSES = (*(status.value for status in ExportStatus), CANCELLED)
#: pathwatch_receiver_refused_requests_total{reason} it counts (grpc refuses a message above
#: max_message_bytes before the servicer sees it, and has no cap of requests in flight)
REASONS = (OVER_BUDGET, SHUTTING_DOWN, TOO_MANY_SPANS, TOO_MANY_ATTRIBUTES)


#: the most metadata (headers) a call may carry, as OTLP/HTTP's request head: 16 KiB, grpc's hard
#: limit. Its soft limit (8 KiB by default) refused calls above it at random, more often nearer the
#: hard one (a 12 KiB header: about half), RESOURCE_EXHAUSTED without RetryInfo, so an exporter with a
#: long header lost batches at random; now every call within it is served, every call above refused
METADATA_BYTES = 16 * 1024


#: the trailer the Python SDK's exporter reads the RetryInfo from (see the module's docstring)
RETRY_INFO_TRAILER = "google.rpc.retryinfo-bin"


def _packed(message) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(message)
    return detail


def _retry(delay_s: float) -> tuple[any_pb2.Any, tuple[tuple[str, bytes], ...]]:
    """The status detail and the Python exporter's trailer telling a client to retry in
    ``delay_s``."""
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(delay_s * 1e9))
    info = error_details_pb2.RetryInfo(retry_delay=duration)
    return _packed(info), ((RETRY_INFO_TRAILER, info.SerializeToString()),)


#: one per delay an answer may carry (a refusal picks one at random: see RETRY_DELAYS_S)
_RETRIES = tuple(_retry(delay_s) for delay_s in RETRY_DELAYS_S)
_ENDED_WAIT_S = 0.2


def abort_retryable(context: grpc.ServicerContext, code: int, message: str) -> None:
    """End the call with ``code`` and a RetryInfo telling the client when to retry, in the status
    and in the Python exporter's trailer (raises). ``abort_with_status`` would replace the
    trailers with the status's."""
    detail, trailer = random.choice(_RETRIES)
    status = rpc_status.to_status(status_pb2.Status(code=code, message=message, details=[detail]))
    context.set_trailing_metadata(status.trailing_metadata + trailer)
    context.abort(status.code, status.details)


#: how long a call taken up by a reader after its read deadline passed has to give its body
LATE_GRACE_NS = 100_000_000


class ReadDeadlines:
    """Cancels the calls whose body has not arrived ``timeout_s`` after they were set here. One
    thread for all: every deadline is as long, so they fall due in the order they were set."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_ns = int(timeout_s * 1e9)
        self._pending: dict[int, tuple[int, grpc.ServicerContext]] = {}  # in deadline order
        self._next_token = 0
        self._changed = threading.Condition()
        self._stopped = False
        self.thread = WatchedThread(target=self._run, name="pathwatch-grpc-deadlines", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify()
        if self.thread.ident is not None:
            self.thread.join(5)

    def set(self, context: grpc.ServicerContext, started_ns: int | None = None) -> int:
        """The call's deadline, ``timeout_s`` after ``started_ns`` (its start: when grpc handed it
        over, ``time.monotonic_ns()``; now when not given), and ``LATE_GRACE_S`` from now at
        least: a call that waited that long for a reader may have its body buffered already (a
        burst of live exporters' calls: 52 of 1,000 were cancelled so at read_timeout_s=1
        without it), and a stalled one costs a reader no more than that. Readers take calls up in
        the order they came, two at once: a deadline set after one a little later is cancelled
        with it (they are kept in the order set)."""
        now = time.monotonic_ns()
        deadline = max((now if started_ns is None else started_ns) + self._timeout_ns,
                       now + min(self._timeout_ns, LATE_GRACE_NS))
        with self._changed:
            token = self._next_token
            self._next_token += 1
            if not self._pending:
                self._changed.notify()  # the thread waits for a first deadline
            self._pending[token] = (deadline, context)
        return token

    @property
    def pending(self) -> int:
        return len(self._pending)

    def clear(self, token: int) -> bool:
        """Done with the call's deadline; False when it had passed (the call was cancelled)."""
        with self._changed:
            return self._pending.pop(token, None) is not None

    def _run(self) -> None:
        name_os_thread()
        while True:
            with self._changed:
                while True:
                    if self._stopped:
                        return
                    if self._pending:
                        token, (deadline, context) = next(iter(self._pending.items()))
                        left_ns = deadline - time.monotonic_ns()
                        if left_ns <= 0:
                            del self._pending[token]
                            break
                        self._changed.wait(left_ns / 1e9)
                    else:
                        self._changed.wait()
            context.cancel()  # the reader blocked on its body gets an RpcError (outside the lock)


#: when grpc handed the call the reader runs over (``time.monotonic_ns()``): its start
_call = threading.local()


def _run_stamped(started_ns: int, fn, args, kwargs):
    _call.started_ns = started_ns
    try:
        return fn(*args, **kwargs)
    finally:
        _call.started_ns = None


class _Readers(futures.ThreadPoolExecutor):
    """The readers' pool. grpc submits a call to it as the call starts, however long it then waits
    for a reader: each call is stamped with that moment, from which its read deadline runs."""

    def submit(self, fn, /, *args, **kwargs):
        return super().submit(_run_stamped, time.monotonic_ns(), fn, args, kwargs)


def _let_grpc_end(context: grpc.ServicerContext) -> None:
    """Give grpc a moment to end a call that gave no message: one grpc ended — its client cancelled
    it, its connection is gone, or grpc refused the message (above ``max_message_bytes``, or
    inflating past it) — may report the missing message a moment before it ends, while a call its
    client closed without one stays open until answered. ``context.is_active()`` then tells them
    apart (grpc runs the callbacks only once the call is no longer active)."""
    ended = threading.Event()
    if context.add_callback(ended.set):
        ended.wait(_ENDED_WAIT_S)


class TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, handler: ExportHandler, deadlines: ReadDeadlines) -> None:
        self._handler = handler
        self._deadlines = deadlines

    def Export(self, request_iterator, context: grpc.ServicerContext):  # noqa: N802 (gRPC's name)
        refused = self._handler.refuse_unread(PROTOCOL)
        if refused is not None:  # not a single span fits: refused before the message is read
            self._handler.count_request(PROTOCOL, refused.status.value)
            abort_retryable(context, _RETRYABLE[refused.status], refused.message)
        token = self._deadlines.set(context, getattr(_call, "started_ns", None))
        extra = None
        try:
            request = next(request_iterator, None)
            if request is None:
                _let_grpc_end(context)
            else:  # a unary client half-closes with its message: this returns at once
                extra = next(request_iterator, None)
        except grpc.RpcError:  # cancelled: by the client, its connection is gone, or the deadline
            request = None  # no longer active: counted CANCELLED below
        if not self._deadlines.clear(token) or not context.is_active():
            self._handler.count_request(PROTOCOL, CANCELLED)
            # the deadline thread may have passed it without having cancelled it yet (it cancels
            # outside its lock) while its body arrived: cancelled here too, or grpc would answer
            # the empty response OK and the client would never send the spans again
            context.cancel()
            return _EMPTY_RESPONSE  # nobody reads it: the call is over
        if request is None:
            self._handler.count_request(PROTOCOL, ExportStatus.INVALID_ARGUMENT.value)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no request message: the client "
                          "closed the call without sending an ExportTraceServiceRequest")
        if extra is not None:  # taking the first alone would answer OK for spans never read
            self._handler.count_request(PROTOCOL, ExportStatus.INVALID_ARGUMENT.value)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "more than one request message: an "
                          "Export call carries one ExportTraceServiceRequest (unary); none taken")
        result = self._handler.export(request, PROTOCOL)
        self._handler.count_request(PROTOCOL, result.status.value)
        if result.status in _RETRYABLE and not result.permanent:
            abort_retryable(context, _RETRYABLE[result.status], result.message)
        if result.status is not ExportStatus.OK:
            context.abort(_CODES[result.status], result.message)
        if not result.rejected_spans:
            return _EMPTY_RESPONSE
        response = trace_service_pb2.ExportTraceServiceResponse()
        response.partial_success.rejected_spans = result.rejected_spans
        response.partial_success.error_message = result.message
        return response


class GrpcReceiver:
    """The gRPC server: ``readers`` threads read and decode bodies; no cap on calls waiting for a
    reader (see the module's docstring for what bounds their memory)."""

    def __init__(self, endpoint: str, handler: ExportHandler, *, max_message_bytes: int,
                 read_timeout_s: float = 30.0, readers: int = 2,
                 max_streams_per_connection: int = 100, max_connections: int = 1024,
                 keepalive_time_s: float = 60.0, keepalive_timeout_s: float = 20.0,
                 min_client_ping_interval_s: float = 5.0) -> None:
        self._endpoint = endpoint
        self._deadlines = ReadDeadlines(read_timeout_s)
        self._server = grpc.server(
            _Readers(max_workers=readers, thread_name_prefix="pathwatch-grpc",
                     initializer=name_os_thread),
            options=[("grpc.max_receive_message_length", max_message_bytes),
                     ("grpc.so_reuseport", 0),  # a taken port must fail, not be shared
                     # calls waiting for a reader hold the initial 64 KiB stream window, no more
                     ("grpc.http2.bdp_probe", 0),
                     ("grpc.max_concurrent_streams", max_streams_per_connection),
                     # one limit for a call's metadata: above grpc's soft one (8 KiB) it refused
                     # calls at random below its hard one, without RetryInfo (see METADATA_BYTES)
                     ("grpc.max_metadata_size", METADATA_BYTES),
                     ("grpc.absolute_max_metadata_size", METADATA_BYTES),
                     # a stream stops counting against that limit when it ends, as its client
                     # sees it (with grpc's default, only once freed: a client that opened its
                     # next stream at once was refused, UNAVAILABLE)
                     ("grpc.http.overload_protection", 0),
                     ("grpc.max_allowed_incoming_connections", max_connections),
                     # a connection that has not sent the HTTP/2 preface and SETTINGS by then is
                     # closed (grpc's default, 120 s, let silent sockets hold the cap that long)
                     ("grpc.server_handshake_timeout_ms", int(read_timeout_s * 1000)),
                     # and one without a call for that long is sent a GOAWAY (its client connects
                     # again for its next call): a live client opening none held its place for ever
                     ("grpc.max_connection_idle_ms", int(read_timeout_s * 1000)),
                     ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
                     ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
                     ("grpc.http2.ping_timeout_ms", int(keepalive_timeout_s * 1000)),  # see above
                     ("grpc.keepalive_permit_without_calls", 1),
                     ("grpc.http2.max_pings_without_data", 0),
                     ("grpc.http2.min_ping_interval_without_data_ms",
                      int(min_client_ping_interval_s * 1000))])
        service = TraceService(handler, self._deadlines)
        handler.declare(PROTOCOL, STATUSES, REASONS)
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Export": grpc.stream_unary_rpc_method_handler(
                service.Export, request_deserializer=None,
                response_serializer=trace_service_pb2.ExportTraceServiceResponse.SerializeToString),
        }),))
        self.port = 0

    @property
    def thread(self) -> WatchedThread:
        """The thread of the read deadlines: the liveness check watches it (grpc's own threads,
        in its core, end only with the process)."""
        return self._deadlines.thread

    @property
    def reading(self) -> int:
        """Calls taken up by a reader whose body has not arrived yet."""
        return self._deadlines.pending

    def start(self) -> str:
        """Bind and serve; returns the endpoint actually listening (port 0 picks a free one)."""
        try:
            self.port = self._server.add_insecure_port(self._endpoint)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self._endpoint} (receiver.grpc_endpoint): {exc}") from None
        if not self.port:
            raise OSError(f"cannot listen on {self._endpoint} (receiver.grpc_endpoint)")
        self._deadlines.start()
        self._server.start()
        host = self._endpoint.rpartition(":")[0]
        return f"{host}:{self.port}"

    def stop(self, grace_s: float) -> None:
        """Refuse new calls at once; let calls in progress finish within ``grace_s``."""
        self._server.stop(grace_s).wait(grace_s + 1)
        self._deadlines.stop()
