"""Exporting: batch processor on the app's provider, OTLP to a real collector, dropped spans counted,
heartbeats with the counts."""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (BatchSpanProcessor, SimpleSpanProcessor, SpanExporter,
                                            SpanExportResult)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

import instrumentation
from instrumentation import exporting
from instrumentation.exporting import (BatchSettings, CountingBatchSpanProcessor, CountingExporter,
                                       DropCounter, Heartbeat, batch_settings, build_resource, configure,
                                       endpoint_problem)
from instrumentation.errors import ConfigurationError
from instrumentation.linking import MAX_EMITS, pending_emits
from tests.instrumentation.collector import Collector
from tests.instrumentation.helpers import SAMPLE_PATHMAP, attrs, spans_named, spans_of_kind
from tests.instrumentation.sample.engines import UserContext, UserExecutionEngine
from tests.support import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
# the bounded flush and shutdowns below are given 0.5-1 s; unbounded, the SDK's take 10 s or more
# (the OTLP exporter's timeout, its join's 30 s). A check against that hang, with room for a loaded
# machine, not a timing: how fast they are is measured in benchmarks/
HANG_GUARD_S = 6.0


@pytest.fixture
def collector():
    server = Collector().start()
    yield server
    server.stop()


def test_configure_adds_a_processor_to_the_apps_provider_and_exports_over_otlp(collector, exporter, provider):
    setup = configure(collector.endpoint, tracer_provider=provider)
    try:
        assert setup.provider is provider and not setup.created_provider
        with provider.get_tracer("app").start_as_current_span("app-span"):
            pass
        wait_until(lambda: "app-span" in collector.names(), message="span at the collector")
        assert [s.name for s in exporter.get_finished_spans()] == ["app-span"]  # the app's own path still works
    finally:
        setup.shutdown()


def test_instrument_with_endpoint_exports_wrapped_spans_and_heartbeats(collector, instrument):
    # the counts are cumulative per process: earlier tests in this process may have dropped spans
    dropped_before = exporting.drops.dropped
    errors_before = instrumentation.instrumentation_errors()
    instrument(endpoint=collector.endpoint, heartbeat_interval_s=0.05)
    UserExecutionEngine(UserContext("alice")).execute_agent(UserContext("alice", run_id="r1"))
    wait_until(lambda: collector.of_kind("execute") and collector.of_kind("heartbeat"),
               message="execute and heartbeat spans at the collector")
    execute = collector.of_kind("execute")[0]["attributes"]
    assert execute["pathwatch.run.id"] == "r1"
    beat = collector.of_kind("heartbeat")[0]["attributes"]
    assert beat["pathwatch.sdk.heartbeat_interval_s"] == 0.05
    assert beat["pathwatch.sdk.dropped_spans"] == dropped_before
    assert beat["pathwatch.sdk.instrumentation_errors"] == errors_before


def test_heartbeat_reports_cumulative_counts_and_a_final_beat_at_stop(exporter, provider):
    counter = DropCounter()
    counter.add_failed(3)
    evicted_before = pending_emits.evicted  # cumulative per process, like the dropped spans
    try:
        for run in range(MAX_EMITS + 2):  # two emits more than the emit table holds
            pending_emits.record(f"run-{run}", "agent_started", f"evt-{run}")
    finally:
        pending_emits.clear()
    heartbeat = Heartbeat(interval_s=0.02, tracer_provider=provider, counter=counter)
    heartbeat.start()
    wait_until(lambda: len(spans_of_kind(exporter, "heartbeat")) >= 2, message="two heartbeats")
    # the periodic thread may beat once more before stop() stops it (a count taken before stop()
    # raced with it): the final beat is the one stop() itself makes, on the stopping thread, last
    beaters = []
    periodic_beat = heartbeat.beat

    def beat(final: bool = False) -> None:
        periodic_beat(final)
        beaters.append(threading.current_thread())

    heartbeat.beat = beat
    heartbeat.stop()
    assert beaters and beaters[-1] is threading.current_thread()  # the final beat at shutdown
    assert beaters.count(threading.current_thread()) == 1
    beat = spans_of_kind(exporter, "heartbeat")[-1]
    assert beat.name == "pathwatch.heartbeat" and beat.parent is None
    assert attrs(beat)["pathwatch.sdk.dropped_spans"] == 3
    assert attrs(beat)["pathwatch.sdk.pending_emits_evicted"] == evicted_before + 2


def test_only_the_heartbeat_of_a_clean_stop_is_final(exporter, provider):
    """Every heartbeat says whether the process stops (``pathwatch.sdk.heartbeat_final``): false on
    the periodic ones, true on the one ``stop`` makes. A process killed outright sends no true one,
    which is how the sidecar tells it from a clean stop."""
    heartbeat = Heartbeat(interval_s=0.02, tracer_provider=provider, counter=DropCounter())
    heartbeat.start()
    wait_until(lambda: len(spans_of_kind(exporter, "heartbeat")) >= 2, message="two heartbeats")
    heartbeat.stop()
    finals = [attrs(s)["pathwatch.sdk.heartbeat_final"] for s in spans_of_kind(exporter, "heartbeat")]
    assert finals[-1] is True and not any(finals[:-1]) and len(finals) >= 3


def test_the_first_heartbeat_is_sent_at_the_start_not_an_interval_later(exporter, provider):
    """The sidecar follows a process (is it still there?) from its first heartbeat: one that came
    only an interval after the start (10 s by default) left a process killed before then -- a crash
    loop's OOM kill in its first seconds, with the spans its exporter held -- unknown, never judged
    gone. The periodic beat sends its first report (numbered 1, not final) as it starts."""
    heartbeat = Heartbeat(interval_s=3600, tracer_provider=provider, counter=DropCounter())
    heartbeat.start()
    try:
        wait_until(lambda: spans_of_kind(exporter, "heartbeat"), timeout=10,
                   message="a heartbeat at the start")
        (first,) = spans_of_kind(exporter, "heartbeat")
        assert attrs(first)["pathwatch.sdk.heartbeat_sequence"] == 1
        assert attrs(first)["pathwatch.sdk.heartbeat_final"] is False
    finally:
        heartbeat.stop()
    assert [attrs(s)["pathwatch.sdk.heartbeat_final"]
            for s in spans_of_kind(exporter, "heartbeat")] == [False, True]


