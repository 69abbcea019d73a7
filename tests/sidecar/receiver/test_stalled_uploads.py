"""Uploads that stall mid-request, against the real sidecar process: each is ended at
``receiver.read_timeout_s`` and counted, so stalled clients cannot hold the receivers' slots (the 64
OTLP/HTTP requests in flight, the gRPC readers) and lock every other exporter out."""

from __future__ import annotations

import socket
import threading

import grpc
import httpx
import pytest

from tests.sidecar.receiver.harness import GRPC_METHOD, SidecarProcess, stalled_requests
from tests.sidecar.receiver.otlp_payloads import make_request, make_span
from tests.support import wait_until

pytestmark = pytest.mark.timeout(120)
READ_TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    with SidecarProcess(tmp_path_factory.mktemp("stalled"),
                        receiver={"read_timeout_s": READ_TIMEOUT_S}) as process:
        yield process
        assert process.stop() == 0, process.log()


def body() -> bytes:
    return make_request([make_span({})]).SerializeToString()


def read_until_closed(client: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (within the socket's timeout)."""
    chunks = []
    while chunk := client.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks)


def test_stalled_http_uploads_are_answered_408_and_free_their_slots(sidecar):
    stalled = []
    try:
        for _ in range(64):  # every in-flight slot: headers and 10 of 1000 bytes, then silence
            client = socket.create_connection(("127.0.0.1", sidecar.http_port), timeout=10)
            client.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Type: application/x-protobuf\r\nContent-Length: 1000\r\n\r\n"
                           + b"\x0a" * 10)
            stalled.append(client)
        for client in stalled:
            answer = read_until_closed(client)
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert b"connection: close" in answer.lower()
            assert b"receiver.read_timeout_s=0.5s" in answer
    finally:
        for client in stalled:
            client.close()
    assert sidecar.metric("pathwatch_receiver_requests_total", protocol="http", status="408") == 64
    response = httpx.post(sidecar.http_url, content=body(),
                          headers={"Content-Type": "application/x-protobuf"}, timeout=10)
    assert response.status_code == 200


def test_stalled_grpc_calls_are_cancelled_and_free_their_readers(sidecar):
    channel = grpc.insecure_channel(sidecar.grpc_endpoint)
    never = threading.Event()

    try:
        stalled = [channel.stream_unary(GRPC_METHOD).future(stalled_requests(never))
                   for _ in range(16)]
        wait_until(lambda: all(call.done() for call in stalled), timeout=20,
                   message="every stalled call ended by the sidecar")
        assert {call.code() for call in stalled} == {grpc.StatusCode.CANCELLED}
        channel.unary_unary(GRPC_METHOD)(body(), timeout=10)
    finally:
        never.set()
        channel.close()
    assert sidecar.metric("pathwatch_receiver_requests_total", protocol="grpc",
                          status="CANCELLED") == 16
    assert sidecar.metric("pathwatch_receiver_requests_total", protocol="grpc", status="OK") == 1
