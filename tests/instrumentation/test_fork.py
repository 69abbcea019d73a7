"""os.fork(): gunicorn's workers are forks of one master, where the app and pathwatch may already be
loaded (``opentelemetry-instrument gunicorn -w N``, ``--preload``). Each worker is a process of its
own: its instance, event and connection ids must not collide with a sibling's, its heartbeat must
run, and a lock of pathwatch's held by another thread of the master at the fork must not hang it.

Real forks, no mocks: the child reports what it saw through a pipe and leaves with ``os._exit``."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from instrumentation import transport
from instrumentation.errors import errors, record_error
from instrumentation.exporting import (CountingBatchSpanProcessor, CountingExporter, DropCounter, Heartbeat,
                                       configure, drops, heartbeat_trace_id)
from instrumentation.identity import instances
from instrumentation.linking import pending_emits
from tests.instrumentation.helpers import attrs, only_span, spans_named
from tests.instrumentation.sample.emitters import QueuedEmitter
from tests.instrumentation.sample.engines import UserContext, UserExecutionEngine
from tests.support import wait_until

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="no os.fork on this platform")


def in_child(work: Callable[[], Any], timeout_s: float = 20.0) -> Any:
    """Run ``work`` in a forked child and return what it returned (JSON); a child that hangs is
    killed and fails the test."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            try:
                result = {"ok": work()}
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                result = {"error": repr(exc)}
            os.write(write, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write)
    try:
        ready, _, _ = select.select([read], [], [], timeout_s)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            pytest.fail(f"the forked child hung for {timeout_s}s")
        data = b""
        while chunk := os.read(read, 65536):
            data += chunk
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    result = json.loads(data)
    assert "error" not in result, result.get("error")
    return result["ok"]


def _ids(exporter: InMemorySpanExporter, user: str, preloaded: UserExecutionEngine) -> dict[str, str]:
    exporter.clear()
    engine = UserExecutionEngine(UserContext(user))
    engine.execute_agent(UserContext(user))
    preloaded.execute_agent(UserContext(user))
    QueuedEmitter(user).notify_tool_executing("run-" + user, "search")
    engine_spans = spans_named(exporter, "execution_engine.execute_agent")
    emit = attrs(only_span(exporter, "event_emitter.notify_tool_executing"))
    return {"instance": attrs(engine_spans[0])["pathwatch.instance.id"],
            "preloaded": attrs(engine_spans[1])["pathwatch.instance.id"],
            "event": emit["messaging.message.id"],
            "connection": transport.new_connection_id()}


def test_a_forked_child_makes_ids_of_its_own(instrument, exporter):
    instrument()
    preloaded = UserExecutionEngine(UserContext("master"))  # made before the fork (--preload)
    preloaded.execute_agent(UserContext("master"))
    inherited = attrs(spans_named(exporter, "execution_engine.execute_agent")[-1])["pathwatch.instance.id"]

    child = in_child(lambda: _ids(exporter, "bob", preloaded))
    parent = _ids(exporter, "alice", preloaded)

    for key in ("instance", "event", "connection"):
        assert parent[key] != child[key], key
        assert parent[key].split("-")[1] != child[key].split("-")[1], key  # another process token
    assert parent["preloaded"] == inherited  # the parent's instances keep their tokens
    assert child["preloaded"] != inherited  # the child's copy is another instance


def test_the_fork_handler_draws_no_instance_tokens_until_an_instance_is_used(instrument, exporter,
                                                                            monkeypatch):
    # every fork runs it, also subprocess's with a preexec_fn: no work per instance of the parent
    instrument()
    engines = [UserExecutionEngine(UserContext(f"u{n}")) for n in range(200)]
    for engine in engines[:2]:
        engine.execute_agent(UserContext("master"))
    before = [attrs(s)["pathwatch.instance.id"]
              for s in spans_named(exporter, "execution_engine.execute_agent")]
    drawn = []
    new_token = instances._new_token
    monkeypatch.setattr(instances, "_new_token", lambda: drawn.append(1) or new_token())

    def child() -> dict[str, Any]:
        at_fork = len(drawn)
        exporter.clear()
        engines[0].execute_agent(UserContext("bob"))
        engines[0].execute_agent(UserContext("bob"))
        tokens = [attrs(s)["pathwatch.instance.id"]
                  for s in spans_named(exporter, "execution_engine.execute_agent")]
        return {"at_fork": at_fork, "after": len(drawn), "tokens": tokens, "size": len(instances)}

    seen = in_child(child)
    assert seen["at_fork"] == 0 and seen["after"] == 1
    assert seen["tokens"][0] == seen["tokens"][1] != before[0]  # its own token, kept
    assert seen["tokens"][0].split("-")[1] != before[0].split("-")[1]
    assert seen["size"] >= 200
    engines[1].execute_agent(UserContext("alice"))  # the parent's keep theirs
    assert attrs(spans_named(exporter, "execution_engine.execute_agent")[-1])[
        "pathwatch.instance.id"] == before[1]