class _CountingEvent(threading.Event):
    """A heartbeat thread's stop event that counts the turns of its loop (one wait a turn)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def wait(self, timeout=None):
        self.waits += 1
        return super().wait(timeout)


def test_the_lifespan_shutdowns_heartbeat_is_final_and_the_periodic_one_waits_for_the_next_start(
        exporter, instrument):
    """uvicorn ends the process by its SIGTERM right after the app's lifespan shutdown, no exit
    handler run: that heartbeat is the process's last, so it is final. A periodic beat after it
    (while the shutdown flushes, or before the process ends) would say it lives on, and the sidecar
    would take the clean stop for a kill: none comes until the app starts again (a test client's
    next cycle), whose periodic beats are not final."""
    from starlette.testclient import TestClient

    from tests.instrumentation.sample.app import build_app

    instrumentor = instrument(heartbeat_interval_s=0.02)
    heartbeat = instrumentor.heartbeat
    turns = heartbeat._stop = _CountingEvent()  # the loop reads it at each turn
    app, _ = build_app()
    with TestClient(app) as client:
        assert client.post("/api/runs/r1", headers={"x-user-id": "alice"}).status_code == 200
        wait_until(lambda: spans_of_kind(exporter, "heartbeat"), message="a periodic heartbeat")
    beats = [attrs(s)["pathwatch.sdk.heartbeat_final"] for s in spans_of_kind(exporter, "heartbeat")]
    assert beats[-1] is True and not any(beats[:-1])
    waited = turns.waits
    wait_until(lambda: turns.waits >= waited + 5, message="five turns of the heartbeat loop")
    assert len(spans_of_kind(exporter, "heartbeat")) == len(beats)  # paused after the final beat
    with TestClient(app):
        wait_until(lambda: len(spans_of_kind(exporter, "heartbeat")) > len(beats) + 1,
                   message="periodic heartbeats again once the app started again")
        assert attrs(spans_of_kind(exporter, "heartbeat")[len(beats)])[
            "pathwatch.sdk.heartbeat_final"] is False


class _BlockingExporter(SpanExporter):
    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.exported = 0

    def export(self, spans):
        self.entered.set()
        self.release.wait(10)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS


def _overfill(processor_class: type, counter: DropCounter, options: dict | None = None) -> int:
    """40 spans through a batch processor whose queue holds 4, exporting in batches of 4 with the
    worker held inside its first export: 32 are dropped. Returns the spans exported."""
    counter.install()
    blocking = _BlockingExporter()
    provider = TracerProvider()
    provider.add_span_processor(processor_class(blocking, max_queue_size=4, schedule_delay_millis=60000,
                                                max_export_batch_size=4, **(options or {})))
    tracer = provider.get_tracer("test")
    try:
        # First fill one batch and wait until the worker is stuck exporting it: the SDK's "queue
        # full" check races with a worker that is still draining, so only then is every further
        # span beyond the queue's 4 slots certainly dropped.
        for index in range(4):
            tracer.start_span(f"s{index}").end()
        assert blocking.entered.wait(10), "the batch worker never started exporting"
        for index in range(4, 40):
            tracer.start_span(f"s{index}").end()
        blocking.release.set()
        provider.force_flush()
        return blocking.exported
    finally:
        blocking.release.set()
        provider.shutdown()
        counter.uninstall()


def test_spans_dropped_on_a_full_queue_are_counted():
    counter = DropCounter()
    assert _overfill(BatchSpanProcessor, counter) == 8
    assert counter.queue_full == 32


def test_a_span_dropped_in_a_thread_inside_the_drop_counter_does_not_wait_for_itself():
    """The same for the drop counter's lock: a span the full queue drops, ended by a finalizer
    or a signal handler while its thread counts (an int that grows allocates: the collector
    may run there), counted in that thread again."""
    counter = DropCounter()
    blocking = _BlockingExporter()
    processor = CountingBatchSpanProcessor(blocking, max_queue_size=2, max_export_batch_size=2,
                                           schedule_delay_millis=60000, counter=counter)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("test")
    counted = threading.Event()
    try:
        for index in range(2):
            tracer.start_span(f"s{index}").end()
        assert blocking.entered.wait(10), "the batch worker never started exporting"
        for index in range(2, 4):
            tracer.start_span(f"s{index}").end()  # the queue full

        def inside_a_count() -> None:
            with counter._lock:
                tracer.start_span("from a finalizer").end()  # pushes the oldest out: counted
            counted.set()

        threading.Thread(target=inside_a_count, daemon=True).start()
        assert counted.wait(5), "the drop counter waited for the lock its own thread held"
        assert counter.queue_full == 1
    finally:
        blocking.release.set()
        if counted.is_set():
            provider.shutdown()


class _FirstBatchRefused(SpanExporter):
    """Holds its first export until released, then refuses it (the sidecar overloaded); takes the
    others, keeping their spans."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls = 0
        self.spans: list = []

    def export(self, spans):
        self.calls += 1
        if self.calls == 1:
            self.entered.set()
            self.release.wait(10)
            return SpanExportResult.FAILURE
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


def test_the_final_heartbeat_counts_the_spans_whose_export_failed_ahead_of_it():
    """A clean stop makes the final heartbeat, then the shutdown sends what is queued: a batch
    ahead of it that failed after it was made was counted only after, and the final heartbeat,
    which arrived, told the sidecar nothing was lost (2000 spans so at an exit, measured)."""
    counter = DropCounter()
    delegate = _FirstBatchRefused()
    processor = CountingBatchSpanProcessor(CountingExporter(delegate, counter), counter=counter,
                                           max_queue_size=16, max_export_batch_size=3,
                                           schedule_delay_millis=60000)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    heartbeat = Heartbeat(0, provider, counter=counter, processor=processor)
    tracer = provider.get_tracer("test")
    try:
        for index in range(3):  # a whole batch: the worker takes it at once
            tracer.start_span(f"s{index}").end()
        assert delegate.entered.wait(10), "the batch worker never started exporting"
        heartbeat.start()
        heartbeat.stop()  # the final heartbeat, made while that batch is still being sent
        delegate.release.set()  # ... which the sidecar then refuses
        processor.shutdown()
        [final] = [span for span in delegate.spans if span.name == "pathwatch.heartbeat"]
        assert final.attributes["pathwatch.sdk.heartbeat_final"] is True
        assert counter.dropped == 3
        assert final.attributes["pathwatch.sdk.dropped_spans"] == 3
    finally:
        delegate.release.set()
        provider.shutdown()


def test_a_heartbeat_of_another_counter_keeps_its_own_count_through_the_exporter():
    """The exporter stamps a heartbeat with its counter's count as it sends it: a heartbeat made from
    another counter (a second setup in the process; the full suite's tests, whose exporter's counter
    had counted 13,122 drops of earlier tests) was stamped with that count, a loss it never had."""
    exporters_counter, own = DropCounter(), DropCounter()
    exporters_counter.add_failed(500)
    own.add_failed(4)
    delegate = InMemorySpanExporter()
    processor = CountingBatchSpanProcessor(CountingExporter(delegate, exporters_counter),
                                           counter=exporters_counter, schedule_delay_millis=60000)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    try:
        Heartbeat(0, provider, counter=own).beat()
        Heartbeat(0, provider, counter=exporters_counter).beat()
        assert processor.force_flush(10_000)
        counts = [span.attributes["pathwatch.sdk.dropped_spans"]
                  for span in delegate.get_finished_spans() if span.name == "pathwatch.heartbeat"]
        assert counts == [4, 500]
    finally:
        provider.shutdown()


