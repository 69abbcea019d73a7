"""Connections to the sidecar's servers, against the real sidecar process: one beyond a server's
configured cap of open connections (``receiver.http_max_connections``, ``api.max_connections``,
``receiver.grpc_max_connections``) is closed at once while the open ones keep working, and one whose
request head has not completed in time (``receiver.read_timeout_s`` for OTLP/HTTP,
``api.head_timeout_s`` for the API) is closed while a normal request is answered. uvicorn did
neither: a slow-loris client held as many connections (file descriptors) as it liked, for ever. The
caps were constants (1024, 1024, 256): a gateway for more than 1024 exporting pods turned the rest
away for good, with no key to raise it. The process raises its open files limit for the caps."""

from __future__ import annotations

import resource
import socket
from contextlib import ExitStack
from pathlib import Path

import grpc
import httpx
import pytest

from sidecar.app import FD_RESERVE
from tests.sidecar.receiver.harness import GRPC_METHOD, SidecarProcess
from tests.sidecar.receiver.otlp_payloads import make_request, make_span

pytestmark = pytest.mark.timeout(180)
HEAD_TIMEOUT_S = 0.5
CAP = 3
CLOSED = "pathwatch_http_connections_closed_total"
HALF_HEAD = {"otlp_http": b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: applic",
             "api": b"GET /healthz HTTP/1.1\r\nHost: x\r\nAcc"}


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """A sidecar whose HTTP servers wait HEAD_TIMEOUT_S for a request head."""
    with SidecarProcess(tmp_path_factory.mktemp("short"), receiver={"read_timeout_s": HEAD_TIMEOUT_S},
                        api={"head_timeout_s": HEAD_TIMEOUT_S}) as process:
        yield process
        assert process.stop() == 0, process.log()


@pytest.fixture
def capped(tmp_path_factory):
    """A sidecar whose servers each serve CAP connections at most (the default timeouts: 30 s for an
    OTLP/HTTP head, 10 s for the API's), one per test: each fills a cap."""
    with SidecarProcess(tmp_path_factory.mktemp("capped"),
                        receiver={"grpc_max_connections": CAP, "http_max_connections": CAP},
                        api={"max_connections": CAP}) as process:
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
    timeout_s = HEAD_TIMEOUT_S
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
    timeout_s = HEAD_TIMEOUT_S
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


PATCH_HEAD = (b"PATCH /api/v1/incidents/0123456789abcdef HTTP/1.1\r\nHost: x\r\n"
              b"Content-Length: 4000\r\n\r\n")


@pytest.mark.parametrize("trickle", [False, True], ids=["stalled", "trickling"])
def test_an_api_change_whose_body_does_not_arrive_in_time_is_answered_408_and_closed(short, trickle):
    # the head complete, the body late: nothing bounded the handler's wait for it (the head timeout
    # runs only while a head is awaited), so the connection stayed open, unanswered, for ever
    timeout_s = HEAD_TIMEOUT_S
    with socket.create_connection(("127.0.0.1", short.api_port)) as client:
        client.sendall(PATCH_HEAD + b'{"sta')
        client.settimeout(timeout_s / 5 if trickle else timeout_s + 10)
        answer = b""
        for _ in range(int((timeout_s + 10) / (timeout_s / 5))):  # bounded; a byte per wait
            try:
                answer = client.recv(4096)
                break
            except TimeoutError:
                client.sendall(b" ")  # JSON whitespace: the body goes on, never complete
        assert answer.startswith(b"HTTP/1.1 408 "), f"{answer!r}: not answered in {timeout_s + 10:g}s"
        client.settimeout(timeout_s + 10)
        while True:  # the rest of the answer, then the server's close
            try:
                chunk = client.recv(4096)
            except ConnectionResetError:
                break
            except TimeoutError:
                pytest.fail(f"still open {timeout_s + 10:g}s after the 408")
            if not chunk:
                break
            answer += chunk
    assert b"connection: close" in answer.lower() and b"api.head_timeout_s" in answer
    assert answered(short, "api") == 200


@pytest.mark.parametrize("server", ["otlp_http", "api"])
def test_a_connection_beyond_the_configured_cap_is_closed_at_once_and_open_ones_keep_working(capped,
                                                                                            server):
    with ExitStack() as stack:
        held = []
        for _ in range(CAP):  # each answered once (so open and counted), then half a next head
            client = stack.enter_context(socket.create_connection(("127.0.0.1", port(capped, server)),
                                                                  timeout=10))
            client.sendall(request(server))
            assert read_response(client).startswith(b"HTTP/1.1 200 ")
            client.sendall(HALF_HEAD[server])
            held.append(client)
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port(capped, server)), timeout=5) as extra:
                extra.sendall(request(server))  # refused whatever it sends
                assert closed_by_server(extra), "a connection beyond the cap was kept"
        for client in held:  # the open ones finish their requests and make another
            client.sendall(rest_of_request(server))
            assert read_response(client).startswith(b"HTTP/1.1 200 ")
            client.sendall(request(server))
            assert read_response(client).startswith(b"HTTP/1.1 200 ")
        for client in held:  # the held ones end; the server's close shows it has let them go
            client.shutdown(socket.SHUT_WR)
        for client in held:
            assert closed_by_server(client)
    assert answered(capped, server) == 200  # room again
    assert capped.metric(CLOSED, server=server, reason="limit") == 3
    assert capped.metric(CLOSED, server=server, reason="head_timeout") == 0


def test_a_grpc_connection_beyond_the_configured_cap_is_closed_and_served_once_there_is_room(capped):
    """grpc closes it (the client sees UNAVAILABLE, which exporters retry); nothing counts it."""
    payload = body()
    # a channel of its own connection each (channels to one target share one by default)
    channels = [grpc.insecure_channel(capped.grpc_endpoint, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(CAP + 1)]
    try:
        exports = [channel.unary_unary(GRPC_METHOD) for channel in channels]
        for export in exports[:CAP]:
            export(payload, timeout=10)
        with pytest.raises(grpc.RpcError) as caught:
            exports[CAP](payload, timeout=10)
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE, caught.value
        for export in exports[:CAP]:  # the open ones keep working
            export(payload, timeout=10)
        channels[0].close()
        exports[CAP](payload, timeout=30, wait_for_ready=True)  # room again (after the client's backoff)
    finally:
        for channel in channels:
            channel.close()
    assert capped.metric("pathwatch_receiver_requests_total", protocol="grpc", status="OK") == 2 * CAP + 1


def _soft_limit(pid: int) -> int:
    line = next(line for line in Path(f"/proc/{pid}/limits").read_text().splitlines()
                if line.startswith("Max open files"))
    return int(line.split()[3])


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc/<pid>/limits")
def test_the_sidecar_raises_its_open_files_limit_to_what_its_caps_need(tmp_path):
    """A soft limit of 1024 (common outside containers) let the default caps (2,304 connections) be
    unreachable: accept failed with EMFILE long before. The sidecar raises it, up to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    caps = {"receiver": {"grpc_max_connections": 700, "http_max_connections": 300},
            "api": {"max_connections": 100}}
    needed = 700 + 300 + 100 + FD_RESERVE
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the hard open files limit {hard} is below {needed}")
    low = max(256, len(list(Path("/proc/self/fd").iterdir())) + 64)  # room for this process's files
    assert low < needed
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))  # inherited by the sidecar
    try:
        process = SidecarProcess(tmp_path, **caps).start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        process.wait_ready(30)
        assert _soft_limit(process.process.pid) == needed
        assert f"raised from {low} to {needed}" in process.log()
    finally:
        assert process.stop() == 0, process.log()
