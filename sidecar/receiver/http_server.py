"""OTLP/HTTP: ``POST /v1/traces`` with a binary protobuf body (``application/x-protobuf``) or an
OTLP/JSON one (``application/json``, see ``otlp_json.py``), either optionally compressed
(``Content-Encoding: gzip``, ``deflate`` — zlib, as the Collector reads it, which also takes it
named ``zlib`` — or ``zstd``, the encodings the Collector's OTLP receiver accepts besides snappy and
lz4; an empty one is none, as there). A header sent on several lines is the list of their values
(RFC 9110 5.3): ``Content-Encoding: gzip`` and ``identity`` is ``gzip, identity``, answered 415.
A compressed body is never inflated past ``max_message_bytes``: a small body that would (a zip
bomb) is answered 413.

Answers as the OTLP/HTTP specification says, in the encoding of the request (binary protobuf, or
JSON with ``Content-Type: application/json``): 200 with an ExportTraceServiceResponse (partial
success included); errors carry a ``google.rpc.Status`` body — 400 malformed, 413 larger than
``receiver.max_message_bytes`` (also after decompression) or holding more spans than
``receiver.max_spans_per_request`` (refused before they are parsed), 415 another content type or an unknown
encoding (answered in protobuf), 429 pending-span budget full, 503 shutting down or more than
``max_in_flight`` requests at once (with ``Retry-After``, as 429 is; refused before the body is
read, and so is a request while the budget cannot take a single span, see ``export.py``), 408
when the body has not arrived within ``receiver.read_timeout_s`` (the connection is closed: a
stalled upload must not hold one of the ``max_in_flight`` slots for ever); 405 carries
``Allow: POST``. Every answer is counted in ``pathwatch_receiver_requests_total{status}``, and so is
a request whose client closed the connection before its body was complete, as ``499`` (nginx's
"client closed request", the HTTP mapping of gRPC's CANCELLED in google/rpc/code.proto; the gRPC
receiver counts the same end as ``CANCELLED``): nobody is left to answer, and it is no rejection of
the body (a 400 would be read as one).
Connections: at most ``max_connections`` open (``receiver.http_max_connections``, 1024 by default;
one beyond is closed at once, unanswered, and counted in
``pathwatch_http_connections_closed_total{server="otlp_http",reason="limit"}``), and a request head
must arrive within ``receiver.read_timeout_s`` of the connection opening or its previous response
(else the connection is closed); see ``asgi_server.py``.
A request answered before its body was read (a 413 by its ``Content-Length``, 415, 429/503 as
above) keeps its connection: uvicorn's h11 protocol reads the rest of that body and discards it
(holding at most uvicorn's 64 KiB high-water mark and a socket read of it), then serves the
connection's next request, and ``asgi_server.py`` closes the connection if that rest has not come
within ``read_timeout_s``. Closing at once instead would leave the client's body unread: the kernel
then resets the connection (RFC 9112 9.6), and a client still sending would see the reset, not the
429 (OTLP exporters send the whole body before they read the answer). A client that sent
``Expect: 100-continue`` gets no ``100 Continue``, only the answer with ``Connection: close``: it
need not send the body, and the connection is closed after the answer (kept, it would read the
client's next request as that body). An HTTP/1.0 request, ``Connection: keep-alive`` or not, is
answered with ``Connection: close`` and its connection closed, as uvicorn does (h11 keeps no HTTP/1.0
connection; RFC 9112 9.3 lets a server decline): its client's next request goes on a new connection.
A small raw ASGI app: no framework sits on this path.
"""

from __future__ import annotations

import asyncio
import random
import zlib
from collections.abc import Callable

import zstandard

from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from sidecar.receiver.export import RETRY_AFTER_S, ExportHandler, ExportStatus
from sidecar.receiver.refusals import IN_FLIGHT, TOO_LARGE

PROTOCOL = "http"
PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_HTTP_STATUS = {
    ExportStatus.OK: 200,
    ExportStatus.INVALID_ARGUMENT: 400,
    ExportStatus.RESOURCE_EXHAUSTED: 429,
    ExportStatus.UNAVAILABLE: 503,
}
#: the status of a request whose client went away before its body was complete (never sent)
CLIENT_CLOSED = 499
_GRPC_CODE = {400: 3, 404: 5, 405: 12, 408: 4, 413: 8, 415: 3, 429: 8, CLIENT_CLOSED: 1,
              503: 14}  # google.rpc.Code
