"""The app's ASGI lifespan shutdown (``instrumentation.shutdown``): uvicorn stopped by SIGTERM ends its
process without the exit handlers (tests/instrumentation/test_zero_code.py), so what the span
processors hold leaves there or is lost -- pathwatch's and the SDK's own (``OTEL_TRACES_EXPORTER=otlp``)
-- within one bound; and an exit that follows (Ctrl-C) does not wait again for what failed there."""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from starlette.testclient import TestClient

import instrumentation
from instrumentation import exporting, instrumentor, shutdown
from tests.instrumentation.collector import Collector
from tests.instrumentation.sample.app import build_app
from tests.support import free_port


@pytest.fixture
def collector():
    server = Collector().start()
    yield server
    server.stop()


@pytest.fixture
def black_hole():
    """A sidecar that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    yield f"127.0.0.1:{listener.getsockname()[1]}"
    listener.close()


@pytest.fixture(autouse=True)
def no_sdk_flush_left():
    """A test's SDK flush still under way (its exporter released at its end) is no next test's:
    a shutdown would find it under way, waited for by an earlier one, and not flush its own."""
    yield
    if shutdown._sdk_flushing is not None:
        shutdown._sdk_flushing.result(30)


class Hung(SpanExporter):
    """A collector that never answers: each export waits (the OTLP exporter waits its 10 s)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.exports = 0

    def export(self, spans):
        self.exports += 1
        self.entered.set()
        self.release.wait(30)
        return SpanExportResult.FAILURE

    def shutdown(self):
        self.release.set()


def sdk_provider(exporter: SpanExporter) -> TracerProvider:
    """What ``opentelemetry-instrument`` sets up with ``OTEL_TRACES_EXPORTER=otlp``: the SDK's own
    batch processor, here on a schedule far beyond the test (nothing leaves but by a flush)."""
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=600_000))
    return provider


def serve_once(app, run_id: str) -> float:
    """One request; returns how long the app's lifespan shutdown took."""
    with TestClient(app) as client:
        assert client.post(f"/api/runs/{run_id}", headers={"x-user-id": "alice"}).status_code == 200
        started = time.monotonic()
    return time.monotonic() - started


def run_ids(collector: Collector) -> list[str]:
    return [span["attributes"]["pathwatch.run.id"] for span in collector.of_kind("execute")]


def test_the_apps_lifespan_shutdown_sends_what_the_sdks_own_exporter_holds(collector, instrument):
    provider = sdk_provider(OTLPSpanExporter(endpoint=collector.endpoint, insecure=True))
    try:
        instrument(tracer_provider=provider)  # no endpoint: the spans are the SDK exporter's to send
        app, _ = build_app()
        with TestClient(app) as client:
            assert client.post("/api/runs/r1", headers={"x-user-id": "alice"}).status_code == 200
            assert collector.of_kind("execute") == []
        assert run_ids(collector) == ["r1"]
        assert collector.of_kind("heartbeat")  # through the SDK's processor, flushed with the rest
        serve_once(app, "r2")  # nothing stopped: the process serves again, and sends again
        assert run_ids(collector) == ["r1", "r2"]
    finally:
        provider.shutdown()


def test_with_both_exporters_hung_the_lifespan_shutdown_waits_one_bound_and_says_what_is_left(
        instrument, black_hole, monkeypatch, caplog):
    """Pathwatch's exporter and the SDK's own, both to collectors that never answer: the SDK's flush
    (1.45) has no bound of its own; both are waited for together, within SHUTDOWN_TIMEOUT_MILLIS."""
    monkeypatch.setattr(instrumentor, "SHUTDOWN_TIMEOUT_MILLIS", 3000)
    monkeypatch.setattr(exporting, "SHUTDOWN_TIMEOUT_MILLIS", 300)  # the fixture's uninstrument()
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    hung = Hung()
    provider = sdk_provider(hung)
    try:
        instrument(tracer_provider=provider, endpoint=black_hole)
        took = serve_once(build_app()[0], "r1")
        assert hung.entered.is_set()  # the SDK's processor was flushed
        assert took < 5.0  # one bound of 3 s for both; each in turn, 6 s (the SDK's alone: 30 s)
        messages = [r.getMessage() for r in caplog.records if "app is shutting down" in r.getMessage()]
        assert any("its exporter did not send everything" in m for m in messages), messages
        sdk = [m for m in messages if "the OpenTelemetry SDK's exporter did not send everything" in m]
        # the SDK's batch is in its export (not queued any more): how many there were is said
        left = [re.search(r"(\d+) spans still queued \((\d+) when it began\)", m) for m in sdk]
        assert len(sdk) == 1 and left[0] and int(left[0].group(2)) > 0, sdk
    finally:
        hung.release.set()
        provider.shutdown()