_BSP_VARIABLES = ("OTEL_BSP_SCHEDULE_DELAY", "OTEL_BSP_MAX_QUEUE_SIZE", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE")


@pytest.fixture
def bsp_env(monkeypatch):
    """A clean slate of OTEL_BSP_* variables and of the warnings already given about them."""
    for name in _BSP_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(exporting, "_bsp_warned", set())
    return monkeypatch


def test_without_bsp_variables_pathwatchs_processor_keeps_its_own_sizes(bsp_env):
    bsp_env.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "")  # empty is unset
    assert batch_settings() == BatchSettings(schedule_delay_millis=200, max_queue_size=65536,
                                             max_export_batch_size=2048)


def test_the_standard_bsp_variables_size_pathwatchs_processor(bsp_env):
    # the runbooks tell the on-call to raise these: pathwatch's processor passed fixed sizes, so the
    # SDK ignored them. Queue 2, batches of 1 and a worker held inside its first export: of 5 spans,
    # the first is being exported, 2 wait in the queue and 2 are dropped (none with 65536 slots)
    bsp_env.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "2")
    bsp_env.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", " 1 ")
    bsp_env.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    blocking = _BlockingExporter()
    setup = configure(exporter=blocking, tracer_provider=TracerProvider())
    tracer = setup.provider.get_tracer("test")
    dropped_before = exporting.drops.dropped
    try:
        assert setup.settings == BatchSettings(schedule_delay_millis=600000, max_queue_size=2,
                                               max_export_batch_size=1)
        tracer.start_span("first").end()
        assert blocking.entered.wait(10), "the batch worker never started exporting"
        for index in range(4):
            tracer.start_span(f"s{index}").end()
        assert exporting.drops.dropped - dropped_before == 2
        blocking.release.set()
        assert setup.force_flush()
        assert blocking.exported == 3
    finally:
        blocking.release.set()
        setup.shutdown()


def test_sizes_given_in_code_win_over_the_bsp_variables(bsp_env):
    bsp_env.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "8")
    bsp_env.setenv("OTEL_BSP_SCHEDULE_DELAY", "10")
    assert batch_settings(max_queue_size=4096, schedule_delay_millis=50) == BatchSettings(50, 4096, 2048)


@pytest.mark.parametrize("value", ["lots", "0", "-5", "1.5", "0x10", str(2**31), "9" * 40])
@pytest.mark.parametrize("name,default", [("OTEL_BSP_SCHEDULE_DELAY", 200),
                                          ("OTEL_BSP_MAX_QUEUE_SIZE", 65536),
                                          ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 2048)])
def test_a_bad_bsp_variable_is_logged_once_and_the_default_kept(bsp_env, caplog, name, default, value):
    bsp_env.setenv(name, value)
    memory = InMemorySpanExporter()
    field = next(field for field, variable, _ in exporting._BSP_ENV if variable == name)
    with caplog.at_level(logging.WARNING, logger="instrumentation.exporting"):
        setups = [configure(exporter=memory, tracer_provider=TracerProvider()) for _ in range(2)]
    try:
        assert [getattr(setup.settings, field) for setup in setups] == [default, default]
        warnings = [r.getMessage() for r in caplog.records if name in r.getMessage()]
        assert len(warnings) == 1 and f"keeps its default {default}" in warnings[0], warnings
        # the app goes on: spans still leave through the processor
        setups[0].provider.get_tracer("test").start_span("after").end()
        assert setups[0].force_flush() and [s.name for s in memory.get_finished_spans()] == ["after"]
    finally:
        for setup in setups:
            setup.shutdown()


def test_a_batch_size_above_the_queue_size_becomes_the_queue_size(bsp_env, caplog):
    # the SDK refuses the pair (ValueError): a smaller queue alone must not break the app
    bsp_env.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "1000")
    with caplog.at_level(logging.WARNING, logger="instrumentation.exporting"):
        setup = configure(exporter=InMemorySpanExporter(), tracer_provider=TracerProvider())
        setup.shutdown()
        assert setup.settings == BatchSettings(200, 1000, 1000)
        assert not caplog.records  # the batch size was pathwatch's default, not the operator's
        bsp_env.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "5000")
        assert batch_settings() == BatchSettings(200, 1000, 1000)
        assert batch_settings() == BatchSettings(200, 1000, 1000)
    assert [r.getMessage() for r in caplog.records] == [
        "pathwatch: OTEL_BSP_MAX_EXPORT_BATCH_SIZE='5000' is above the queue size 1000: "
        "pathwatch's exporter sends batches of 1000"]


def test_a_batch_size_in_code_above_the_queue_size_of_the_environment_becomes_the_queue_size(
        bsp_env, caplog):
    # the operator sized the queue, the app's code a batch above it: configure() raised the SDK's
    # ValueError into the app. The operator's queue holds; the batch is clamped to it, logged once
    bsp_env.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "1000")
    memory = InMemorySpanExporter()
    with caplog.at_level(logging.WARNING, logger="instrumentation.exporting"):
        setups = [configure(exporter=memory, tracer_provider=TracerProvider(), max_export_batch_size=2048)
                  for _ in range(2)]
    try:
        assert [setup.settings for setup in setups] == [BatchSettings(200, 1000, 1000)] * 2
        assert [r.getMessage() for r in caplog.records] == [
            "pathwatch: OTEL_BSP_MAX_QUEUE_SIZE='1000' is below the batch size 2048 passed in code: "
            "pathwatch's exporter sends batches of 1000"]
        setups[0].provider.get_tracer("test").start_span("after").end()
        assert setups[0].force_flush() and [s.name for s in memory.get_finished_spans()] == ["after"]
    finally:
        for setup in setups:
            setup.shutdown()
    # both sizes in code: the app's own pair, refused by the SDK at its call as without pathwatch
    with pytest.raises(ValueError):
        configure(exporter=InMemorySpanExporter(), tracer_provider=TracerProvider(),
                  max_queue_size=10, max_export_batch_size=20)


