"""Real-world class shapes under the wrapping (second review of wrapping.py): metaclasses that
refuse changes, and the other shapes an app's engines, emitters and sockets take. Each test: the
app sees what it sees unwrapped, and the spans are those docs/conventions.md gives."""

from __future__ import annotations

import itertools
import logging
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import instrumentation
import instrumentation.wrapping
from instrumentation.errors import instrumentation_error_count
from tests.instrumentation.helpers import attrs, spans_named

_names = itertools.count()  # a module name is imported once: wrapt's post-import hooks fire once

# --- a class that refuses part of its wrapping: all or nothing ------------------------------------

REFUSING = '''
class Frozen(type):
    """Refuses one attribute set after the class is made (a framework's sealed classes)."""
    def __setattr__(cls, name, value):
        if name == "stop" and getattr(cls, "_sealed", False):
            raise TypeError(f"{cls.__name__} is sealed")
        super().__setattr__(name, value)

class Engine(metaclass=Frozen):
    _sealed = True
    def run(self, x):
        return ("run", x)
    def stop(self):
        return "stop"

class Other:
    def run(self, x):
        return ("other", x)
    def stop(self):
        return "other stop"

class Base:
    def run(self, x):
        return ("base", x)
    def stop(self):
        return "base stop"
'''

REFUSING_MAP = '''
version: 1
roles:
  engine:
    kind: execute
    implementations: [{mod}.Engine, {mod}.Other, {mod}.Base]
    methods: [run, stop]
'''


def test_a_class_refusing_one_patch_is_left_whole_and_untraced(backend, exporter, caplog):
    """A metaclass refusing 'stop' (set after 'run') left Engine half wrapped -- run traced, stop
    not -- recorded as wrapped for its role, logged as 'internal error at wrap:...' naming no entry.
    Now nothing of it is wrapped (run rolled back), it is not among the role's classes, and one
    error names its entry and line; the module's other entries are wrapped."""
    caplog.set_level(logging.ERROR, logger="instrumentation")
    errors = instrumentation_error_count()
    mod = backend(REFUSING, REFUSING_MAP)
    assert type(mod.Engine.__dict__["run"]).__name__ == "function"
    assert "__init_subclass__" not in mod.Engine.__dict__
    assert mod.Engine().run(1) == ("run", 1) and mod.Engine().stop() == "stop"
    assert mod.Other().run(2) == ("other", 2)
    assert [attrs(s)["pathwatch.implementation"] for s in spans_named(exporter, "engine.run")] == [
        f"{mod.__name__}.Other"]
    assert mod.Engine not in instrumentation.wrapping.active().classes_by_role()["engine"]
    assert instrumentation_error_count() == errors + 1
    assert caplog.text.count("cannot be wrapped") == 1
    assert f".yaml:6 roles.engine.implementations[0]: {mod.__name__}.Engine cannot be wrapped: " \
           "setting 'stop' on it raised TypeError" in caplog.text
    assert "is sealed" not in caplog.text  # the app's message is not quoted
    instrumentation.uninstrument()
    assert mod.Engine.__dict__["run"].__qualname__ == "Engine.run"


def test_a_subclass_refusing_a_patch_is_left_whole_and_its_bases_stay_wrapped(backend, exporter,
                                                                               caplog):
    """A subclass of a listed class defined later whose metaclass refuses one of its overrides: its
    other override is not left wrapped (rolled back), it is not counted among the wrapped
    subclasses;
    what it inherits is still traced by its base's wrappers."""
    caplog.set_level(logging.ERROR, logger="instrumentation")
    mod = backend(REFUSING, REFUSING_MAP)
    errors = instrumentation_error_count()
    inst = instrumentation.wrapping.active()
    unlisted = inst._unlisted

    class Sealed(mod.Base, metaclass=mod.Frozen):
        _sealed = True
        def run(self, x):
            return ("sealed", super().run(x))
        def stop(self):
            return "sealed stop"

    assert type(Sealed.__dict__["run"]).__name__ == "function"
    assert Sealed not in inst._class_roles and inst._unlisted == unlisted
    assert Sealed().run(3) == ("sealed", ("base", 3))
    [span] = spans_named(exporter, "engine.run")  # Base.run, called by super(): its own wrapper
    assert attrs(span)["code.function.name"] == f"{mod.__name__}.Base.run"
    assert attrs(span)["pathwatch.nested"] is False
    assert instrumentation_error_count() == errors + 1
    assert "Sealed cannot be wrapped: setting 'stop' on it raised TypeError" in caplog.text


