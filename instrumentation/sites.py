"""Per-(class, method) call sites: everything a wrapped call needs, precomputed at wrap time.

A ``MethodSite`` holds the span name, the constant attributes, the extractors bound to the method's
signature and the role it belongs to. ``MethodSite.start`` turns one call into a ``Call``: a started
span plus the context variables to set while the method body runs (``enter``/``exit`` may run once,
or once per step of a generator), and ``end`` finishes the span. Each of these is fail-safe: an
internal error is counted and the backend's call goes on untraced.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from asyncio import CancelledError, _get_running_loop, current_task
import threading
import weakref
from collections.abc import Callable
from contextvars import Context, ContextVar
from types import CodeType
from typing import Any

import wrapt
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY as _SUPPRESS_KEY
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

from instrumentation import attributes as attr
from instrumentation.attributes import DeliveryOutcomes, SpanKinds
from instrumentation.errors import by_type_only, mark_app_error, record_error
from instrumentation.extractors import Getter, bind, binds_instance, walk
from instrumentation.identity import current_request, instances, names_user, value_text
from instrumentation.linking import (LINK_CONTEXT, LINK_MESSAGE_KEY, DispatchCounter, EventRef,
                                     RoleWrite, count_write, current_dispatch, current_event,
                                     event_in_context, fan_out_sent, in_fan_out, new_event_id,
                                     pending_emits, role_write_in_progress, write_in_progress)
from instrumentation.message_content import content_key
from instrumentation.pathmap import RoleSpec
from instrumentation.runtime import state
from instrumentation.transport import (MessageInfo, carries_event, closed_errors, describe_message,
                                       is_connection, link_write)

_logger = logging.getLogger("instrumentation")
_get_ident = threading.get_ident


def _context_functions() -> tuple[Any, Any, Any]:
    """(get_current, attach, reset) of OpenTelemetry's current context. With its default runtime
    context (``ContextVarsRuntimeContext``, a ContextVar) the ContextVar's own methods: what the
    API's ``get_current`` / ``attach`` / ``detach`` come down to, without the two or three Python
    calls each makes on the way (a traced call makes six such calls). Another runtime context
    (``OTEL_PYTHON_CONTEXT``) is reached through the API."""
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    var = getattr(runtime, "_current_context", None)
    if type(runtime) is ContextVarsRuntimeContext and type(var) is ContextVar:
        return var.get, var.set, var.reset
    return otel_context.get_current, otel_context.attach, otel_context.detach


_get_current, _attach, _reset = _context_functions()
# the key OpenTelemetry keeps the current span under (made with a unique suffix), found through its API
_SPAN_KEY: str = next(iter(trace.set_span_in_context(trace.INVALID_SPAN, otel_context.Context())))
#: beside the span pathwatch makes current: a ``_Before`` or its ``Call`` (that span, and what was
#: current before it)
_BEFORE_KEY: str = otel_context.create_key("pathwatch-before")
#: the execute call the code runs inside (the innermost; each names the one it runs inside in
#: ``Call.enclosing``), in the context an execute call makes current: what an emit names as its
#: execution (``execution_of``)
_EXECUTION_KEY: str = otel_context.create_key("pathwatch-execution")
_Context = otel_context.Context
_current_request_get = current_request.get

# attribute keys and kinds as module globals: the per-call path reads them without attribute lookups
_IMPLEMENTATION, _CANONICAL, _RETIRED = attr.IMPLEMENTATION, attr.CANONICAL, attr.RETIRED
_INSTANCE_ID, _USER_OWNER, _ENTRY_POINT = attr.INSTANCE_ID, attr.USER_OWNER, attr.ENTRY_POINT
_NESTED, _THREAD_ID, _CALLER = attr.NESTED, attr.THREAD_ID, attr.CALLER
_NESTED_OUTER, _USER_TARGET = attr.NESTED_OUTER, attr.USER_TARGET
_RUN_ID, _EXECUTION_SPAN_ID = attr.RUN_ID, attr.EXECUTION_SPAN_ID
_EXECUTE, _EMIT, _DISPATCH, _DELIVER = (SpanKinds.EXECUTE, SpanKinds.EMIT, SpanKinds.DISPATCH,
                                        SpanKinds.DELIVER)
_MAX_CALLER_NAMES = 4096
#: execute calls an emit looks through for its execution (recursion deeper than this is not followed)
_MAX_EXECUTION_DEPTH = 64
_caller_names: dict[int, tuple[CodeType, str]] = {}  # id(code) -> (code, "module.qualname"), bounded

# frames of these files are never "the caller"
_OWN_DIR = os.path.dirname(os.path.abspath(__file__))
_SKIP_FILES: set[str] = {os.path.join(_OWN_DIR, f) for f in os.listdir(_OWN_DIR) if f.endswith(".py")}
_SKIP_FILES |= {os.path.join(os.path.dirname(wrapt.__file__), f)
                for f in os.listdir(os.path.dirname(wrapt.__file__)) if f.endswith(".py")}


class RoleRuntime:
    """Run-time facts of one role, shared by all its sites."""

    def __init__(self, spec: RoleSpec) -> None:
        self.spec = spec
        self.name = spec.name
        # the call of this role the code runs inside (nested while it has not ended: a task it
        # started keeps it in its copied context after it returned)
        self.nested: ContextVar[Call | None] = ContextVar(f"pathwatch_in_{spec.name}", default=None)
        # ids of the code of the role's own methods: never "the caller". Keyed by id because hashing a
        # code object hashes its contents on every lookup; the codes are kept alive in _codes.
        self.skip_codes: set[int] = set()
        self._codes: list[CodeType] = []
        self.canonical_classes: set[type] = set()
        self.retired_classes: set[type] = set()
        # facts of the classes pathwatch wrapped (kept alive by their patches anyway); a class
        # that only inherits wrapped methods (one made per request beyond the subclass cap) is not
        # remembered: the cache would keep every such class alive and grow without bound
        self._type_info: dict[type, tuple[str, bool, bool]] = {}
        #: attribute chains of the owner paths (user-scoped roles only)
        self.owner_chains: tuple[tuple[str, ...], ...] = tuple(
            path.attrs for path in spec.extractors["owner"]) if spec.user_scoped else ()
        #: False once its instrumentation is uninstalled: a wrapper of it the app still holds (a
        #: method it took then, a decorator it put around ``Engine.run``) calls through the running
        #: instrumentation's wrapper of the same function, or passes the call through (wrapping)
        self.live = True

    def type_info(self, cls: type) -> tuple[str, bool, bool]:
        """(implementation, canonical, retired) of an instance's own class; cached per wrapped class."""
        info = self._type_info.get(cls)
        if info is None:
            info = (f"{cls.__module__}.{cls.__qualname__}", cls in self.canonical_classes,
                    cls in self.retired_classes)
        return info

    def add_class_code(self, cls: type) -> None:
        for value in vars(cls).values():
            func = getattr(value, "__func__", value)
            func = getattr(func, "__wrapped__", func)
            code = getattr(func, "__code__", None)
            if isinstance(code, CodeType) and id(code) not in self.skip_codes:
                self._codes.append(code)
                self.skip_codes.add(id(code))
        self._type_info.pop(cls, None)
        self._type_info[cls] = self.type_info(cls)

    def code_mark(self) -> int:
        """Where ``forget_class_code`` goes back to."""
        return len(self._codes)

    def forget_class_code(self, cls: type, mark: int) -> None:
        """Undo ``add_class_code`` of a class whose wrapping was rolled back (codes added since
        ``mark``): its frames are callers again, as an unwrapped class's are."""
        for code in self._codes[mark:]:
            self.skip_codes.discard(id(code))
        del self._codes[mark:]
        self._type_info.pop(cls, None)