def test_failed_exports_are_counted():
    class Failing(SpanExporter):
        def export(self, spans):
            return SpanExportResult.FAILURE

    class Raising(SpanExporter):
        def export(self, spans):
            raise ConnectionError("down")

    counter = DropCounter()
    assert CountingExporter(Failing(), counter).export([object(), object()]) is SpanExportResult.FAILURE
    with pytest.raises(ConnectionError):
        CountingExporter(Raising(), counter).export([object()])
    assert counter.export_failed == 3 and counter.dropped == 3


def test_an_export_the_shutdown_cuts_short_is_a_counted_failure_not_a_traceback():
    # the OTLP exporter shut down (pathwatch's bounded shutdown, the sidecar down) while it built its
    # request calls its closed channel: "ValueError: Cannot invoke RPC on closed channel!", which
    # the SDK's worker logged as "Exception while exporting Span." with a traceback
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    building, shut_down = threading.Event(), threading.Event()

    class Building(OTLPSpanExporter):  # the real exporter, held while it builds its request
        def _translate_data(self, data):
            building.set()
            shut_down.wait(HANG_GUARD_S)
            return super()._translate_data(data)

    provider = TracerProvider()
    spans = []
    for index in range(3):
        span = provider.get_tracer("app").start_span(f"s{index}")
        span.end()
        spans.append(span)
    counter = DropCounter()
    exporter = CountingExporter(Building(endpoint=f"127.0.0.1:{free_port()}", insecure=True), counter)
    outcome: list = []

    def export() -> None:
        try:
            outcome.append(exporter.export(spans))
        except Exception as exc:  # what the SDK's worker logs with its traceback
            outcome.append(exc)

    worker = threading.Thread(target=export)
    worker.start()
    assert building.wait(HANG_GUARD_S)
    exporter.shutdown()  # what the processor's shutdown does at its deadline
    shut_down.set()
    worker.join(HANG_GUARD_S)
    assert outcome == [SpanExportResult.FAILURE]  # ValueError before
    assert counter.export_failed == 3


def test_spans_the_provider_hands_a_stopped_start_processor_are_not_counted_as_dropped(
        collector, instrument, provider, exporter):
    # a key rotation: uninstrument(), instrument() again. The SDK cannot take the first start's
    # processor off the provider; shut down, it is still handed every span and reports each through
    # drop_items(1, "already_shutdown") -- counted, every span the second processor sent fine was a
    # "dropped span" on the heartbeat (the sidecar's span_loss)
    instrument(endpoint=collector.endpoint)
    instrumentation.uninstrument()
    dropped_before = exporting.drops.dropped
    instrument(endpoint=collector.endpoint)
    tracer = provider.get_tracer("app")
    for _ in range(20):
        tracer.start_span("app.work").end()
    wait_until(lambda: collector.names().count("app.work") == 20, message="20 spans at the collector")
    instrumentation.uninstrument()  # the final heartbeat, exported before the processor stops
    final = [s for s in collector.of_kind("heartbeat")][-1]["attributes"]
    assert final["pathwatch.sdk.dropped_spans"] == dropped_before
    assert exporting.drops.dropped == dropped_before
    assert len(collector.of_kind("heartbeat")) == 2  # one final beat per start


@pytest.fixture(params=["refused", "black_hole"])
def dead_sidecar(request):
    """An OTLP endpoint of a sidecar that is down (a closed port) or hung (a TCP listener that
    accepts connections and never answers)."""
    if request.param == "refused":
        yield f"127.0.0.1:{free_port()}"
        return
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def test_uninstrument_keeps_its_bound_when_the_sidecar_is_down_or_hung(dead_sidecar, instrument, provider,
                                                                        exporter, monkeypatch):
    # the SDK's flush (1.45) ignores its timeout and retries every batch for the OTLP exporter's
    # 10 s: uninstrument() took 40-60 s here with 10,000 spans queued
    monkeypatch.setattr(exporting, "SHUTDOWN_TIMEOUT_MILLIS", 1000, raising=False)
    failed_before = exporting.drops.export_failed
    instrument(endpoint=dead_sidecar)
    tracer = provider.get_tracer("app")
    for index in range(5000):  # more than two batches of 2048
        tracer.start_span(f"s{index}").end()
    started = time.monotonic()
    instrumentation.uninstrument()
    assert time.monotonic() - started < HANG_GUARD_S  # the SDK's flush: 40-60 s for 10,000 spans
    # nothing was sent: every span pathwatch's processor got (the app's exporter got the same ones,
    # and pathwatch's the final heartbeat too: heartbeats go through pathwatch's exporter only) is
    # counted as dropped — the batch in flight as a failed export, the ones still queued at the
    # deadline by the shutdown
    assert exporting.drops.export_failed - failed_before == len(exporter.get_finished_spans()) + 1 == 5001


def test_the_apps_lifespan_shutdown_sends_what_is_queued_and_says_what_it_could_not(
        collector, instrument, monkeypatch, caplog):
    """uvicorn SIGTERMed ends the process without atexit (tests/instrumentation/test_zero_code.py):
    the app's ASGI lifespan shutdown is where pathwatch's queue leaves, or is said to be left."""
    from starlette.testclient import TestClient

    from instrumentation import instrumentor
    from tests.instrumentation.sample.app import build_app

    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # nothing leaves on the schedule
    instrument(endpoint=collector.endpoint)
    app, _ = build_app()
    with TestClient(app) as client:
        assert client.post("/api/runs/r1", headers={"x-user-id": "alice"}).status_code == 200
        assert collector.of_kind("execute") == []
    # the lifespan shutdown waited for the export: at the collector, with a heartbeat, nothing stopped
    assert [s["attributes"]["pathwatch.run.id"] for s in collector.of_kind("execute")] == ["r1"]
    assert collector.of_kind("heartbeat")
    with TestClient(app) as client:  # the process serves again: exported again at its shutdown
        assert client.post("/api/runs/r2", headers={"x-user-id": "alice"}).status_code == 200
    assert [s["attributes"]["pathwatch.run.id"] for s in collector.of_kind("execute")] == ["r1", "r2"]

    collector.stop()  # the sidecar down: bounded, and the spans still queued are named
    monkeypatch.setattr(instrumentor, "SHUTDOWN_TIMEOUT_MILLIS", 300)
    monkeypatch.setattr(exporting, "SHUTDOWN_TIMEOUT_MILLIS", 300)  # the fixture's uninstrument()
    with TestClient(app) as client:
        assert client.post("/api/runs/r3", headers={"x-user-id": "alice"}).status_code == 200
        started = time.monotonic()
    assert time.monotonic() - started < HANG_GUARD_S
    assert "the app is shutting down and its exporter did not send everything" in caplog.text
    assert re.search(r"\d+ spans still queued \(\d+ when it began\) behind an export not ended, "
                     "lost if the process ends now", caplog.text)