def test_a_running_heartbeat_beats_in_the_forked_child(instrument, exporter):
    instrumentor = instrument(heartbeat_interval_s=0.05)

    def heartbeats() -> dict[str, Any]:
        exporter.clear()
        wait_until(lambda: spans_named(exporter, "pathwatch.heartbeat"), timeout=10,
                   message="a heartbeat in the child")
        thread = instrumentor.heartbeat._thread
        return {"alive": thread is not None and thread.is_alive(),
                "beats": len(spans_named(exporter, "pathwatch.heartbeat"))}

    child = in_child(heartbeats)
    assert child["alive"] and child["beats"] >= 1
    assert instrumentor.heartbeat._thread.is_alive()  # the parent's goes on


def test_the_child_counts_its_own_errors_and_drops(instrument):
    instrument()
    record_error("fork-test:before", ValueError())
    drops.add_failed(3)

    child = in_child(lambda: [errors.count, drops.export_failed, pending_emits.evicted])
    assert child == [0, 0, 0]
    assert errors.count >= 1 and drops.export_failed >= 3


def test_a_lock_held_by_another_thread_at_the_fork_does_not_hang_the_child(instrument):
    instrument()

    def use_every_lock() -> bool:
        record_error("fork-test:child", ValueError())
        instances.entry(UserExecutionEngine(UserContext("bob")))
        pending_emits.record("run-1", "tool_executing", "e-1")
        pending_emits.match("run-1", "tool_executing")
        drops.add_failed(1)
        UserExecutionEngine(UserContext("bob")).execute_agent(UserContext("bob"))
        return True

    with held_by_another_thread([errors._lock, instances._lock, pending_emits._lock, drops._lock]):
        assert in_child(use_every_lock, timeout_s=10) is True


def test_a_wrapping_lock_held_by_another_thread_at_the_fork_does_not_hang_the_child(instrument):
    from instrumentation import wrapping

    instrument()

    def wrap_in_the_child() -> bool:
        class WorkerEngine(UserExecutionEngine):  # __init_subclass__ -> on_subclass -> the lock
            pass
        wrapping.on_module_import("tests.instrumentation.sample.engines", "fork-test",
                                  lambda module: None)
        wrapping.remove_import_callback("tests.instrumentation.sample.engines", "fork-test")
        return WorkerEngine in wrapping.active()._class_roles  # wrapped as it was defined

    # what on_subclass()/wrap_listed() and the import-hook registration hold while they work
    with held_by_another_thread([wrapping.active()._lock, wrapping._hook_lock]):
        assert in_child(wrap_in_the_child, timeout_s=10) is True


def test_a_provider_pathwatch_created_gets_a_new_service_instance_id_in_the_child(monkeypatch):
    # the SDK does it (its service.instance.id detector is process dependent and refreshed at the
    # fork): the heartbeats of two workers must not be taken for one process's by the sidecar
    # the global provider can be set once per process: give configure a non-SDK provider instead
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", trace.Once())
    memory = InMemorySpanExporter()
    setup = configure(exporter=memory, tracer_provider=trace.NoOpTracerProvider())
    try:
        tracer = trace.get_tracer("fork-test")  # made before the fork, as pathwatch's own are

        def instance_id() -> str:
            tracer.start_span("in-child").end()
            setup.force_flush()
            return [span.resource.attributes["service.instance.id"] for span in memory.get_finished_spans()
                    if span.name == "in-child"][0]

        parent_id = setup.provider.resource.attributes["service.instance.id"]
        child_id = in_child(instance_id)
        assert child_id != parent_id
        assert instance_id() == parent_id
    finally:
        setup.shutdown()


