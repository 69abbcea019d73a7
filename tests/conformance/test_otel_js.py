"""Conformance: a second, independent OTLP client — the OpenTelemetry JS SDK with its OTLP/gRPC
exporter (``js/client.js``, npm packages installed by ``scripts/setup.sh npm`` into
``.cache/otel-js``) — sends pathwatch-contract spans to the real sidecar process, which decodes and
analyses them like the Python SDK's: the bleed trace becomes an incident, the clean one nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sidecar.rules import BLEED_OWNER_VS_AMBIENT
from tests.e2e.fixture_sidecar import ROOT, Sidecar
from tests.support import wait_until

pytestmark = pytest.mark.timeout(120)

CLIENT = Path(__file__).with_name("js") / "client.js"
MODULES = ROOT / ".cache" / "otel-js" / "node_modules"
PACKAGES = ("@opentelemetry/api", "@opentelemetry/sdk-trace-node", "@opentelemetry/sdk-trace-base",
            "@opentelemetry/exporter-trace-otlp-grpc", "@opentelemetry/resources")
SPANS_PER_RUN = 12  # request, execute, 5 emits, 5 writes (see client.js)


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: run scripts/setup.sh npm (it needs Node.js >= 18)")
    missing = [p for p in PACKAGES if not (MODULES / p / "package.json").exists()]
    if missing:
        pytest.fail(f"the OpenTelemetry JS packages {missing} are missing from {MODULES}: "
                    f"run scripts/setup.sh npm")
    return node


def run_js_client(node: str, endpoint: str, scenario: str) -> str:
    """Run the JS client; returns the trace id it printed."""
    result = subprocess.run([node, str(CLIENT), endpoint, scenario], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "OTEL_JS_MODULES": str(MODULES)})
    assert result.returncode == 0, f"client.js {scenario} failed: {result.stderr}"
    (trace_id,) = json.loads(result.stdout.strip().splitlines()[-1])["trace_ids"]
    assert len(trace_id) == 32
    return trace_id


def test_spans_of_the_js_sdk_are_decoded_and_analysed(tmp_path):
    node = node_binary()
    with Sidecar(tmp_path, rules={"run_idle_s": 0.5}) as sidecar:
        clean = run_js_client(node, sidecar.grpc_endpoint, "clean")
        wait_until(lambda: sidecar.metric("pathwatch_runs_completed_total", outcome="complete") == 1,
                   timeout=20, message="the clean JS run judged complete")
        assert sidecar.metric("pathwatch_receiver_spans_total", protocol="grpc",
                              outcome="accepted") == SPANS_PER_RUN
        assert sidecar.metric("pathwatch_events_emitted_total") == 5
        assert sidecar.metric("pathwatch_events_written_total", outcome="written") == 5

        bleed = run_js_client(node, sidecar.grpc_endpoint, "bleed")
        # the pipeline is one thread: once the bleed shows, the clean run's judgement is recorded
        (incident,) = wait_until(lambda: sidecar.incidents(rule=BLEED_OWNER_VS_AMBIENT),
                                 timeout=20, message="the bleed incident from the JS client")
        assert incident["sample_trace_ids"] == [bleed]
        assert (incident["severity"], incident["role"], incident["implementation"],
                incident["entry_point"]) == ("critical", "execution_engine",
                                             "demo.engines.UserExecutionEngine", "/ws")
        assert [i["rule"] for i in sidecar.incidents()] == [BLEED_OWNER_VS_AMBIENT]
        assert all(clean not in i["sample_trace_ids"] for i in sidecar.incidents())
        assert sidecar.metric("pathwatch_findings_total", rule=BLEED_OWNER_VS_AMBIENT) == 1
        assert sidecar.metric("pathwatch_findings_total") == 1
        assert sidecar.metric("pathwatch_receiver_spans_total", protocol="grpc",
                              outcome="accepted") == 2 * SPANS_PER_RUN
        # thread.id is an OTLP int from JS numbers: accepted as the contract's int, nothing rejected
        assert sidecar.metric("pathwatch_receiver_invalid_attributes_total") == 0
        assert sidecar.metric("pathwatch_receiver_spans_total", outcome="invalid") == 0
        assert sidecar.stop() == 0