@pytest.mark.parametrize("endpoint, problem", [
    ("127.0.0.1:99999", "the port 99999 is not in 1..65535"),  # gRPC connected to 34463
    ("127.0.0.1:0", "the port 0 is not in 1..65535"),
    ("sidecar", "no port (gRPC would connect to 443)"),
    ("[::1]", "no port (gRPC would connect to 443)"),
    ("127.0.0.1:abc", "the port 'abc' is not a number"),
    ("http://127.0.0.1:99999/", "the port 99999 is not in 1..65535"),
    # the exporter keeps the URL's host alone: gRPC connected to 127.0.0.1:443, in plaintext
    ("http://127.0.0.1", "no port (gRPC would connect to 443, in plaintext)"),
    ("HTTP://sidecar/", "no port (gRPC would connect to 443, in plaintext)"),
    # gRPC read it whole as the address, on 443: ipv6:[::0.1.67.23]:443
    ("::1:4317", "an IPv6 address without brackets (gRPC would read it whole as the address, on port 443)"),
    ("http://::1:4317", "an IPv6 address without brackets"),
])
def test_an_endpoint_grpc_would_read_as_another_refuses_to_start_naming_the_variable(
        monkeypatch, provider, hmac_key, endpoint, problem):
    monkeypatch.setenv("PATHWATCH_OTLP_ENDPOINT", endpoint)
    with pytest.raises(ConfigurationError, match=re.escape(f"PATHWATCH_OTLP_ENDPOINT={endpoint!r}: {problem}")):
        instrumentation.instrument(None, tracer_provider=provider)
    assert not instrumentation.is_enabled()
    with pytest.raises(ConfigurationError, match=re.escape(f"endpoint={endpoint!r}: {problem}")):
        instrumentation.instrument(None, tracer_provider=provider, endpoint=endpoint)


@pytest.mark.parametrize("endpoint, shown", [
    ("https://user:s3cret@collector.example", "https://***@collector.example"),
    ("http://user:s3cret@127.0.0.1:4317/", "http://***@127.0.0.1:4317/"),
    ("user:s3cret@127.0.0.1:4317", "***@127.0.0.1:4317"),
    # a password holding '/', '?' or '#' unencoded ended the authority early: read as the port and
    # quoted ('the port 's3cr' is not a number'), the endpoint whole with it (review s30,
    # /tmp/s30_priv/probe_endpoint_password.py)
    ("http://user:s3cr/et@127.0.0.1:4317", "http://***@127.0.0.1:4317"),
    ("https://user:s3cr?et@collector.example:4317/", "https://***@collector.example:4317/"),
    ("http://user:s3cr#et@127.0.0.1:4317", "http://***@127.0.0.1:4317"),
    ("user:s3cr/et@127.0.0.1:4317", "***@127.0.0.1:4317"),
])
def test_an_endpoint_with_credentials_is_refused_without_quoting_them(monkeypatch, provider, hmac_key,
                                                                      endpoint, shown):
    """/tmp/s28_review1/repro_endpoint_credentials.py: the refusal quoted the endpoint whole, its
    password in the log ('the port 's3cret@collector.example' is not a number'), or passed it
    (HOST:PORT): gRPC takes 'user:s3cret@host' for its target, never as credentials."""
    monkeypatch.setenv("PATHWATCH_OTLP_ENDPOINT", endpoint)
    for kwargs, setting in (({}, "PATHWATCH_OTLP_ENDPOINT"), ({"endpoint": endpoint}, "endpoint")):
        with pytest.raises(ConfigurationError) as raised:
            instrumentation.instrument(None, tracer_provider=provider, **kwargs)
        assert str(raised.value).startswith(f"{setting}={shown!r}: credentials before the host")
        assert "s3cr" not in str(raised.value)
    assert not instrumentation.is_enabled()


@pytest.mark.parametrize("endpoint", [
    "127.0.0.1:4317", "localhost:4317", "[::1]:4317", "pathwatch.monitoring.svc.cluster.local:4317",
    "http://127.0.0.1:4317", "https://collector.example", "https://collector.example:4317/",
    "unix:///run/otlp.sock",
    # gRPC's abstract unix socket (refused as "the port 'pathwatch' is not a number"), one with an @ in
    # its name (refused as credentials), and a URL's query or fragment, which the exporter drops with
    # the path (refused as "the port '4317?compress=1' is not a number")
    "unix-abstract:pathwatch", "unix-abstract:otel@pathwatch", "http://127.0.0.1:4317?compress=1",
    "http://127.0.0.1:4317#traces",
])
def test_the_endpoints_grpc_reads_as_written_are_accepted(endpoint):
    assert endpoint_problem(endpoint) is None


def test_force_flush_keeps_its_timeout_when_the_sidecar_is_down_or_hung(dead_sidecar):
    setup = configure(dead_sidecar, tracer_provider=TracerProvider())
    try:
        setup.provider.get_tracer("app").start_span("s").end()
        started = time.monotonic()
        assert setup.force_flush(timeout_millis=500) is False  # the span stays queued, not dropped
        assert time.monotonic() - started < HANG_GUARD_S  # the SDK's own flush: the exporter's 10 s
    finally:
        setup.shutdown(timeout_millis=500)


def test_flushes_that_time_out_share_one_background_flush():
    # each timed-out flush left its thread behind, queued on the SDK's export lock: an app that
    # flushes after every job gained a thread per job for as long as the sidecar hung
    class Hung(SpanExporter):
        def __init__(self):
            self.release = threading.Event()

        def export(self, spans):
            self.release.wait(30)  # a black-holed sidecar: the OTLP exporter waits its timeout
            return SpanExportResult.FAILURE

        def shutdown(self):
            self.release.set()

    hung = Hung()
    setup = configure(tracer_provider=TracerProvider(), exporter=hung, schedule_delay_millis=60_000)
    try:
        tracer = setup.provider.get_tracer("app")
        for index in range(5):
            tracer.start_span(f"job{index}").end()
            assert setup.force_flush(timeout_millis=50) is False
        assert [t.name for t in threading.enumerate()].count("pathwatch-flush") == 1
    finally:
        hung.release.set()
        setup.shutdown(timeout_millis=500)