class MethodSite:
    """One wrapped (class, method)."""

    def __init__(self, role: RoleRuntime, owner_class: type, defining_class: type, method: str,
                 descriptor: Any) -> None:
        self.role = role
        # the SpanKinds constant itself: the per-call path compares kinds with ``is``
        self.kind = next(k for k in (SpanKinds.EXECUTE, SpanKinds.EMIT, SpanKinds.DISPATCH,
                                     SpanKinds.DELIVER) if k == role.spec.kind)
        self.method = method
        self.owner_class = owner_class  # the class the wrapper is installed on
        self.span_name = f"{role.name}.{method}"
        self.is_static = isinstance(descriptor, staticmethod)
        self.is_classmethod = isinstance(descriptor, classmethod)
        if isinstance(descriptor, (functools.singledispatchmethod, functools.partialmethod)):
            function = descriptor.__get__(None, owner_class)  # a function with the method's signature
            name = method
        else:
            function = getattr(descriptor, "__func__", descriptor)
            name = getattr(function, "__name__", method)
        self.function_name = f"{defining_class.__module__}.{defining_class.__qualname__}.{name}"
        self.static_attrs: dict[str, Any] = {
            attr.SPAN_KIND: self.kind,
            attr.CODE_FUNCTION_NAME: self.function_name,
            attr.ROLE: role.name,
        }
        if role.spec.user_scoped:
            self.static_attrs[attr.USER_SCOPED] = True
        if self.kind == SpanKinds.EMIT:
            self.static_attrs[attr.MESSAGING_OPERATION_TYPE] = "create"
        elif self.kind == SpanKinds.DELIVER:
            self.static_attrs[attr.MESSAGING_OPERATION_TYPE] = "send"
        self.wants_caller = self.kind == SpanKinds.EXECUTE
        # a call that sends one message to several users by design: addressed to no one user
        self.fan_out = self.kind == SpanKinds.DISPATCH and role.spec.is_fan_out(method)
        if self.fan_out:
            self.static_attrs[attr.DELIVERY_FAN_OUT] = True
        # the dispatcher's registry of sockets by user (the role's ``connections`` paths): a
        # KeyError of the recipient is no connection only when it has no entry for them
        self.registry_chains = role.spec.connections if self.kind == SpanKinds.DISPATCH else ()
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):
            signature = None
        # the instance (or class) comes first, unless the callable does not bind: a staticmethod,
        # or a class attribute such as a functools.partial or an object with __call__, which is
        # called without it (its signature starts with its own first parameter). A classmethod
        # binds the class whatever it wraps (a partial too)
        skip_first = not self.is_static and (self.is_classmethod or binds_instance(
            getattr(descriptor, "__func__", descriptor)))
        getters = {field: tuple(g for g in (bind(spec, signature, method, skip_first)
                                            for spec in specs) if g is not None)
                   for field, specs in role.spec.extractors.items() if field != "owner"}
        self.user_getters = tuple((key, getters[field]) for key, field in (
            (attr.USER_SUBJECT, "subject"), (attr.USER_TARGET, "target"))
            if getters[field] and not (self.fan_out and field == "target"))
        self.plain_getters = tuple((key, getters[field]) for key, field in (
            (attr.RUN_ID, "run_id"), (attr.CONVERSATION_THREAD_ID, "thread_id"),
            (attr.EVENT_TYPE, "event_type")) if getters[field])
        self.event_id_getters = getters["event_id"]

    # --- per call ---------------------------------------------------------------------------------
    def caller(self, depth: int = 1) -> str | None:
        """``module.qualname`` of the nearest frame outside pathwatch and the role's own classes.
        ``depth``: where to look from (1: the frame calling this); the frames of pathwatch's own
        between are passed over unseen (each frame seen is made a frame object)."""
        try:
            frame = sys._getframe(depth)
            skip_codes = self.role.skip_codes
            while frame is not None:
                code = frame.f_code
                if id(code) in skip_codes or code.co_filename in _SKIP_FILES:
                    frame = frame.f_back
                    continue
                known = _caller_names.get(id(code))
                if known is not None and known[0] is code:
                    return known[1]
                name = f"{frame.f_globals.get('__name__', '?')}.{getattr(code, 'co_qualname', code.co_name)}"
                if len(_caller_names) < _MAX_CALLER_NAMES:
                    _caller_names[id(code)] = (code, name)  # the code is kept: its id stays its own
                return name
        except Exception as exc:
            record_error(f"caller:{self.function_name}", exc)
        return None

    def start(self, instance: Any, args: tuple, kwargs: dict, caller: str | None = None,
              want_caller: bool = False) -> Call | None:
        """Start the span of one call, or None when suppressed or when pathwatch itself failed."""
        try:
            if _get_current().get(_SUPPRESS_KEY):
                return None
            if self.kind is _DELIVER and role_write_in_progress() is not None:
                return None  # a deliver role's call inside another's: one write, one span
            attrs = self.static_attrs.copy()
            role = self.role
            # the user ids and the tracer (its scope names their key) from one setting
            setting, tracer = state.setting
            pseudonymize = setting.fast
            entry = None
            if self.is_static or instance is None:
                cls = self.owner_class
            elif self.is_classmethod:
                cls = instance
            else:
                cls = type(instance)
                # a known instance's entry, found as instances.entry() finds it (inlined: one call less)
                entry = instances._entries.get(id(instance))
                if entry is None or entry.ref() is not instance:
                    entry = instances.entry(instance)
            if entry is not None:
                cached = entry.cached
                # its class too: an instance whose ``__class__`` the app reassigned (a state object
                # moved to another implementation) reports the class it has now
                if cached is None or cached[0] is not role or cached[1] is not setting \
                        or cached[3] is not cls:
                    cached = entry.cached = (role, setting, self._instance_attrs(
                        cls, entry, instance, pseudonymize), cls)
                attrs.update(cached[2])
            else:
                info = role._type_info.get(cls) or role.type_info(cls)
                attrs[_IMPLEMENTATION], attrs[_CANONICAL], attrs[_RETIRED] = info
                if role.owner_chains and not (self.is_static or self.is_classmethod or instance is None):
                    # no weakref: not remembered
                    owner = unremembered_owner(instance, role.owner_chains, pseudonymize)
                    if owner is not None:
                        attrs[_USER_OWNER] = owner
            request = _current_request_get()
            if request is not None:
                attrs.update(request.span_attrs(setting))
            outer_call = role.nested.get()
            nested = outer_call is not None and outer_call.live
            kind = self.kind
            if kind is not _DELIVER:
                attrs[_NESTED] = nested
                if nested and outer_call.span is not None:  # type: ignore[union-attr]
                    attrs[_NESTED_OUTER] = format(
                        outer_call.span.get_span_context().span_id, "016x")  # type: ignore[union-attr]
            if kind is _EXECUTE:
                attrs[_THREAD_ID] = _get_ident()
                if not nested:
                    if want_caller:  # start() called by a wrapper: the wrapper's caller
                        caller = self.caller(3)
                    if caller is not None:
                        attrs[_CALLER] = caller
            # a value that cannot be made text (its __str__ raises) loses its attribute, not the span
            # each field's first getter that finds a value (as _extract, inlined: a call less a field)
            if self.user_getters:
                for key, getters in self.user_getters:
                    for get in getters:
                        try:
                            value = get(instance, args, kwargs)
                            if value is None or not value != "":
                                continue
                        except Exception as exc:  # a raising property or an odd argument: count, go on
                            record_error(f"extract:{self.function_name}:{key}", exc)
                            continue
                        try:
                            user = pseudonymize(value)
                        except Exception as exc:  # no text: its attribute left off
                            record_error(f"extract:{self.function_name}:{key}", exc)
                            break
                        if user is not None:  # b"" is no user: the next path is read
                            attrs[key] = user
                            break
            for key, getters in self.plain_getters:
                for get in getters:
                    try:
                        value = get(instance, args, kwargs)
                        if value is not None and value != "":
                            break
                    except Exception as exc:
                        record_error(f"extract:{self.function_name}:{key}", exc)
                else:
                    continue
                try:
                    attrs[key] = value if type(value) is str else value_text(value)
                except Exception as exc:
                    record_error(f"extract:{self.function_name}:{key}", exc)
            call = Call(self, attrs)
            if kind is _EMIT:
                self._start_emit(call, attrs, nested, instance, args, kwargs)
            elif kind is _DISPATCH:
                self._start_dispatch(call, attrs, args, kwargs)
                if self.registry_chains:
                    call.instance = instance  # its registry is read if the call raises KeyError
            elif kind is _DELIVER:
                self._start_deliver(attrs, args, kwargs)
            # the current context given: the tracer and its sampler look no further for it
            call.span = tracer.start_span(self.span_name, context=_get_current(), attributes=attrs)
            if kind is _DELIVER:
                call.write = RoleWrite(call.span, setting)
            return call
        except Exception as exc:
            try:
                record_error(f"start:{self.function_name}", exc)
            except RecursionError:  # the app's stack is at the interpreter's limit: no frame left
                pass                # to count in; the call still goes on, untraced
            return None

    def _instance_attrs(self, cls: type, entry: Any, instance: Any,
                        pseudonymize: Callable[[Any], str | None]) -> dict[str, Any]:
        """What every span of this instance carries: built once per instance (and again when the
        owner is captured, or the setting changed), its owner pseudonymized with ``pseudonymize``."""
        implementation, canonical, retired = self.role.type_info(cls)
        attrs = {_IMPLEMENTATION: implementation, _CANONICAL: canonical, _RETIRED: retired,
                 _INSTANCE_ID: entry.token}
        chains = self.role.owner_chains
        if chains:  # only the owner read through this role's own paths (none without any)
            read, owner = entry.owner_of(chains)
            if not read:
                # no __init__ wrapped for this role ran (e.g. one added by @dataclass after the class
                # existed, the instance predates instrument(), or it is a call of a base's role made
                # by an instance of another role's class): the owner is read at its first call
                owner = capture_owner(instance, chains, entry)
            owner = None if owner is None else pseudonymize(owner)
            if owner is not None:  # b"" is no user
                attrs[_USER_OWNER] = owner
        return attrs

    def _extract(self, getters: tuple[Getter, ...], key: str, instance: Any, args: tuple,
                 kwargs: dict) -> Any:
        for get in getters:
            try:
                value = get(instance, args, kwargs)
                # in the try: a value whose != raises or is no bool (a numpy array) is skipped too
                if value is not None and value != "":
                    return value
            except Exception as exc:  # a raising property or an odd argument: count, go on
                record_error(f"extract:{self.function_name}:{key}", exc)
        return None

    def _start_emit(self, call: Call, attrs: dict, nested: bool, instance: Any, args: tuple,
                    kwargs: dict) -> None:
        outer = current_event.get()
        run_id = attrs.get(attr.RUN_ID)
        event_type = attrs.get(attr.EVENT_TYPE)
        if nested and outer is not None:  # a delegate of the same emitter role: the same event
            event_id = outer.event_id
        else:
            given = self._extract(self.event_id_getters, "event_id", instance, args, kwargs) \
                if self.event_id_getters else None
            event_id = None
            if given is not None:
                try:
                    event_id = value_text(given)
                except Exception as exc:  # the emit still gets an id, one of pathwatch's
                    record_error(f"extract:{self.function_name}:event_id", exc)
            if event_id is None:
                event_id = new_event_id()
            if run_id is not None and event_type is not None:
                pending_emits.record(run_id, event_type, event_id, attrs.get(_USER_TARGET))
        attrs[attr.MESSAGING_MESSAGE_ID] = event_id
        call.event = EventRef(event_id, run_id, event_type, LINK_CONTEXT)
        if run_id is not None:
            execution = execution_of(run_id)
            if execution is not None:
                attrs[_EXECUTION_SPAN_ID] = execution

    def _start_dispatch(self, call: Call, attrs: dict, args: tuple, kwargs: dict) -> None:
        call.dispatch = dispatch = DispatchCounter(current_dispatch.get(), self.fan_out)
        if not self.fan_out and dispatch.outer is not None:
            fanned = fan_out_sent(dispatch.outer)
            if fanned is not None:  # a per-user send nested in a fan-out: one of its recipients
                pending_emits.add_recipient(*fanned, attrs.get(_USER_TARGET))
        outer = event_in_context(attrs.get(attr.RUN_ID), attrs.get(attr.EVENT_TYPE))
        if outer is not None:
            attrs[attr.MESSAGING_MESSAGE_ID] = outer.event_id
            if outer.run_id is not None and outer.event_type is not None:
                # if it writes nothing itself (it queues), its message tells its writes later
                call.sent = (outer.run_id, outer.event_type, outer.event_id, args, kwargs)
                if self.fan_out:  # writes made later by each socket's own writer find it so
                    pending_emits.fanned_out(outer.run_id, outer.event_type, outer.event_id)
                    dispatch.fanned = (outer.run_id, outer.event_type, outer.event_id)
            return
        run_id = attrs.get(attr.RUN_ID)
        event_type = attrs.get(attr.EVENT_TYPE)
        own = _own_event_id(args, kwargs) if state.messages.event_id else None
        if own is not None:
            # the message names its event, as it does for the writes of it: its emit may be another
            # process's (a pub/sub relay), not in this one's table
            attrs[attr.MESSAGING_MESSAGE_ID] = own
            call.event = EventRef(own, run_id, event_type, LINK_MESSAGE_KEY)
            if self.fan_out and run_id is not None and event_type is not None:
                pending_emits.fanned_out(run_id, event_type, own, made_elsewhere=True)
                dispatch.fanned = (run_id, event_type, own)
            return
        if run_id is not None and event_type is not None:
            if self.fan_out:  # names no user: of several users' emits of the key, none is taken
                found = pending_emits.fan_out_by_key(run_id, event_type,
                                                     _message_content(args, kwargs))
                event_id = None if found is None else found[0]
            else:
                event_id = pending_emits.match(run_id, event_type, user=attrs.get(_USER_TARGET))
            if event_id is not None:
                attrs[attr.MESSAGING_MESSAGE_ID] = event_id
                call.event = EventRef(event_id, run_id, event_type, LINK_MESSAGE_KEY)
                if self.fan_out:
                    dispatch.fanned = (run_id, event_type, event_id)

    def _start_deliver(self, attrs: dict, args: tuple, kwargs: dict) -> None:
        link_write(attrs, self._describe_delivered(attrs, args, kwargs))
        dispatch = current_dispatch.get()
        if dispatch is not None:
            count_write(dispatch)
            if in_fan_out(dispatch):
                attrs[attr.DELIVERY_FAN_OUT] = True

    def _describe_delivered(self, attrs: dict, args: tuple, kwargs: dict) -> MessageInfo | None:
        """The event a deliver role's call writes: read from its message (the first argument, other
        than the socket itself, that carries one), with the role's ``event_type`` / ``run_id`` paths
        winning."""
        candidates = (describe_message(value) for value in (*args, *kwargs.values())
                      if not is_connection(value))
        info = next((found for found in candidates if found is not None and found.carries_event()),
                    None)
        event_type, run_id = attrs.get(attr.EVENT_TYPE), attrs.get(attr.RUN_ID)
        if event_type is None and run_id is None:
            return info
        if info is None:
            return MessageInfo(event_type, run_id, None)
        return MessageInfo(event_type if event_type is not None else info.event_type,
                           run_id if run_id is not None else info.run_id, info.event_id)


