"""Process-wide state of the instrumentation: on/off, the tracer, the pseudonymizer, the message keys.

Wrappers read ``state.on`` first and return straight to the wrapped call when it is false, so a
disabled instrumentation costs one attribute check per call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY


SDK_VERSION = "0.1.0"
TRACER_NAME = "pathwatch"


class MessageKeys:
    """Where an outgoing socket message carries its event (the path map's ``messages`` section)."""

    __slots__ = ("event_type", "run_id", "event_id", "top_level")

    def __init__(self, event_type: str | None = "type", run_id: str | None = "run_id",
                 event_id: str | None = None) -> None:
        self.event_type = tuple(event_type.split(".")) if event_type else None
        self.run_id = tuple(run_id.split(".")) if run_id else None
        self.event_id = tuple(event_id.split(".")) if event_id else None
        #: the top-level keys of a message that the chains start with (all a long text is read for)
        self.top_level = frozenset(chain[0] for chain in (self.event_type, self.run_id, self.event_id)
                                   if chain)


def _nobody(scope: Any) -> Any:
    return None


def _nobody_yet(scope: Any) -> tuple[Any, Any]:
    return None, None


def _no_ids(scope: Any) -> list[Any]:
    return []


def do_nothing() -> None:
    return None


def _no_pseudonyms(raw: Any) -> str | None:
    raise RuntimeError("pathwatch is not instrumented: no pseudonymizer")


class _NoPseudonymizer:
    """The setting before the first ``instrument()``: no user id can be exported."""

    __slots__ = ()
    enduser_key = "enduser.pseudo.id"
    fast = staticmethod(_no_pseudonyms)


class _State:
    __slots__ = ("on", "enabled", "active", "tracer", "pseudonymizer", "pseudonymize", "setting",
                 "messages",
                 "http_user", "http_identity", "websocket_user", "websocket_identity",
                 "identity_headers", "identity_params", "request_ids", "at_app_startup", "at_app_shutdown")

    def __init__(self) -> None:
        self.enabled = True  # the operator's switch (set_enabled)
        self.active = False  # instrument() ran and uninstrument() did not
        self.on = False  # enabled and active: the one check on the hot path
        self.tracer: Any = trace.get_tracer(TRACER_NAME, SDK_VERSION)
        #: the setting of user ids (an ``identity.Pseudonymizer``: ``fast``, ``enduser_key``), published
        #: as one object: what is built from two of its parts (a request's cached attributes, the
        #: pseudonym under the enduser key) is keyed on it, so another thread never pairs the parts
        #: of two settings (``instrument()`` replaces it while requests run)
        self.pseudonymizer: Any = _NoPseudonymizer()
        #: ``pseudonymizer.fast``, for the per-call paths that use it alone
        self.pseudonymize: Callable[[Any], str | None] = _no_pseudonyms
        #: (pseudonymizer, tracer) published as one object: a span's user ids and the key id on its
        #: tracer's scope must come from one ``instrument()``, read once by whatever starts it,
        #: while another thread rotates the key
        self.setting: tuple[Any, Any] = (self.pseudonymizer, self.tracer)
        self.messages = MessageKeys()
        # ASGI scope -> raw user id, from the path map's identity section
        self.http_user: Callable[[Any], Any] = _nobody
        self.websocket_user: Callable[[Any], Any] = _nobody
        #: ASGI scope -> (raw user when the request starts, the sources to read again later or
        #: None) (``identity.build_request_identity``)
        self.http_identity: Callable[[Any], tuple[Any, Any]] = _nobody_yet
        #: ASGI scope -> (raw user at connect, the sources to read again later or None)
        #: (``identity.build_socket_identity``)
        self.websocket_identity: Callable[[Any], tuple[Any, Any]] = _nobody_yet
        #: span attribute of a captured request header that carries a user id -> (scope, pseudonymize)
        #: -> its values with each id pseudonymized (``identity.build_header_scrubbers``)
        self.identity_headers: dict[str, Callable[[Any, Callable[[Any], Any]], list[str]]] = {}
        #: the query parameters a user id is read from (``identity.query_param_names``), and ASGI
        #: scope -> every raw user id the request carries (``identity.build_request_ids``): the
        #: server span's URL is scrubbed of them all
        self.identity_params: frozenset[str] = frozenset()
        self.request_ids: Callable[[Any], list[Any]] = _no_ids
        #: what the end of the app's ASGI lifespan startup runs: the path map's modules not imported
        #: named (``PathwatchInstrumentor._at_app_startup``)
        self.at_app_startup: Callable[[], None] = do_nothing
        #: what the app's ASGI lifespan shutdown runs (in a worker thread): a heartbeat and the bounded
        #: flush of pathwatch's exporter and the SDK's (``PathwatchInstrumentor._at_app_shutdown``)
        self.at_app_shutdown: Callable[[], None] = do_nothing

    def refresh(self) -> None:
        self.on = self.enabled and self.active


state = _State()


def set_enabled(enabled: bool) -> None:
    """Switch span production on or off at run time (wrappers stay installed)."""
    state.enabled = bool(enabled)
    state.refresh()


def is_enabled() -> bool:
    return state.on


def suppressed() -> bool:
    """OpenTelemetry's "suppress instrumentation" flag is set in the current context."""
    return bool(otel_context.get_value(_SUPPRESS_INSTRUMENTATION_KEY))