def test_a_flush_is_true_only_once_what_was_queued_before_it_is_exported(monkeypatch):
    # a flush asked for while an earlier one's thread had emptied the queue but not yet exited got
    # that flush's True, with its own span still queued (the window held open here)
    class Recording(SpanExporter):
        def __init__(self):
            self.names = []

        def export(self, spans):
            self.names += [span.name for span in spans]
            return SpanExportResult.SUCCESS

    gate, finished = threading.Event(), threading.Event()
    run = exporting._Background._run

    def run_then_hold(background):
        run(background)  # the SDK's flush returned: the queue was empty
        finished.set()
        gate.wait(2)  # the thread is descheduled before it exits

    monkeypatch.setattr(exporting._Background, "_run", run_then_hold)
    recording = Recording()
    setup = configure(tracer_provider=TracerProvider(), exporter=recording, schedule_delay_millis=60_000)
    try:
        tracer = setup.provider.get_tracer("app")
        tracer.start_span("job1").end()
        assert setup.force_flush(timeout_millis=1000) is True
        assert finished.wait(5)
        tracer.start_span("job2").end()
        assert setup.force_flush(timeout_millis=1000) is True
        assert recording.names == ["job1", "job2"]
    finally:
        gate.set()
        setup.shutdown(timeout_millis=500)


def test_the_providers_own_shutdown_at_exit_is_bounded_too(monkeypatch):
    # the SDK provider shuts its processors down at exit (atexit): the SDK's join of pathwatch's
    # worker would take up to 30 s, and its exports with the sidecar hung as long again
    monkeypatch.setattr(exporting, "SHUTDOWN_TIMEOUT_MILLIS", 1000, raising=False)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    try:
        provider = TracerProvider(shutdown_on_exit=False)
        configure(f"127.0.0.1:{listener.getsockname()[1]}", tracer_provider=provider)
        for index in range(3000):
            provider.get_tracer("app").start_span(f"s{index}").end()
        started = time.monotonic()
        provider.shutdown()
        assert time.monotonic() - started < HANG_GUARD_S  # the SDK's join alone: up to 30 s
    finally:
        listener.close()


def test_a_second_shutdown_counts_nothing_again():
    counter = DropCounter()
    blocking = _BlockingExporter()
    processor = CountingBatchSpanProcessor(CountingExporter(blocking, counter), counter=counter,
                                           max_queue_size=16, max_export_batch_size=4,
                                           schedule_delay_millis=60000)
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(processor)
    try:
        for index in range(4):  # a full batch wakes the worker, held in its export
            provider.get_tracer("app").start_span(f"s{index}").end()
        assert blocking.entered.wait(10), "the batch worker never started exporting"
        for index in range(4, 10):
            provider.get_tracer("app").start_span(f"s{index}").end()
        processor.shutdown(timeout_millis=100)  # the worker is held past the deadline
        assert counter.export_failed == 6  # still queued; the batch in flight is not counted yet
        blocking.release.set()
        processor.shutdown(timeout_millis=100)
        provider.shutdown()  # the provider's at exit
        assert counter.export_failed == 6
    finally:
        blocking.release.set()


def test_resource_carries_pathwatch_version_and_an_instance_id(monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "agent-backend")
    monkeypatch.setenv("PATHWATCH_SERVICE_VERSION", "1.2.3")
    resource = build_resource().attributes
    assert resource["service.name"] == "agent-backend"
    assert resource["service.version"] == "1.2.3"
    assert resource["pathwatch.sdk.version"] == instrumentation.__version__
    assert resource["service.instance.id"]


def test_configure_without_an_sdk_provider_creates_one(monkeypatch):
    # the global provider can be set once per process: give configure a non-SDK provider instead
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", trace.Once())
    memory = InMemorySpanExporter()
    setup = configure(exporter=memory, tracer_provider=trace.NoOpTracerProvider())
    try:
        assert setup.created_provider and trace.get_tracer_provider() is setup.provider
        assert setup.provider.resource.attributes["pathwatch.sdk.version"] == instrumentation.__version__
    finally:
        setup.shutdown()


def test_a_provider_pathwatch_makes_global_is_announced_and_the_app_configured_later_can_join_it(
        collector):
    """configure() without an SDK provider makes pathwatch's global; an app configuring its own
    OpenTelemetry afterwards got only OpenTelemetry's 'Overriding of current TracerProvider is not
    allowed' and its exporter nothing, with no word from pathwatch (review,
    /tmp/s22/review_instr/probe6_global_provider.py). It stays global (the FastAPI request spans come
    through it to the sidecar: checked here); one warning says so and what to do, which works."""
    child = textwrap.dedent(f"""
        from fastapi import FastAPI
        from starlette.testclient import TestClient
        import instrumentation
        instrumentation.instrument("tests/instrumentation/sample/pathmap.yaml",
                                   endpoint="{collector.endpoint}", heartbeat_interval_s=0)
        app = FastAPI()   # built after instrument(): request spans and pathwatch's middleware

        @app.get("/x")
        def x():
            return "ok"

        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        apps = InMemorySpanExporter()
        own = TracerProvider()
        own.add_span_processor(SimpleSpanProcessor(apps))
        trace.set_tracer_provider(own)  # refused: pathwatch's is global
        print("the app's provider is global:", trace.get_tracer_provider() is own)
        trace.get_tracer_provider().add_span_processor(SimpleSpanProcessor(apps))  # the advice
        with trace.get_tracer("app").start_as_current_span("checkout"):
            pass
        TestClient(app).get("/x")
        print("the app's exporter got:", sorted(s.name for s in apps.get_finished_spans()))
        instrumentation.uninstrument()
        instrumentation.instrument("tests/instrumentation/sample/pathmap.yaml",  # a key rotation
                                   endpoint="{collector.endpoint}", heartbeat_interval_s=0)
        instrumentation.uninstrument()
    """)
    env = {"PATHWATCH_HMAC_KEY": "test-key-not-secret", "PATH": ""}
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "the app's provider is global: False" in done.stdout
    assert "the app's exporter got: ['GET /x', 'checkout']" in done.stdout
    assert done.stderr.count("set it as the global tracer provider") == 1, done.stderr  # not again
    assert "add your span processors to opentelemetry.trace.get_tracer_provider()" in done.stderr
    assert "Overriding of current TracerProvider is not allowed" in done.stderr
    wait_until(lambda: "GET /x" in collector.names(), message="the request span at the sidecar")
    request = next(span for span in collector.spans if span["name"] == "GET /x")
    assert request["attributes"]["pathwatch.kind"] == "request"


def test_a_provider_the_app_configured_first_gets_pathwatchs_processor_without_a_warning(
        collector, caplog, provider, exporter):
    with caplog.at_level(logging.WARNING, logger="instrumentation"):
        setup = configure(collector.endpoint, tracer_provider=provider)
    try:
        assert not setup.created_provider and "global tracer provider" not in caplog.text
    finally:
        setup.shutdown()


@pytest.mark.parametrize("sdk_log_level", [logging.WARNING, logging.ERROR])
def test_our_processor_counts_its_drops_once_whatever_the_sdks_log_level(sdk_log_level, monkeypatch):
    monkeypatch.setattr(logging.getLogger("opentelemetry"), "level", sdk_log_level)
    counter = DropCounter()  # its log filter is installed too: a drop seen both ways counts once
    assert _overfill(CountingBatchSpanProcessor, counter, {"counter": counter}) == 8
    assert counter.queue_full == 32


