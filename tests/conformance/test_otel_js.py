"""Conformance: a second, independent OTLP client — the OpenTelemetry JS SDK with its OTLP/gRPC
exporter, and with its OTLP/HTTP exporter, which sends OTLP/JSON (``js/client.js``, npm packages
installed by ``scripts/setup.sh npm`` into ``.cache/otel-js``) — sends pathwatch-contract spans to
the real sidecar process, which decodes and analyses them like the Python SDK's: the bleed trace
becomes an incident, the clean one nothing. Over HTTP a recording proxy shows what went over the
wire: OTLP/JSON with hex ids, answered in JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from sidecar.rules import BLEED_OWNER_VS_AMBIENT
from tests.e2e.fixture_sidecar import ROOT, Sidecar
from tests.sidecar.receiver.test_otlp_json import assert_encoded_alike
from tests.support import wait_until

pytestmark = pytest.mark.timeout(120)

CLIENT = Path(__file__).with_name("js") / "client.js"
MODULES = ROOT / ".cache" / "otel-js" / "node_modules"
PACKAGES = ("@opentelemetry/api", "@opentelemetry/sdk-trace-node", "@opentelemetry/sdk-trace-base",
            "@opentelemetry/exporter-trace-otlp-grpc", "@opentelemetry/exporter-trace-otlp-http",
            "@opentelemetry/resources")
SPANS_PER_RUN = 12  # request, execute, 5 emits, 5 writes (see client.js)
# whether each event's write answered its emit is judged delivery_deadline_s +
# delivery_export_allowance_s after the emit's receipt (2 + 6 s by default), long after the run is
# judged (run_idle_s): "the clean run raises nothing" looked before any delivery finding could come.
# The client exports every span before it exits (SimpleSpanProcessor, forceFlush): no allowance, a
# deadline within the idle time, so once a run is judged so are its events
RULES = {"run_idle_s": 0.5, "delivery_deadline_s": 0.3, "delivery_export_allowance_s": 0.0}


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: run scripts/setup.sh npm (it needs Node.js >= 18)")
    missing = [p for p in PACKAGES if not (MODULES / p / "package.json").exists()]
    if missing:
        pytest.fail(f"the OpenTelemetry JS packages {missing} are missing from {MODULES}: "
                    f"run scripts/setup.sh npm")
    return node


def run_js_client(node: str, endpoint: str, scenario: str, protocol: str = "grpc") -> str:
    """Run the JS client; returns the trace id it printed."""
    result = subprocess.run([node, str(CLIENT), endpoint, scenario, protocol], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "OTEL_JS_MODULES": str(MODULES)})
    assert result.returncode == 0, f"client.js {scenario} {protocol} failed: {result.stderr}"
    # the SDK warns of a partial success, or of a response it could not read
    assert "Partial Success" not in result.stderr and "Failed to parse" not in result.stderr, \
        result.stderr
    (trace_id,) = json.loads(result.stdout.strip().splitlines()[-1])["trace_ids"]
    assert len(trace_id) == 32
    return trace_id


class RecordingProxy:
    """A loopback HTTP proxy in front of the sidecar's OTLP/HTTP receiver that keeps every request
    and answer, to show what the JS SDK really sent and got back."""

    def __init__(self, upstream: str) -> None:
        self.exchanges: list[dict] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the http.server name)
                body = self._body()
                forwarded = {k: v for k, v in self.headers.items()
                             if k.lower() in ("content-type", "content-encoding")}
                answer = httpx.post(f"http://{upstream}{self.path}", content=body,
                                    headers=forwarded, timeout=20)
                proxy.exchanges.append({"path": self.path, "request_headers": forwarded,
                                        "body": body, "status": answer.status_code,
                                        "response_type": answer.headers.get("content-type"),
                                        "response": answer.content})
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers.get("content-type", ""))
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
                    return self.rfile.read(int(self.headers.get("Content-Length", 0)))
                chunks = []  # Node's http client streams the body: chunked, no Content-Length
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()  # the blank line after the last chunk
                return b"".join(chunks)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    def sent_trace_ids(self) -> set[str]:
        return {span["traceId"] for exchange in self.exchanges
                for resource in json.loads(exchange["body"])["resourceSpans"]
                for scope in resource["scopeSpans"] for span in scope["spans"]}


def test_spans_of_the_js_sdk_are_decoded_and_analysed(tmp_path):
    node = node_binary()
    with Sidecar(tmp_path, rules=RULES) as sidecar:
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


def test_spans_of_the_js_sdk_sent_as_otlp_json_are_decoded_and_analysed(tmp_path):
    node = node_binary()
    with Sidecar(tmp_path, rules=RULES) as sidecar, \
            RecordingProxy(sidecar.http_endpoint) as proxy:
        clean = run_js_client(node, proxy.endpoint, "clean", "http/json")
        wait_until(lambda: sidecar.metric("pathwatch_runs_completed_total", outcome="complete") == 1,
                   timeout=20, message="the clean JS run judged complete")
        # what went over the wire: OTLP/JSON (hex ids, lowerCamelCase), answered in JSON
        assert proxy.exchanges and proxy.sent_trace_ids() == {clean}
        for exchange in proxy.exchanges:
            assert exchange["path"] == "/v1/traces"
            assert exchange["request_headers"]["Content-Type"] == "application/json"
            assert (exchange["status"], exchange["response_type"]) == (200, "application/json")
            assert json.loads(exchange["response"]) == {}
            # the SDK's bodies take the fast way, to the very bytes protobuf's JSON parser makes
            assert assert_encoded_alike(exchange["body"]) is not None
        assert sidecar.metric("pathwatch_receiver_spans_total", protocol="http",
                              outcome="accepted") == SPANS_PER_RUN
        assert sidecar.metric("pathwatch_receiver_spans_total", protocol="grpc") == 0
        assert sidecar.metric("pathwatch_events_emitted_total") == 5
        assert sidecar.metric("pathwatch_events_written_total", outcome="written") == 5
        assert sidecar.incidents() == []

        # the same client straight to the sidecar (Node streams the body: chunked, no length)
        exchanges = len(proxy.exchanges)
        bleed = run_js_client(node, sidecar.http_endpoint, "bleed", "http/json")
        (incident,) = wait_until(lambda: sidecar.incidents(rule=BLEED_OWNER_VS_AMBIENT),
                                 timeout=20, message="the bleed incident from the JS client's JSON")
        assert len(proxy.exchanges) == exchanges
        assert incident["sample_trace_ids"] == [bleed]
        assert (incident["severity"], incident["role"], incident["implementation"],
                incident["entry_point"]) == ("critical", "execution_engine",
                                             "demo.engines.UserExecutionEngine", "/ws")
        assert [i["rule"] for i in sidecar.incidents()] == [BLEED_OWNER_VS_AMBIENT]
        assert all(clean not in i["sample_trace_ids"] for i in sidecar.incidents())
        assert sidecar.metric("pathwatch_findings_total") == 1
        assert sidecar.metric("pathwatch_receiver_spans_total", protocol="http",
                              outcome="accepted") == 2 * SPANS_PER_RUN
        assert sidecar.metric("pathwatch_receiver_requests_total", protocol="http",
                              status="200") == 2 * exchanges  # a request per span, both runs
        assert sidecar.metric("pathwatch_receiver_requests_total", protocol="http") == 2 * exchanges
        # thread.id is an OTLP/JSON intValue from a JS number: the contract's int, nothing rejected
        assert sidecar.metric("pathwatch_receiver_invalid_attributes_total") == 0
        assert sidecar.metric("pathwatch_receiver_spans_total", outcome="invalid") == 0
        assert sidecar.stop() == 0
