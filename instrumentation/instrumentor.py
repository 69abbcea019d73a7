"""The instrumentor: load the path map, switch wrapping, request spans, exporting and heartbeats on and off."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Collection
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor

from instrumentation import attributes as attr
from instrumentation import fastapi as _fastapi
from instrumentation import transport as _transport
from instrumentation.errors import (ConfigurationError, PathMapError, PathwatchError,
                                    instrumentation_error_count)
from instrumentation.exporting import (DEFAULT_HEARTBEAT_S, SHUTDOWN_TIMEOUT_MILLIS, ExportSetup,
                                       Heartbeat, configure, drops, endpoint_problem,
                                       no_exporter_message, sdk_exports_to, shown_endpoint)
from instrumentation.forks import in_forked_child
from instrumentation.identity import (Pseudonymizer, build_header_scrubbers, build_request_ids,
                                      build_request_identity, build_scope_resolver,
                                      build_socket_identity, query_param_names)
from instrumentation.linking import pending_emits
from instrumentation.pathmap import PathMap
from instrumentation.runtime import (SDK_VERSION, TRACER_NAME, MessageKeys, do_nothing, is_enabled,
                                     set_enabled, state)
from instrumentation.shutdown import flush_at_app_shutdown
from instrumentation.wrapping import Instrumentation, on_module_import, remove_import_callback


_logger = logging.getLogger(__name__)
instrument_app = _fastapi.instrument_app


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


class PathwatchInstrumentor(BaseInstrumentor):
    """OpenTelemetry instrumentor: ``PathwatchInstrumentor().instrument(pathmap=...)``.

    Keyword arguments of ``instrument`` (all optional; the environment fills the gaps):
    ``pathmap`` (path or ``PathMap``), ``tracer_provider``, ``endpoint`` (export over OTLP/gRPC with
    pathwatch's own processor), ``check_imports``, ``heartbeat_interval_s``, ``request_spans``
    (have the FastAPI instrumentation make server spans; default true), ``pseudonymizer``.
    """

    _wrapping: Instrumentation | None = None
    _heartbeat: Heartbeat | None = None
    _export: ExportSetup | None = None
    _tracer_provider: Any = None
    #: BaseInstrumentor checks its instrumented flag, then sets it once done, without a lock, and
    #: this class is a singleton: two threads starting pathwatch at once both got through, and the
    #: second overwrote the first's heartbeat, exporter and wrapping, which then ran for good (every
    #: span exported twice). instrument() and uninstrument() run one at a time, the flag read under
    #: the lock; reentrant, so that a call made from inside one is told apart (``_changing``) and
    #: ignored, never a deadlock. The settings are read and the path map's modules imported
    #: (check_imports) before the lock is taken (``_prepare``): a module of the path map that
    #: another thread was importing, and that starts pathwatch itself, waited for the lock while the
    #: thread holding it waited for that module -- a deadlock Python's import system cannot see. A
    #: start or stop made from inside those imports (a module starting pathwatch) is ignored as well
    _lifecycle = threading.RLock()
    _changing = False

    def instrumentation_dependencies(self) -> Collection[str]:
        return ()  # pathwatch wraps whatever the path map names; FastAPI/Starlette only if present

    def instrument(self, **kwargs: Any) -> Any:
        """As ``BaseInstrumentor.instrument``, one call at a time: a second one, also from another
        thread at the same moment, is the warned no-op it is when made afterwards."""
        if getattr(_preparing, "active", False):
            return _ignored("instrument")
        if not self._is_instrumented_by_opentelemetry:  # else the warned no-op: nothing to read
            kwargs = {**kwargs, _PREPARED: _prepare(kwargs)}
        return self._one_at_a_time(super().instrument, "instrument", kwargs)

    def uninstrument(self, **kwargs: Any) -> Any:
        if getattr(_preparing, "active", False):
            return _ignored("uninstrument")
        return self._one_at_a_time(super().uninstrument, "uninstrument", kwargs)

    def _one_at_a_time(self, change: Any, name: str, kwargs: dict[str, Any]) -> Any:
        with PathwatchInstrumentor._lifecycle:
            if PathwatchInstrumentor._changing:  # this thread, inside instrument()/uninstrument()
                return _ignored(name)
            PathwatchInstrumentor._changing = True
            try:
                return change(**kwargs)
            finally:
                PathwatchInstrumentor._changing = False

    def _instrument(self, **kwargs: Any) -> None:
        prepared = kwargs.get(_PREPARED)
        if prepared is None:  # BaseInstrumentor.instrument called directly
            prepared = _read_settings(kwargs)
        elif isinstance(prepared, BaseException):
            raise prepared  # what reading the settings raised, now that pathwatch would start
        pathmap, pseudonymizer, interval = prepared
        http_user = build_scope_resolver(pathmap.model.identity.http)
        http_identity = build_request_identity(pathmap.model.identity.http)
        websocket_user = build_scope_resolver(pathmap.model.identity.websocket)
        websocket_identity = build_socket_identity(pathmap.model.identity.websocket)
        sources = [*pathmap.model.identity.http, *pathmap.model.identity.websocket]
        identity_headers = build_header_scrubbers(sources)
        identity_params, request_ids = query_param_names(sources), build_request_ids(sources)
        tracer_provider = kwargs.get("tracer_provider")
        endpoint = kwargs.get("endpoint", os.environ.get("PATHWATCH_OTLP_ENDPOINT"))
        # only the zero-code start is second-guessed: the endpoint from the environment, the SDK's
        # global provider configured (by opentelemetry-instrument) from the same environment
        sdk_endpoint = (sdk_exports_to(endpoint)
                        if endpoint and "endpoint" not in kwargs and tracer_provider is None
                        and isinstance(trace.get_tracer_provider(), SdkTracerProvider) else None)
        if sdk_endpoint is not None:
            _logger.warning("pathwatch: the OpenTelemetry SDK already exports spans to %s "
                            "(OTEL_TRACES_EXPORTER=otlp): no second exporter to %s, which would send "
                            "every span twice. Set OTEL_TRACES_EXPORTER=none to export through "
                            "pathwatch's own (it counts its drops exactly)", sdk_endpoint, endpoint)
        elif endpoint:
            self._export = configure(endpoint, tracer_provider=tracer_provider)
            tracer_provider = self._export.provider
        drops.install()
        self._tracer_provider = tracer_provider  # None: the global one

        # the key id on the scope: every span of this tracer carries it at no cost per span, and the
        # tracer of the next instrument() (a rotated key) is another scope
        tracer = trace.get_tracer(TRACER_NAME, SDK_VERSION, tracer_provider,
                                  attributes={attr.PSEUDONYM_KEY_ID: pseudonymizer.key_id})
        # the ids and the tracer of the key that made them as one object: a span started while
        # this runs in another thread takes both from the old setting or both from this one
        state.setting = (pseudonymizer, tracer)
        state.tracer = tracer
        state.pseudonymizer = pseudonymizer  # the function and the enduser key as one setting
        state.pseudonymize = pseudonymizer.fast
        messages = pathmap.model.messages
        state.messages = MessageKeys(messages.event_type, messages.run_id, messages.event_id)
        state.http_user = http_user
        state.http_identity = http_identity
        state.websocket_user = websocket_user
        state.websocket_identity = websocket_identity
        state.identity_headers = identity_headers
        state.identity_params = identity_params
        state.request_ids = request_ids
        state.active = True
        state.refresh()

        self._wrapping = Instrumentation(pathmap)
        self._wrapping.install()
        on_module_import("starlette.websockets", "transport", _transport.on_websockets_import)
        request_spans = kwargs.get("request_spans", True)
        on_module_import("fastapi.applications", "fastapi",
                         lambda module: _fastapi.on_fastapi_import(
                             module, request_spans=request_spans, tracer_provider=tracer_provider))
        # through pathwatch's own processor when it exports (its queue, its drop counting; not the
        # app's other exporters, which would hold a trace as long as the process), else through the
        # provider's processors (the SDK's own exporter to the sidecar)
        self._heartbeat = Heartbeat(interval, tracer_provider, processor=(
            self._export.processor if self._export is not None else None))
        self._heartbeat.start()
        state.at_app_startup = self._at_app_startup
        state.at_app_shutdown = self._at_app_shutdown

    def _at_app_startup(self) -> None:
        """The app has started (its ASGI lifespan startup ended): a module of the path map it has not
        imported is most likely misspelled (``engine.SlowEngine``), its classes never wrapped, and
        the import hook that checks an entry never fires for it. Named here, with its line; a module
        the app imports later (lazily) is wrapped then all the same. And an ``arg.NAME`` path no
        wrapped method of its role takes (a misspelled parameter), which no import hook checks.
        The periodic heartbeat goes on if an earlier shutdown's final one paused it (a test
        client's next cycle: the process serves again)."""
        if self._heartbeat is not None:
            self._heartbeat.resume()
        wrapping = self._wrapping
        if wrapping is None:
            return
        pathmap = wrapping.pathmap
        first: dict[str, Any] = {}
        for role in pathmap.roles.values():
            for ref in role.implementations:
                if ref.module not in sys.modules:
                    first.setdefault(ref.module, ref)
        if first:
            where = "; ".join(str(pathmap.error(ref.key_path, f"{ref.text}: module {module} not imported"))
                              for module, ref in first.items())
            _logger.warning("pathwatch: the app started without importing %d module(s) of the path "
                            "map: %s. Their classes make no spans until the app imports them (a "
                            "misspelled module? PATHWATCH_CHECK_IMPORTS=1 imports every module at "
                            "start and fails naming one that cannot be)", len(first), where)
        # an arg.NAME no wrapped method takes never resolves (check_imports refuses it): of the roles
        # whose modules are all imported, whose classes are all known
        classes = {name: listed for name, listed in wrapping.classes_by_role().items()
                   if not pathmap.roles[name].modules & first.keys()}
        for problem in pathmap.parameter_problems(classes):
            _logger.warning("pathwatch: %s: that path resolves on no call (found when the app "
                            "started; PATHWATCH_CHECK_IMPORTS=1 refuses to start on it)", problem)

    def _at_app_shutdown(self) -> None:
        """The app's ASGI lifespan shutdown: a final heartbeat, and what pathwatch's exporter and the SDK's
        own hold sent, within ``SHUTDOWN_TIMEOUT_MILLIS`` in all (``shutdown.flush_at_app_shutdown``).
        uvicorn ends its process by the SIGTERM it stopped on (re-raised after its shutdown), so no
        atexit handler runs: without this, what was queued was lost without a word. Nothing is
        stopped: the process may serve again (a test client)."""
        flush_at_app_shutdown(self._heartbeat, self._export, self._tracer_provider,
                              SHUTDOWN_TIMEOUT_MILLIS)

    def _uninstrument(self, **kwargs: Any) -> None:
        state.active = False
        state.refresh()
        state.at_app_startup = state.at_app_shutdown = do_nothing
        if self._heartbeat is not None:
            self._heartbeat.stop()  # the final heartbeat, while spans still flow
            self._heartbeat = None
        if self._export is not None:
            # what is queued is exported, within SHUTDOWN_TIMEOUT_MILLIS also with the sidecar down
            # or hung (what is left then is counted as dropped): the app's shutdown is not held
            self._export.shutdown()
            self._export = None
        self._tracer_provider = None
        if self._wrapping is not None:
            self._wrapping.uninstall()
            self._wrapping = None
        remove_import_callback("starlette.websockets", "transport")
        remove_import_callback("fastapi.applications", "fastapi")
        _transport.uninstall()
        _fastapi.uninstall()
        pending_emits.clear()

    @property
    def wrapping(self) -> Instrumentation | None:
        return self._wrapping

    @property
    def heartbeat(self) -> Heartbeat | None:
        return self._heartbeat


#: the keyword argument ``instrument`` passes ``_instrument`` what ``_prepare`` read (or raised)
_PREPARED = "_pathwatch_prepared"
#: set while this thread reads the settings and imports the path map's modules, outside the lock
_preparing = threading.local()


def _ignored(name: str) -> None:
    _logger.warning("pathwatch: %s() called while pathwatch is being started or stopped in "
                    "this thread (by a module it imports?): ignored", name)
    return None


def _prepare(kwargs: dict[str, Any]) -> tuple[PathMap, Pseudonymizer, float] | Exception:
    """``_read_settings`` before the lifecycle lock is taken; what it raises is returned, to be raised
    by ``_instrument`` -- only if pathwatch is not started meanwhile (a second start stays a no-op)."""
    _preparing.active = True
    try:
        return _read_settings(kwargs)
    except Exception as exc:
        return exc
    finally:
        _preparing.active = False


def _read_settings(kwargs: dict[str, Any]) -> tuple[PathMap, Pseudonymizer, float]:
    pathmap = _load_pathmap(kwargs.get("pathmap"))
    pseudonymizer = kwargs.get("pseudonymizer") or Pseudonymizer.from_env()
    # every setting is read before anything is switched on: a bad one leaves nothing half-installed
    interval = kwargs.get("heartbeat_interval_s")
    if interval is None:
        interval = _env_seconds("PATHWATCH_HEARTBEAT_INTERVAL_S", DEFAULT_HEARTBEAT_S)
    else:
        interval = _checked_interval(interval, f"heartbeat_interval_s={interval!r}")
    endpoint = kwargs.get("endpoint", os.environ.get("PATHWATCH_OTLP_ENDPOINT"))
    problem = endpoint_problem(endpoint) if isinstance(endpoint, str) and endpoint else None
    if problem:
        setting = "endpoint" if "endpoint" in kwargs else "PATHWATCH_OTLP_ENDPOINT"
        raise ConfigurationError(f"{setting}={shown_endpoint(endpoint)!r}: {problem}")
    if kwargs.get("check_imports", _truthy(os.environ.get("PATHWATCH_CHECK_IMPORTS"))):
        pathmap.check_imports()
    return pathmap, pseudonymizer, interval


@in_forked_child
def _new_lifecycle_lock() -> None:
    """A forked child has one thread: a start or stop another thread of the parent was making is
    not under way here (its lock would never be released)."""
    PathwatchInstrumentor._lifecycle = threading.RLock()
    PathwatchInstrumentor._changing = False


#: the longest heartbeat interval (a year): beyond ``threading.TIMEOUT_MAX`` (about 292 years on
#: Linux; ``inf`` too) the heartbeat thread's wait raised OverflowError, a traceback in the app's log
MAX_HEARTBEAT_INTERVAL_S = 365 * 86400.0


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return float(default)
    return _checked_interval(raw, f"{name}={raw!r}")


def _checked_interval(raw: Any, setting: str) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = -1.0
    if not 0 <= value <= MAX_HEARTBEAT_INTERVAL_S:  # also refuses nan and inf
        raise ConfigurationError(f"{setting}: expected a number of seconds from 0 to "
                                 f"{MAX_HEARTBEAT_INTERVAL_S:.0f} (0: only the final heartbeat)")
    return value


def _load_pathmap(value: Any) -> PathMap:
    if isinstance(value, PathMap):
        return value
    if value is None:
        value = os.environ.get("PATHWATCH_PATHMAP")
    if not value:
        _logger.warning("pathwatch: no path map (set PATHWATCH_PATHMAP); only requests and socket "
                        "writes are traced")
        return PathMap.empty()
    return PathMap.load(Path(value))


def instrument(pathmap: str | Path | PathMap | None = None, **kwargs: Any) -> PathwatchInstrumentor:
    """Start pathwatch (see ``PathwatchInstrumentor`` for the keyword arguments)."""
    instrumentor = PathwatchInstrumentor()
    instrumentor.instrument(pathmap=pathmap, **kwargs)
    return instrumentor


class ZeroCodeStart:
    """What ``opentelemetry-instrument`` loads (the ``opentelemetry_instrumentor`` entry point).

    Its launcher logs an instrumentor's exception and then stops loading the others, so a missing
    ``PATHWATCH_HMAC_KEY`` or a bad path map would leave the app running with no instrumentation at
    all, the error buried in a traceback among the start-up lines. Here such an error is one clear
    ERROR, and the app runs without pathwatch while the other instrumentations still load — the
    backend never breaks because of pathwatch. With ``PATHWATCH_CHECK_IMPORTS=1`` (a deploy gate)
    the process exits with code 2 instead, before the app starts.
    """

    def instrumentation_dependencies(self) -> Collection[str]:
        return ()  # as ``PathwatchInstrumentor``: a distro that checks them finds none missing

    def instrument(self, **kwargs: Any) -> None:
        try:
            instrumentor = PathwatchInstrumentor()
            instrumentor.instrument(**kwargs)
            if instrumentor._export is None:
                # the launcher configured the SDK before loading instrumentors: what it set up is
                # final here (an app calling instrument() itself may add its exporter afterwards)
                message = no_exporter_message()
                if message:  # spans would go nowhere, silently: the sidecar would see nothing
                    _logger.warning(message)
        except PathwatchError as exc:
            if _truthy(os.environ.get("PATHWATCH_CHECK_IMPORTS")):
                _logger.critical("pathwatch: %s — exiting with code 2 (PATHWATCH_CHECK_IMPORTS=1)", exc)
                _exit_at_start(2)
            _logger.error("pathwatch is NOT instrumenting this process: %s. The app runs without "
                          "pathwatch's spans; set PATHWATCH_CHECK_IMPORTS=1 to refuse to start "
                          "instead", exc)
        except Exception:  # a bug of ours: the app and the other instrumentations still run
            _logger.exception("pathwatch is NOT instrumenting this process: an internal error (please "
                              "report it with this traceback)")
            if _truthy(os.environ.get("PATHWATCH_CHECK_IMPORTS")):  # the gate holds for it too
                _exit_at_start(2)


def _exit_at_start(code: int) -> None:
    """Leave the process from the interpreter's start-up (sitecustomize), where ``SystemExit`` is a
    fatal error with a traceback: flush what was logged, then exit at once."""
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)


def uninstrument() -> None:
    """Stop pathwatch and restore every original method."""
    PathwatchInstrumentor().uninstrument()


def instrumentation_errors() -> int:
    return instrumentation_error_count()
