"""Liveness of a real sidecar process whose pipeline thread dies or is stuck for good
(``tests/sidecar/faulty_sidecar.py`` makes it so on command), and what its shutdown says then."""

from __future__ import annotations

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

from sidecar.testing import SidecarProcess
from tests.sidecar.faulty_sidecar import DIE, MODULE
from tests.sidecar.receiver.otlp_payloads import make_request, make_span
from tests.support import wait_until


def faulty_sidecar(tmp_path, **api) -> SidecarProcess:
    return SidecarProcess({"receiver": {"http_endpoint": ""}, "api": api}, state_dir=tmp_path,
                          module=MODULE)


def export(sidecar: SidecarProcess, *names: str) -> None:
    channel = grpc.insecure_channel(sidecar.grpc_endpoint)
    try:
        trace_service_pb2_grpc.TraceServiceStub(channel).Export(
            make_request([make_span({}, name=name) for name in names]), timeout=10)
    finally:
        channel.close()


def status(sidecar: SidecarProcess, path: str) -> int:
    return httpx.get(f"{sidecar.api_url}{path}", timeout=5).status_code


def test_a_shutdown_after_the_pipeline_thread_died_with_spans_in_hand_is_no_clean_stop(tmp_path):
    """The spans the dead thread had taken were never processed: exit code 1, as for spans left in
    the queue (before: 'stopped; 0 span(s) processed' and exit code 0, the queue being empty)."""
    with faulty_sidecar(tmp_path) as sidecar:
        export(sidecar, DIE, "span")
        wait_until(lambda: status(sidecar, "/readyz") == 503, timeout=30,
                   message="the pipeline thread ended")
        assert sidecar.stop() == 1, sidecar.log()
    assert "2 span(s) unprocessed" in sidecar.log()
