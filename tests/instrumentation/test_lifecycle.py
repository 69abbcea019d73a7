"""Starting and stopping pathwatch: concurrent calls of instrument()/uninstrument(), and a start made
while a module of the path map is still being imported."""

from __future__ import annotations

import importlib
import itertools
import sys
import threading
import types

import pytest

import instrumentation
from instrumentation import exporting, instrumentor
from instrumentation.errors import PathMapError, errors
from instrumentation.pathmap import PathMap
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

    (processor,) = _pathwatch_processors(provider)
    instrumentation.uninstrument()
    assert processor._batch_processor._shutdown
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


# --- instrument() while a listed module is still being imported -----------------------------------

_app_names = itertools.count()
ENGINE = '''
class Engine:
    def run(self, context):
        return "ran"
'''
PATHMAP = '''
version: 1
roles:
  engine:
    kind: execute
    implementations: [{module}.Engine]
    methods: [run]
'''


@pytest.fixture
def app_modules(tmp_path, monkeypatch, instrument):
    """app_modules(**sources) -> an app: ``app.names`` (key -> a new module name), ``app.pathmap``
    (naming ``Engine`` of the first module), ``app.boot`` (a module whose ``start()`` starts
    pathwatch with that path map, and whose ``gate`` holds two events for a test to pause an import).
    The sources are written in ``tmp_path``, ``{boot}`` and ``{<key>}`` replaced by the module
    names; the modules are forgotten after the test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    made: list[str] = []

    def make(**sources: str) -> types.SimpleNamespace:
        n = next(_app_names)
        names = {key: f"pw_life_{key}{n}" for key in sources}
        pathmap = tmp_path / f"pathmap{n}.yaml"
        pathmap.write_text(PATHMAP.format(module=next(iter(names.values()))))
        boot = types.ModuleType(f"pw_life_boot{n}")
        boot.gate = types.SimpleNamespace(inside=threading.Event(), go=threading.Event())
        boot.start = lambda: instrument(pathmap)
        monkeypatch.setitem(sys.modules, boot.__name__, boot)
        for key, source in sources.items():
            (tmp_path / f"{names[key]}.py").write_text(source.format(boot=boot.__name__, **names))
        made.extend(names.values())
        return types.SimpleNamespace(names=names, pathmap=pathmap, boot=boot)

    yield make
    for name in made:
        sys.modules.pop(name, None)


def _is_wrapped(cls: type) -> bool:
    return hasattr(vars(cls)["run"], "__wrapped__")


STARTS = "import {boot}\n{boot}.start()\n"


def test_a_module_that_starts_pathwatch_at_its_top_is_wrapped(app_modules, exporter):
    # a single-file app (`uvicorn main:app`) calling instrument() before its classes are defined:
    # the hook fired at once, found no Engine and left the module unwrapped ("class not found")
    app = app_modules(main=STARTS + ENGINE)
    main = importlib.import_module(app.names["main"])
    assert _is_wrapped(main.Engine)
    assert main.Engine().run(None) == "ran"
    assert [span.name for span in exporter.get_finished_spans()] == ["engine.run"]
    assert errors.count == 0


def test_a_module_whose_import_starts_pathwatch_through_another_is_wrapped(app_modules, exporter):
    # the engines module imports the app's settings, whose import starts pathwatch
    app = app_modules(engines="import {settings}\n" + ENGINE, settings=STARTS)
    engines = importlib.import_module(app.names["engines"])
    assert engines.Engine().run(None) == "ran"
    assert [span.name for span in exporter.get_finished_spans()] == ["engine.run"]
    assert errors.count == 0


def test_a_module_imported_by_another_thread_while_pathwatch_starts_is_wrapped(app_modules, exporter):
    app = app_modules(engines="import {boot}\n{boot}.gate.inside.set()\n{boot}.gate.go.wait(10)\n"
                              + ENGINE)
    importer = threading.Thread(target=importlib.import_module, args=(app.names["engines"],))
    importer.start()
    try:
        assert app.boot.gate.inside.wait(10)  # the import is under way, Engine not defined yet
        app.boot.start()
    finally:
        app.boot.gate.go.set()
        importer.join()
    engines = sys.modules[app.names["engines"]]
    assert engines.Engine().run(None) == "ran"
    assert [span.name for span in exporter.get_finished_spans()] == ["engine.run"]
    assert errors.count == 0


def test_check_imports_while_another_thread_imports_a_listed_module_that_starts_pathwatch(
        app_modules, instrument, exporter, monkeypatch):
    # thread A starts pathwatch with check_imports; thread B is importing a module of the path map
    # that starts pathwatch at its end. A held the lifecycle lock while check_imports waited for that
    # module's import lock; B held the import lock and waited for the lifecycle lock: both hung for
    # good (Python's import deadlock detection sees module locks only)
    app = app_modules(main=ENGINE + "import {boot}\n{boot}.gate.inside.set()\n{boot}.gate.go.wait(10)\n"
                                    "{boot}.start()\n")
    check_imports = PathMap.check_imports

    def check_imports_letting_b_start(pathmap):  # A is about to import the module B is importing
        app.boot.gate.go.set()
        return check_imports(pathmap)

    monkeypatch.setattr(PathMap, "check_imports", check_imports_letting_b_start)
    failures: list[BaseException] = []

    def run(target):
        try:
            target()
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    importer = threading.Thread(target=run, args=(lambda: importlib.import_module(app.names["main"]),),
                                daemon=True)
    importer.start()
    assert app.boot.gate.inside.wait(10)  # B holds the module's import lock, Engine is defined
    starter = threading.Thread(target=run, args=(lambda: instrument(app.pathmap, check_imports=True),),
                               daemon=True)
    starter.start()
    for thread in (importer, starter):
        thread.join(20)
    hung = [thread for thread in (importer, starter) if thread.is_alive()]
    if hung:  # a fresh lock (as in a forked child), or every later start and stop would hang too
        instrumentation.PathwatchInstrumentor._lifecycle = threading.RLock()
        instrumentation.PathwatchInstrumentor._changing = False
    assert not hung, "deadlock: check_imports waits for the import, the import waits for the lock"
    assert not failures
    main = sys.modules[app.names["main"]]
    assert _is_wrapped(main.Engine)
    assert main.Engine().run(None) == "ran"
    assert [span.name for span in exporter.get_finished_spans()] == ["engine.run"]
    assert errors.count == 0


def test_a_module_hooked_by_an_earlier_start_that_starts_pathwatch_again_is_wrapped_once(app_modules,
                                                                                        exporter):
    # its post-import hook is pending since the first start: the second start, from its top, finds
    # its name hooked already and the module in sys.modules
    app = app_modules(main=STARTS + ENGINE)
    app.boot.start()
    instrumentation.uninstrument()
    exporter.clear()  # the final heartbeat
    main = importlib.import_module(app.names["main"])
    assert main.Engine().run(None) == "ran"
    assert [span.name for span in exporter.get_finished_spans()] == ["engine.run"]
    assert errors.count == 0  # no "class not found" on the way


def test_a_module_whose_first_import_failed_is_wrapped_at_the_next(app_modules, exporter):
    app = app_modules(flaky=STARTS + "if not getattr({boot}, 'retry', False):\n"
                                     "    raise ImportError('not yet')\n" + ENGINE)
    with pytest.raises(ImportError, match="not yet"):
        importlib.import_module(app.names["flaky"])
    assert app.names["flaky"] not in sys.modules
    app.boot.retry = True  # its second import starts pathwatch again: a warned no-op
    flaky = importlib.import_module(app.names["flaky"])
    assert flaky.Engine().run(None) == "ran"
    assert [span.name for span in exporter.get_finished_spans()] == ["engine.run"]


def test_check_imports_during_the_import_of_a_listed_module_says_why_its_class_is_missing(
        app_modules, instrument):
    app = app_modules(main=STARTS + ENGINE)
    app.boot.start = lambda: instrument(app.pathmap, check_imports=True)
    with pytest.raises(PathMapError, match="still being imported: pathwatch was started during its"):
        importlib.import_module(app.names["main"])