#: pathwatch_receiver_requests_total{status} of every answer: 200 and the error statuses
STATUSES = ("200", *map(str, _GRPC_CODE))
_RETRY_AFTER = tuple(str(seconds).encode() for seconds in RETRY_AFTER_S)
#: b"" and b"zlib" as the Collector's confighttp reads them: no encoding, and deflate's other name
_ENCODINGS = (b"identity", b"", b"gzip", b"deflate", b"zlib", b"zstd")
#: a zstd frame may ask for a window this large at most (the decoder allocates it): 8 MiB, the Go
#: encoder's default (the Collector's exporters), or the message limit if larger
_MIN_ZSTD_WINDOW = 8 * 1024 * 1024
_CHUNK = 1024 * 1024
#: the first piece of a gzip member or zstd frame after the first handed to its decompressor,
#: doubling up to _CHUNK for the next ones: at a member's end the decompressor copies what is left
#: of the piece it was given (``unused_data``), so these copies add up to about twice the body.
#: Given the whole rest of the body, each member copied it: 4 MiB of 20-byte gzip members (9-byte
#: zstd frames) took 35 s (74 s) of the OTLP/HTTP event loop, every other client of it waiting. The
#: first member is given the whole body (one call for the usual body of one member; its copy of the
#: rest is made once)
_FIRST_STEP = 1024


class _TooLarge(Exception):
    pass


class _ReadNoted:
    """An ASGI ``receive`` that notes whether it was called (whether the body was asked for)."""

    __slots__ = ("_receive", "called")

    def __init__(self, receive) -> None:
        self._receive = receive
        self.called = False

    async def __call__(self):
        self.called = True
        return await self._receive()


class _BadBody(Exception):
    pass


class _ClientClosed(Exception):
    pass


