"""Overload, as the soak of a real sidecar under several real clients saw it (reproducer
/tmp/s31_overload/soak.py): nothing accepted lost.

- Nothing said how many accepted spans the pipeline had processed: "accepted = processed + pending"
  could be read only from the shutdown's log line. ``pathwatch_pipeline_processed_spans_total``.

Real pipeline (its detector blocks, so the queue stays full), real gRPC and HTTP servers.
"""

from __future__ import annotations

import grpc
import httpx

from tests.sidecar.receiver.fakes import BlockingDetector
from tests.sidecar.receiver.harness import running_receivers
from tests.sidecar.receiver.otlp_payloads import make_request, make_span
from tests.sidecar.receiver.test_grpc_receiver import stub_for
from tests.support import wait_until

PROTOBUF = {"Content-Type": "application/x-protobuf"}


def request_of(count: int):
    return make_request([make_span({}) for _ in range(count)])


def fill(receivers, blocker: BlockingDetector, count: int) -> None:
    response = httpx.post(receivers.http_url, content=request_of(count).SerializeToString(),
                          headers=PROTOBUF)
    assert response.status_code == 200 and blocker.entered.wait(10)


def test_every_accepted_span_is_counted_processed_once_the_queue_drains():
    blocker = BlockingDetector()
    with running_receivers([blocker], max_pending_spans=100) as receivers:
        fill(receivers, blocker, 7)
        channel, stub = stub_for(receivers.grpc_endpoint)
        stub.Export(request_of(5), timeout=10)
        channel.close()
        assert receivers.metric("pathwatch_pipeline_processed_spans_total") == 0  # held
        assert receivers.metric("pathwatch_receiver_pending_spans") == 12
        blocker.release.set()
        wait_until(lambda: receivers.pipeline.pending_spans == 0, message="queue drained")
        accepted = sum(receivers.metric("pathwatch_receiver_spans_total", protocol=protocol,
                                        outcome="accepted") for protocol in ("grpc", "http"))
        assert accepted == 12
        assert receivers.metric("pathwatch_pipeline_processed_spans_total") == accepted
