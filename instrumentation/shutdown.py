"""What leaves at the app's ASGI lifespan shutdown (``state.at_app_shutdown``, through pathwatch's
middleware): a final heartbeat, pathwatch's exporter flushed, and the app's tracer provider's other span
processors (the SDK's own exporter, ``OTEL_TRACES_EXPORTER=otlp``) flushed, all within one bound.

uvicorn (0.54) ends its process by the SIGTERM it stopped on, re-raised after its shutdown: no exit
handler runs, so no provider shuts its processors down and what they queued is lost. The SDK's
``force_flush`` (1.45) ignores its timeout (every batch retried for the OTLP exporter's 10 s), so it
runs on a thread of its own, waited for until the same deadline as pathwatch's flush; a flush that
did not end then goes on in the background, and the next shutdown does not start another nor wait
for it again (each TestClient cycle of an app's tests, its collector down, waited the whole bound
for the same flush): it says what is still queued. The same for pathwatch's exporter, whose
processor remembers the flush that outlived its bound (``CountingBatchSpanProcessor.overdue``).
Nothing is stopped: the process may serve again (a test client's app). What is left is logged,
never raised into the app's shutdown.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from opentelemetry import trace

from instrumentation.errors import record_error
from instrumentation.exporting import (CountingBatchSpanProcessor, ExportSetup, Heartbeat,
                                       _Background, queued_spans)
from instrumentation.forks import in_forked_child

_logger = logging.getLogger(__name__)

_UNSENT = ("pathwatch: the app is shutting down and %s did not send everything within %.1f s (is %s "
           "up?): %d spans still queued (%d when it began) behind an export not ended, lost if the "
           "process ends now")
_STILL_UNSENT = ("pathwatch: the app is shutting down and %s is still sending what an earlier shutdown "
                 "waited for (is %s up?): not waited for again, %d spans still queued (%d when it "
                 "began), lost if the process ends now")

#: the flush of the SDK's processors under way (one at a time: see the module docstring)
_sdk_flushing: _Background | None = None
#: that flush once a shutdown's wait for it ran out: not waited for again while it is under way
_sdk_overdue: _Background | None = None
_sdk_lock = threading.Lock()


def flush_at_app_shutdown(heartbeat: Heartbeat | None, export: ExportSetup | None, provider: Any,
                          timeout_millis: int) -> None:
    """A final heartbeat, then pathwatch's exporter (``export``) and the span processors of ``provider``
    (default: the global one) other than pathwatch's flushed together, waited for at most
    ``timeout_millis`` in all; what either did not send by then is logged."""
    started = time.monotonic()
    deadline = started + timeout_millis / 1000
    if heartbeat is not None:
        heartbeat.beat(final=True)  # the process ends right after (uvicorn), or starts the app again
    others = _other_processors(provider, export)
    others_queued = sum(queued_spans(processor) for processor in others)
    sdk_flush, overdue = _start_sdk_flush(others) if others else (None, False)
    if export is not None:
        own_queued = export.queued()
        if export.overdue():  # its flush waited for until its bound by an earlier shutdown
            _logger.warning(_STILL_UNSENT, "its exporter", "the sidecar", export.queued(), own_queued)
        else:
            remaining = max(0, int((deadline - time.monotonic()) * 1000))
            if not export.force_flush(remaining):
                _logger.warning(_UNSENT, "its exporter", time.monotonic() - started, "the sidecar",
                                export.queued(), own_queued)
    if sdk_flush is None:
        return
    if overdue:  # waited for until its bound by an earlier shutdown: the collector down or hung
        if not sdk_flush.result(0):
            _logger.warning(_STILL_UNSENT, "the OpenTelemetry SDK's exporter", "its collector",
                            sum(queued_spans(processor) for processor in others), others_queued)
    elif not sdk_flush.result(deadline - time.monotonic()):
        _overdue(sdk_flush)
        _logger.warning(_UNSENT, "the OpenTelemetry SDK's exporter", time.monotonic() - started,
                        "its collector", sum(queued_spans(processor) for processor in others),
                        others_queued)


def _other_processors(provider: Any, export: ExportSetup | None) -> list[Any]:
    """The span processors of ``provider`` that are not pathwatch's: the SDK provider's list, else
    the provider itself when pathwatch adds none to it (another SDK's provider with a ``force_flush``).
    None of pathwatch's own processors: the current one is ``export``'s, and an earlier ``instrument()``'s
    (a key rotation: the SDK cannot take a processor off its provider) is shut down, its flush False
    with nothing queued -- read as the SDK's exporter not sending everything."""
    if provider is None:
        provider = trace.get_tracer_provider()
    own = export.processor if export is not None else None
    processors = getattr(getattr(provider, "_active_span_processor", None), "_span_processors", None)
    if processors is None:
        return [provider] if own is None and callable(getattr(provider, "force_flush", None)) else []
    return [processor for processor in processors
            if processor is not own and not isinstance(processor, CountingBatchSpanProcessor)]


def _start_sdk_flush(processors: list[Any]) -> tuple[_Background | None, bool]:
    """The SDK processors' flush on a thread of its own; the one under way if an earlier shutdown's
    has not ended (its collector down or hung): it exports until the queues are empty. None where
    no thread can start. True with a flush that an earlier shutdown waited for until its bound."""
    global _sdk_flushing
    with _sdk_lock:
        if _sdk_flushing is None or _sdk_flushing.done():
            _sdk_flushing = _Background.start(lambda: _flush_all(processors), "pathwatch-sdk-flush")
        return _sdk_flushing, _sdk_flushing is not None and _sdk_flushing is _sdk_overdue


def _overdue(flush: _Background) -> None:
    """``flush`` outlived a shutdown's bound: a next shutdown does not wait for it again."""
    global _sdk_overdue
    with _sdk_lock:
        if not flush.done():
            _sdk_overdue = flush


def _flush_all(processors: list[Any]) -> bool:
    flushed = True
    for processor in processors:
        try:
            flushed = processor.force_flush() is not False and flushed
        except Exception as exc:  # the app's processor: counted as ours, logged once, never raised
            record_error("shutdown_flush", exc)
            flushed = False
    return flushed


@in_forked_child
def _no_flush_in_the_child() -> None:
    """A forked child has none of its parent's threads (nor the lock's holder)."""
    global _sdk_flushing, _sdk_overdue, _sdk_lock
    _sdk_flushing = _sdk_overdue = None
    _sdk_lock = threading.Lock()
