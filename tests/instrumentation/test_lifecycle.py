"""Starting and stopping pathwatch: concurrent calls of instrument()/uninstrument()."""

from __future__ import annotations

import threading

import pytest

import instrumentation
from instrumentation import exporting, instrumentor
from instrumentation.exporting import CountingBatchSpanProcessor
from tests.instrumentation.collector import Collector
from tests.instrumentation.helpers import SAMPLE_PATHMAP, spans_of_kind
from tests.instrumentation.sample import engines
from tests.instrumentation.sample.engines import UserContext, UserExecutionEngine


@pytest.fixture
def collector():
    server = Collector().start()
    yield server
    server.stop()


def _pathwatch_processors(provider) -> list[CountingBatchSpanProcessor]:
    return [processor for processor in provider._active_span_processor._span_processors
            if isinstance(processor, CountingBatchSpanProcessor)]


def test_two_threads_starting_pathwatch_at_once_start_it_once(instrument, provider, exporter, collector,
                                                               monkeypatch, caplog):
    # BaseInstrumentor checks its flag and sets it after starting, unlocked: both threads got in,
    # the second overwrote the first's heartbeat and exporter, which ran on after uninstrument()
    # (every span exported twice). Both threads wait on a barrier inside the start, so that without
    # a lock both are certainly in it at once; with one, the first gives up waiting for the second
    inside = threading.Barrier(2, timeout=1.0)
    load = instrumentor._load_pathmap

    def load_with_both_inside(value):
        try:
            inside.wait()
        except threading.BrokenBarrierError:
            pass  # the other thread is not starting pathwatch at the same time
        return load(value)

    monkeypatch.setattr(instrumentor, "_load_pathmap", load_with_both_inside)
    heartbeats_before = set(exporting._heartbeats)
    go = threading.Barrier(2)
    failures: list[BaseException] = []

    def start() -> None:
        go.wait()
        try:
            instrument(endpoint=collector.endpoint)
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    assert len(_pathwatch_processors(provider)) == 1
    heartbeats = set(exporting._heartbeats) - heartbeats_before
    assert len(heartbeats) == 1
    assert "Attempting to instrument while already instrumented" in caplog.text  # the sequential no-op
    UserExecutionEngine().execute_agent(UserContext("alice"))
    assert len(spans_of_kind(exporter, "execute")) == 1

    instrumentation.uninstrument()
    assert all(processor._batch_processor._shutdown for processor in _pathwatch_processors(provider))
    assert not heartbeats & set(exporting._heartbeats)  # stopped
    assert not hasattr(vars(engines.UserExecutionEngine)["execute_agent"], "__wrapped__")


def test_a_start_made_while_pathwatch_is_starting_in_the_same_thread_is_ignored(instrument, provider,
                                                                                 monkeypatch, caplog):
    # e.g. a module that check_imports imports starts pathwatch itself: a warned no-op, no deadlock
    load = instrumentor._load_pathmap
    nested: list[object] = []

    def load_and_start_again(value):
        if not nested:  # the outer start only
            nested.append("starting")
            nested.append(instrumentation.instrument(SAMPLE_PATHMAP, tracer_provider=provider,
                                                     heartbeat_interval_s=0))
        return load(value)

    monkeypatch.setattr(instrumentor, "_load_pathmap", load_and_start_again)
    before = set(exporting._heartbeats)
    instrument()
    assert len(nested) == 2 and len(set(exporting._heartbeats) - before) == 1
    assert "called while pathwatch is being started or stopped in this thread" in caplog.text
    assert instrumentation.PathwatchInstrumentor().is_instrumented_by_opentelemetry
