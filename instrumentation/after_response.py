"""An HTTP request whose app goes on after its response: the request span covers the call.

The OpenTelemetry ASGI instrumentation ends an HTTP request's server span when the response is
complete (its last ``http.response.body`` message), but the app may go on within the request's ASGI
call: Starlette runs a response's background tasks (FastAPI's ``BackgroundTasks``) after sending
it, in the request's context. Their work started after the request span had ended, and was reported
as leaked context (``bleed.leaked_context``, critical), a run a background task executes by design.

So pathwatch's middleware defers the request span's end to the end of the call (``serving``,
``defer``, ``served``): its end time is the response's, as the instrumentation set it, and when the
call went on after it, ``pathwatch.request.after_response_ns`` says how long; the sidecar takes the
request as running until then. Said from 1 ms on (every call returns microseconds after its last
body message), and whenever one of the request's spans started after the response (``RequestInfo.
after_response``): a background task done within 1 ms was leaked context to a sidecar judging with
a clock tolerance under 1 ms. The span is exported when the call returns (with its background
tasks), not when the response left. A task that outlives the call (``asyncio.create_task``) is still
leaked context, as before."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any

from instrumentation import attributes as attr

SCOPE_KEY = "pathwatch.serving"
#: the shortest time after the response the request span says (every call returns a few
#: microseconds after its last body message: only work after the response is worth the attribute)
MIN_AFTER_RESPONSE_NS = 1_000_000


class _Serving:
    __slots__ = ("span", "end", "info")

    def __init__(self, span: Any, info: Any) -> None:
        self.span = weakref.ref(span)
        #: (the span's end, taking its end time; when the response was complete), once deferred
        self.end: tuple[Callable[[int], None], int] | None = None
        self.info = info  # the request's RequestInfo: tells whether a span started after it


def serving(scope: dict, span: Any, info: Any = None) -> None:
    """The middleware's call of the HTTP request ``scope`` runs, ``span`` its request span,
    ``info`` its ``RequestInfo``."""
    scope[SCOPE_KEY] = _Serving(span, info)


def defer(scope: dict, span: Any, end: Callable[[int], None]) -> bool:
    """``span`` is ending now (the response is complete): True when it is the request span of a
    call still running, whose end ``end(end_time)`` is then made when the call returns."""
    state = scope.get(SCOPE_KEY)
    if state is None or state.end is not None or state.span() is not span:
        return False
    state.end = (end, time.time_ns())
    if state.info is not None:
        state.info.after_response = False  # its spans from now on say so (span_attrs)
    return True


def served(scope: dict) -> None:
    """The call returned: the request span deferred (``defer``) ends, at the response's time, saying
    how long the call went on after it."""
    state = scope.pop(SCOPE_KEY, None)
    if state is None or state.end is None:
        return
    end, responded_ns = state.end
    after_ns = time.time_ns() - responded_ns
    span = state.span()
    worked = state.info is not None and state.info.after_response
    if (span is not None and (after_ns >= MIN_AFTER_RESPONSE_NS or worked)
            and span.is_recording()):
        span.set_attribute(attr.REQUEST_AFTER_RESPONSE_NS, after_ns)
    end(responded_ns)
