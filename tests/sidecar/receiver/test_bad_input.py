"""Bad input against a real sidecar process: no crash, the right status, the right counters."""

import random

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from instrumentation import attributes as A
from tests.sidecar.receiver.harness import GRPC_METHOD, SidecarProcess, metric_value
from tests.sidecar.receiver.otlp_payloads import make_request, make_span, run_spans

MAX_MESSAGE_BYTES = 256 * 1024
PROTOBUF = {"Content-Type": "application/x-protobuf"}
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory):
    process = SidecarProcess(tmp_path_factory.mktemp("bad-input"),
                             receiver={"max_message_bytes": MAX_MESSAGE_BYTES})
    with process:
        yield process
        assert process.stop() == 0, process.log()


@pytest.fixture(scope="module")
def export(sidecar):
    channel = grpc.insecure_channel(sidecar.grpc_endpoint)
    call = channel.unary_unary(GRPC_METHOD,
                               response_deserializer=ExportTraceServiceResponse.FromString)
    yield call
    channel.close()


class Counts:
    """Receiver counters read from /metrics, to compare before and after a request."""

    def __init__(self, sidecar: SidecarProcess) -> None:
        text = sidecar.metrics()
        self.requests = {(p, s): metric_value(text, "pathwatch_receiver_requests_total",
                                              protocol=p, status=s)
                         for p in ("grpc", "http")
                         for s in ("OK", "INVALID_ARGUMENT", "200", "400", "413")}
        self.spans = {(p, o): metric_value(text, "pathwatch_receiver_spans_total",
                                           protocol=p, outcome=o)
                      for p in ("grpc", "http")
                      for o in ("accepted", "invalid", "refused", "replayed")}
        self.invalid_attributes = {key: metric_value(text, "pathwatch_receiver_invalid_attributes_total",
                                                     attribute=key) for key in A.SPAN_ATTRIBUTES}

    def delta(self, before: "Counts") -> dict:
        changed = {}
        for name in ("requests", "spans", "invalid_attributes"):
            mine, theirs = getattr(self, name), getattr(before, name)
            changed.update({(name, *((k,) if isinstance(k, str) else k)): mine[k] - theirs[k]
                            for k in mine if mine[k] != theirs[k]})
        return changed


def grpc_status(export, body: bytes):
    try:
        return grpc.StatusCode.OK, export(body, timeout=20)
    except grpc.RpcError as exc:
        return exc.code(), None


def post(sidecar, body: bytes) -> httpx.Response:
    return httpx.post(sidecar.http_url, content=body, headers=PROTOBUF, timeout=20)


@SETTINGS
@given(body=st.binary(min_size=1, max_size=2000))
def test_garbage_bytes(sidecar, export, body):
    before = Counts(sidecar)
    code, response = grpc_status(export, body)
    http = post(sidecar, body)
    delta = Counts(sidecar).delta(before)
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT)
    assert http.status_code == (200 if code is grpc.StatusCode.OK else 400)
    grpc_label = "OK" if code is grpc.StatusCode.OK else "INVALID_ARGUMENT"
    assert delta[("requests", "grpc", grpc_label)] == 1
    assert delta[("requests", "http", str(http.status_code))] == 1


@SETTINGS
@given(cut=st.floats(min_value=0.01, max_value=0.99), seed=st.integers(0, 1000))
def test_truncated_protobuf(sidecar, export, cut, seed):
    spans = run_spans(seed, random.Random(seed))
    body = make_request(spans).SerializeToString()
    truncated = body[: int(len(body) * cut)]
    before = Counts(sidecar)
    code, response = grpc_status(export, truncated)
    delta = Counts(sidecar).delta(before)
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT)
    if code is grpc.StatusCode.OK:  # cut on a field boundary: a shorter but valid request
        offered = delta.get(("spans", "grpc", "accepted"), 0) + delta.get(("spans", "grpc", "invalid"), 0)
        assert offered <= len(spans)
    else:
        assert delta[("requests", "grpc", "INVALID_ARGUMENT")] == 1
        assert ("spans", "grpc", "accepted") not in delta


ids = st.sampled_from([b"", b"\x01", bytes(16), b"\x07" * 15, b"\x07" * 17, None])


@SETTINGS
@given(trace_ids=st.lists(ids, min_size=1, max_size=8), span_ids=st.lists(
    st.sampled_from([b"", bytes(8), b"\x05" * 7, None]), min_size=8, max_size=8))
