"""Connections to the two HTTP servers (OTLP/HTTP, the API), against the real sidecar process: one
beyond a server's cap of open connections is closed at once while the open ones keep working, and
one whose request head has not completed in time (``receiver.read_timeout_s`` for OTLP/HTTP,
``API_HEAD_TIMEOUT_S`` for the API) is closed while a normal request is answered. uvicorn did
neither: a slow-loris client held as many connections (file descriptors) as it liked, for ever."""

from __future__ import annotations

import socket
from contextlib import ExitStack

import httpx
import pytest

from sidecar.receiver.asgi_server import API_HEAD_TIMEOUT_S, API_MAX_CONNECTIONS
from sidecar.receiver.http_server import MAX_CONNECTIONS
from tests.sidecar.receiver.harness import SidecarProcess
from tests.sidecar.receiver.otlp_payloads import make_request, make_span

pytestmark = pytest.mark.timeout(180)
READ_TIMEOUT_S = 0.5
CLOSED = "pathwatch_http_connections_closed_total"
HALF_HEAD = {"otlp_http": b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: applic",
             "api": b"GET /healthz HTTP/1.1\r\nHost: x\r\nAcc"}


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """A sidecar whose OTLP/HTTP server waits READ_TIMEOUT_S for a request head."""
    with SidecarProcess(tmp_path_factory.mktemp("short"),
                        receiver={"read_timeout_s": READ_TIMEOUT_S}) as process:
        yield process
        assert process.stop() == 0, process.log()


@pytest.fixture
def default(tmp_path_factory):
    """A sidecar with the default timeouts (30 s for OTLP/HTTP), one per test: each fills a cap."""
    with SidecarProcess(tmp_path_factory.mktemp("default")) as process:
        yield process
        assert process.stop() == 0, process.log()


def body() -> bytes:
    return make_request([make_span({})]).SerializeToString()


def request(server: str) -> bytes:
    """A whole request that the server answers 200."""
    if server == "api":
        return b"GET /healthz HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n"
    payload = body()
    return (b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
            b"Content-Length: %d\r\n\r\n" % len(payload) + payload)


def rest_of_request(server: str) -> bytes:
    assert request(server).startswith(HALF_HEAD[server])
    return request(server)[len(HALF_HEAD[server]):]


def read_response(client: socket.socket) -> bytes:
    """One response's head and body (Content-Length), the connection kept."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = client.recv(4096)
        assert chunk, f"connection closed by the server after {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                  if line.startswith(b"content-length:"))
    while len(rest) < length:
        rest += client.recv(4096)
    return head


def closed_by_server(client: socket.socket) -> bool:
    """Whether the server closes the connection, unanswered, within the socket's timeout (a bounded
    wait: a timeout is False)."""
    try:
        return client.recv(4096) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def port(sidecar: SidecarProcess, server: str) -> int:
    return sidecar.api_port if server == "api" else sidecar.http_port


def answered(sidecar: SidecarProcess, server: str) -> int:
    if server == "api":
        return httpx.get(f"{sidecar.api_url}/healthz", timeout=10).status_code
    return httpx.post(sidecar.http_url, content=body(), timeout=10,
                      headers={"Content-Type": "application/x-protobuf"}).status_code


@pytest.mark.parametrize("server", ["otlp_http", "api"])
def test_a_connection_whose_request_head_is_late_is_closed(short, server):
    timeout_s = API_HEAD_TIMEOUT_S if server == "api" else READ_TIMEOUT_S
    before = short.metric(CLOSED, server=server, reason="head_timeout")
    with ExitStack() as stack:
        def connect() -> socket.socket:
            client = stack.enter_context(socket.create_connection(("127.0.0.1", port(short, server))))
            client.settimeout(timeout_s + 10)  # the bound on the wait for the server to close it
            return client

        silent = connect()  # sends nothing
        halves = [connect() for _ in range(3)]  # half a head each
        for client in halves:
            client.sendall(HALF_HEAD[server])
        after_response = connect()  # one whole request, then half of the next head
        after_response.sendall(request(server))
        assert read_response(after_response).startswith(b"HTTP/1.1 200 ")
        after_response.sendall(HALF_HEAD[server])
        assert answered(short, server) == 200  # a normal request meanwhile
        for client in [silent, *halves, after_response]:
            assert closed_by_server(client), f"still open {timeout_s + 10:g}s on, head unfinished"
    assert answered(short, server) == 200
    assert short.metric(CLOSED, server=server, reason="head_timeout") == before + 5


EARLY_ANSWER = {  # a request answered before its (never-ending) body is read
    "otlp_http": b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                 b"Content-Length: 1000000\r\n\r\n",  # 415
    "api": b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n"}  # 200


@pytest.mark.parametrize("server", ["otlp_http", "api"])
def test_a_connection_answered_before_its_body_whose_body_keeps_trickling_is_closed(short, server):
    # such a connection was never closed: h11 waited for the rest of the body, no head was awaited,
    # and a client dribbling bytes held it (256 of them locked everyone out of the API)
    timeout_s = API_HEAD_TIMEOUT_S if server == "api" else READ_TIMEOUT_S
    before = short.metric(CLOSED, server=server, reason="head_timeout")
    with socket.create_connection(("127.0.0.1", port(short, server))) as client:
        client.settimeout(timeout_s + 10)
        client.sendall(EARLY_ANSWER[server])
        status = read_response(client).split(b" ")[1]
        assert status == (b"200" if server == "api" else b"415")
        client.settimeout(0.05)
        closed = False
        for _ in range(int((timeout_s + 10) / 0.05)):  # a byte of body per wait, until closed
            try:
                client.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            if closed_by_server(client):
                closed = True
                break
        assert closed, f"still open {timeout_s + 10:g}s on, its body trickling"
    assert answered(short, server) == 200
    assert short.metric(CLOSED, server=server, reason="head_timeout") == before + 1


@pytest.mark.parametrize("server", ["otlp_http", "api"])
def test_a_connection_beyond_the_cap_is_closed_at_once_and_open_ones_keep_working(default, server):
    cap = API_MAX_CONNECTIONS if server == "api" else MAX_CONNECTIONS
    with ExitStack() as stack:
        held = []
        for _ in range(cap):  # each answered once (so open and counted), then half a next head
            client = stack.enter_context(socket.create_connection(("127.0.0.1", port(default, server)),
                                                                  timeout=10))
            client.sendall(request(server))
            assert read_response(client).startswith(b"HTTP/1.1 200 ")
            client.sendall(HALF_HEAD[server])
            held.append(client)
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port(default, server)), timeout=5) as extra:
                extra.sendall(request(server))  # refused whatever it sends
                assert closed_by_server(extra), "a connection beyond the cap was kept"
        for client in held[:8] + held[-8:]:  # the open ones finish their requests and make another
            client.sendall(rest_of_request(server))
            assert read_response(client).startswith(b"HTTP/1.1 200 ")
            client.sendall(request(server))
            assert read_response(client).startswith(b"HTTP/1.1 200 ")
        for client in held:  # the held ones end; the server's close shows it has let them go
            client.shutdown(socket.SHUT_WR)
        for client in held:
            assert closed_by_server(client)
    assert answered(default, server) == 200  # room again
    assert default.metric(CLOSED, server=server, reason="limit") == 3
    assert default.metric(CLOSED, server=server, reason="head_timeout") == 0