def test_instrument_again_after_a_refused_class_wraps_the_others_once(backend, instrument,
                                                                      exporter):
    """instrument() / uninstrument() / instrument(): the refused class is tried again and left whole
    again; the others are wrapped once (one span a call)."""
    mod = backend(REFUSING, REFUSING_MAP)
    pathmap = Path(mod.__file__).with_suffix(".yaml")
    instrumentation.uninstrument()
    assert type(mod.Other.__dict__["run"]).__name__ == "function"
    instrument(pathmap)
    mod.Other().run(1)
    mod.Engine().run(1)
    assert [attrs(s)["pathwatch.implementation"] for s in spans_named(exporter, "engine.run")] == [
        f"{mod.__name__}.Other"]
    assert type(mod.Engine.__dict__["run"]).__name__ == "function"


# --- instrument() / uninstrument() / instrument(): one span a call --------------------------------

DECORATED_LATER = '''
import functools

class Engine:
    def run(self, x):
        return ("run", x)

def retry(method):
    @functools.wraps(method)
    def retrying(*args, **kwargs):
        return method(*args, **kwargs)
    return retrying
'''

DECORATED_LATER_MAP = '''
version: 1
roles:
  engine:
    kind: execute
    implementations: [{mod}.Engine]
    methods: [run]
'''


def test_a_decorator_the_app_puts_around_a_wrapped_method_traces_once_across_a_restart(
        backend, instrument, exporter):
    """The app decorates a wrapped method once pathwatch runs (Engine.run = retry(Engine.run): a
    retry or metrics decorator applied at its start). A key rotation, uninstrument() then
    instrument(), wrapped the app's decorator anew while it still held the first instrumentation's
    wrapper, which went on tracing: two spans a call, neither nested in the other (two roles'
    runtimes) -- a duplicate.execution for every run. The old wrapper passes calls through."""
    mod = backend(DECORATED_LATER, DECORATED_LATER_MAP)
    mod.Engine.run = mod.retry(mod.Engine.run)
    assert mod.Engine().run(1) == ("run", 1)
    assert len(spans_named(exporter, "engine.run")) == 1
    instrumentation.uninstrument()
    exporter.clear()
    assert mod.Engine().run(2) == ("run", 2)
    assert spans_named(exporter, "engine.run") == []
    instrument(Path(mod.__file__).with_suffix(".yaml"))
    assert mod.Engine().run(3) == ("run", 3)
    [span] = spans_named(exporter, "engine.run")
    assert attrs(span)["pathwatch.nested"] is False
    instrumentation.uninstrument()
    instrument(Path(mod.__file__).with_suffix(".yaml"))
    exporter.clear()
    mod.Engine().run(4)
    assert len(spans_named(exporter, "engine.run")) == 1


# --- a metaclass whose __dir__ leaves methods out (enum.Enum) ------------------------------------

ENUM_ENGINES = '''
import enum

class Strategy(enum.Enum):
    FAST = "fast"
    SLOW = "slow"

    def run(self, run_id):
        return (self.value, run_id)

    @classmethod
    def run_default(cls, run_id):
        return cls.FAST.run(run_id)
'''

ENUM_MAP = '''
version: 1
roles:
  strategy:
    kind: execute
    implementations: [{mod}.Strategy]
    methods: [run, "run_*"]
    run_id: [arg.run_id]
'''


def test_an_enum_listed_as_an_implementation_has_its_methods_traced(backend, exporter):
    """The methods to wrap were found by dir(cls), and an Enum's metaclass lists its members there,
    not its methods: an enum named in the path map (a strategy per member, exact method names too)
    passed every check and made no span, unsaid. Now found in the classes' __dict__s."""
    errors = instrumentation_error_count()
    mod = backend(ENUM_ENGINES, ENUM_MAP)
    assert mod.Strategy.SLOW.run("r1") == ("slow", "r1")
    assert mod.Strategy.run_default("r2") == ("fast", "r2")
    assert list(mod.Strategy) == [mod.Strategy.FAST, mod.Strategy.SLOW]
    assert mod.Strategy("slow") is mod.Strategy.SLOW
    spans = [(s.name, attrs(s)["pathwatch.run.id"], attrs(s)["pathwatch.nested"])
             for s in exporter.get_finished_spans()]
    assert sorted(spans) == [("strategy.run", "r1", False), ("strategy.run", "r2", True),
                             ("strategy.run_default", "r2", False)]
    assert instrumentation_error_count() == errors


