"""Bad input against the real sidecar process, beyond tests/sidecar/receiver/test_bad_input.py:
every answer's status is the documented one AND is counted under that status, span counters move
only for bodies that decoded, and the process keeps working (a real bleed still becomes an incident).
"""

from __future__ import annotations

import gzip
import random

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from instrumentation import attributes as A
from tests.e2e.fixture_sidecar import Sidecar
from tests.sidecar.receiver.harness import GRPC_METHOD
from tests.sidecar.receiver.otlp_payloads import make_request, make_span, run_spans
from tests.support import wait_until

pytestmark = pytest.mark.timeout(300)
PROTOBUF = {"Content-Type": "application/x-protobuf"}
SETTINGS = settings(max_examples=30, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
VALID = make_request(run_spans(1, random.Random(1))).SerializeToString()


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    with Sidecar(tmp_path_factory.mktemp("bad-input")) as process:
        yield process
        assert process.stop() == 0, process.log()


@pytest.fixture(scope="module")
def export(sidecar):
    channel = grpc.insecure_channel(sidecar.grpc_endpoint)
    yield channel.unary_unary(GRPC_METHOD, response_deserializer=ExportTraceServiceResponse.FromString)
    channel.close()


def counters(sidecar: Sidecar, protocol: str) -> dict[str, float]:
    return {"spans": sidecar.metric("pathwatch_receiver_spans_total", protocol=protocol),
            "accepted": sidecar.metric("pathwatch_receiver_spans_total", protocol=protocol,
                                       outcome="accepted")}


def requests_with(sidecar: Sidecar, protocol: str, status: str) -> float:
    return sidecar.metric("pathwatch_receiver_requests_total", protocol=protocol, status=status)


def post(sidecar: Sidecar, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"http://127.0.0.1:{sidecar.http_port}/v1/traces", content=body,
                      headers=headers, timeout=20)


def mutate(body: bytes, flips: list[tuple[int, int]]) -> bytes:
    data = bytearray(body)
    for position, value in flips:
        data[position % len(data)] = value
    return bytes(data)


flips = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6)


@SETTINGS
@given(flips=flips, gzipped=st.booleans())
def test_mutated_protobuf_over_http_is_200_or_400_and_counted_so(sidecar, flips, gzipped):
    body = mutate(VALID, flips)
    headers = {**PROTOBUF, **({"Content-Encoding": "gzip"} if gzipped else {})}
    before = counters(sidecar, "http")
    status_counts = {s: requests_with(sidecar, "http", s) for s in ("200", "400")}
    response = post(sidecar, gzip.compress(body) if gzipped else body, headers)
    assert response.status_code in (200, 400), response.text
    status = str(response.status_code)
    assert requests_with(sidecar, "http", status) == status_counts[status] + 1
    after = counters(sidecar, "http")
    if response.status_code == 400:
        assert after == before, "a body that did not decode counted spans"
    else:
        assert 0 <= after["spans"] - before["spans"] <= len(run_spans(1, random.Random(1)))


@SETTINGS
@given(flips=flips)
def test_mutated_protobuf_over_grpc_is_ok_or_invalid_argument_and_counted_so(sidecar, export, flips):
    body = mutate(VALID, flips)
    before = counters(sidecar, "grpc")
    status_counts = {s: requests_with(sidecar, "grpc", s) for s in ("OK", "INVALID_ARGUMENT")}
    try:
        export(body, timeout=20)
        code = "OK"
    except grpc.RpcError as exc:
        code = exc.code().name
    assert code in ("OK", "INVALID_ARGUMENT")
    assert requests_with(sidecar, "grpc", code) == status_counts[code] + 1
    if code == "INVALID_ARGUMENT":
        assert counters(sidecar, "grpc") == before


@pytest.mark.parametrize("headers", [
    {"Content-Type": "application/grpc"},
    {"Content-Type": "text/plain"},
    {"Content-Type": "application/json", "Content-Encoding": "br"},
    {**PROTOBUF, "Content-Encoding": "br"},
])
def test_unsupported_media_is_415_and_counted(sidecar, headers):
    before, refused = counters(sidecar, "http"), requests_with(sidecar, "http", "415")
    response = post(sidecar, VALID, headers)
    assert response.status_code == 415
    assert requests_with(sidecar, "http", "415") == refused + 1
    assert counters(sidecar, "http") == before


def test_a_gzip_bomb_is_413_and_counted(sidecar):
    before, refused = counters(sidecar, "http"), requests_with(sidecar, "http", "413")
    response = post(sidecar, gzip.compress(b"\x00" * 8 * 1024 * 1024),
                    {**PROTOBUF, "Content-Encoding": "gzip"})
    assert response.status_code == 413
    assert requests_with(sidecar, "http", "413") == refused + 1
    assert counters(sidecar, "http") == before


def test_an_unknown_span_kind_is_ignored_counted_and_the_span_accepted(sidecar, export):
    before = sidecar.metric("pathwatch_receiver_invalid_attributes_total", attribute=A.SPAN_KIND)
    accepted = counters(sidecar, "grpc")["accepted"]
    response = export(make_request([make_span({A.SPAN_KIND: "teleport"})]).SerializeToString(),
                      timeout=20)
    assert response.partial_success.rejected_spans == 0
    assert sidecar.metric("pathwatch_receiver_invalid_attributes_total",
                          attribute=A.SPAN_KIND) == before + 1
    assert counters(sidecar, "grpc")["accepted"] == accepted + 1


def test_after_the_abuse_a_real_bleed_still_becomes_an_incident(sidecar, export):
    rule = "bleed.owner_vs_ambient"
    before = sidecar.metric("pathwatch_findings_total", rule=rule)  # mutated runs may have some
    spans = run_spans(7, random.Random(7), bleed=True)
    export(make_request(spans).SerializeToString(), timeout=20)
    wait_until(lambda: sidecar.metric("pathwatch_findings_total", rule=rule) > before, timeout=20,
               message="the bleed finding after the bad input")
    assert sidecar.incidents(rule=rule)[0]["count"] >= 1
    assert httpx.get(f"{sidecar.api_url}/readyz").status_code == 200