def execution_of(run_id: str) -> str | None:
    """The span id (16 hex digits) of the execution an emit of ``run_id`` made now is part of: the
    innermost execute call running around it in this task's context that names that run and is
    not nested in a call of its own role (that outer call, further out, is the execution). A call
    that has returned is passed over: a task it started that outlives it is no longer its work (a
    pump task started lazily in one run's call goes on to serve later runs)."""
    call = _get_current().get(_EXECUTION_KEY)
    depth = 0
    while call is not None and depth < _MAX_EXECUTION_DEPTH:
        attrs = call.attrs
        if call.live and attrs.get(_RUN_ID) == run_id and not attrs.get(_NESTED):
            span_hex = call.span_hex
            if span_hex is None and call.span is not None:
                span_hex = call.span_hex = format(call.span.get_span_context().span_id, "016x")
            return span_hex
        call = call.enclosing
        depth += 1
    return None


def _own_event_id(args: tuple, kwargs: dict) -> str | None:
    """The event id a dispatch's message carries itself (the path map's ``messages.event_id``):
    of the first argument that names an event (a socket is none)."""
    for value in (*args, *kwargs.values()):
        if is_connection(value):
            continue
        info = describe_message(value)
        if info is not None and info.carries_event():
            return info.event_id  # text already (a value that cannot be is left out)
    return None