def test_an_enums_machinery_is_not_wrapped_by_a_private_glob(backend, exporter):
    """Found in the __dict__s, an enum's _sunder_ machinery (_new_member_, _missing_, set on each
    enum class) matched a '_*' glob, unlike through dir(): dir(Strategy) then listed '__new__' (its
    _new_member_ no longer object.__new__). It is left out, as dir() leaves it out."""
    source = ENUM_ENGINES + """
    def _pick(self, run_id):
        return self.run(run_id)
"""
    mod = backend(source, ENUM_MAP.replace('[run, "run_*"]', '[run, "_*"]'))
    assert "__new__" not in dir(mod.Strategy)
    assert type(mod.Strategy.__dict__["_new_member_"]).__name__ != "_MethodWrapper"
    assert mod.Strategy("fast") is mod.Strategy.FAST
    assert mod.Strategy.SLOW._pick("r1") == ("slow", "r1")
    assert sorted(s.name for s in exporter.get_finished_spans()) == [
        "strategy._pick", "strategy.run"]


def test_check_imports_finds_an_enums_methods_by_a_glob(tmp_path, monkeypatch):
    """check_imports() (the deploy gate) refused a method glob matching only an enum's methods:
    'matches no method of the role's classes'."""
    from instrumentation.pathmap import PathMap

    monkeypatch.syspath_prepend(str(tmp_path))
    name = f"pw_shape_{next(_names)}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(ENUM_ENGINES))
    pathmap = PathMap.from_yaml(textwrap.dedent(ENUM_MAP).replace("{mod}", name)
                                .replace('[run, "run_*"]', '["run_*"]'))
    try:
        assert [r.cls.__name__ for r in pathmap.check_imports()] == ["Strategy"]
    finally:
        sys.modules.pop(name, None)


HANDLERS = '''
import asyncio

class Base:
    def run_inherited(self, x):
        return ("inherited", x)

    def run_retried(self, x):
        return ("base", x)

class RetryMixin(Base):
    def run_retried(self, x):
        return ("retried", super().run_retried(x))

class Engine(Base):
    def run(self, x):
        return ("run", self.run_helper(x))

    def run_helper(self, x):
        return x

    async def run_async(self, x):
        return ("async", self.run_helper(x))

    @classmethod
    def run_cls(cls, x):
        return (cls.__name__, x)

    @staticmethod
    def run_static(x):
        return ("static", x)

class Retrying(Engine, RetryMixin):
    pass
'''

HANDLERS_MAP = '''
version: 1
roles:
  engine:
    kind: execute
    implementations: [{mod}.Engine]
    methods: ["run*"]
'''


def test_methods_the_app_took_before_a_restart_are_traced_once_by_the_running_instrumentation(
        backend, instrument, exporter):
    """Handlers the app took while pathwatch ran (a table of bound methods, a route, the class's
    function), called after uninstrument() + instrument() (a key rotation): each call is traced
    once,
    through the running instrumentation -- its nested calls of the role are nested in it (with the
    old wrapper's role, a call of the same role inside was not nested: a duplicate.execution)."""
    mod = backend(HANDLERS, HANDLERS_MAP)
    engine = mod.Engine()
    handlers = {"run": engine.run, "unbound": mod.Engine.run, "async": engine.run_async,
                "cls": mod.Engine.run_cls, "static": engine.run_static,
                "inherited": engine.run_inherited, "cooperative": mod.Retrying().run_retried}
    instrumentation.uninstrument()
    instrument(Path(mod.__file__).with_suffix(".yaml"))
    exporter.clear()
    assert handlers["run"](1) == ("run", 1)
    assert handlers["unbound"](engine, 2) == ("run", 2)
    assert asyncio_run(handlers["async"](3)) == ("async", 3)
    assert handlers["cls"](4) == ("Engine", 4)
    assert handlers["static"](5) == ("static", 5)
    assert handlers["inherited"](6) == ("inherited", 6)
    assert handlers["cooperative"](7) == ("retried", ("base", 7))
    spans = exporter.get_finished_spans()
    names = sorted(s.name for s in spans)
    assert names == sorted(["engine.run", "engine.run_helper", "engine.run", "engine.run_helper",
                            "engine.run_async", "engine.run_helper", "engine.run_cls",
                            "engine.run_static", "engine.run_inherited", "engine.run_retried"])
    by_id = {format(s.context.span_id, "016x"): s for s in spans}
    for helper in spans_named(exporter, "engine.run_helper"):
        assert attrs(helper)["pathwatch.nested"] is True
        assert by_id[attrs(helper)["pathwatch.nested.outer_span_id"]].name in (
            "engine.run", "engine.run_async")
    assert sum(1 for s in spans if attrs(s)["pathwatch.nested"] is False) == 7