def test_an_instance_id_from_otel_resource_attributes_is_renewed_only_for_a_provider_made_before_the_fork(
        monkeypatch):
    """docs/conventions.md (Forked processes): the SDK renews the service.instance.id of a provider
    made before the fork even when OTEL_RESOURCE_ATTRIBUTES set it (the Operator's
    namespace.pod.container), but a worker that builds its provider after the fork (uvicorn
    --workers, gunicorn loading the app per worker) keeps that id, shared with its siblings: the
    sidecar tells those apart by counts_since_s, not by the id."""
    from opentelemetry.sdk.trace import TracerProvider

    from instrumentation.exporting import build_resource

    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=shop,service.instance.id=ns.pod-0.app")
    before = TracerProvider(resource=build_resource())
    assert before.resource.attributes["service.instance.id"] == "ns.pod-0.app"

    def ids_in_child() -> list[str]:
        after = TracerProvider(resource=build_resource())
        return [before.resource.attributes["service.instance.id"],
                after.resource.attributes["service.instance.id"]]

    renewed, built_after = in_child(ids_in_child)
    assert renewed != "ns.pod-0.app"
    assert built_after == "ns.pod-0.app"
    assert before.resource.attributes["service.instance.id"] == "ns.pod-0.app"  # the parent's
    before.shutdown()


@pytest.mark.parametrize("own_processor", [True, False], ids=["pathwatch-exporter", "provider-processors"])
def test_a_forked_childs_heartbeats_are_a_trace_of_their_own(monkeypatch, own_processor):
    """A gateway's traceID router sends all heartbeats of a process to one replica by their shared
    trace id; a forked worker is another process (its own counts, its own service.instance.id), so
    its heartbeats share a trace of their own, with the child's resource, also when the heartbeat's
    tracer was built in the parent before the fork."""
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", trace.Once())
    memory = InMemorySpanExporter()
    setup = configure(exporter=memory, tracer_provider=trace.NoOpTracerProvider())
    heartbeat = Heartbeat(0, setup.provider, counter=DropCounter(),
                          processor=setup.processor if own_processor else None)
    heartbeat.start()  # restarted in a forked child
    try:
        def beats() -> list[list[Any]]:
            memory.clear()
            heartbeat.beat()
            heartbeat.beat()
            assert setup.force_flush()
            return [[f"{span.context.trace_id:032x}", span.parent is None,
                     span.resource.attributes["service.instance.id"]]
                    for span in memory.get_finished_spans() if span.name == "pathwatch.heartbeat"]

        parent = beats()
        child = in_child(beats)
        after = beats()
    finally:
        heartbeat.stop()
        setup.shutdown()
    assert len(parent) == len(child) == len(after) == 2
    assert all(root for _, root, _ in parent + child + after)
    assert len({trace_id for trace_id, _, _ in child}) == 1
    assert {trace_id for trace_id, _, _ in parent + after} == {f"{heartbeat_trace_id():032x}"}
    assert child[0][0] != parent[0][0]
    assert child[0][2] != parent[0][2] == after[0][2]  # the child's own service.instance.id


@contextlib.contextmanager
def held_by_another_thread(locks: list) -> Iterator[None]:
    """``locks`` held by another thread of this process for the duration (across a fork made
    meanwhile), then released."""
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        for lock in locks:
            lock.acquire()
        held.set()
        release.wait(30)
        for lock in reversed(locks):
            lock.release()

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    assert held.wait(10)
    try:
        yield
    finally:
        release.set()
        thread.join(10)


def test_a_flush_under_way_in_the_parent_at_the_fork_does_not_hold_the_childs_flushes():
    # the parent's flush (the sidecar hung) goes on in a background thread the child does not have:
    # the child waited for it at every force_flush, and returned False at its timeout
    parent = os.getpid()
    release = threading.Event()

    class HungInTheParent(SpanExporter):
        exported = 0

        def export(self, spans):
            if os.getpid() == parent:
                release.wait(30)
            self.exported += len(spans)
            return SpanExportResult.SUCCESS

    exporter = HungInTheParent()
    counter = DropCounter()
    processor = CountingBatchSpanProcessor(CountingExporter(exporter, counter), counter=counter,
                                           schedule_delay_millis=60000)
    provider = TracerProvider()
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("test")
    try:
        tracer.start_span("in the parent").end()
        assert processor.force_flush(100) is False  # the export hangs: the flush goes on

        def child() -> Any:
            tracer.start_span("in the child").end()
            return [processor.force_flush(10_000), exporter.exported]

        assert in_child(child) == [True, 1]
    finally:
        release.set()
        provider.shutdown()