def _registered(instance: Any, chains: tuple[tuple[str, ...], ...], key: Any) -> bool:
    """``key`` has an entry in the registry of sockets the first of ``chains`` that resolves on
    ``instance`` names (``key in registry``). A path whose link raises (a property) does not
    resolve: the next is tried, as an extractor's alternatives are. A registry that cannot be read
    (no path resolves, or its ``in`` raises) says nothing: False, as without ``connections``."""
    for chain in chains:
        try:
            registry = walk(instance, chain)
        except Exception as exc:  # the app's property: its error is not the call's
            record_error("connections", exc)
            continue
        if registry is not None:
            try:
                return key in registry
            except Exception as exc:  # the app's registry: its error is not the call's
                record_error("connections", exc)
                return False
    return False


def _message_content(args: tuple, kwargs: dict) -> int | None:
    """``message_content.content_key`` of the message a dispatch call sends (the first argument,
    other than a socket, that carries an event), as its writes will see it; None when none does."""
    for value in (*args, *kwargs.values()):
        if not is_connection(value) and carries_event(value):
            return content_key(value)
    return None


def capture_owner(instance: Any, chains: tuple[tuple[str, ...], ...],
                  entry: Any) -> str | bytes | None:
    """Read the owner paths of a user-scoped instance and remember, for those paths, the first that
    resolves (its raw id: the span attributes built from it pseudonymize it), or that none did;
    return what was remembered."""
    owner = read_owner(instance, chains)
    try:
        return entry.set_owner(chains, owner)
    except Exception as exc:  # an id that cannot be made text: no owner, the span still made
        record_error(f"owner:{type(instance).__qualname__}", exc)
        return entry.set_owner(chains, None)


