"""Wrapping the path map's classes when their modules are imported.

A post-import hook per module (``wrapt.register_post_import_hook``) fires when the module is
imported, or at once when it already was, so modules imported before or after ``instrument()`` are
covered; a module still being imported when its hook fires (``instrument()`` called at its top, or
from a module it imports) has none of its classes yet: its hooks run once its import ends. For each
class the path map names, every matching method gets a ``wrapt.FunctionWrapper`` (sync, async,
generator and async-generator methods, classmethods, staticmethods; signatures and introspection
stay intact). Subclasses are covered through an ``__init_subclass__`` hook installed on each listed
class (plus a scan of the subclasses that exist already): their own overrides are wrapped too.
Every patch is recorded and ``uninstall`` puts back the very objects that were there.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import sys
import threading
import types
import weakref
from collections.abc import Callable
from typing import Any

import wrapt

from instrumentation.errors import PathMapError, record_error
from instrumentation.forks import in_forked_child
from instrumentation.identity import instances
from instrumentation.pathmap import (CONSTRUCTORS, PathMap, ResolvedClass, RoleSpec,
                                     attribute_names)
from instrumentation.runtime import state
from instrumentation.sites import (Call, MethodSite, RoleRuntime, StreamWatch, capture_owner,
                                   stream_closed_cancelled, stream_ended, stream_stepped,
                                   watch_stream)

_logger = logging.getLogger(__name__)
_MISSING = object()
#: subclasses of wrapped classes that are not in the path map and are wrapped as they are defined.
#: A wrapped class is kept for the life of the instrumentation (its patches are undone at
#: uninstall), so classes made on the fly (``type(...)`` per request) are capped: beyond the cap
#: they run unwrapped and the first one is reported (counted in the heartbeat's error total).
MAX_UNLISTED_SUBCLASSES = 10_000

# wrapt cannot unregister a hook: one trampoline per module name, forever, calling the callbacks
# registered now (instrument/uninstrument cycles add and remove callbacks, never hooks)
_hooked_modules: set[str] = set()
_callbacks: dict[str, dict[str, Callable[[Any], None]]] = {}
_hook_lock = threading.RLock()
_active: Instrumentation | None = None
_get_asyncgen_hooks = sys.get_asyncgen_hooks
_set_asyncgen_hooks = sys.set_asyncgen_hooks


def _dispatch_import(module: Any) -> None:
    if _initializing(module) and _after_its_import(module):
        return
    for callback in list(_callbacks.get(module.__name__, {}).values()):
        try:
            callback(module)
        except Exception as exc:  # a hook must never break the import it follows
            record_error(f"hook:{module.__name__}", exc)


# --- a module still being imported: its hooks run once its import ends --------------------------------
# A hook fires at once for a module in sys.modules, and a module is there from the start of its
# import: instrument() called at the top of a module the path map lists (a single-file app), or from
# a module it imports (the app's bootstrap), found none of its classes and left it unwrapped. The
# import system marks such a module's spec ``_initializing`` and resets that flag in a ``finally``
# once the module's code has run (importlib._bootstrap._load_unlocked, 3.11 to 3.13), in the
# importing thread, under the module's import lock, before the importer gets the module: the spec
# is given a subclass of its class whose ``_initializing`` setter runs the hooks at that reset.
_after_import: dict[str, tuple[Any, Any]] = {}  # module name -> (module, spec) whose import goes on
_watching_classes: dict[type, type] = {}  # a spec class -> its subclass that sees the end of the import


def _initializing(module: Any) -> bool:
    """Whether ``module`` is still being imported (as the import system itself tells)."""
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _after_its_import(module: Any) -> bool:
    """Run the hooks of ``module`` once its import ends; False when that cannot be watched (the
    hooks then run now: a class not defined yet is reported, with the cause and the remedy)."""
    spec = module.__spec__
    with _hook_lock:
        pending = _after_import.get(spec.name)
        if pending is not None and pending[1] is spec:
            return True  # its hooks run then, every one registered by that time
        try:
            spec_class = type(spec)
            watching = _watching_classes.get(spec_class)
            if watching is None:
                watching = type(spec_class.__name__, (spec_class,), {
                    "__module__": spec_class.__module__, "__qualname__": spec_class.__qualname__,
                    "_initializing": property(_spec_initializing, _spec_set_initializing),
                    "_pathwatch_spec_class": spec_class})
                _watching_classes[spec_class] = watching
            spec.__class__ = watching
        except Exception:  # a spec whose class cannot be changed: a class not defined yet is then
            # reported by the path map, saying the module was still being imported and what to do
            _logger.debug("pathwatch: the end of the import of %s cannot be watched", spec.name,
                          exc_info=True)
            return False
        _after_import[spec.name] = (module, spec)
    if not spec.__dict__.get("_initializing", False):
        _import_ended(spec)  # it ended (in another thread) before the spec was watched
    return True


def _spec_initializing(spec: Any) -> bool:
    return spec.__dict__.get("_initializing", False)


def _spec_set_initializing(spec: Any, value: bool) -> None:
    spec.__dict__["_initializing"] = value
    if not value:
        try:
            _import_ended(spec)
        except Exception as exc:  # the import it follows must never break
            record_error(f"hook:{getattr(spec, 'name', '?')}", exc)


def _import_ended(spec: Any) -> None:
    """The import of a watched module ended: its hooks run, or, when it failed (the module is out of
    sys.modules again), they are registered for its next import."""
    with _hook_lock:
        original = getattr(type(spec), "_pathwatch_spec_class", None)
        if original is not None:
            spec.__class__ = original
        pending = _after_import.get(spec.name)
        if pending is None or pending[1] is not spec:
            return  # handled already (the importing thread and the one watching, both at the end)
        del _after_import[spec.name]
        module = pending[0]
        if sys.modules.get(spec.name) is None:
            wrapt.register_post_import_hook(_dispatch_import, spec.name)
            return
    _dispatch_import(module)


def on_module_import(module_name: str, key: str, callback: Callable[[Any], None]) -> None:
    """Run ``callback(module)`` when ``module_name`` is imported, or now if it already is."""
    with _hook_lock:
        _callbacks.setdefault(module_name, {})[key] = callback
        if module_name not in _hooked_modules:
            _hooked_modules.add(module_name)
            wrapt.register_post_import_hook(_dispatch_import, module_name)  # fires now if imported
            return
    module = sys.modules.get(module_name)
    if module is not None:
        _dispatch_one(module, callback)


def _dispatch_one(module: Any, callback: Callable[[Any], None]) -> None:
    if _initializing(module) and _after_its_import(module):
        return  # every callback registered by the end of its import runs then
    try:
        callback(module)
    except Exception as exc:
        record_error(f"hook:{module.__name__}", exc)


def remove_import_callback(module_name: str, key: str) -> None:
    with _hook_lock:
        _callbacks.get(module_name, {}).pop(key, None)


class _Patch:
    __slots__ = ("cls", "name", "original", "replacement")

    def __init__(self, cls: type, name: str, original: Any, replacement: Any) -> None:
        self.cls = cls
        self.name = name
        self.original = original  # the object that was in cls.__dict__, or _MISSING
        self.replacement = replacement


class Instrumentation:
    """The wrapping of one path map; at most one is active in a process."""

    def __init__(self, pathmap: PathMap) -> None:
        self.pathmap = pathmap
        self.roles = {name: RoleRuntime(spec) for name, spec in pathmap.roles.items()}
        self._patches: list[_Patch] = []
        self._class_roles: dict[type, RoleRuntime] = {}  # every class handled, listed or subclass
        self._unlisted = 0  # subclasses wrapped because a base is (see MAX_UNLISTED_SUBCLASSES)
        self._listed: dict[type, RoleRuntime] = {}  # classes wrapped for their own path-map entry
        #: every path-map entry found naming a class, from every module imported so far: an alias or
        #: a re-export in another module names the same class object (one role is chosen from all)
        self._entries: dict[type, list[ResolvedClass]] = {}
        self._clashed: set[type] = set()  # named by two roles: left untraced (logged once)
        self._lock = threading.RLock()
        self.sites: list[MethodSite] = []
        _instrumentations.add(self)

    # --- lifecycle ---------------------------------------------------------------------------------
    def install(self) -> None:
        global _active
        _active = self
        for module_name in sorted(self.pathmap.modules()):
            on_module_import(module_name, "pathmap", self.on_import)  # fires now if already imported

    def uninstall(self) -> None:
        global _active
        with self._lock:
            if _active is self:
                _active = None
            for role in self.roles.values():
                role.live = False  # its wrappers the app still holds: see _through_live
            for module_name in self.pathmap.modules():
                remove_import_callback(module_name, "pathmap")
            for patch in reversed(self._patches):
                try:
                    if patch.cls.__dict__.get(patch.name) is not patch.replacement:
                        continue  # someone re-patched it since: leave their object alone
                    if patch.original is _MISSING:
                        delattr(patch.cls, patch.name)
                    else:
                        setattr(patch.cls, patch.name, patch.original)
                except Exception as exc:
                    record_error(f"unwrap:{patch.cls.__qualname__}.{patch.name}", exc)
            self._patches.clear()
            self._class_roles.clear()
            self._listed.clear()
            self._entries.clear()
            self._clashed.clear()
            self._unlisted = 0

    def classes_by_role(self) -> dict[str, list[type]]:
        """Role name -> the classes wrapped for an entry of their own (not plain subclasses)."""
        with self._lock:
            listed = list(self._listed.items())
        classes: dict[str, list[type]] = {}
        for cls, role in listed:
            classes.setdefault(role.name, []).append(cls)
        return classes

    # --- hooks ---------------------------------------------------------------------------------------
    def on_import(self, module: Any) -> None:
        """Post-import hook: wrap the module's classes. Never raises into the importing code."""
        with self._lock:  # the entries of other modules are read and written (another thread's import)
            # a bad entry leaves out only what it names: the module's other classes, and a class's
            # other methods, are wrapped (one typo must not hide the implementations named right)
            skipped: list[PathMapError] = []
            missing: list[tuple[type, PathMapError]] = []
            try:
                plans = self._plan(self.pathmap.matches(module, skipped), missing)
            except Exception as exc:
                record_error(f"hook:{module.__name__}", exc)
                return
            for error in skipped:
                record_error(f"pathmap:{module.__name__}:{error.key_path}", message=(
                    f"{error} (that entry is left out; the module's other entries are wrapped)"))
            for cls, error in missing:
                record_error(f"pathmap:{cls.__module__}.{cls.__qualname__}:{error.key_path}",
                             message=f"{error} (its other methods are wrapped)")
            for cls, chosen, error in sorted(plans, key=lambda p: len(p[0].__mro__)):  # bases first
                try:
                    self.wrap_listed(cls, chosen, error)
                except Exception as exc:
                    record_error(f"wrap:{cls.__module__}.{cls.__qualname__}", exc)

    def _plan(self, matches: list[ResolvedClass], missing: list[tuple[type, PathMapError]]
              ) -> list[tuple[type, list[ResolvedClass], PathMapError | None]]:
        """The role of each class a module's entries name, chosen with the entries other modules gave
        (an alias ``aliases.E`` of ``engines.UserEngine``): (class, entries it plays, error). An exact
        method name a class named by this module's entries lacks is added to ``missing`` (class,
        error): the class is wrapped with the methods it has."""
        by_class: dict[type, list[ResolvedClass]] = {}
        for entry in matches:
            by_class.setdefault(entry.cls, []).append(entry)
        plans = []
        for cls, new in by_class.items():
            entries = list(self._entries.get(cls, ()))
            entries += [entry for entry in new if entry not in entries]
            chosen, error = self.pathmap.choose(entries)
            for entry in chosen:
                if entry in new:
                    missing.extend((cls, error) for error in self.pathmap.missing_methods(entry))
            plans.append((cls, entries, chosen, error))
        for cls, entries, _, _ in plans:
            self._entries[cls] = entries
        return [(cls, chosen, error) for cls, _, chosen, error in plans]

    def on_subclass(self, subclass: type) -> None:
        try:
            with self._lock:
                role = next((self._class_roles[base] for base in subclass.__mro__[1:]
                             if base in self._class_roles), None)
                if role is not None and subclass not in self._class_roles:
                    if self._unlisted >= MAX_UNLISTED_SUBCLASSES:
                        record_error("subclass:limit", message=(
                            f"more than {MAX_UNLISTED_SUBCLASSES} subclasses of wrapped classes: "
                            f"{subclass.__qualname__} and later ones are left unwrapped"))
                        return
                    self._wrap_plain(subclass, role)
        except Exception as exc:
            record_error(f"subclass:{subclass.__qualname__}", exc)

    # --- wrapping ------------------------------------------------------------------------------------
    def wrap_listed(self, cls: type, chosen: list[ResolvedClass], error: PathMapError | None) -> None:
        """Wrap ``cls`` for the role its entries give it (``chosen``), or leave it untraced when two
        roles name it (``error``). Entries found later (another module's alias) may change that: a
        class wrapped already is unwrapped first."""
        with self._lock:
            current = self._listed.get(cls)
            if error is not None:
                if cls not in self._clashed:
                    self._clashed.add(cls)
                    record_error(f"pathmap:ambiguous:{cls.__module__}.{cls.__qualname__}",
                                 message=str(error))
                if current is not None:  # as if it had never been listed:
                    listed_subclasses = self._unlist(cls)
                    self.on_subclass(cls)  # a plain subclass of a wrapped base, if it has one
                    for subclass in listed_subclasses:
                        self._rewrap(subclass)
                    for subclass in sorted(_all_subclasses(cls), key=lambda k: len(k.__mro__)):
                        self.on_subclass(subclass)
                return
            role = self.roles[chosen[0].role.name]
            listed_subclasses: list[type] = []
            if current is not None and current is not role:
                # a glob's role until now: an exact entry (an alias in another module) wins
                listed_subclasses = self._unlist(cls)
                current = None
            for item in chosen:
                # by the name the path map gives it (an alias ``E = UserEngine`` is canonical as
                # ``aliases.E``); the class object is then canonical under any of its names
                if item.text == item.role.canonical:
                    role.canonical_classes.add(cls)
                if item.text in item.role.retired:
                    role.retired_classes.add(cls)
            if current is not None:
                role.add_class_code(cls)  # refresh cached type facts
                return
            if cls in self._class_roles:
                # wrapped as a plain subclass when it was defined (of another role's class, or of
                # its own role's, without the methods it inherits from unlisted bases): its own
                # entry in the path map wins
                self._unwrap_class(cls)
            self._listed[cls] = role
            try:
                self._wrap_class(cls, role, listed=True)
            except _Refused as refused:  # left untraced as a whole (rolled back): as if not listed
                del self._listed[cls]
                role.canonical_classes.discard(cls)
                role.retired_classes.discard(cls)
                entry = self.pathmap.error(chosen[0].ref.key_path, refused.describe(cls))
                record_error(f"wrap:{cls.__module__}.{cls.__qualname__}", refused.error,
                             message=f"{entry} (that entry is left out; the module's other entries "
                                     "are wrapped)")
                for subclass in listed_subclasses:
                    self._rewrap(subclass)
                return
            for subclass in sorted(_all_subclasses(cls), key=lambda k: len(k.__mro__)):
                if subclass in self._listed:
                    continue
                if subclass in self._class_roles:
                    # wrapped as a plain subclass of a base of another role (a listed base of
                    # ``cls`` wrapped first, or ``cls`` itself while it was a plain subclass): its
                    # nearest listed base is now ``cls``, whose role its own methods take (as
                    # ``_unlist`` does the other way)
                    if self._class_roles[subclass] is role or self._nearest_listed(subclass) is not cls:
                        continue
                    self._unwrap_class(subclass)
                self._wrap_plain(subclass, role)
            for subclass in listed_subclasses:
                self._rewrap(subclass)

    def _unlist(self, cls: type) -> list[type]:
        """Undo the wrapping of a listed class, and of the plain subclasses wrapped for its role;
        return its listed subclasses (by depth), whose wrapping depended on its role."""
        role = self._listed.pop(cls)
        role.canonical_classes.discard(cls)
        role.retired_classes.discard(cls)
        subclasses = _all_subclasses(cls)
        for subclass in subclasses:
            if subclass in self._class_roles and subclass not in self._listed and \
                    self._nearest_listed(subclass, cls) is cls:
                self._unwrap_class(subclass)
        self._undo_patches(cls)
        del self._class_roles[cls]
        return sorted((k for k in subclasses if k in self._listed), key=lambda k: len(k.__mro__))

    def _nearest_listed(self, subclass: type, also: type | None = None) -> type | None:
        """The first class after ``subclass`` in its MRO that is listed (or is ``also``)."""
        return next((k for k in subclass.__mro__[1:] if k in self._listed or k is also), None)

    def _rewrap(self, cls: type) -> None:
        """Wrap a listed class again (a base of it changed role: what it inherits is wrapped anew)."""
        role = self._listed[cls]
        self._undo_patches(cls)
        try:
            self._wrap_class(cls, role, listed=True)
        except _Refused as refused:
            del self._listed[cls]
            role.canonical_classes.discard(cls)
            role.retired_classes.discard(cls)
            record_error(f"wrap:{cls.__module__}.{cls.__qualname__}", refused.error,
                         message=f"{refused.describe(cls)} (it is left untraced)")

    def _wrap_plain(self, cls: type, role: RoleRuntime) -> None:
        """Wrap a subclass of a wrapped class that the path map does not list, or leave it untraced
        as a whole when its class refuses a patch (logged once, counted)."""
        try:
            self._wrap_class(cls, role, listed=False)
        except _Refused as refused:
            record_error(f"wrap:{cls.__module__}.{cls.__qualname__}", refused.error,
                         message=f"{refused.describe(cls)} (a subclass of a wrapped class: it is "
                                 "left untraced)")
            return
        self._unlisted += 1

    def _wrap_class(self, cls: type, role: RoleRuntime, listed: bool) -> None:
        """Wrap ``cls`` for ``role`` as a whole or not at all: a patch its class refuses (a
        metaclass whose ``__setattr__`` raises, a read-only class) undoes every one made before it,
        and ``_Refused`` is raised with nothing of the class recorded as wrapped."""
        patches, sites, codes = len(self._patches), len(self.sites), role.code_mark()
        self._class_roles[cls] = role
        try:
            self._wrap_class_methods(cls, role, listed)
            if listed:
                self._install_subclass_hook(cls)
        except Exception as exc:
            refused = exc if isinstance(exc, _Refused) else _Refused("", exc)
            for patch in reversed(self._patches[patches:]):
                try:
                    if patch.original is _MISSING:
                        delattr(cls, patch.name)
                    else:
                        setattr(cls, patch.name, patch.original)
                except Exception as undo_error:  # noqa: PERF203 - a rare path
                    record_error(f"unwrap:{cls.__qualname__}.{patch.name}", undo_error)
            del self._patches[patches:]
            del self.sites[sites:]
            role.forget_class_code(cls, codes)
            del self._class_roles[cls]
            raise refused from exc

    def _wrap_class_methods(self, cls: type, role: RoleRuntime, listed: bool) -> None:
        role.add_class_code(cls)
        spec = role.spec
        for name in _method_names(cls, spec):
            mro = cls.__mro__
            holder = next((k for k in mro if name in k.__dict__), None)
            if holder is None:
                continue
            if holder is not cls and (not listed or self._class_roles.get(holder) is role):
                # inherited from a class wrapped for this role (or, for a subclass, from any base):
                # its wrapper traces the call. One wrapped for another role is wrapped again here,
                # for this class's role: the call is this class's (the other role's span is not
                # made, see _InheritedMethodWrapper)
                continue
            # the class whose own method runs: past the classes holding only pathwatch's patch of a
            # method they inherit (a listed class of another role between this one and the base)
            defining = next((k for k in mro[mro.index(holder):] if name in k.__dict__
                             and not isinstance(k.__dict__[name], _InheritedMethodWrapper)), holder)
            self._wrap_method(cls, defining, name, role)
        if spec.user_scoped and spec.extractors["owner"]:
            self._wrap_init(cls, listed)

    def _wrap_method(self, cls: type, defining: type, name: str, role: RoleRuntime) -> None:
        descriptor = _original(defining.__dict__[name])
        function = _function_of(descriptor)
        if not callable(function) or isinstance(function, type):
            return  # a class defined on the class (``class Error(Exception)``, ``factory = dict``)
        site = MethodSite(role, cls, defining, name, descriptor)
        wrapper = FunctionWrapperFactory.for_function(function, site)
        if defining is cls:
            self._patch(cls, name, _MethodWrapper(descriptor, wrapper, name, site))
        else:  # inherited: looked up past ``cls`` at each use (see _InheritedMethodWrapper)
            self._patch(cls, name, _InheritedMethodWrapper(descriptor, wrapper, name, cls, site))
        self.sites.append(site)

    def _wrap_init(self, cls: type, listed: bool) -> None:
        defining = next(k for k in cls.__mro__ if "__init__" in k.__dict__)
        if defining is object or (defining is not cls and (
                not listed or self._class_roles.get(defining) is self._class_roles[cls])):
            return  # captured by the base's wrapper, for this role; another role's is passed over
        chains = self._class_roles[cls].owner_chains
        original = _original(defining.__dict__["__init__"])
        if defining is cls:
            self._patch(cls, "__init__", _InitWrapper(original, _owner_capture(chains)))
        else:
            self._patch(cls, "__init__", _InheritedInitWrapper(original, _owner_capture(chains), cls))

    def _install_subclass_hook(self, cls: type) -> None:
        original = cls.__dict__.get("__init_subclass__", _MISSING)
        on_subclass = _subclass_trampoline

        def __init_subclass__(subclass: type, **kwargs: Any) -> None:
            if original is _MISSING:
                super(cls, subclass).__init_subclass__(**kwargs)
            else:
                original.__get__(None, subclass)(**kwargs)
            on_subclass(subclass)

        self._patch(cls, "__init_subclass__", classmethod(__init_subclass__))

    def _unwrap_class(self, cls: type) -> None:
        """Undo what wrapping ``cls`` as a plain subclass did (its own patches and sites)."""
        self._undo_patches(cls)
        del self._class_roles[cls]
        self._unlisted -= 1

    def _undo_patches(self, cls: type) -> None:
        for patch in reversed([p for p in self._patches if p.cls is cls]):
            if patch.original is _MISSING:
                delattr(cls, patch.name)
            else:
                setattr(cls, patch.name, patch.original)
        self._patches = [p for p in self._patches if p.cls is not cls]
        self.sites = [site for site in self.sites if site.owner_class is not cls]

    def _patch(self, cls: type, name: str, replacement: Any) -> None:
        original = _original(cls.__dict__.get(name, _MISSING))
        try:
            setattr(cls, name, replacement)
        except Exception as exc:
            raise _Refused(name, exc) from exc
        self._patches.append(_Patch(cls, name, original, replacement))