class OtlpHttpApp:
    def __init__(self, handler: ExportHandler, max_message_bytes: int, max_in_flight: int = 64,
                 read_timeout_s: float = 30.0) -> None:
        self._handler = handler
        self._max_bytes = max_message_bytes
        self._max_in_flight = max_in_flight
        self._read_timeout_s = read_timeout_s
        self.in_flight = 0  # requests being answered (one event loop: no lock)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        headers = _headers(scope)
        media = _media_type(headers)
        answer_in = JSON if media == JSON else PROTOBUF  # the request's encoding, as OTLP says
        if headers.get(b"expect", b"").lower() == b"100-continue":
            receive = _ReadNoted(receive)  # (rare: no wrapper for other requests)
        if self.in_flight >= self._max_in_flight:  # each may hold a body of max_message_bytes
            message = f"more than {self._max_in_flight} requests in flight; retry later"
            self._handler.refusals.refused(PROTOCOL, IN_FLIGHT, 0, message)
            status, body = _error(503, message, answer_in)
        else:
            self.in_flight += 1
            try:
                status, body = await self._respond(scope, receive, headers, media, answer_in)
            finally:
                self.in_flight -= 1
        self._handler.count_request(PROTOCOL, str(status))
        if status == CLIENT_CLOSED:
            return  # the connection is gone: nothing to answer
        headers = [(b"content-type", answer_in.encode()), (b"content-length", str(len(body)).encode())]
        if status in (429, 503):
            headers.append((b"retry-after", random.choice(_RETRY_AFTER)))
        elif status == 405:
            headers.append((b"allow", b"POST"))
        elif status == 408:  # the rest of the body may still come: this connection is done
            headers.append((b"connection", b"close"))
        if type(receive) is _ReadNoted and not receive.called:
            # the client awaits 100 Continue (uvicorn sends it at the first receive()) and got the
            # answer instead: it need not send the body, and closing says so (RFC 9110 10.1.1).
            # Kept open, the connection would read the client's next request as that body (and
            # answer nothing until read_timeout_s); a client that sends the body on seeing no
            # "close" (Go's) would send up to max_message_bytes only for it to be discarded
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _respond(self, scope, receive, headers: dict[bytes, bytes], media: str,
                       answer_in: str) -> tuple[int, bytes]:
        if scope["path"] != PATH:
            return _error(404, f"no such path {scope['path']!r}; OTLP traces go to POST {PATH}",
                          answer_in)
        if scope["method"] != "POST":
            return _error(405, f"{PATH} accepts POST only", answer_in)
        problem = _unsupported(headers, media)
        if problem:
            return _error(415, problem, answer_in)
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_bytes:
            return self._too_large(answer_in)  # permanent: said before a retryable refusal
        refused = self._handler.refuse_unread(PROTOCOL)
        if refused is not None:  # not a single span fits: the body is not read (uvicorn discards it)
            return _error(_HTTP_STATUS[refused.status], refused.message, answer_in)
        try:
            async with asyncio.timeout(self._read_timeout_s):
                body = await self._read_body(receive)
            body = self._decompress(body, headers)
        except TimeoutError:
            return _error(408, f"request body not received within receiver.read_timeout_s="
                               f"{self._read_timeout_s:g}s", answer_in)
        except _TooLarge:
            return self._too_large(answer_in)
        except _BadBody as exc:
            return _error(400, str(exc), answer_in)
        except _ClientClosed:
            return CLIENT_CLOSED, b""  # never sent
        if media == JSON:
            result = self._handler.export_json(body, PROTOCOL)
        else:
            result = self._handler.export(body, PROTOCOL)
        status = 413 if result.permanent else _HTTP_STATUS[result.status]
        if status != 200:
            return _error(status, result.message, answer_in)
        response = trace_service_pb2.ExportTraceServiceResponse()
        if result.rejected_spans:
            response.partial_success.rejected_spans = result.rejected_spans
            response.partial_success.error_message = result.message
        return 200, _encode(response, answer_in)

    def _too_large(self, answer_in: str) -> tuple[int, bytes]:
        message = f"request body larger than receiver.max_message_bytes={self._max_bytes}"
        self._handler.refusals.refused(PROTOCOL, TOO_LARGE, 0, message)
        return _error(413, message, answer_in)

    async def _read_body(self, receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientClosed
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _decompress(self, body: bytes, headers: dict[bytes, bytes]) -> bytes:
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding == b"gzip":
            return self._gunzip(body)
        if encoding == b"deflate" or encoding == b"zlib":
            return self._inflate(body)
        if encoding == b"zstd":
            return self._unzstd(body)
        return body

    def _inflate(self, body: bytes) -> bytes:
        """One zlib stream (RFC 1950: what ``Content-Encoding: deflate`` means, and what the
        Collector and the OpenTelemetry SDKs read and write), within the size limit."""
        inflater = zlib.decompressobj()
        try:
            data = inflater.decompress(body, self._max_bytes + 1)
        except zlib.error as exc:
            raise _BadBody(f"body is not valid deflate (zlib): {exc}") from None
        if len(data) > self._max_bytes or inflater.unconsumed_tail:
            raise _TooLarge
        if not inflater.eof:
            raise _BadBody("deflate body is truncated")
        if inflater.unused_data:
            raise _BadBody("bytes after the end of the deflate (zlib) stream")
        return data

    def _unzstd(self, body: bytes) -> bytes:
        """Every zstd frame in turn, within the size limit. First counted in bounded reads (the
        decompressor's one-shot call has no output limit), then decompressed frame by frame, which
        finds a truncated frame (the bounded reader ends it silently) and bytes after the last.
        The frames after the first are fed in growing pieces: see ``_FIRST_STEP``."""
        decompressor = zstandard.ZstdDecompressor(
            max_window_size=max(_MIN_ZSTD_WINDOW, 1 << (self._max_bytes - 1).bit_length()))
        size = 0
        try:
            with decompressor.stream_reader(body, read_across_frames=True) as reader:
                while chunk := reader.read(min(_CHUNK, self._max_bytes + 1 - size)):
                    size += len(chunk)
                    if size > self._max_bytes:
                        raise _TooLarge  # a zstd bomb stops here
            parts: list[bytes] = []
            view, at, first = memoryview(body), 0, len(body)
            while at < len(body):  # a frame each time round (max_message_bytes in all: counted)
                frame = decompressor.decompressobj()
                step, first = first, _FIRST_STEP
                while not frame.eof:
                    if at == len(body):
                        raise _BadBody("zstd body is truncated")
                    piece = view[at:at + step]
                    parts.append(frame.decompress(piece))
                    at += len(piece) - len(frame.unused_data)
                    step = min(2 * step, _CHUNK)
        except zstandard.ZstdError as exc:
            raise _BadBody(f"body is not valid zstd: {exc}") from None
        if not parts:
            raise _BadBody("zstd body is empty")
        return b"".join(parts)

    def _gunzip(self, body: bytes) -> bytes:
        """Every gzip member in turn (a body may hold several, as Go's reader, the Collector's,
        accepts), within one size budget for all of them; bytes after a member that do not start
        another one are an error, never silently ignored."""
        parts: list[bytes] = []
        size, view, at, first = 0, memoryview(body), 0, len(body)
        while True:  # a member each time round; those after the first in pieces (_FIRST_STEP)
            inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            step, first = first, _FIRST_STEP
            while not inflater.eof:
                if at == len(body):
                    raise _BadBody("gzip body is truncated")
                piece = view[at:at + step]
                try:
                    data = inflater.decompress(piece, self._max_bytes - size + 1)
                except zlib.error as exc:
                    raise _BadBody(f"body is not valid gzip: {exc}") from None
                size += len(data)
                if size > self._max_bytes:
                    raise _TooLarge  # a small body inflating past the limit (a zip bomb) stops here
                parts.append(data)
                # within the limit, the output stopped short of it: the whole piece was read
                # (unconsumed_tail is empty) but for what follows the member's end (unused_data)
                at += len(piece) - len(inflater.unused_data)
                step = min(2 * step, _CHUNK)
            if at == len(body):
                return b"".join(parts)


def _headers(scope) -> dict[bytes, bytes]:
    """The request's headers by (lower-case) name, the lines of one given several times joined
    into the comma-separated list they mean (RFC 9110 5.3): keeping the last line alone read a
    gzip body sent with ``Content-Encoding: gzip`` and ``identity`` as protobuf, answering 400
    "not a protobuf" where 415 names the encodings."""
    headers: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        name = name.lower()
        headers[name] = headers[name] + b", " + value if name in headers else value
    return headers


def _media_type(headers: dict[bytes, bytes]) -> str:
    return headers.get(b"content-type", b"").split(b";")[0].strip().lower().decode("latin-1")


def _unsupported(headers: dict[bytes, bytes], media: str) -> str:
    if media != PROTOBUF and media != JSON:
        return f"unsupported Content-Type {media!r}; expected {PROTOBUF} or {JSON}"
    encoding = headers.get(b"content-encoding", b"identity").strip().lower()
    if encoding not in _ENCODINGS:
        return (f"unsupported Content-Encoding {encoding.decode('latin-1')!r}; use gzip, deflate, "
                "zstd or none")
    return ""


def _error(status: int, message: str, answer_in: str) -> tuple[int, bytes]:
    return status, _encode(status_pb2.Status(code=_GRPC_CODE.get(status, 2), message=message),
                           answer_in)


def _encode(message, answer_in: str) -> bytes:
    if answer_in == JSON:  # lowerCamelCase names, int64 as strings (the proto3 JSON mapping)
        return json_format.MessageToJson(message, indent=None).encode()
    return message.SerializeToString()


class HttpReceiver:
    """The OTLP/HTTP app served on its own thread."""

    def __init__(self, endpoint: str, handler: ExportHandler, *, max_message_bytes: int,
                 max_in_flight: int = 64, max_connections: int = 1024,
                 read_timeout_s: float = 30.0,
                 on_closed: Callable[[str], None] = lambda reason: None) -> None:
        from sidecar.receiver.asgi_server import ConnectionLimits, ThreadedAsgiServer

        self.app = OtlpHttpApp(handler, max_message_bytes, max_in_flight, read_timeout_s)
        handler.declare(PROTOCOL, STATUSES)
        # the connection cap only guards against a flood of connections (each closed at once, no
        # answer); requests beyond max_in_flight get the app's answer, counted and with Retry-After.
        # read_timeout_s bounds the wait for a head as it bounds the wait for a body
        self._server = ThreadedAsgiServer(
            self.app, endpoint, "receiver.http_endpoint", name="pathwatch-otlp-http",
            limits=ConnectionLimits(max_connections, read_timeout_s, on_closed))
        self.port = self._server.port

    def start(self) -> str:
        self._server.start()
        return self._server.endpoint

    @property
    def listening(self) -> bool:
        return self._server.listening

    @property
    def thread(self):  # noqa: ANN201 - sidecar.threads.WatchedThread
        """The server's thread: the liveness check watches it."""
        return self._server.thread

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.stop(timeout_s)