def read_owner(instance: Any, chains: tuple[tuple[str, ...], ...]) -> Any:
    """The raw id of the first owner path of ``instance`` that resolves."""
    for chain in chains:
        try:
            value = walk(instance, chain)
            if value is not None and value != "" and names_user(value):
                return value
        except Exception as exc:  # that path only: the next one may resolve
            record_error(f"owner:{type(instance).__qualname__}", exc)
    return None


_unremembered_classes: weakref.WeakSet[type] = weakref.WeakSet()  # warned about once each


def unremembered_owner(instance: Any, chains: tuple[tuple[str, ...], ...],
                       pseudonymize: Callable[[Any], str | None]) -> str | None:
    """The owner of a user-scoped instance the registry cannot remember (it cannot be weakly
    referenced: ``__slots__`` without ``__weakref__``, a ``NamedTuple``): read at every call, as it
    is then, and its class named once in the log — such instances have no instance id either, so a
    shared one cannot be told from two."""
    cls = type(instance)
    if cls not in _unremembered_classes:
        try:
            _unremembered_classes.add(cls)
            _logger.warning(
                "pathwatch: instances of the user-scoped %s.%s cannot be weakly referenced "
                "(__slots__ without __weakref__, or a tuple): they get no pathwatch.instance.id, and "
                "their owner is read at each call instead of captured at construction (a class "
                "with __slots__ gets both with '__weakref__' among them)", cls.__module__,
                cls.__qualname__)
        except Exception:  # a class that cannot be weakly referenced itself: still traced
            pass
    owner = read_owner(instance, chains)
    if owner is None:
        return None
    try:
        return pseudonymize(owner)
    except Exception as exc:  # an id that cannot be made text: no owner, the span still made
        record_error(f"owner:{cls.__qualname__}", exc)
        return None


class _Before:
    """Beside the span a traced call makes current (``_BEFORE_KEY``): that span, and the span and
    ``_Before`` current in the context it was made current over (``_ABSENT`` for none), all that
    ``_without_pathwatch_span`` puts back. Not that whole context: a task started in the call keeps
    its context, which would keep the one before, and so on -- every call of a chain of tasks each
    started in the last one's call, with its span. At the call's end what it was made over is
    taken past the ended calls (``_compact``). The ``Call`` itself serves as its own (same fields,
    set at its first enter(): no object more a call); a generator's later steps, each made current
    over its consumer's context, get one each. An execute call's context names it as the execution
    (``_EXECUTION_KEY``): what it was made over named is put back as well (``prior_execution``; a
    ``Call``'s is its ``enclosing``)."""

    __slots__ = ("span", "prior_span", "prior", "prior_execution")

    def __init__(self, span: Any, before: Any, execute: bool) -> None:
        self.span = span
        self.prior_span = before.get(_SPAN_KEY, _ABSENT)
        self.prior: _Before | object = before.get(_BEFORE_KEY, _ABSENT)
        #: an execute call's: the execution named where it was made current (``_ABSENT``: another
        #: kind of call, which names none of its own)
        self.prior_execution = before.get(_EXECUTION_KEY) if execute else _ABSENT