def asyncio_run(awaitable: Any) -> Any:
    import asyncio

    async def main() -> Any:
        return await awaitable
    return asyncio.run(main())


# --- an instance whose class the app reassigns ----------------------------------------------------

MIGRATED = '''
class Engine:
    def __init__(self, user_id):
        self.user_id = user_id
    def run(self, x):
        return (type(self).__name__, x)

class Legacy(Engine):
    def run(self, x):
        return ("legacy", x)

class Current(Engine):
    pass
'''

MIGRATED_MAP = '''
version: 1
roles:
  engine:
    kind: execute
    implementations: [{mod}.Engine, {mod}.Legacy, {mod}.Current]
    canonical: {mod}.Current
    retired: [{mod}.Legacy]
    methods: [run]
    user_scoped: true
    owner: [self.user_id]
'''


def test_an_instance_whose_class_the_app_reassigns_reports_its_class_now(backend, exporter):
    """A state object moved to another implementation (engine.__class__ = Current): its spans kept
    the class of its first call -- Legacy, retired: a duplicate.retired_invoked for every call of
    the canonical class, whose code ran. Its implementation is its class at each call; its instance
    id and owner stay."""
    mod = backend(MIGRATED, MIGRATED_MAP)
    engine = mod.Legacy("alice")
    assert engine.run(1) == ("legacy", 1)
    engine.__class__ = mod.Current
    assert engine.run(2) == ("Current", 2)
    first, second = (attrs(s) for s in spans_named(exporter, "engine.run"))
    assert (first["pathwatch.implementation"], first["pathwatch.retired"]) == (
        f"{mod.__name__}.Legacy", True)
    assert (second["pathwatch.implementation"], second["pathwatch.canonical"],
            second["pathwatch.retired"]) == (f"{mod.__name__}.Current", True, False)
    assert second["pathwatch.instance.id"] == first["pathwatch.instance.id"]
    assert second["pathwatch.user.owner"] == first["pathwatch.user.owner"]


# --- callable attributes that are not functions: read as the app's own ---------------------------

CACHED = '''
import functools
import weakref

class Engine:
    @functools.lru_cache(maxsize=8)
    def run_cached(self, x):
        return ("cached", x)

    @functools.cache
    def run_memo(self, x):
        return ("memo", x)

    run_count = len

class Override(Engine):
    pass
'''

CACHED_MAP = '''
version: 1
roles:
  engine:
    kind: execute
    implementations: [{mod}.Engine]
    methods: ["run_*"]
'''


def test_a_cached_method_read_from_the_class_is_one_object_and_reads_as_the_apps(backend, exporter):
    """functools.lru_cache / functools.cache around a method: read from the class it is the cache
    itself, one object (an override check ``type(obj).run is Engine.run``, a weak reference, a
    registry keyed by it); wrapped it was a new wrapper at each read (is: False, a weak reference
    dead at once). A callable that does not bind (len) read as wrapt's '<_MethodWrapper at 0x...
    for builtin_function_or_method ...>' in logs."""
    import weakref

    mod = backend(CACHED, CACHED_MAP)
    for name in ("run_cached", "run_memo"):
        method = getattr(mod.Engine, name)
        assert method is getattr(mod.Engine, name) and getattr(mod.Override, name) is method
        ref = weakref.ref(method)
        assert ref() is method
        assert repr(method).startswith(f"<functools._lru_cache_wrapper object at ")
    engine = mod.Engine()
    assert engine.run_cached(1) == ("cached", 1) and engine.run_cached(1) == ("cached", 1)
    assert mod.Engine.run_cached.cache_info().hits == 1
    assert engine.run_memo(2) == ("memo", 2)
    assert repr(mod.Engine.run_count) == repr(engine.run_count) == "<built-in function len>"
    assert engine.run_count([1, 2]) == 2
    assert sorted(s.name for s in exporter.get_finished_spans()) == [
        "engine.run_cached", "engine.run_cached", "engine.run_count", "engine.run_memo"]


# --- @contextmanager / @asynccontextmanager methods -----------------------------------------------

