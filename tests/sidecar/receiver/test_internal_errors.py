"""A bug of ours after decoding (the replay guard, the pipeline's submit) is answered as OTLP
says an internal error is: retryable (gRPC UNAVAILABLE with RetryInfo, HTTP 503 with
Retry-After) and counted; uvicorn's 500 and grpc's UNKNOWN, uncounted, made exporters drop the
batch for good (OTLP/HTTP retries 429, 502, 503 and 504 only; gRPC UNKNOWN is not retryable)."""

import grpc
import httpx
import pytest
from google.rpc import code_pb2
from grpc_status import rpc_status

from tests.sidecar.receiver.harness import GRPC_METHOD, RETRY_AFTER, running_receivers
from tests.sidecar.receiver.otlp_payloads import make_request, make_span
from tests.sidecar.receiver.test_grpc_receiver import retry_delay_s


def _raising(batch):
    raise RuntimeError("a bug in the pipeline")


@pytest.fixture
def receivers(monkeypatch):
    with running_receivers() as receivers:
        monkeypatch.setattr(receivers.pipeline, "submit", _raising)
        yield receivers


def test_an_internal_error_after_decoding_is_503_with_retry_after_and_counted(receivers):
    body = make_request([make_span()]).SerializeToString()
    response = httpx.post(receivers.http_url, content=body,
                          headers={"Content-Type": "application/x-protobuf"})
    assert response.status_code == 503
    assert response.headers["retry-after"] in RETRY_AFTER
    assert response.headers["content-type"] == "application/x-protobuf"
    assert receivers.metric("pathwatch_receiver_requests_total", protocol="http", status="503") == 1


def test_an_internal_error_after_decoding_is_unavailable_with_retry_info_and_counted(receivers):
    call = grpc.insecure_channel(receivers.grpc_endpoint).unary_unary(GRPC_METHOD)
    with pytest.raises(grpc.RpcError) as caught:
        call(make_request([make_span()]).SerializeToString(), timeout=10)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE, caught.value
    assert rpc_status.from_call(caught.value).code == code_pb2.UNAVAILABLE
    assert retry_delay_s(caught.value) is not None
    assert receivers.metric("pathwatch_receiver_requests_total", protocol="grpc",
                            status="UNAVAILABLE") == 1