def _compact(made_over: Any) -> None:
    """Pass over the traced calls whose span records no more (ended; or never, sampled out) in what
    ``made_over`` (a ``_Before`` or a ``Call``) was made over: ``_keep_apps_context`` passes over
    them as well, and a span that has stopped recording never records again. What is kept holds
    only calls that were still running around this one when it ended."""
    prior_span, prior = made_over.prior_span, made_over.prior
    depth = 0
    while ((prior.__class__ is Call or prior.__class__ is _Before) and prior.span is prior_span
           and not prior_span.is_recording() and depth < _MAX_EXECUTION_DEPTH):
        prior_span, prior = prior.prior_span, prior.prior
        depth += 1
    made_over.prior_span, made_over.prior = prior_span, prior


_ABSENT = object()  # no such key in the context a traced call was made current over


def _without_pathwatch_span(context: Any) -> Any:
    """``context`` with the span a traced call made current in it replaced by the one current before
    that call (also a context the app derived from the call's, with its own values kept); None when
    its current span is not one pathwatch made current (the app's own)."""
    before = context.get(_BEFORE_KEY)
    if before is None or before.span is not context.get(_SPAN_KEY):
        return None
    values = {key: value for key, value in context.items()
              if key != _SPAN_KEY and key != _BEFORE_KEY}
    if before.prior_span is not _ABSENT:
        values[_SPAN_KEY] = before.prior_span
    if before.prior is not _ABSENT:
        values[_BEFORE_KEY] = before.prior
    # an execute call's context names it as the execution: what it was made over named
    if before.__class__ is Call:
        execution = before.enclosing if before.site.kind is _EXECUTE else _ABSENT
    else:
        execution = before.prior_execution
    if execution is not _ABSENT:
        if execution is None:
            values.pop(_EXECUTION_KEY, None)
        else:
            values[_EXECUTION_KEY] = execution
    return _Context(values)


def _keep_apps_context(current: Any, span: Any) -> None:
    """A traced call's method (or a step of it) left another OpenTelemetry context current than the
    one the call attached: it attached its own (baggage, a value for the rest of its caller's work)
    or detached a token attached before. Unwrapped, the caller would go on in that context: so it
    stays, with pathwatch's span taken out of it (detaching by the call's token put back the context
    of before the call and threw the app's away). A span the method made current itself stays
    current, as it would. A context of an earlier traced call, put back by the app's detach of a
    token attached inside that call, loses that call's ended span as well (and those of ended calls
    around it): the context it was attached over is what the token would have put back unwrapped.
    The span of a traced call still running around this one stays (the app detached, in this call,
    a token its caller attached)."""
    kept = current
    while True:  # this call's span, and ended calls' an app's token put back; never a running one's
        outer = _without_pathwatch_span(kept)
        if outer is None:
            break
        top = kept.get(_SPAN_KEY)
        if top is not span and top.is_recording():
            break
        kept = outer
    if kept is not current:
        _attach(kept)


def task_cancelling() -> bool:
    """Whether the code runs in an asyncio task being cancelled (``Task.cancelling``, 3.11+) -- also
    inside ``asyncio.timeout``, whose exit comes after: a generator whose consumer is not known
    (``stream_closed_cancelled``) closed now was closed because this task was cancelled."""
    try:
        task = current_task()
    except RuntimeError:  # no event loop running in this thread
        return False
    try:
        cancelling = getattr(task, "cancelling", None)  # None: not in a task; another loop's task
        return cancelling is not None and cancelling() > 0
    except Exception:  # a task of another loop's making: not told
        return False


class StreamWatch(weakref.ref):
    """Who consumes a streaming execute call (a generator or async generator method's), with nothing
    kept alive through it: a weak reference to the generator driving the app's. ``driver``: the
    task that ran its last step (a weak reference; None: none known); ``since``: its cancellation
    requests then (``Task.cancelling``: one it caught earlier without ``uncancel`` is not one
    since). ``consumer_cancelled``: whether that task had been cancelled since (or was being) when
    the consumer let the generator go unfinished, or when it ended; None: neither seen yet.

    A bare ``async for`` whose task is cancelled while the generator waits at a ``yield`` gets no
    CancelledError through it: the unwinding loop lets it go, and the event loop's finalizer closes
    an async generator later (``aclose()``) in a task of its own, not being cancelled, by when the
    consumer's task may be gone (nobody held it). A generator the consumer's frame kept in a
    variable is let go only as the task's error that holds that frame is freed: with the task, or
    in whoever awaited it. So the consumer's task is asked as the generator is let go (this weak
    reference's callback, run before the generator is closed) and as it ends (a done callback)."""

    __slots__ = ("driver", "since", "consumer_cancelled")

    def driver_done(self, task: Any) -> None:
        """The consumer's task ended (a done callback on it, removed when the stream ends first)."""
        try:
            if self.consumer_cancelled is None:
                self.consumer_cancelled = _was_cancelled(task, self.since)
        except Exception as exc:  # a callback must not raise into the event loop
            record_error("stream:driver_done", exc)


def watch_stream(site: MethodSite, generator: Any) -> StreamWatch | None:
    """A watch on the generator or async generator ``generator`` that drives the app's for
    ``site``'s call: only an execute call says it was cancelled."""
    if site.kind is not _EXECUTE:
        return None
    try:
        watch = StreamWatch(generator, _stream_dropped)
    except Exception as exc:  # a generator that takes no weak reference: not watched
        record_error(f"stream:{site.function_name}", exc)
        return None
    watch.driver = watch.consumer_cancelled = None
    watch.since = 0
    return watch


def stream_stepped(watch: StreamWatch) -> None:
    """A step of the watched stream starts: the task running it is its consumer now (one task may
    hand it to another), told by a done callback when it ends."""
    try:
        loop = _get_running_loop()
        task = current_task(loop) if loop is not None else None
        driver = watch.driver
        if driver is None:
            if task is None:  # no event loop in this thread (a sync generator): nothing to watch
                return
        elif driver() is task:
            watch.since = _cancel_requests(task)
            return
        _forget_driver(watch)
        if task is not None:
            watch.driver = weakref.ref(task)
            watch.since = _cancel_requests(task)
            # an empty context: the callback needs none, and keeps none of the consumer's alive
            task.add_done_callback(watch.driver_done, context=Context())
    except Exception as exc:  # a task of another loop's making that takes no weak reference
        watch.driver = None
        record_error("stream:step", exc)