SESSIONS = '''
import contextlib

class Engine:
    def __init__(self):
        self.log = []
        self.kept = None

    @contextlib.asynccontextmanager
    async def run_session(self, run_id, mode="ok"):
        await self.run_prepare(run_id)
        try:
            yield "session"
        except KeyError as error:
            self.log.append(("caught", type(error).__name__))
            if mode == "reraise":
                raise
            if mode == "other":
                raise ValueError("other") from error
        finally:
            await self.run_close(run_id)

    @contextlib.contextmanager
    def run_sync_session(self, run_id, mode="ok"):
        self.run_step(run_id)
        try:
            yield "sync session"
        except KeyError as error:
            self.log.append(("caught", type(error).__name__))
            if mode == "reraise":
                raise
        finally:
            self.run_step(run_id)

    @contextlib.contextmanager
    def _kept(self, run_id):
        self.run_step(run_id)
        yield "kept"

    def run_keeping(self, run_id):
        self.kept = self._kept(run_id)
        return self.kept

    async def run_prepare(self, run_id):
        self.log.append("prepare")

    async def run_close(self, run_id):
        self.log.append("close")

    def run_step(self, run_id):
        self.log.append("step")
'''

SESSIONS_MAP = '''
version: 1
roles:
  engine:
    kind: execute
    implementations: [{mod}.Engine]
    methods: ["run_*"]
    run_id: [arg.run_id]
'''


def _tops(exporter: Any) -> list[str]:
    return sorted(s.name for s in exporter.get_finished_spans() if not attrs(s)["pathwatch.nested"])


def test_a_context_manager_method_is_traced_until_its_block_exits(backend, exporter):
    """An @asynccontextmanager method (async with engine.run_session(run_id)): its span ended as the
    context manager was made, before its setup ran, so the role's calls of its setup and teardown
    were calls of their own, not nested: three execute spans of one run, a duplicate.execution.
    The call goes on until its generator finishes (the block's exit), its setup and teardown in its
    context; what the app sees is unchanged (the value, an exception caught, re-raised or
    replaced)."""
    import asyncio

    mod = backend(SESSIONS, SESSIONS_MAP)
    engine = mod.Engine()

    async def session(mode: str, fail: bool) -> Any:
        async with engine.run_session("r1", mode) as value:
            if fail:
                raise KeyError("k")
        return value

    assert asyncio.run(session("ok", False)) == "session"
    assert engine.log == ["prepare", "close"]
    [outer] = [s for s in exporter.get_finished_spans() if s.name == "engine.run_session"]
    outer_id = format(outer.context.span_id, "016x")
    for span in exporter.get_finished_spans():
        if span is not outer:
            assert attrs(span)["pathwatch.nested"] is True
            assert attrs(span)["pathwatch.nested.outer_span_id"] == outer_id
            assert span.parent.span_id == outer.context.span_id
    assert outer.start_time <= min(s.start_time for s in exporter.get_finished_spans())
    assert outer.end_time >= max(s.end_time for s in exporter.get_finished_spans())
    assert asyncio.run(session("swallow", True)) == "session"
    with pytest.raises(KeyError):
        asyncio.run(session("reraise", True))
    with pytest.raises(ValueError) as raised:
        asyncio.run(session("other", True))
    assert type(raised.value.__cause__) is KeyError
    assert _tops(exporter) == ["engine.run_session"] * 4

    exporter.clear()
    with engine.run_sync_session("r2") as value:
        assert value == "sync session"
    with pytest.raises(KeyError):
        with engine.run_sync_session("r2", "reraise"):
            raise KeyError("k")
    assert _tops(exporter) == ["engine.run_sync_session"] * 2
    assert len(spans_named(exporter, "engine.run_step")) == 4


def test_a_context_manager_the_method_keeps_is_handed_out_as_it_is(backend, exporter):
    """One the method keeps (self.kept): its generator is not replaced; the call ends at its
    return."""
    mod = backend(SESSIONS, SESSIONS_MAP)
    engine = mod.Engine()
    manager = engine.run_keeping("r3")
    assert manager is engine.kept
    generator = manager.gen
    with manager as value:
        assert value == "kept"
    assert manager.gen is generator and type(generator).__name__ == "generator"
    assert generator.gi_code.co_name == "_kept"
    keeping = spans_named(exporter, "engine.run_keeping")
    step = spans_named(exporter, "engine.run_step")
    assert len(keeping) == 1 and len(step) == 1 and attrs(step[0])["pathwatch.nested"] is False