class _Refused(Exception):
    """A class refused being wrapped: setting ``name`` on it raised ``error`` (its type alone is
    told: its message is the app's)."""

    def __init__(self, name: str, error: BaseException) -> None:
        super().__init__(name)
        self.name = name
        self.error = error

    def describe(self, cls: type) -> str:
        name = f"{cls.__module__}.{cls.__qualname__}"
        error = type(self.error).__name__
        if not self.name:  # pathwatch's own failure
            return (f"{name} cannot be wrapped: an internal error ({error}); nothing of it is "
                    "wrapped")
        return (f"{name} cannot be wrapped: setting {self.name!r} on it raised {error} (its "
                "metaclass or its class refuses the change); nothing of it is wrapped")


def _subclass_trampoline(subclass: type) -> None:
    active = _active
    if active is not None:
        active.on_subclass(subclass)


def _all_subclasses(cls: type) -> list[type]:
    found: list[type] = []
    stack = list(type.__subclasses__(cls))
    while stack:
        sub = stack.pop()
        if sub not in found:
            found.append(sub)
            stack.extend(type.__subclasses__(sub))
    return found


def _method_names(cls: type, spec: RoleSpec) -> list[str]:
    names = []
    for name in attribute_names(cls):
        if name in CONSTRUCTORS or not spec.method_matches(name):
            continue
        names.append(name)
    return names