def stream_ended(watch: StreamWatch) -> None:
    """The watched stream's call ended: its consumer is of no more interest."""
    try:
        _forget_driver(watch)
    except Exception as exc:
        record_error("stream:end", exc)


def _forget_driver(watch: StreamWatch) -> None:
    driver = watch.driver
    watch.driver = watch.consumer_cancelled = None
    task = driver() if driver is not None else None
    if task is not None:
        task.remove_done_callback(watch.driver_done)  # equal bound methods: same watch


def _stream_dropped(watch: StreamWatch) -> None:
    # the watched generator is collected: unfinished (its call not ended), the finalizer closes it
    try:
        driver = watch.driver
        task = driver() if driver is not None else None
        if task is not None and watch.consumer_cancelled is None:
            watch.consumer_cancelled = _was_cancelled(task, watch.since)
    except Exception as exc:  # a weak reference's callback must not raise
        record_error("stream:dropped", exc)


def stream_closed_cancelled(watch: StreamWatch | None) -> bool:
    """Whether a generator's call closed now (GeneratorExit) was closed because its consumer's task
    -- the one that ran its last step (``watch``) -- was cancelled since that step: as that task
    was when the consumer let the generator go (the event loop's finalizer closes an async
    generator later, in a task of its own) or when it ended, else as it is now (``aclosing`` in it
    as it is being cancelled, a close by another task). A ``break`` out of the loop, a consumer
    that raised something else or returned, is not. With no consumer known (no watch: its steps
    ran in no task), the task closing it is asked (``task_cancelling``)."""
    if watch is not None:
        seen = watch.consumer_cancelled
        if seen is not None:
            return seen
        driver = watch.driver
        task = driver() if driver is not None else None
        if task is not None:
            return _was_cancelled(task, watch.since)
    return task_cancelling()


def _was_cancelled(task: Any, since: int) -> bool:
    """Whether ``task`` was cancelled or is being cancelled by a request made after it had ``since``
    of them: ``Task.cancelling`` counts requests until ``uncancel`` (``asyncio.timeout`` at its
    exit), also once the task is done (it caught the CancelledError)."""
    try:
        return task.cancelled() or _cancel_requests(task) > since
    except Exception:  # a task of another loop's making: not told
        return False


def _cancel_requests(task: Any) -> int:
    cancelling = getattr(task, "cancelling", None)  # None: a task of another loop's making
    return cancelling() if cancelling is not None else 0