class _Attempts:
    """The OTLP exporter's gRPC stub, recording the span names of every Export call it makes (each
    attempt: its retries too)."""

    def __init__(self, stub, calls: list[list[str]]) -> None:
        self._stub, self._calls = stub, calls

    def Export(self, request, **kwargs):  # noqa: N802 - gRPC method name
        self._calls.append(sorted(span.name for resource in request.resource_spans
                                  for scope in resource.scope_spans for span in scope.spans))
        return self._stub.Export(request, **kwargs)


def test_after_a_lifespan_shutdown_gave_up_on_a_batch_the_exit_tries_only_what_is_new(
        instrument, monkeypatch, caplog):
    """Ctrl-C with the sidecar down: the lifespan shutdown waited its bound for the export of what
    was queued, and then the exit (uvicorn's SIGINT runs the exit handlers) waited its bound again
    for the same batch, the OTLP exporter retrying it, never trying the final heartbeat (10.6 s by
    hand). At exit that batch is given up (counted as dropped) and what is new is tried, once."""
    monkeypatch.setattr(instrumentor, "SHUTDOWN_TIMEOUT_MILLIS", 300)  # the lifespan's; the exit's: 5 s
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    started = instrument(endpoint=f"127.0.0.1:{free_port()}")  # the sidecar down
    otlp = started._export.processor._batch_processor._exporter.exporter
    calls: list[list[str]] = []
    make_stub = otlp._stub
    otlp._stub = lambda channel: _Attempts(make_stub(channel), calls)
    otlp._client = otlp._stub(otlp._channel)

    serve_once(build_app()[0], "r1")  # the lifespan shutdown gave up on the export after 300 ms
    assert calls, "the lifespan shutdown's flush never tried the export"
    batch = calls[0]
    assert "pathwatch.heartbeat" in batch and len(batch) > 1
    tried, failed = len(calls), exporting.drops.export_failed
    instrumentation.uninstrument()  # what the exit runs: the final heartbeat, then pathwatch's shutdown
    # the batch the lifespan shutdown waited for is not retried (nor waited for) again; the final
    # heartbeat, new since, is tried once
    assert calls[tried:] == [["pathwatch.heartbeat"]]
    assert exporting.drops.export_failed - failed == len(batch) + 1  # neither sent: both counted
    assert "the rest tried once" in caplog.text and f"{len(batch) + 1} spans were not sent, counted " \
        "as dropped" in caplog.text


def test_after_a_key_rotation_the_lifespan_shutdown_says_nothing_when_everything_was_sent(
        collector, instrument, caplog):
    """uninstrument(); instrument() on a running app (a key rotation) leaves the first pathwatch
    processor, shut down, on the app's provider (the SDK cannot take it off): the lifespan shutdown
    flushed it with the SDK's, its flush False with nothing queued, and warned at every shutdown
    'the OpenTelemetry SDK's exporter did not send everything within 0.0 s ...: 0 spans still queued
    (0 when it began)', everything sent (/tmp/s28_review2/test_repro_rotation_false_warning.py)."""
    provider = TracerProvider(shutdown_on_exit=False)  # the SDK's, OTEL_TRACES_EXPORTER=none
    instrument(tracer_provider=provider, endpoint=collector.endpoint)
    instrumentation.uninstrument()
    instrument(tracer_provider=provider, endpoint=collector.endpoint)
    serve_once(build_app()[0], "r1")
    assert run_ids(collector) == ["r1"]
    assert "app is shutting down" not in caplog.text