def test_missing_or_invalid_ids_are_rejected_one_by_one(sidecar, export, trace_ids, span_ids):
    # fresh valid ids each example: Hypothesis repeats examples, and the sidecar answers a request it
    # already accepted as a replay (outcome="replayed") without counting its invalid spans again
    rng = random.Random()
    spans, bad = [], 0
    for trace_id, span_id in zip(trace_ids, span_ids):
        spans.append(make_span({}, trace_id=trace_id, span_id=span_id, rng=rng))
        bad += trace_id is not None or span_id is not None  # None = a valid random id
    before = Counts(sidecar)
    code, response = grpc_status(export, make_request(spans).SerializeToString())
    delta = Counts(sidecar).delta(before)
    assert code is grpc.StatusCode.OK
    assert response.partial_success.rejected_spans == bad
    assert delta.get(("spans", "grpc", "invalid"), 0) == bad
    assert delta.get(("spans", "grpc", "accepted"), 0) == len(spans) - bad


typed_values = st.one_of(st.integers(-5, 5).map(lambda v: AnyValue(int_value=v)),
                         st.booleans().map(lambda v: AnyValue(bool_value=v)),
                         st.floats(allow_nan=False).map(lambda v: AnyValue(double_value=v)),
                         st.binary(max_size=4).map(lambda v: AnyValue(bytes_value=v)),
                         st.text(min_size=1, max_size=5).map(lambda v: AnyValue(string_value=v)))
STRING_KEYS = [A.RUN_ID, A.ROLE, A.ENDUSER_PSEUDO_ID, A.EVENT_TYPE, A.CONNECTION_ID]
BOOL_KEYS = [A.CANONICAL, A.RETIRED, A.NESTED]


@SETTINGS
@given(attributes=st.lists(st.tuples(st.sampled_from(STRING_KEYS + BOOL_KEYS), typed_values),
                           min_size=1, max_size=10))
def test_wrong_attribute_types_are_ignored_and_counted(sidecar, export, attributes):
    span = make_span({})
    expected: dict[str, int] = {}
    for key, value in attributes:
        span.attributes.append(KeyValue(key=key, value=value))
        wanted = "string_value" if key in STRING_KEYS else "bool_value"
        if value.WhichOneof("value") != wanted:
            expected[key] = expected.get(key, 0) + 1
    before = Counts(sidecar)
    code, response = grpc_status(export, make_request([span]).SerializeToString())
    delta = Counts(sidecar).delta(before)
    assert code is grpc.StatusCode.OK and response.partial_success.rejected_spans == 0
    assert delta[("spans", "grpc", "accepted")] == 1
    assert {k[1]: v for k, v in delta.items() if k[0] == "invalid_attributes"} == expected


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.integers(1, 3 * MAX_MESSAGE_BYTES))
def test_absurd_sizes_are_refused(sidecar, export, extra):
    body = make_request([make_span({A.RUN_ID: "x" * (MAX_MESSAGE_BYTES + extra)})]).SerializeToString()
    before = Counts(sidecar)
    code, _ = grpc_status(export, body)
    http = post(sidecar, body)
    delta = Counts(sidecar).delta(before)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert http.status_code == 413
    assert delta[("requests", "http", "413")] == 1
    assert ("spans", "grpc", "accepted") not in delta


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_attributes_that_are_not_utf8_cost_themselves_alone_however_long(sidecar, export, protocol):
    # a long one (two bytes of length) was INVALID_ARGUMENT / 400 for the whole request
    spans = [make_span({A.SPAN_KIND: "execute", A.RUN_ID: "r-QZXQZX" + "." * 200}),
             make_span({A.SPAN_KIND: "execute", A.RUN_ID: "run-1", "k" * 130: "k-QZXQZX"})]
    body = make_request(spans, resource={"service.name": "svc", "process.command_line":
                                         "c-QZXQZX" + "." * 300}).SerializeToString()
    assert body.count(b"QZXQZX") == 3
    body = body.replace(b"QZXQZX", b"\xff\xfe" * 3)
    before = Counts(sidecar)
    if protocol == "grpc":
        assert grpc_status(export, body)[0] is grpc.StatusCode.OK
    else:
        assert post(sidecar, body).status_code == 200
    assert Counts(sidecar).delta(before) == {
        ("requests", protocol, "OK" if protocol == "grpc" else "200"): 1,
        ("spans", protocol, "accepted"): 2, ("invalid_attributes", A.RUN_ID): 1}


def test_huge_attribute_counts_are_fine(sidecar, export):
    span = make_span({f"custom.{i}": i for i in range(10_000)} | {A.SPAN_KIND: "execute"})
    body = make_request([span]).SerializeToString()
    assert len(body) < MAX_MESSAGE_BYTES
    code, response = grpc_status(export, body)
    assert code is grpc.StatusCode.OK and response.partial_success.rejected_spans == 0
    assert post(sidecar, body).status_code == 200


def test_still_ready_after_the_abuse(sidecar):
    assert httpx.get(f"{sidecar.api_url}/readyz").status_code == 200
    assert sidecar.metric("pathwatch_receiver_requests_total", protocol="grpc", status="OK") > 0