class Call:
    """One traced call: its span and the context it sets while the method body runs."""

    __slots__ = ("site", "attrs", "span", "event", "dispatch", "write", "sent", "live", "instance",
                 "enclosing", "span_hex", "prior_span", "prior", "_otel", "_mine", "_before",
                 "_nested", "_event", "_dispatch", "_write")

    def __init__(self, site: MethodSite, attrs: dict) -> None:
        self.site = site
        self.attrs = attrs
        self.span: Any = None
        self.event: EventRef | None = None
        self.dispatch: DispatchCounter | None = None
        self.write: RoleWrite | None = None  # a deliver role's call: the write under it
        #: a dispatch in an emit: (run_id, event_type, event_id, args, kwargs), for ``end``
        self.sent: tuple | None = None
        self.live = True  # until end(): calls of the role made under it are nested
        self.instance: Any = None  # a dispatch whose role names its registry (``connections``)
        self.enclosing: Call | None = None  # an execute call: the execute call it runs inside
        self.span_hex: str | None = None  # an execute call: its span id as an emit names it
        self._otel: Any = None
        self._mine: Any = None  # the OpenTelemetry context enter() attached
        #: what it was made current over (the first enter(); see ``_Before``): None until then
        self.prior: Any = None
        self._before: _Before | None = None  # a generator's later steps: what its last one was
        self._nested: Any = None
        self._event: Any = None
        self._dispatch: Any = None
        self._write: Any = None

    def enter(self) -> None:
        try:
            # the current context's values as a plain dict: read and written at a dict's speed (a
            # Context's own methods are a subclass's), then made the Context attached
            values = {**_get_current()}
            span = self.span
            site = self.site
            execute = site.kind is _EXECUTE
            if self.prior is None:  # its first enter(): the call itself is its ``_Before``
                made_over: Call | _Before = self
                self.prior_span = values.get(_SPAN_KEY, _ABSENT)
                self.prior = values.get(_BEFORE_KEY, _ABSENT)
                if execute:
                    self.enclosing = values.get(_EXECUTION_KEY)
            else:  # a generator's next step: contexts of the steps before keep what they were over
                self._before = made_over = _Before(span, values, execute)
            values[_SPAN_KEY] = span
            values[_BEFORE_KEY] = made_over
            if execute:
                values[_EXECUTION_KEY] = self
            self._mine = mine = _Context(values)
            self._otel = _attach(mine)
            self._nested = site.role.nested.set(self)
            if self.event is not None:
                self._event = current_event.set(self.event)
            if self.dispatch is not None:
                self._dispatch = current_dispatch.set(self.dispatch)
            if self.write is not None:
                self._write = write_in_progress.set(self.write)
        except Exception as exc:
            record_error(f"enter:{self.site.function_name}", exc)

    def exit(self) -> None:
        try:
            if self._write is not None:
                write_in_progress.reset(self._write)
                self._write = None
            if self._dispatch is not None:
                current_dispatch.reset(self._dispatch)
                self._dispatch = None
            if self._event is not None:
                current_event.reset(self._event)
                self._event = None
            if self._nested is not None:
                self.site.role.nested.reset(self._nested)
                self._nested = None
            if self._otel is not None:
                token, mine = self._otel, self._mine
                self._otel = self._mine = None
                current = _get_current()
                if current is mine:
                    try:
                        _reset(token)
                    except Exception:  # as OpenTelemetry's detach would: logged, the call goes on
                        otel_context.detach(token)
                else:
                    _keep_apps_context(current, self.span)
        except Exception as exc:
            record_error(f"exit:{self.site.function_name}", exc)

    def end(self, error: BaseException | None, closed_cancelled: bool = False) -> None:
        """``closed_cancelled``: a generator's call closed (GeneratorExit, no error) because its
        consumer's task was cancelled (``stream_closed_cancelled``): an execute span says
        ``pathwatch.cancelled`` as when the CancelledError went through it."""
        self.live = False
        enclosing = self.enclosing
        if enclosing is not None:
            # a task this call started may outlive it (a pump, the next tick of a periodic job): it
            # keeps this call in its context, which would keep the calls it ran inside, and theirs,
            # each with its span -- every tick since the process started. Only the calls still
            # running around it matter to an emit (execution_of passes ended ones over, and an ended
            # call never runs again): the ended ones between are dropped
            depth = 0
            while enclosing is not None and not enclosing.live and depth < _MAX_EXECUTION_DEPTH:
                enclosing = enclosing.enclosing
                depth += 1
            self.enclosing = None if enclosing is None or not enclosing.live else enclosing
        if self.dispatch is not None:
            self.dispatch.live = False
            # likewise a send that starts the next one in a task (a relay): only the dispatch
            # calls still running around it count its writes (in_fan_out, count_write), and an
            # ended one never runs again -- the ended ones between are dropped
            outer = self.dispatch.outer
            while outer is not None and not outer.live:
                outer = outer.outer
            self.dispatch.outer = outer
            if self.sent is not None and error is None and not self.dispatch.writes:
                self._queued(self.sent)
        if self.write is not None:
            self.write.live = False
        span = self.span
        kind = self.site.kind
        by_type_only(span)  # what the app recorded on it (it was the current span): never raises
        try:
            if error is not None or kind is _DISPATCH or kind is _DELIVER:
                self._finish(span, kind, error)
            elif closed_cancelled and kind is _EXECUTE and span.is_recording():
                span.set_attribute(attr.CANCELLED, True)  # nothing raised: its status stays
        except Exception as exc:
            record_error(f"end:{self.site.function_name}", exc)
        # a task the call started keeps the call in its context: not the instance nor the
        # arguments of a dispatch that raised, past its end
        self.instance = self.sent = None
        try:
            span.end()
        except Exception as exc:
            record_error(f"end:{self.site.function_name}", exc)
        # what a task it started keeps of it: no ended call before it (none: nothing to pass over)
        made_over: Call | _Before | None = self._before
        if made_over is None:
            made_over = self  # never entered: its prior is None
        else:
            self._before = None
        kind_before = made_over.prior.__class__
        if kind_before is Call or kind_before is _Before:
            try:
                _compact(made_over)
            except Exception as exc:
                record_error(f"end:{self.site.function_name}", exc)

    def _queued(self, sent: tuple) -> None:
        """The dispatch wrote nothing itself (it queued its message for a writer task, or found no
        socket): the emit it sent is told its message (``PendingEmits.sent``)."""
        self.sent = None
        try:
            run_id, event_type, event_id, args, kwargs = sent
            pending_emits.sent(run_id, event_type, event_id, _message_content(args, kwargs))
        except Exception as exc:
            record_error(f"end:{self.site.function_name}", exc)

    def _finish(self, span: Any, kind: str, error: BaseException | None) -> None:
        if not span.is_recording():
            return
        failed = error is not None
        # its task cancelled while it ran (the run cancelled, a timeout around it): the app stopped
        # it, nothing failed; what it did not write is judged by its event's deadline
        cancelled = failed and isinstance(error, CancelledError)
        if kind is _DISPATCH:
            writes = self.dispatch.writes if self.dispatch is not None else 0
            span.set_attribute(attr.DISPATCH_WRITES, writes)
            if not failed:
                outcome = DeliveryOutcomes.WRITTEN if writes else DeliveryOutcomes.NO_CONNECTION
            elif cancelled:
                outcome = DeliveryOutcomes.CANCELLED
            elif not writes and self._recipient_missing(error):
                outcome = DeliveryOutcomes.NO_CONNECTION  # its lookup of the recipient found none
            else:
                outcome = DeliveryOutcomes.FAILED
            span.set_attribute(attr.DELIVERY_OUTCOME, outcome)
        elif kind is _DELIVER:
            # a write that hit a closed socket is "closed" also when the role swallowed the error
            closed = ((self.write is not None and self.write.closed)
                      or (failed and isinstance(error, closed_errors())))
            span.set_attribute(attr.DELIVERY_OUTCOME,
                               DeliveryOutcomes.CLOSED if closed else DeliveryOutcomes.CANCELLED
                               if cancelled else DeliveryOutcomes.FAILED if failed
                               else DeliveryOutcomes.WRITTEN)
        elif cancelled and kind is _EXECUTE:
            # the app stopped the run (its user cancelled it, its socket closed): the events it did
            # not get to are not owed (delivery.missing_required_events)
            span.set_attribute(attr.CANCELLED, True)
        if failed:
            mark_app_error(span, error)

    def _recipient_missing(self, error: BaseException | None) -> bool:
        """The dispatch raised ``KeyError`` of its own recipient: a registry of sockets by user
        (``sockets[user_id]``) had no entry for them, so they had no connection. The key is compared
        as a user id, by its pseudonym with the span's ``pathwatch.user.target``. When the role
        names its registry (``connections``), only if that registry has no entry for the key: with
        one, the error came from another table keyed by the user (their settings)."""
        if not isinstance(error, KeyError) or len(error.args) != 1:
            return False
        target = self.attrs.get(attr.USER_TARGET)
        if target is None:
            return False
        key = error.args[0]
        try:
            if state.pseudonymize(key) != target:
                return False
        except Exception:  # a key that cannot be read as a user id is not one
            return False
        chains = self.site.registry_chains
        return not chains or not _registered(self.instance, chains, key)