def _owner_capture(chains: tuple[tuple[str, ...], ...]) -> Callable[..., Any]:
    """__init__ wrapper: after the constructor returns, read the owner and remember it."""

    def capture(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        result = wrapped(*args, **kwargs)
        if state.on and instance is not None:
            try:
                entry = instances.entry(instance)
                if entry is not None:
                    capture_owner(instance, chains, entry)
            except Exception as exc:
                try:
                    record_error(f"owner:{type(instance).__qualname__}", exc)
                except RecursionError:  # the app's stack is at its limit: its object still returns
                    pass
        return result
    return capture


class FunctionWrapperFactory:
    """Closure factories: one wrapper per method kind, built once per (class, method)."""

    @staticmethod
    def for_function(function: Any, site: MethodSite) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(function):
            return _async_generator_wrapper(site)
        if inspect.iscoroutinefunction(function):
            return _coroutine_wrapper(site)
        if inspect.isgeneratorfunction(function):
            # a generator-based coroutine (``@types.coroutine``) is awaited: its traced generator
            # must be awaitable too
            awaitable = _has_code_flag(function, inspect.CO_ITERABLE_COROUTINE)
            return _generator_wrapper(site, awaitable)
        return _sync_wrapper(site)


class _BoundMethodType(type):
    """The metaclass of :class:`_BoundMethod`, for one call only: ``weakref.WeakMethod`` remakes the
    method it holds as ``type(method)(function, instance)``, which wrapt's constructor (seven
    arguments) refuses. wrapt itself builds every bound method through ``_make_bound`` (``type.__call__``
    of the class), which skips this Python ``__call__``: ``instance.method`` costs what it did."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 2 and not kwargs:
            return _rebind(*args)
        return super().__call__(*args, **kwargs)


class _BoundMethod(wrapt.BoundFunctionWrapper, metaclass=_BoundMethodType):
    """``instance.method`` (or ``Class.method``) of a wrapped method. A plain bound method pickles
    and copies as "this attribute of that object", a function as "this attribute of that class";
    wrapt's proxy refuses both (``NotImplementedError``), which would break apps that keep
    ``self.handlers = {"x": self.on_x}`` and copy, pickle or hand them to a process pool.
    ``weakref.WeakMethod(instance.method)`` works too (see :class:`_BoundMethodType`)."""

    def _self_is_function(self) -> bool:
        """Reached as a plain function: a staticmethod, or a method taken from the class."""
        binding = self._self_binding
        return binding == "staticmethod" or (self._self_instance is None and binding != "classmethod")

    def _self_rebind(self) -> tuple[Any, str]:
        if self._self_is_function():
            holder = self._self_owner
        elif self._self_binding == "classmethod":
            holder = self.__self__  # the class
        else:
            # the instance it was read from: a method's __self__, and what a descriptor binding to
            # itself (Python 3.13's functools.partial) has none of
            holder = self._self_instance
        return holder, self._self_parent._self_attribute

    def __reduce_ex__(self, protocol: int) -> tuple:
        return getattr, self._self_rebind()

    def __copy__(self) -> Any:
        return self

    def __deepcopy__(self, memo: dict) -> Any:
        if self._self_is_function() or self._self_binding == "classmethod":
            return self  # functions and classes are not copied either
        instance, name = self._self_rebind()
        return getattr(copy.deepcopy(instance, memo), name)

    def __repr__(self) -> str:
        """As the app's own method or function reads (``<bound method Engine.run of <...>>``,
        ``<function Engine.run at 0x...>``), not wrapt's ``<_BoundMethod at 0x... for method at
        0x...>``: handlers and callbacks are logged by their repr (asyncio's debug mode, the app's
        own logs)."""
        return repr(self.__wrapped__)


#: builds a _BoundMethod with wrapt's C constructor, past _BoundMethodType.__call__ (the hot path)
_make_bound = type.__call__.__get__(_BoundMethod)


def _rebind(function: Any, instance: Any) -> Any:
    """``_BoundMethod(function, instance)``: what ``weakref.WeakMethod`` calls to remake the method
    it holds. The method the instance's class has under the function's name, when it is a wrapper of
    that very function (traced as before); otherwise the plain bound method
    ``types.MethodType(function, instance)``, which is what WeakMethod remakes without pathwatch."""
    try:
        name = getattr(function, "__name__", None)
        if type(name) is str:
            for holder in ((instance, type(instance)) if isinstance(instance, type) else (type(instance),)):
                value = next((k.__dict__[name] for k in holder.__mro__ if name in k.__dict__), None)
                if isinstance(value, _MethodWrapper):
                    bound = (value.__get__(None, instance) if holder is instance
                             else value.__get__(instance, holder))
                    if getattr(bound, "__func__", None) is function \
                            and getattr(bound, "__self__", None) is instance:
                        return bound
    except Exception as exc:
        record_error(f"rebind:{getattr(function, '__qualname__', '?')}", exc)
    return types.MethodType(function, instance)


#: the bindings whose object read from the class is, without pathwatch, the function itself
_FUNCTION_BINDINGS = frozenset({"function", "staticmethod"})


def _bind(descriptor: Any, instance: Any, wrapper: Callable[..., Any], enabled: Any, binding: str,
          parent: Any, owner: Any = _MISSING) -> Any:
    """wrapt's binding of a wrapped method (its ``__bound_function_wrapper__``): a new bound method
    for an instance, as Python makes one (``engine.run``); read from the class (``Engine.run``), a
    function or staticmethod is one object, as the function is without pathwatch, so
    ``Engine.run is Engine.run``, ``type(engine).run is Engine.run`` for a subclass that does not
    override it, and a weak reference to it lives as long as the class. A callable descriptor of
    another kind (an object with ``__call__`` and ``__get__``) whose binding is not callable (its
    ``__get__`` returns a value, not a method) is that value, as without pathwatch: there is no call
    to trace, and a proxy of it is not it (``type()``, ``is``, ``json.dumps``)."""
    if binding == "callable" and not callable(descriptor):
        return descriptor
    if instance is not None or (binding not in _FUNCTION_BINDINGS
                                and not _binds_to_itself(binding, descriptor, parent)):
        if owner is _MISSING:  # a wrapt whose bound wrappers take no owner
            return _make_bound(descriptor, instance, wrapper, enabled, binding, parent)
        return _make_bound(descriptor, instance, wrapper, enabled, binding, parent, owner)
    return _unbound(parent, descriptor, wrapper, enabled, binding,
                    () if owner is _MISSING else (owner,))


def _binds_to_itself(binding: str, descriptor: Any, parent: Any) -> bool:
    """A callable descriptor read from the class as itself, as a function is:
    ``functools.lru_cache`` and ``functools.cache`` around a method (``Engine.run is Engine.run``
    unwrapped), Python 3.13's ``functools.partial`` and bound method. Read as one object too
    (``_unbound``)."""
    return binding != "classmethod" and descriptor is parent.__wrapped__


def _unbound(parent: Any, function: Any, wrapper: Callable[..., Any], enabled: Any, binding: str,
             owner: tuple) -> Any:
    """The one object ``parent`` (a method wrapper) is read as from a class, made at the first read,
    bound to the class that holds ``parent`` (not a subclass it was read from, which it would keep
    alive); made anew when the function found is another (a base patched later)."""
    bound = parent._self_unbound
    if bound is None or bound.__wrapped__ is not function:
        if owner and isinstance(owner[0], type):
            name = parent._self_attribute
            owner = (next((k for k in owner[0].__mro__ if k.__dict__.get(name) is parent),
                          owner[0]),)
        bound = parent._self_unbound = _make_bound(function, None, wrapper, enabled, binding,
                                                   parent, *owner)
    return bound


class _MethodWrapper(wrapt.FunctionWrapper):
    __bound_function_wrapper__ = staticmethod(_bind)

    def __init__(self, descriptor: Any, wrapper: Callable[..., Any], attribute: str,
                 site: MethodSite | None = None) -> None:
        super().__init__(descriptor, wrapper)
        self._self_attribute = attribute  # the name it is reached by on the class (aliases differ)
        self._self_site = site
        self._self_unbound: Any = None  # what it is read as from a class (see _bind)

    # A callable class attribute that does not bind (a builtin such as ``len``, a functools.partial,
    # an object with ``__call__`` and no ``__get__``) is read, from the class or an instance, as this
    # wrapper itself -- wrapt's proxy refuses pickle and copy (``NotImplementedError``), where the
    # app's object pickles and copies. It pickles as "this attribute of that class" (what it is read
    # as there: the class is pickled by reference), and copies as itself, as a function does.
    def __reduce_ex__(self, protocol: int) -> tuple:
        site = self._self_site
        if site is None:  # not installed on a class (an alternate's binding probe): as wrapt's
            return super().__reduce_ex__(protocol)
        return getattr, (site.owner_class, self._self_attribute)

    def __copy__(self) -> Any:
        return self

    def __deepcopy__(self, memo: dict) -> Any:
        return self

    def __repr__(self) -> str:
        """As the app's own object reads: a callable class attribute that does not bind (``len``, a
        ``functools.partial``) is read as this wrapper itself, and handlers are logged by their repr
        (not wrapt's ``<_MethodWrapper at 0x... for builtin_function_or_method at 0x...>``)."""
        return repr(self.__wrapped__)


class _InitWrapper(wrapt.FunctionWrapper):
    """An ``__init__`` wrapped to capture the owner. Bound as a wrapped method is (:func:`_bind`):
    ``Engine.__init__`` is one object, which a weak reference keeps, and it and ``engine.__init__``
    pickle, copy and read (repr) as the app's own."""

    __bound_function_wrapper__ = staticmethod(_bind)

    def __init__(self, descriptor: Any, wrapper: Callable[..., Any]) -> None:
        super().__init__(descriptor, wrapper)
        self._self_attribute = "__init__"  # as _MethodWrapper's (what _BoundMethod pickles by)
        self._self_unbound: Any = None  # what it is read as from a class (see _bind)


#: the size of an inherited wrapper's table of the other methods it has met (see _alternate)
MAX_INHERITED_ALTERNATES = 64
_bind_wrapped = wrapt.FunctionWrapper.__get__  # wrapt's own binding (the captured descriptor)


def _bound_takes_owner() -> bool:
    """wrapt's bound wrappers take the owner class (a seventh argument) since its 2.x releases."""
    try:
        wrapt.BoundFunctionWrapper(len, None, len, None, "builtin", None, object)
    except TypeError:
        return False
    return True


_OWNER_ARG = _bound_takes_owner()


class _InheritedMethodWrapper(_MethodWrapper):
    """A method a listed class inherits from an unlisted base, or from a listed class of another role,
    wrapped on the listed class (for its own role: the other role's wrapper is passed over, see
    :func:`_past_other_roles`).

    Installed in the listed class's ``__dict__``, a copy of ``Base.<name>`` would come first in the
    lookup of every subclass, before a class that a subclass's MRO places between the listed class and
    the base (``class Retrying(Engine, RetryMixin)`` with ``RetryMixin(Base)`` overriding the method):
    that cooperative override would never run. So the wrapper resolves its target at each lookup as
    ``super(listed class, instance or class).<name>`` -- exactly what the lookup would have found
    without it (and a base patched later is seen too). The usual target is traced by the wrapper
    built at wrap time (one identity check); another one gets a wrapper of its own kind and a site of
    its own (built once, kept in a small table); an attribute that is not a method (``None``, a
    property's value) is returned as it is. Methods defined on the listed class itself keep the
    plain :class:`_MethodWrapper`: this path costs only the inherited ones."""

    def __init__(self, descriptor: Any, wrapper: Callable[..., Any], attribute: str, listed: type,
                 site: MethodSite) -> None:
        super().__init__(descriptor, wrapper, attribute, site)
        # a function, classmethod or staticmethod is recognised by the function under what super()
        # returns; other descriptors (singledispatchmethod, ...) return a new object at each binding
        simple = isinstance(descriptor, (types.FunctionType, classmethod, staticmethod))
        self._self_resolve = (listed, attribute, _function_of(descriptor) if simple else _MISSING,
                              wrapper, self._self_binding)
        self._self_alternates: dict[int, tuple[Any, tuple[Callable[..., Any], str] | None]] = {}

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        listed, name, function, wrapper, binding = self._self_resolve
        try:
            after = super(listed, owner if instance is None else instance)  # type: ignore[arg-type]
        except TypeError:  # bound to an object that is not one of the listed class's
            return _bind_wrapped(self, instance, owner)
        target = getattr(after, name)  # raises what the unwrapped lookup raises
        if function is _MISSING or getattr(target, "__func__", target) is not function:
            try:
                alternate = self._alternate(instance, owner)
            except Exception as exc:
                record_error(f"inherited:{listed.__qualname__}.{name}", exc)
                alternate = None
            if alternate is None or not callable(target):
                return target  # what it binds to is not a method (a descriptor's value): as it is
            wrapper, binding = alternate
        if type(target) is _BoundMethod:
            target = _past_other_roles(target, self._self_site)
            if type(target) is _BoundMethod:
                return target  # another listed class's wrapper of this role, further on in the MRO
        owners = (owner,) if _OWNER_ARG else ()
        if instance is None and wrapper is self._self_resolve[3] and (
                binding in _FUNCTION_BINDINGS or _binds_to_itself(binding, target, self)):
            return _unbound(self, target, wrapper, None, binding, owners)
        return _make_bound(target, instance, wrapper, None, binding, self, *owners)

    def _alternate(self, instance: Any, owner: Any) -> tuple[Callable[..., Any], str] | None:
        """The wrapper of the attribute found past the listed class when it is not the base's method
        the wrapper was built for; None: leave it unwrapped."""
        listed, name = self._self_resolve[0], self._self_resolve[1]
        start = owner if instance is None else type(instance)
        if not isinstance(start, type) or listed not in start.__mro__:
            start = instance.__class__  # what super() used (an object reporting another class)
        mro = start.__mro__
        raw: Any = _MISSING
        for defining in mro[mro.index(listed) + 1:]:
            raw = defining.__dict__.get(name, _MISSING)
            if raw is not _MISSING:
                break
        else:
            return None
        if _original(raw) is self.__wrapped__:  # the base's own method (a descriptor binding to new
            # objects), or another role's wrapper of it
            return self._self_resolve[3], self._self_resolve[4]
        alternates = self._self_alternates
        known = alternates.get(id(raw))
        if known is not None and known[0] is raw:
            return known[1]
        if len(alternates) >= MAX_INHERITED_ALTERNATES:
            record_error("inherited:limit", message=(
                f"more than {MAX_INHERITED_ALTERNATES} methods override {listed.__qualname__}.{name} "
                "past it: the later ones run untraced"))
            return None
        site = self._self_site
        descriptor = _original(raw)
        function = _function_of(descriptor)
        alternate: tuple[Callable[..., Any], str] | None
        if isinstance(raw, _MethodWrapper) and raw._self_site is not None \
                and raw._self_site.role is site.role:  # type: ignore[union-attr]
            alternate = None  # wrapped for this very role already: one span
        elif not callable(function) or isinstance(function, type):
            alternate = None  # not a method: as it is
        else:
            other = MethodSite(site.role, listed, defining, name, descriptor)  # type: ignore[union-attr]
            wrapper = FunctionWrapperFactory.for_function(function, other)
            alternate = (wrapper, _MethodWrapper(descriptor, wrapper, name)._self_binding)
        alternates[id(raw)] = (raw, alternate)  # the key is kept alive with it
        return alternate


def _past_other_roles(bound: _BoundMethod, site: MethodSite | None) -> Any:
    """``bound`` (made by a pathwatch wrapper found past a listed class in the MRO) without the
    wrappers of other roles: a listed class of one role that inherits a method from a listed class
    of another role (``class ChatSupervisor(UserExecutionEngine)``) makes one span, of its own role,
    around the base's function -- the base's wrapper would make a second one, of the base's role.
    Returned as it is when a wrapper of ``site``'s role is met: two listed classes of one role in one
    MRO (``class Both(Engine, Other)``, or a listed subclass of a listed class) that both inherit a
    method -- the first one's super() lookup meets the second one's wrapper, whose bound method
    forwards ``__func__`` to the base's function; wrapping it again made two spans."""
    target: Any = bound
    while type(target) is _BoundMethod:
        parent = target._self_parent
        other = parent._self_site if isinstance(parent, _MethodWrapper) else None
        if other is not None and site is not None and other.role is site.role:
            return target
        target = target.__wrapped__
    return target


class _InheritedInitWrapper(_InitWrapper):
    """An ``__init__`` the listed class inherits, wrapped on it to capture the owner: resolved at each
    use past the listed class, as :class:`_InheritedMethodWrapper` does (a cooperative ``__init__``
    between the listed class and its base in a subclass's MRO still runs)."""

    def __init__(self, descriptor: Any, wrapper: Callable[..., Any], listed: type) -> None:
        super().__init__(descriptor, wrapper)
        self._self_resolve = (listed, self._self_binding)

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        listed, binding = self._self_resolve
        try:
            after = super(listed, owner if instance is None else instance)  # type: ignore[arg-type]
        except TypeError:
            return _bind_wrapped(self, instance, owner)
        init = after.__init__
        # a base's capture (of another role: those of this role are not wrapped again) is passed
        # over: the instance's owner is read through this class's owner paths, once
        while isinstance(init, wrapt.BoundFunctionWrapper) and isinstance(init._self_parent, _InitWrapper):
            init = init.__wrapped__
        owners = (owner,) if _OWNER_ARG else ()
        if instance is None:  # a base's function, or a builtin's slot (``dict.__init__``): one object
            return _unbound(self, init, self._self_wrapper, None, binding, owners)
        return _make_bound(init, instance, self._self_wrapper, None, binding, self, *owners)


def _function_of(descriptor: Any) -> Any:
    """The function under a method descriptor (its kind says which wrapper it takes)."""
    if isinstance(descriptor, (functools.singledispatchmethod, functools.partialmethod)):
        return descriptor.func
    return getattr(descriptor, "__func__", descriptor)


def _original(value: Any) -> Any:
    """The app's own object under pathwatch's wrappers. A class rebuilt from a wrapped class's
    namespace (``@dataclass(slots=True)`` makes a new class from the old one's ``__dict__``) holds
    our wrappers already: they are wrapped afresh for it, never twice."""
    while isinstance(value, (_MethodWrapper, _InitWrapper)):
        value = value.__wrapped__
    return value


#: what a sync method may return that is still to run
_DEFERRED = frozenset({types.CoroutineType, types.GeneratorType, types.AsyncGeneratorType})
#: what a ``@contextlib.contextmanager`` / ``@asynccontextmanager`` method returns: its generator,
#: made by the call, runs later (at the ``with`` block's entry and exit)
_GENERATOR_CONTEXT_MANAGERS = frozenset({contextlib._GeneratorContextManager,
                                         contextlib._AsyncGeneratorContextManager})
_DEFERRABLE = _DEFERRED | _GENERATOR_CONTEXT_MANAGERS
_getrefcount = sys.getrefcount
_getweakrefcount = weakref.getweakrefcount


def _refcount_of_a_local() -> int:
    value = object()
    return _getrefcount(value)


#: sys.getrefcount of an object that only a local variable holds (as a wrapper's ``result``)
_SOLE = _refcount_of_a_local()


def _sync_wrapper(site: MethodSite) -> Callable[..., Any]:
    want_caller = site.wants_caller
    role = site.role

    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        if not state.on:
            return wrapped(*args, **kwargs)
        if not role.live:  # held by the app past its instrumentation's end
            return _through_live(site, wrapped, instance, args, kwargs)
        try:
            call = site.start(instance, args, kwargs, want_caller=want_caller)
        except RecursionError:  # no frame left for pathwatch: the app's call still goes on
            call = None
        if call is None:
            return wrapped(*args, **kwargs)
        call.enter()
        try:
            result = wrapped(*args, **kwargs)
        except BaseException as exc:
            call.exit()
            call.end(exc)
            raise
        call.exit()
        # nobody else holds it, not even weakly (a WeakSet of the app's live streams, a
        # WeakKeyDictionary keyed by it: the object handed out must be that very one)
        kind = type(result)
        if kind in _DEFERRABLE and _getrefcount(result) == _SOLE and not _getweakrefcount(result):
            if kind in _DEFERRED:
                return _defer(call, result)
            return _defer_context_manager(call, result)
        call.end(None)
        return result
    return wrapper


def _through_live(site: MethodSite, wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
    """A call of a wrapper whose instrumentation was uninstalled, that the app still holds: a method
    it took before ``uninstrument()`` (a handler table, a route, a callback), or a decorator it put
    around the wrapped method then (``Engine.run = retry(Engine.run)``). The call goes through the
    wrapper the running instrumentation put on the same class for the same function, when there is
    one: traced once, as the method read now is (its role, its nesting). Otherwise -- pathwatch's
    wrapper there wraps something else, the app's decorator that calls this one -- it is passed
    through: that wrapper traces the call."""
    try:
        live = _live_binding(site, wrapped, instance)
    except Exception as exc:
        record_error(f"stale:{site.function_name}", exc)
        live = None
    if live is None:
        return wrapped(*args, **kwargs)
    return live(*args, **kwargs)


def _live_binding(site: MethodSite, wrapped: Any, instance: Any) -> Any:
    """The running instrumentation's wrapper on the class ``site`` wraps, bound as ``wrapped`` was,
    when it calls the function ``wrapped`` calls; None when there is none."""
    holder = site.owner_class
    current = holder.__dict__.get(site.method)
    live_site = current._self_site if isinstance(current, _MethodWrapper) else None
    if live_site is None or not live_site.role.live:
        return None
    if site.is_static or instance is None:
        bound = current.__get__(None, holder)
    elif site.is_classmethod:
        bound = current.__get__(None, instance)
    else:
        bound = current.__get__(instance, type(instance))
    if bound is current:  # a callable that does not bind: read as the wrapper itself
        target = current.__wrapped__
    elif type(bound) is _BoundMethod:
        target = bound.__wrapped__
    else:
        return None
    function = _underlying(wrapped)
    return bound if function is not None and _underlying(target) is function else None


def _underlying(callable_: Any) -> Any:
    """The function a bound method, a function, or wrapt's partial of a function read from the class
    and called with its instance, calls."""
    kind = type(callable_)
    if kind is types.MethodType:
        return callable_.__func__
    if kind is types.FunctionType:
        return callable_
    return getattr(callable_, "__wrapped__", callable_)


def _defer(call: Call, result: Any) -> Any:
    """The rest of a sync method's call that returned a coroutine, generator or async generator it
    made for its caller (a sync decorator around an ``async def``): the call goes on until that one
    finishes (its outcome, its error) and its context is set while it runs, through a traced
    coroutine or generator driving it. Only one that nobody else holds, not even weakly (the wrapper's
    reference is the only one): the traced one's close or collection closes it."""
    try:
        kind = type(result)
        if kind is types.GeneratorType and result.gi_code.co_flags & inspect.CO_ITERABLE_COROUTINE:
            call.end(None)  # a ``@types.coroutine`` generator is awaited: left as it is
            return result
        started = _started(result)
        if started and kind is not types.GeneratorType:
            call.end(None)  # a coroutine or async generator stepped already: left as it is
            return result
        pending = _Pending(result, call)
        if kind is types.CoroutineType:
            traced = _traced_coroutine(pending, None)
        elif kind is types.GeneratorType:
            watched: list[StreamWatch | None] = []
            traced = _traced_generator(pending, None, watched, primed=started)
            watched.append(watch_stream(call.site, traced))
            if started:
                # primed (``next(gen)`` before returning it: the classic priming ``@coroutine``
                # decorator): the caller's first step is a ``send(value)``, which an unstarted
                # generator refuses -- the traced one is primed too, without stepping the app's
                next(traced)
        else:
            watched = []
            traced = _traced_async_generator(pending, None, watched)
            watched.append(watch_stream(call.site, traced))
        traced.__name__, traced.__qualname__ = result.__name__, result.__qualname__
        return traced
    except Exception as exc:
        record_error(f"defer:{call.site.function_name}", exc)
        call.end(None)
        return result


def _defer_context_manager(call: Call, manager: Any) -> Any:
    """The rest of a call that returned a ``@contextmanager`` / ``@asynccontextmanager`` context
    manager it made: the call goes on until its generator finishes (the ``with`` block's exit), its
    context set while the generator runs (its setup and teardown, not the block: the caller's), as
    for a generator it returned (``_defer``). The manager is handed out as it is, driving the
    traced generator in place of the app's (``manager.gen``); only when nobody else holds that
    generator."""
    try:
        generator = manager.__dict__.get("gen")
        deferrable = type(generator) in _DEFERRED and not _getweakrefcount(generator) \
            and _getrefcount(generator) == _SOLE + 1  # here and in the manager only
    except Exception as exc:
        record_error(f"defer:{call.site.function_name}", exc)
        deferrable = False
    if not deferrable:
        call.end(None)
        return manager
    traced = _defer(call, generator)  # ends the call itself when it hands it out as it is
    if traced is not generator:
        manager.gen = traced
    return manager


def _started(result: Any) -> bool:
    """Whether a generator, coroutine or async generator has run a step already (or finished)."""
    if type(result) is types.GeneratorType:
        return result.gi_frame is None or result.gi_suspended
    if type(result) is types.CoroutineType:
        return result.cr_frame is None or result.cr_suspended
    frame = result.ag_frame
    if frame is None:
        return True
    suspended = getattr(result, "ag_suspended", None)  # Python 3.12
    # 3.11: a frame not run yet stands at its first instruction
    return suspended if suspended is not None else frame.f_lasti > 0


def _coroutine_wrapper(site: MethodSite) -> Callable[..., Any]:
    want_caller = site.wants_caller
    role = site.role

    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        if not state.on:
            return wrapped(*args, **kwargs)
        if not role.live:  # held by the app past its instrumentation's end
            return _through_live(site, wrapped, instance, args, kwargs)
        # the caller is the frame that calls the method, not whoever awaits the coroutine later
        try:
            caller = site.caller(2) if want_caller else None  # the wrapper's caller
        except RecursionError:  # no frame left for pathwatch: as in _sync_wrapper
            caller = None
        # made here: a wrong argument raises the app's TypeError at the call, as unwrapped
        coroutine = wrapped(*args, **kwargs)
        traced = _traced_coroutine(_Pending(coroutine, None), (site, instance, args, kwargs, caller))
        try:  # named as the app's: "coroutine 'Engine.run' was never awaited", reprs, debuggers
            traced.__name__, traced.__qualname__ = coroutine.__name__, coroutine.__qualname__
        except AttributeError:  # an awaitable that is not a coroutine
            pass
        return traced
    return wrapper


async def _traced_coroutine(pending: _Pending, begin: tuple | None) -> Any:
    """Awaits the app's coroutine. ``begin`` (site, instance, args, kwargs, caller): the call starts
    at the first step; None: ``pending`` holds the call started already (see _defer)."""
    coroutine, call = pending.take()
    if begin is not None:
        site, instance, args, kwargs, caller = begin
        try:
            call = site.start(instance, args, kwargs, caller)
        except RecursionError:  # no frame left for pathwatch: as in _sync_wrapper
            call = None
        if call is None:
            return await coroutine
    call.enter()
    try:
        result = await coroutine
    except BaseException as exc:
        call.exit()
        call.end(exc)
        raise
    call.exit()
    call.end(None)
    return result


class _Pending:
    """The app's coroutine or generator (with the call started for it, if any) until the traced one
    takes it at its first step. The traced one may never start (a task cancelled before its first
    step, ``close()``, dropped): the call then ends, and the app's coroutine is closed with it, as an
    unwrapped coroutine closed unstarted is, instead of being collected unstarted (a second
    "coroutine ... was never awaited")."""

    __slots__ = ("value", "call")

    def __init__(self, value: Any, call: Call | None) -> None:
        self.value = value
        self.call = call

    def take(self) -> tuple[Any, Any]:
        value, call = self.value, self.call
        self.value = self.call = None
        return value, call

    def __del__(self) -> None:
        value, call = self.value, self.call
        try:
            if call is not None:
                call.end(None)
            if type(value) is types.CoroutineType:
                value.close()
        except Exception:  # noqa: S110 - a finalizer must not raise; close() of a new one cannot
            pass


def _generator_wrapper(site: MethodSite, awaitable: bool = False) -> Callable[..., Any]:
    want_caller = site.wants_caller
    role = site.role
    traced_generator = _traced_iterable_coroutine if awaitable else _traced_generator

    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        if not state.on:
            return wrapped(*args, **kwargs)
        if not role.live:  # held by the app past its instrumentation's end
            return _through_live(site, wrapped, instance, args, kwargs)
        try:
            caller = site.caller(2) if want_caller else None  # the wrapper's caller
        except RecursionError:  # no frame left for pathwatch: as in _sync_wrapper
            caller = None
        # made here (no code of it runs yet): a wrong argument raises at the call, as unwrapped
        generator = wrapped(*args, **kwargs)
        # one awaited (``@types.coroutine``) is not watched: a cancellation goes through it
        watched: list[StreamWatch | None] = []
        traced = traced_generator(generator, (site, instance, args, kwargs, caller), watched)
        if not awaitable:
            watched.append(watch_stream(site, traced))
        try:
            traced.__name__, traced.__qualname__ = generator.__name__, generator.__qualname__
        except AttributeError:  # an iterator that is not a generator
            pass
        return traced
    return wrapper


def _traced_generator(source: Any, begin: tuple | None, watched: list[StreamWatch | None],
                      primed: bool = False) -> Any:
    """Drives the app's generator as its consumer drives this one. ``begin`` (site, instance, args,
    kwargs, caller): ``source`` is the generator and the call starts at the first step (the span
    covers the iteration); None: ``source`` is the _Pending of a call started already. ``watched``:
    [the watch on this generator's consumer (``watch_stream``)], filled by its maker, or empty.
    ``primed``: the app's generator has run its first step already; this one's first step yields
    None without stepping it (``_defer`` takes that step), so the consumer's first ``send``
    reaches it.

    Every send and throw reaches the generator and its answer is followed -- GeneratorExit too: an
    explicit throw(GeneratorExit) may be caught and answered with a value, and close() then fails as
    it would unwrapped ("generator ignored GeneratorExit"). ``yield from`` would close it instead."""
    if begin is None:
        generator, call = source.take()
    else:
        generator = source
        site, instance, args, kwargs, caller = begin
        try:
            call = site.start(instance, args, kwargs, caller)
        except RecursionError:  # no frame left for pathwatch: as in _sync_wrapper
            call = None
    watch = watched[0] if call is not None and watched and call.span.is_recording() else None
    error: BaseException | None = None
    closed_cancelled = False  # closed (GeneratorExit) because its consumer's task was cancelled
    try:
        sent: Any = None
        thrown: BaseException | None = None
        while True:
            if primed:
                primed, item = False, None
            else:
                if call is not None:
                    # a close (GeneratorExit thrown in) is no step of a consumer's
                    if watch is not None and not isinstance(thrown, GeneratorExit):
                        stream_stepped(watch)
                    call.enter()  # context is set per step only: between steps the consumer runs
                try:
                    item = generator.send(sent) if thrown is None else generator.throw(thrown)
                except StopIteration as stop:
                    return stop.value
                finally:
                    if call is not None:
                        call.exit()
            try:
                sent, thrown = (yield item), None
            except BaseException as exc:
                sent, thrown = None, exc
    except GeneratorExit:
        closed_cancelled = call is not None and stream_closed_cancelled(watch)
        generator.close()  # finished already, unless GeneratorExit came from elsewhere
        raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        if call is not None:
            if watch is not None:
                stream_ended(watch)
            call.end(error, closed_cancelled)


def _has_code_flag(function: Any, flag: int) -> bool:
    """Whether the code under ``function`` has ``flag``, found as ``inspect.isgeneratorfunction``
    finds it (through partials and bound methods)."""
    while isinstance(function, functools.partial):
        function = function.func
    code = getattr(getattr(function, "__func__", function), "__code__", None)
    return isinstance(code, types.CodeType) and bool(code.co_flags & flag)


def _iterable_coroutine(function: Any) -> Any:
    """A copy of the generator function ``function`` whose generators can be awaited, as those of a
    ``@types.coroutine`` generator function are (the copy: ``types.coroutine`` changes the function
    it is given)."""
    code = function.__code__
    copy = types.FunctionType(code.replace(co_flags=code.co_flags | inspect.CO_ITERABLE_COROUTINE),
                              function.__globals__, function.__name__, function.__defaults__,
                              function.__closure__)
    copy.__qualname__ = function.__qualname__
    return copy


#: ``_traced_generator`` for a ``@types.coroutine`` method: what it hands out is awaited
_traced_iterable_coroutine = _iterable_coroutine(_traced_generator)


def _async_generator_wrapper(site: MethodSite) -> Callable[..., Any]:
    want_caller = site.wants_caller
    role = site.role

    def wrapper(wrapped: Any, instance: Any, args: tuple, kwargs: dict) -> Any:
        if not state.on:
            return wrapped(*args, **kwargs)
        if not role.live:  # held by the app past its instrumentation's end
            return _through_live(site, wrapped, instance, args, kwargs)
        try:
            caller = site.caller(2) if want_caller else None  # the wrapper's caller
        except RecursionError:  # no frame left for pathwatch: as in _sync_wrapper
            caller = None
        # made here (no code of it runs yet): a wrong argument raises at the call, as unwrapped
        generator = wrapped(*args, **kwargs)
        watched: list[StreamWatch | None] = []
        traced = _traced_async_generator(generator, (site, instance, args, kwargs, caller), watched)
        watched.append(watch_stream(site, traced))
        try:
            traced.__name__, traced.__qualname__ = generator.__name__, generator.__qualname__
        except AttributeError:
            pass
        return traced
    return wrapper


async def _traced_async_generator(source: Any, begin: tuple | None,
                                  watched: list[StreamWatch | None]) -> Any:
    """As _traced_generator: every asend and athrow (GeneratorExit too) reaches the app's generator.
    ``watched``: [the watch on this generator's consumer (``watch_stream``)], filled by its
    maker."""
    if begin is None:
        generator, call = source.take()
    else:
        generator = source
        site, instance, args, kwargs, caller = begin
        try:
            call = site.start(instance, args, kwargs, caller)
        except RecursionError:  # no frame left for pathwatch: as in _sync_wrapper
            call = None
    watch = watched[0] if call is not None and watched and call.span.is_recording() else None
    error: BaseException | None = None
    closed_cancelled = False  # closed (GeneratorExit) because its consumer's task was cancelled
    started = False
    try:
        sent: Any = None
        thrown: BaseException | None = None
        while True:
            if call is not None:
                # a close (GeneratorExit thrown in) is no step of a consumer's
                if watch is not None and not isinstance(thrown, GeneratorExit):
                    stream_stepped(watch)
                call.enter()
            try:
                if thrown is not None:
                    step = generator.athrow(thrown)
                elif started:
                    step = generator.asend(sent)
                else:
                    step, started = _first_asend(generator), True
                item = await step
            except StopAsyncIteration:
                return
            finally:
                if call is not None:
                    call.exit()
            try:
                sent, thrown = (yield item), None
            except BaseException as exc:
                sent, thrown = None, exc
    except GeneratorExit:
        # a bare ``async for`` cancelled between two steps: closed by the event loop, in a task of
        # its own, once its consumer let it go (``StreamWatch``)
        closed_cancelled = call is not None and stream_closed_cancelled(watch)
        await generator.aclose()  # finished already, unless GeneratorExit came from elsewhere
        raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        if call is not None:
            if watch is not None:
                stream_ended(watch)
            call.end(error, closed_cancelled)


def _first_asend(generator: Any) -> Any:
    """The first ``asend`` of the app's async generator, made without the thread's ``firstiter``
    hook. An event loop's hook registers every async generator at its first step, to close it at
    shutdown (``loop.shutdown_asyncgens()`` closes them all at once); the app's generator, registered
    beside the wrapper that drives it, would be closed twice concurrently -- the wrapper's close of it
    found it running ("aclose(): asynchronous generator is already running", logged by asyncio). Only
    the wrapper is registered then, and its close closes the app's generator. The ``finalizer`` hook
    is kept: one collected unfinished is still closed by the loop. Hooks are per thread and nothing
    runs between setting them and putting them back (the hooks are read when ``asend`` is called)."""
    firstiter = _get_asyncgen_hooks().firstiter
    if firstiter is None:
        return generator.asend(None)
    _set_asyncgen_hooks(firstiter=None)
    try:
        return generator.asend(None)
    finally:
        _set_asyncgen_hooks(firstiter=firstiter)


#: every Instrumentation alive, for the fork handler (an uninstalled one may still be uninstalled again)
_instrumentations: weakref.WeakSet[Instrumentation] = weakref.WeakSet()


@in_forked_child
def _after_fork_in_child() -> None:
    """``os.fork()``: new locks in the child, whose only thread is this one. Another thread of the
    parent inside a hook registration or a class's wrapping (``on_subclass``, ``wrap_listed``) at
    the fork held them, and would never release them here: the child hung at its first definition
    of a subclass of a wrapped class, or its first instrument()/import of a path-map module."""
    global _hook_lock
    _hook_lock = threading.RLock()
    for instrumentation in list(_instrumentations):
        instrumentation._lock = threading.RLock()


def active() -> Instrumentation | None:
    return _active