def test_a_next_lifespan_shutdown_does_not_wait_again_for_the_sdks_flush_that_outlived_its_bound(
        instrument, monkeypatch, caplog):
    """An app's own test suite, its SDK exporter's collector down: each TestClient cycle's lifespan
    shutdown waited the whole bound (5 s) for the same flush, still retrying the first cycle's batch
    (/tmp/s28_review2/test_repro_testclient_cycles_collector_down.py: 5.0, 5.0, 5.0 s). The flush
    that outlived its bound is not waited for again, nor another started; what is queued is said."""
    hung = Hung()
    provider = sdk_provider(hung)
    try:
        instrument(tracer_provider=provider)
        app, _ = build_app()
        monkeypatch.setattr(instrumentor, "SHUTDOWN_TIMEOUT_MILLIS", 300)
        serve_once(app, "r1")  # the flush of r1's batch outlived its bound: still exporting
        assert hung.entered.is_set() and "SDK's exporter did not send everything" in caplog.text
        caplog.clear()
        # a bound far above a loaded machine's TestClient cycle: returning within half of it is not
        # having waited it (before the fix the cycle took the whole bound)
        monkeypatch.setattr(instrumentor, "SHUTDOWN_TIMEOUT_MILLIS", 30000)
        took = serve_once(app, "r2")
        assert not hung.release.is_set()  # returned with the first flush still hung
        assert took < 15.0  # not a second wait of the bound for it
        assert hung.exports == 1  # no second flush beside it
        said = re.search(r"still sending what an earlier shutdown waited for .*: not waited for "
                         r"again, (\d+) spans still queued", caplog.text)
        assert said and int(said.group(1)) > 0, caplog.text  # r2's spans, queued behind it
        hung.release.set()  # the collector back: the first flush ends, and the next is waited for
        assert shutdown._sdk_flushing.result(30) is not None
        caplog.clear()
        exports = hung.exports
        serve_once(app, "r3")
        assert hung.exports > exports and "app is shutting down" not in caplog.text
    finally:
        hung.release.set()
        provider.shutdown()


def test_a_next_lifespan_shutdown_does_not_wait_again_for_pathwatchs_flush_that_outlived_its_bound(
        instrument, monkeypatch, caplog):
    """An app's own test suite, pathwatch's sidecar down or hung: each TestClient cycle's lifespan
    shutdown waited the whole bound (5 s) for the same flush of pathwatch's exporter, still exporting
    the first cycle's batch (/tmp/s28_ownwait/test_repro_own_exporter_cycles.py: 5.0, 5.0, 5.0 s,
    closed port and hung alike). The flush that outlived its bound is not waited for again, nor
    another started; what is queued is said."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # nothing leaves but by a flush
    started = instrument(endpoint=f"127.0.0.1:{free_port()}")
    processor = started._export.processor
    hung = Hung()
    processor._batch_processor._exporter.exporter = hung  # behind pathwatch's CountingExporter
    try:
        app, _ = build_app()
        monkeypatch.setattr(instrumentor, "SHUTDOWN_TIMEOUT_MILLIS", 300)
        serve_once(app, "r1")  # the flush of r1's batch outlived its bound: still exporting
        assert hung.entered.is_set() and "its exporter did not send everything" in caplog.text
        first_flush = processor._flushing
        caplog.clear()
        monkeypatch.setattr(instrumentor, "SHUTDOWN_TIMEOUT_MILLIS", 30_000)
        took = serve_once(app, "r2")
        assert not hung.release.is_set()  # returned with the first flush still hung
        assert took < 15.0  # not a second wait of the bound (30 s) for it
        assert hung.exports == 1 and processor._flushing is first_flush  # no second flush beside it
        said = re.search(r"its exporter is still sending what an earlier shutdown waited for \(is "
                         r"the sidecar up\?\): not waited for again, (\d+) spans still queued",
                         caplog.text)
        assert said and int(said.group(1)) > 0, caplog.text  # r2's spans, queued behind it
        hung.release.set()  # the sidecar back: the first flush ends, and the next is waited for
        assert first_flush.result(30) is not None
        caplog.clear()
        exports = hung.exports
        serve_once(app, "r3")
        assert hung.exports > exports and "app is shutting down" not in caplog.text
    finally:
        hung.release.set()