def test_the_final_heartbeat_is_emitted_at_exit_also_without_periodic_ones():
    child = textwrap.dedent("""
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
        import instrumentation

        class Printing(SpanExporter):
            def export(self, spans):
                for span in spans:
                    print("exported", span.name, flush=True)
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(Printing()))
        instrumentation.instrument("tests/instrumentation/sample/pathmap.yaml",
                                   tracer_provider=provider, heartbeat_interval_s=0)
        # the process exits without uninstrument()
    """)
    env = {"PATHWATCH_HMAC_KEY": "test-key-not-secret", "PATH": ""}
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["exported pathwatch.heartbeat"]


def test_the_drop_counter_lets_records_that_are_not_text_through():
    counter = DropCounter()
    record = logging.LogRecord(exporting._BSP_LOGGER, logging.WARNING, __file__, 1,
                               ValueError("logged as an object"), None, None)
    assert counter.filter(record) is True and counter.dropped == 0


@pytest.mark.parametrize(("environ", "endpoint", "same"), [
    ({"OTEL_TRACES_EXPORTER": "otlp"}, "127.0.0.1:4317", True),  # the distro's default
    ({"OTEL_TRACES_EXPORTER": "console,otlp",
      "OTEL_EXPORTER_OTLP_ENDPOINT": "http://localhost:4317"}, "localhost:4317", True),
    ({"OTEL_TRACES_EXPORTER": "otlp",
      "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://pathwatch:4317"}, "pathwatch:4317", True),
    ({"OTEL_TRACES_EXPORTER": "otlp",
      "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, "127.0.0.1:4317", False),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, "127.0.0.1:14317", False),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
     "127.0.0.1:4317", False),
    ({"OTEL_TRACES_EXPORTER": "none"}, "127.0.0.1:4317", False),
    ({}, "127.0.0.1:4317", False),
])
def test_the_sdks_own_exporter_to_the_same_endpoint_is_recognised(environ, endpoint, same):
    assert (exporting.sdk_exports_to(endpoint, environ) is not None) is same


def test_instrument_adds_no_second_exporter_where_the_sdk_exports_already(instrument, monkeypatch,
                                                                          caplog, provider):
    """README's zero-code start under opentelemetry-instrument: the distro's exporter and
    PATHWATCH_OTLP_ENDPOINT pointing at the same sidecar sent every span twice."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4317")
    monkeypatch.setenv("PATHWATCH_OTLP_ENDPOINT", "127.0.0.1:4317")
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)  # the distro's, configured
    with caplog.at_level(logging.WARNING, logger="instrumentation.instrumentor"):
        instrumentor = instrument(tracer_provider=None)
    assert instrumentor._export is None
    assert "no second exporter" in caplog.text and "OTEL_TRACES_EXPORTER=none" in caplog.text


def test_an_endpoint_given_in_code_is_exported_to_whatever_the_environment_says(instrument,
                                                                                monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")  # a deployment default, the SDK not built from it
    instrumentor = instrument(endpoint="127.0.0.1:4317")
    assert instrumentor._export is not None


def _pathwatch_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "instrumentation.instrumentor" and r.levelno == logging.WARNING
            and "no span exporter" in r.getMessage()]


@pytest.mark.parametrize("sdk", ["none", "sdk-without-processor"])
def test_a_start_where_no_span_can_leave_warns_once_naming_what_to_set(instrument, monkeypatch, caplog, sdk):
    """The chart's former backend env in an image without opentelemetry-distro: OTEL_EXPORTER_OTLP_*
    but no SDK to read them, no PATHWATCH_OTLP_ENDPOINT; 0 spans reached the sidecar, nothing logged.
    Also the distro with OTEL_TRACES_EXPORTER=none and no PATHWATCH_OTLP_ENDPOINT."""
    monkeypatch.delenv("PATHWATCH_OTLP_ENDPOINT", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:4317")
    if sdk == "none":
        monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
        global_provider = trace.ProxyTracerProvider()   # opentelemetry-instrument without a distro
    else:
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
        global_provider = TracerProvider()               # the distro's, with no exporter
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: global_provider)
    with caplog.at_level(logging.WARNING, logger="instrumentation.instrumentor"):
        zero_code_start()  # what opentelemetry-instrument loads, the SDK configured before it
    assert instrumentation.PathwatchInstrumentor()._export is None
    [message] = _pathwatch_warnings(caplog)
    assert "PATHWATCH_OTLP_ENDPOINT=127.0.0.1:4317" in message and "OTEL_TRACES_EXPORTER=none" in message
    if sdk == "none":
        assert "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set, but only opentelemetry-distro" in message
    else:
        assert "no span processor (OTEL_TRACES_EXPORTER=none)" in message


def zero_code_start() -> None:
    from instrumentation.instrumentor import ZeroCodeStart

    ZeroCodeStart().instrument(pathmap=SAMPLE_PATHMAP, heartbeat_interval_s=0)


def test_an_app_that_adds_its_exporter_after_instrument_is_not_warned(instrument, monkeypatch, caplog):
    """instrument() called from code, the provider set up afterwards: its spans do leave."""
    monkeypatch.delenv("PATHWATCH_OTLP_ENDPOINT", raising=False)
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: trace.ProxyTracerProvider())
    with caplog.at_level(logging.WARNING, logger="instrumentation.instrumentor"):
        instrument(tracer_provider=None)
    assert _pathwatch_warnings(caplog) == []


def test_no_warning_where_something_exports(collector, instrument, monkeypatch, caplog):
    monkeypatch.delenv("PATHWATCH_OTLP_ENDPOINT", raising=False)
    with caplog.at_level(logging.WARNING, logger="instrumentation.instrumentor"):
        instrument()                                     # the app's provider, with its exporter
        instrumentation.uninstrument()
        instrument(tracer_provider=TracerProvider(), endpoint=collector.endpoint)   # pathwatch's own
    assert _pathwatch_warnings(caplog) == []


@pytest.mark.parametrize(("provider", "exports"), [
    (trace.ProxyTracerProvider(), False), (trace.NoOpTracerProvider(), False), (TracerProvider(), False),
    (object(), None),                                    # another SDK's provider: cannot tell
])
def test_provider_exports(provider, exports):
    assert exporting.provider_exports(provider) is exports
    with_processor = TracerProvider()
    with_processor.add_span_processor(BatchSpanProcessor(InMemorySpanExporter()))
    assert exporting.provider_exports(with_processor) is True
    with_processor.shutdown()


def test_the_heartbeats_of_a_process_are_roots_of_one_trace(collector, instrument, provider, exporter):
    """Gateway mode: a Collector's loadbalancing exporter (routing_key: traceID) sends each trace to
    one sidecar replica. A trace per heartbeat scattered a process's heartbeats over the replicas,
    each counted the rise between the ones it got, and the summed drop counters read up to N times
    the drops (/tmp/s19/hbroute/repro_heartbeat_routing.py). All heartbeats of a process, through
    pathwatch's own exporter, over OTLP: one trace, each a root, each a span of its own, with the
    app's resource; the app's own traces keep their random ids and do not get the heartbeats."""
    instrumentor = instrument(endpoint=collector.endpoint)
    tracer = provider.get_tracer("app")
    for _ in range(3):
        instrumentor.heartbeat.beat()
        tracer.start_span("app.work").end()  # roots of the app: a trace each, as before
    instrumentation.uninstrument()  # the final heartbeat
    instrument(endpoint=collector.endpoint)  # a key rotation: the same process, the same trace
    instrumentation.uninstrument()
    wait_until(lambda: len(collector.of_kind("heartbeat")) == 5 and collector.names().count("app.work") == 3,
               message="5 heartbeats and 3 app spans at the collector")
    beats = collector.of_kind("heartbeat")
    assert {b["trace_id"] for b in beats} == {f"{exporting.heartbeat_trace_id():032x}"}
    assert {b["parent_span_id"] for b in beats} == {""}  # roots, never children
    assert len({b["span_id"] for b in beats}) == 5
    app = [s for s in collector.spans if s["name"] == "app.work"]
    assert len({s["trace_id"] for s in app}) == 3 and beats[0]["trace_id"] not in {s["trace_id"] for s in app}
    assert all(b["resource"] == app[0]["resource"] for b in beats)  # the same service.instance.id
    # through pathwatch's exporter only: not the app's own (a trace as long as the process is none
    # for a tracing backend), which still gets the app's spans
    assert not spans_of_kind(exporter, "heartbeat") and len(spans_named(exporter, "app.work")) == 3


def test_heartbeats_through_the_apps_provider_are_roots_of_the_process_trace_too(exporter):
    """Without pathwatch's exporter (the SDK's own sends to the sidecar: opentelemetry-instrument with
    OTEL_TRACES_EXPORTER=otlp) the heartbeats go through the app provider's processors, as before,
    in the process's heartbeat trace. Never sampled out: a sampler deciding by trace id would now
    keep all of a process's heartbeats or none."""
    app = TracerProvider(sampler=TraceIdRatioBased(0.000001))  # the app's spans: practically none
    app.add_span_processor(SimpleSpanProcessor(exporter))
    heartbeat = Heartbeat(interval_s=0, tracer_provider=app, counter=DropCounter())
    for _ in range(3):
        heartbeat.beat()
    beats = spans_of_kind(exporter, "heartbeat")
    assert len(beats) == 3
    assert {b.context.trace_id for b in beats} == {exporting.heartbeat_trace_id()}
    assert {b.parent for b in beats} == {None}
    assert all(b.resource is app.resource for b in beats)


def test_a_heartbeat_made_before_the_apps_provider_exists_joins_the_trace_once_it_does(
        exporter, provider, monkeypatch):
    heartbeat = Heartbeat(interval_s=0, counter=DropCounter())  # the global provider, not set yet
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: trace.ProxyTracerProvider())
    heartbeat.beat()  # goes nowhere, raises nothing
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)  # the app set its provider
    heartbeat.beat()
    (beat,) = spans_of_kind(exporter, "heartbeat")
    assert beat.context.trace_id == exporting.heartbeat_trace_id() and beat.parent is None


def test_two_processes_heartbeats_are_two_traces():
    """Each backend process its own trace (a traceID router may send them to different replicas),
    one for all of its heartbeats."""
    child = textwrap.dedent("""
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
        import instrumentation

        class Printing(SpanExporter):
            def export(self, spans):
                for span in spans:
                    print(span.name, f"{span.context.trace_id:032x}", span.parent, flush=True)
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(Printing()))
        instrumentor = instrumentation.instrument("tests/instrumentation/sample/pathmap.yaml",
                                                  tracer_provider=provider, heartbeat_interval_s=0)
        instrumentor.heartbeat.beat()
        instrumentor.heartbeat.beat()
        # and the final one at exit
    """)
    env = {"PATHWATCH_HMAC_KEY": "test-key-not-secret", "PATH": ""}
    traces = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env,
                              cwd=ROOT, timeout=60)
        assert done.returncode == 0, done.stderr
        lines = [line.split() for line in done.stdout.splitlines()]
        assert [(name, parent) for name, _, parent in lines] == [("pathwatch.heartbeat", "None")] * 3
        assert len({trace_id for _, trace_id, _ in lines}) == 1
        traces.append(lines[0][1])
    assert traces[0] != traces[1]
    assert f"{exporting.heartbeat_trace_id():032x}" not in traces


def test_heartbeats_number_themselves_from_the_start_of_their_counts(exporter, provider):
    """Each heartbeat says which report of the process's counts it is (1: the first, whichever
    Heartbeat sends it) and since when the counts run: the sidecar can then tell a new backend
    process's first total (every drop of its life) from a total it merely did not see grow. A
    forked child's counts and sequence start again."""
    counter = DropCounter()
    started = counter.since_s
    Heartbeat(interval_s=0, tracer_provider=provider, counter=counter).beat()
    again = Heartbeat(interval_s=0, tracer_provider=provider, counter=counter)  # re-instrumented
    again.beat()
    beats = [attrs(s) for s in spans_of_kind(exporter, "heartbeat")]
    assert [b["pathwatch.sdk.heartbeat_sequence"] for b in beats] == [1, 2]
    assert {b["pathwatch.sdk.counts_since_s"] for b in beats} == {started}
    counter.after_fork_in_child()
    again.beat()
    child = attrs(spans_of_kind(exporter, "heartbeat")[-1])
    assert child["pathwatch.sdk.heartbeat_sequence"] == 1
    assert child["pathwatch.sdk.counts_since_s"] >= started


def test_the_apps_full_batch_processor_in_another_thread_is_counted_and_never_raises():
    # the app's own BatchSpanProcessor, overfilled from a thread where pathwatch's processor never
    # ran: the drop counter's log filter read a thread-local flag set only in the importing thread
    # (AttributeError out of the app's span.end())
    counter = DropCounter()
    outcome: list = []

    def work() -> None:
        try:
            outcome.append(_overfill(BatchSpanProcessor, counter))
        except BaseException as exc:  # noqa: BLE001 - what the app's thread would have seen
            outcome.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(30)
    assert outcome == [8]
    assert counter.queue_full == 32
