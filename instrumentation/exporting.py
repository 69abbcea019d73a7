"""Getting spans out, and being honest about the ones that did not make it.

``configure()`` attaches a ``BatchSpanProcessor`` -> OTLP/gRPC exporter (the sidecar on localhost)
to the app's SDK ``TracerProvider``, or creates one with a Resource when the app has none. The queue
is sized so ordinary load never drops (65536 spans, batches of 2048, 200 ms delay); the standard
``OTEL_BSP_MAX_QUEUE_SIZE``, ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` and ``OTEL_BSP_SCHEDULE_DELAY`` override
those sizes when set (``batch_settings``: a bad value is logged once and the default kept).

Coverage honesty: ``DropCounter`` counts spans the SDK dropped in this process, both the ones a
batch processor throws away when its queue is full and the ones our exporter failed to send.
Pathwatch's own processor counts its drops itself (``CountingBatchSpanProcessor``), whatever the
log level; the app's other batch processors are counted through their "Queue full, dropping Span."
records (a logging filter placed before the SDK's duplicate filter), which exist only while the
``opentelemetry`` loggers let warnings through. ``Heartbeat`` reports these counts and pathwatch's own internal errors on
a periodic ``pathwatch.heartbeat`` span, and once more at shutdown; pathwatch's exporter stamps the
dropped count again as it sends a heartbeat (``_counts_as_sent``), so that the final one counts the
batches queued ahead of it that failed.

One trace per process for the heartbeats: a gateway of several sidecar replicas behind a Collector's
loadbalancing exporter (``routing_key: traceID``) sends each trace to one replica, and each replica
counts the rise of a process's cumulative totals between the heartbeats it got. Each heartbeat a
trace of its own, they scattered over the replicas and the summed counters read up to N times the
drops. So every heartbeat of a process is a root span (no parent) of the process's heartbeat trace
(``heartbeat_trace_id()``: drawn once per process, anew in a forked child), made by a tracer provider
of the heartbeat's own whose id generator returns that id, with the app's provider's resource and the
span processor the heartbeats went through before: pathwatch's own when it exports (the same queue,
exporter and drop counting; not the app's other exporters, where a trace as long as the process is no
trace), else the app provider's. The app's spans and the per-call path are untouched.

Bounded shutdown: the SDK's batch processor (1.45) ignores ``force_flush``'s timeout — it exports
everything queued in the caller's thread, each failing batch retried for up to the exporter's own
timeout (10 s) — so with the sidecar down or hung, a flush of 20,000 spans took over a minute.
Pathwatch's processor flushes on a thread of its own, waited for at most the timeout, and shuts down
within ``SHUTDOWN_TIMEOUT_MILLIS`` (the SDK's join of its worker, then the exporter's shutdown, which
aborts the export in flight); what was still queued then is counted as dropped, never lost silently.
A shutdown after a flush that outlived its bound and still exports (the app's lifespan shutdown's,
the sidecar down) does not wait for that batch again: the OTLP exporter stops retrying it and tries
each batch left once (``CountingExporter.last_try``).
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import secrets
import threading
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON

from instrumentation import attributes as attr
from instrumentation.attributes import SpanKinds
from instrumentation.errors import instrumentation_error_count, record_error
from instrumentation.export_log import OutageLog
from instrumentation.forks import in_forked_child
from instrumentation.linking import pending_emits
from instrumentation.runtime import SDK_VERSION, TRACER_NAME

_logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "127.0.0.1:4317"
SCHEDULE_DELAY_MS = 200
MAX_QUEUE_SIZE = 65536
MAX_EXPORT_BATCH_SIZE = 2048
DEFAULT_HEARTBEAT_S = 10.0
#: the longest pathwatch's processor holds its caller at shutdown (``uninstrument()``, the provider's
#: shutdown at exit): what is not exported by then is counted as dropped
SHUTDOWN_TIMEOUT_MILLIS = 5000
FLUSH_TIMEOUT_MILLIS = 30000  # a force_flush without a timeout (the SDK provider's default)
#: after the shutdown deadline, how long to wait for the export in flight to give up (the exporter is
#: shut down by then) before counting the spans left in the queue
_ABORT_GRACE_S = 0.25
_BSP_LOGGER = "opentelemetry.sdk._shared_internal"  # where BatchProcessor logs "Queue full"
_QUEUE_FULL = "queue_full"  # the error type of the SDK's drop_items for a span its full queue drops
_INSTANCE_ID = str(uuid.uuid4())


class DropCounter(logging.Filter):
    """Counts dropped spans: queue-full records of any batch processor, plus failed exports."""

    def __init__(self) -> None:
        super().__init__()
        # reentrant: a span the full queue drops may end in a thread that holds it (a finalizer the
        # garbage collector runs inside a count, a signal handler), and is counted there again
        self._lock = threading.RLock()
        self.queue_full = 0
        self.export_failed = 0
        self.since_s = time.time()  # when these counts started (the heartbeat's counts_since_s)
        self.reports = 0  # heartbeats that reported these counts (the last one's sequence number)

    @property
    def dropped(self) -> int:
        return self.queue_full + self.export_failed

    def filter(self, record: logging.LogRecord) -> bool:
        # runs inside the SDK's emit, under the app's span.end() (any thread): it must never raise
        try:
            # record.msg is whatever was logged (an exception, a dict): not necessarily a str
            if record.levelno >= logging.WARNING and isinstance(record.msg, str) \
                    and record.msg.startswith("Queue full, dropping") \
                    and record.args == ("Span",) and not _counted_by_processor.active:
                with self._lock:
                    self.queue_full += 1
        except Exception:  # pragma: no cover - a count lost, never the app's log call
            pass
        return True  # count, never swallow

    def add_queue_full(self, count: int) -> None:
        with self._lock:
            self.queue_full += count

    def add_failed(self, count: int) -> None:
        with self._lock:
            self.export_failed += count

    def next_report(self) -> int:
        """The sequence number of a heartbeat reporting these counts: 1 for the first (whichever
        ``Heartbeat`` sends it: an ``instrument()`` after an ``uninstrument()`` goes on counting)."""
        with self._lock:
            self.reports += 1
            return self.reports

    def install(self) -> None:
        logger = logging.getLogger(_BSP_LOGGER)
        if self not in logger.filters:
            # first in line: the SDK's DuplicateFilter after us would hide repeated "Queue full" records
            logger.filters.insert(0, self)

    def uninstall(self) -> None:
        logging.getLogger(_BSP_LOGGER).removeFilter(self)

    def after_fork_in_child(self) -> None:
        """A forked child counts its own drops (its heartbeats report totals since it started),
        under a new lock: another thread of the parent may have held the old one at the fork."""
        self._lock = threading.RLock()
        self.queue_full = 0
        self.export_failed = 0
        self.since_s = time.time()
        self.reports = 0


drops = DropCounter()
class _CountedByProcessor(threading.local):
    """Set while our processor hands a span on (its drops are counted there). False in every thread
    until then: a value set at import would exist in the importing thread only, and the filter's read
    of it in any other thread (the app's own full batch processor logging from a worker thread before
    pathwatch's processor ran there) raised AttributeError out of the app's ``span.end()``."""

    active = False


_counted_by_processor = _CountedByProcessor()


class _DropTap:
    """Stands in for the SDK batch processor's (internal) metrics recorder: every ``drop_items``
    call of a full queue, made exactly where the SDK drops a span, is counted too.

    Not the ``already_shutdown`` ones: the SDK cannot take a processor off its provider, so after
    ``uninstrument()`` pathwatch's processor, shut down, is still handed every span the provider
    ends, and says so through ``drop_items``. Those spans were never pathwatch's to send (after an
    ``instrument()`` again, its new processor sends them): counted, the heartbeat reported each as
    a span lost."""

    def __init__(self, metrics: Any, counter: DropCounter) -> None:
        self._metrics = metrics
        self._counter = counter

    def drop_items(self, count: int, *args: Any, **kwargs: Any) -> None:
        error_type = args[0] if args else kwargs.get("error_type", _QUEUE_FULL)
        if error_type == _QUEUE_FULL:
            self._counter.add_queue_full(count)
        self._metrics.drop_items(count, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._metrics, name)


#: what the bounded flush and shutdown use of the SDK's BatchProcessor (checked at construction)
_BATCH_INTERNALS = ("_queue", "_export_lock", "_shutdown", "_shutdown_timeout_exceeded", "shutdown")


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """The SDK's batch processor, counting the spans it drops itself: its "Queue full" warning,
    which the log filter counts, is not emitted when the app has raised the ``opentelemetry``
    loggers' level (a common way to silence the SDK). Relies on an SDK internal, checked at
    construction; without it the log filter still counts.

    ``force_flush`` and ``shutdown`` keep their timeouts (the SDK's do not; see the module
    docstring), through more of the SDK's internals, also checked at construction (without them
    both are the SDK's own)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        counter = kwargs.pop("counter", drops)
        super().__init__(*args, **kwargs)
        self._counter = counter
        inner = getattr(self, "_batch_processor", None)
        metrics = getattr(inner, "_metrics", None)
        self._tapped = callable(getattr(metrics, "drop_items", None))
        if self._tapped:
            inner._metrics = _DropTap(metrics, counter)
        self._bounded = all(hasattr(inner, name) for name in _BATCH_INTERNALS)
        self._closing = threading.Lock()
        self._closed = False
        # the flush running in the background, if any: a flush that timed out goes on, and the next
        # one waits for it instead of starting another (they would queue on the SDK's export lock,
        # one thread more per flush for as long as the sidecar hangs)
        self._flushing: _Background | None = None
        self._flush_lock = threading.Lock()
        # the flush whose caller's timeout ran out (the app's lifespan shutdown's, the sidecar down),
        # until one ends in time: what it exports has been waited for once already (``shutdown``)
        self._overdue: _Background | None = None
        _processors.add(self)

    def after_fork_in_child(self) -> None:
        """A forked child has none of its parent's threads: a flush the parent had under way (the
        sidecar hung) is no flush here -- waited for, every ``force_flush`` of the child returned
        False at its timeout and none started. The locks are new too (another thread may have held
        them at the fork). The SDK restarts its worker itself."""
        self._closing = threading.Lock()
        self._flush_lock = threading.Lock()
        self._flushing = self._overdue = None

    def overdue(self) -> bool:
        """True while the flush whose caller's timeout ran out (the sidecar down or hung) is still
        exporting: what it exports has been waited for once already (the app's next lifespan
        shutdown does not wait for it again, nor the exit: ``shutdown``)."""
        overdue = self._overdue
        return overdue is not None and not overdue.done()

    def on_end(self, span: ReadableSpan) -> None:
        _counted_by_processor.active = self._tapped
        try:
            super().on_end(span)
        finally:
            _counted_by_processor.active = False

    def force_flush(self, timeout_millis: int | None = None) -> bool:
        """Export what is queued, waiting at most ``timeout_millis`` (default 30 s, the SDK
        provider's): the SDK's flush runs on a thread of its own. False when it did not finish in
        time — the spans stay queued (not dropped) and that flush goes on in the background; a
        flush asked for meanwhile waits for that one (which exports until the queue is empty)."""
        if not self._bounded:
            return super().force_flush(timeout_millis)
        inner = self._batch_processor
        if not inner._queue and inner._export_lock.acquire(blocking=False):
            inner._export_lock.release()  # nothing queued, no export under way: nothing to wait for
            return not inner._shutdown
        if timeout_millis is None:
            timeout_millis = FLUSH_TIMEOUT_MILLIS
        flushed = self._flush_until(time.monotonic() + timeout_millis / 1000)
        self._overdue = None if flushed else self._flushing
        return flushed

    def _flush_until(self, deadline: float) -> bool:
        inner = self._batch_processor
        while True:
            with self._flush_lock:
                flushing = self._flushing
                if flushing is None or flushing.done():
                    flushing = self._flushing = _Background.start(super().force_flush,
                                                                  "pathwatch-flush")
            if flushing is None:  # no thread can start (the interpreter is shutting down)
                return False
            if not flushing.result(deadline - time.monotonic()):
                return False
            # that flush may have begun before this call and emptied the queue before a span ended
            # just now was queued: done only when nothing is queued, read under the export lock
            # (which an export holds from taking its batch to its end)
            if not inner._export_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                return False
            try:
                if not inner._queue:
                    return True
            finally:
                inner._export_lock.release()
            if time.monotonic() >= deadline:
                return False

    def shutdown(self, timeout_millis: int | None = None) -> None:
        """Export what is queued and stop, within ``timeout_millis`` (default
        ``SHUTDOWN_TIMEOUT_MILLIS``): the SDK's shutdown, whose worker exports everything queued and
        is joined for at most the timeout, after which no batch is taken any more and the exporter
        is shut down (the OTLP exporter's export in flight then gives up). The spans still queued
        are counted as dropped (and logged); a failed export is counted by ``CountingExporter``."""
        if timeout_millis is None:
            timeout_millis = SHUTDOWN_TIMEOUT_MILLIS
        if not self._bounded:
            super().shutdown()
            return
        with self._closing:  # once: a second shutdown (the provider's at exit) counts nothing again
            if self._closed:
                return
            self._closed = True
        inner = self._batch_processor
        started = time.monotonic()
        # a flush that outlived its bound is still exporting (the OTLP exporter retrying its batch
        # for 10 s, the sidecar down): that batch is given up now, and what is queued gets one try
        # each, not the whole bound again for the same batch (Ctrl-C after the app's lifespan
        # shutdown waited its bound: 10 s in all)
        exporter = inner._exporter
        last_try = (self.overdue() and isinstance(exporter, CountingExporter)
                    and exporter.last_try())
        failed_before = self._counter.export_failed
        inner.shutdown(timeout_millis=timeout_millis)
        # past the deadline the SDK has set _shutdown_timeout_exceeded: no export loop takes another
        # batch, so the queue only shrinks by an export loop that is between its check and its pop,
        # under the export lock; the export in flight returns soon, its exporter shut down
        locked = inner._export_lock.acquire(timeout=_ABORT_GRACE_S)
        try:
            left = len(inner._queue)
            if locked:
                inner._queue.clear()
        finally:
            if locked:
                inner._export_lock.release()
        if left:
            self._counter.add_failed(left)
        if last_try:
            failed = self._counter.export_failed - failed_before
            if failed:
                _logger.warning("pathwatch: its exporter was still retrying, at shutdown, what the "
                                "app's shutdown had waited for (is the sidecar up?): given up, and "
                                "the rest tried once, in %.1f s: %d spans were not sent, counted as "
                                "dropped", time.monotonic() - started, failed)
        elif left:
            _logger.warning("pathwatch: its exporter did not send everything within %.1f s at shutdown "
                            "(is the sidecar up?): %d spans were not sent, counted as dropped",
                            time.monotonic() - started, left)


#: pathwatch's batch processors alive, for the fork handler
_processors: weakref.WeakSet[CountingBatchSpanProcessor] = weakref.WeakSet()


@in_forked_child
def _renew_processors() -> None:
    for processor in list(_processors):
        processor.after_fork_in_child()


class _Background:
    """``target()`` on a daemon thread, whose result can be waited for, for a while."""

    def __init__(self, target: Any, name: str) -> None:
        self._target, self._name = target, name
        self._result: list[Any] = []
        self._finished = threading.Event()  # set when target() returned (the thread may still run)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @classmethod
    def start(cls, target: Any, name: str) -> _Background | None:
        """Started; None where no thread can start (from an atexit handler on Python >= 3.12)."""
        background = cls(target, name)
        try:
            background._thread.start()
        except RuntimeError:
            return None
        return background

    def _run(self) -> None:
        try:
            self._result.append(self._target())
        except Exception:
            _logger.debug("pathwatch: %s failed", self._name, exc_info=True)
        finally:
            self._finished.set()

    def done(self) -> bool:
        return self._finished.is_set()

    def result(self, timeout_s: float) -> Any:
        """Its result, waited for at most ``timeout_s``; None when not finished (or it raised: logged)."""
        self._finished.wait(max(0.0, timeout_s))
        return self._result[0] if self._result else None


class CountingExporter(SpanExporter):
    """Delegates to an exporter and counts the spans of every failed export. Once shut down, an
    export (of a batch taken before) fails at once, counted, without reaching the delegate; one
    the shutdown cut short fails the same way, whatever the delegate raised then (the OTLP
    exporter, shut down while it was building its request, calls a closed channel: a ValueError
    the SDK logged with a traceback, in the app's log at every shutdown with the sidecar down)."""

    def __init__(self, exporter: SpanExporter, counter: DropCounter = drops) -> None:
        self.exporter = exporter
        self._counter = counter
        self._lock = threading.Lock()
        self._shut_down = False
        # the OTLP exporter's (1.45) event that ends its retries, which its shutdown sets: between
        # two attempts of a batch it waits on it for the backoff (1, 2, 4 s ... up to its 10 s)
        retries_end = getattr(exporter, "_shutdown_in_progress", None)
        self._retries_end = retries_end if isinstance(retries_end, threading.Event) else None
        # its failures logged once an outage, not at every attempt (export_log.py)
        endpoint = getattr(exporter, "_endpoint", None)
        self.outage_log = OutageLog(endpoint) if isinstance(endpoint, str) and endpoint else None
        if self.outage_log is not None:
            self.outage_log.install()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._shut_down:
            self._counter.add_failed(len(spans))
            return SpanExportResult.FAILURE
        try:
            spans = _counts_as_sent(spans, self._counter)
        except Exception as exc:  # the batch goes as it is: a heartbeat's counts as when it was made
            record_error("exporting:heartbeat_counts", exc)
        try:
            result = self.exporter.export(spans)
        except Exception:
            self._counter.add_failed(len(spans))
            if self._shut_down:  # cut short by the shutdown: counted, and no more than a failure
                return SpanExportResult.FAILURE
            raise
        if result is not SpanExportResult.SUCCESS:
            self._counter.add_failed(len(spans))
        elif self.outage_log is not None:
            self.outage_log.exported()
        return result

    def last_try(self) -> bool:
        """From now on one attempt per batch, no retry: the export under way stops retrying (its
        batch fails at once, counted), and each later one fails at its first error. For the
        shutdown that follows a flush which outlived its bound; False for an exporter that cannot
        (not the OTLP exporter), left as it is."""
        if self._retries_end is None:
            return False
        self._retries_end.set()
        return True

    def shutdown(self) -> None:
        with self._lock:
            if self._shut_down:
                return
            self._shut_down = True
        try:
            self.exporter.shutdown()
        finally:
            if self.outage_log is not None:
                self.outage_log.uninstall()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


def _counts_as_sent(spans: Sequence[ReadableSpan], counter: DropCounter) -> Sequence[ReadableSpan]:
    """``spans`` with every heartbeat among them carrying the dropped spans counted by now.

    A heartbeat's counts were read when it was made, and the batches queued ahead of it are sent
    (or fail) after that: the final heartbeat, made as the process stops cleanly before the shutdown
    sends what is queued, arrived saying nothing was lost while the batch ahead of it had been
    refused (2000 spans at an exit, measured). Batches are sent one at a time, oldest first, each
    failure counted before the next is taken: read now, the count holds every span that was not
    sent ahead of the heartbeat (and those dropped since: cumulative counts, never lower)."""
    if not any(span.name == HEARTBEAT_SPAN_NAME for span in spans):
        return spans
    dropped = counter.dropped
    return [_with_dropped(span, dropped, counter.since_s) if span.name == HEARTBEAT_SPAN_NAME
            else span for span in spans]


def _with_dropped(span: ReadableSpan, dropped: int, since_s: float) -> ReadableSpan:
    """The heartbeat with ``dropped`` if it was made from this exporter's counter (its counts since
    ``since_s``): one made from another counter (a second setup in the process, another worker's)
    keeps its own count, which this one's says nothing of."""
    attributes = dict(span.attributes or {})
    if attributes.get(attr.SPAN_KIND) != SpanKinds.HEARTBEAT \
            or attributes.get(attr.COUNTS_SINCE_S) != since_s \
            or not isinstance(attributes.get(attr.DROPPED_SPANS), int) \
            or attributes[attr.DROPPED_SPANS] >= dropped:
        return span
    attributes[attr.DROPPED_SPANS] = dropped
    return ReadableSpan(name=span.name, context=span.context, parent=span.parent,
                        resource=span.resource, attributes=attributes, events=span.events,
                        links=span.links, kind=span.kind, status=span.status,
                        start_time=span.start_time, end_time=span.end_time,
                        instrumentation_scope=span.instrumentation_scope)


def build_resource(service_version: str | None = None) -> Resource:
    """OTEL defaults and env (service.name, OTEL_RESOURCE_ATTRIBUTES) plus pathwatch's own keys."""
    base = Resource.create({})
    extra: dict[str, Any] = {attr.RESOURCE_SDK_VERSION: SDK_VERSION}
    if "service.instance.id" not in base.attributes:
        extra["service.instance.id"] = _INSTANCE_ID
    version = service_version or os.environ.get("PATHWATCH_SERVICE_VERSION")
    if version and "service.version" not in base.attributes:
        extra["service.version"] = version
    return base.merge(Resource(extra))


class BatchSettings(NamedTuple):
    """The sizes of pathwatch's batch processor."""

    schedule_delay_millis: int
    max_queue_size: int
    max_export_batch_size: int


#: BatchSettings field -> the standard variable that sets it -> pathwatch's default
_BSP_ENV = (("schedule_delay_millis", "OTEL_BSP_SCHEDULE_DELAY", SCHEDULE_DELAY_MS),
            ("max_queue_size", "OTEL_BSP_MAX_QUEUE_SIZE", MAX_QUEUE_SIZE),
            ("max_export_batch_size", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", MAX_EXPORT_BATCH_SIZE))
#: above this a queue (a deque's maxlen) or a delay (a thread's wait) cannot be built: the largest
#: value accepted from the environment (24.8 days in milliseconds, 2**31 - 1 spans)
_BSP_MAX_VALUE = 2**31 - 1
_bsp_warned: set[tuple[str, str]] = set()  # (variable, value) already logged


def _bsp_warn_once(name: str, raw: str, message: str, *args: Any) -> None:
    if (name, raw) not in _bsp_warned:
        _bsp_warned.add((name, raw))
        _logger.warning("pathwatch: %s=%r " + message, name, raw, *args)


def batch_settings(environ: Mapping[str, str] = os.environ, *,
                   schedule_delay_millis: int | None = None, max_queue_size: int | None = None,
                   max_export_batch_size: int | None = None) -> BatchSettings:
    """The sizes of pathwatch's batch processor: a value given here, else the standard
    ``OTEL_BSP_SCHEDULE_DELAY`` / ``OTEL_BSP_MAX_QUEUE_SIZE`` / ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` when
    set (not empty), else pathwatch's own (200 ms, 65536, 2048). A variable that is no integer from 1
    to 2**31 - 1 is logged once (per value) and its default kept: a typo never stops the app. A batch
    size above the queue size becomes the queue size (the SDK refuses the pair) when either comes
    from the environment or the batch size is the default, logged once when the environment set it
    or it met a batch size given here; both given here, the SDK's ValueError is the caller's."""
    given = {"schedule_delay_millis": schedule_delay_millis, "max_queue_size": max_queue_size,
             "max_export_batch_size": max_export_batch_size}
    values: dict[str, int] = {}
    from_env: set[str] = set()
    for field, name, default in _BSP_ENV:
        if given[field] is not None:
            values[field] = given[field]
            continue
        raw = (environ.get(name) or "").strip()
        values[field] = default
        if not raw:
            continue
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if not 0 < value <= _BSP_MAX_VALUE:
            _bsp_warn_once(name, raw, "is not an integer from 1 to %d: pathwatch's exporter keeps "
                           "its default %d", _BSP_MAX_VALUE, default)
            continue
        values[field] = value
        from_env.add(field)
    settings = BatchSettings(**values)
    queue, batch = settings.max_queue_size, settings.max_export_batch_size
    if batch > queue and (max_export_batch_size is None or "max_queue_size" in from_env):
        # the SDK refuses the pair (ValueError): clamped unless both sizes were passed in code (the
        # app's own call, refused as without pathwatch). An operator's queue size holds, also
        # against a batch size passed in code
        if "max_export_batch_size" in from_env:
            _bsp_warn_once("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", str(batch),
                           "is above the queue size %d: pathwatch's exporter sends batches of %d",
                           queue, queue)
        elif max_export_batch_size is not None:
            _bsp_warn_once("OTEL_BSP_MAX_QUEUE_SIZE", str(queue), "is below the batch size %d passed "
                           "in code: pathwatch's exporter sends batches of %d", batch, queue)
        settings = settings._replace(max_export_batch_size=queue)
    return settings


class ExportSetup:
    """What ``configure`` built; ``shutdown`` exports what is queued and stops it, within its
    timeout (default ``SHUTDOWN_TIMEOUT_MILLIS``; what is left is counted as dropped).
    ``settings``: the batch processor's sizes."""

    def __init__(self, provider: TracerProvider, processor: BatchSpanProcessor, created: bool,
                 settings: BatchSettings | None = None) -> None:
        self.provider = provider
        self.processor = processor
        self.created_provider = created
        self.settings = settings

    def force_flush(self, timeout_millis: int = 5000) -> bool:
        return self.processor.force_flush(timeout_millis)

    def overdue(self) -> bool:
        """True while a flush whose caller's timeout ran out is still exporting (pathwatch's
        processor; False for another)."""
        return isinstance(self.processor, CountingBatchSpanProcessor) and self.processor.overdue()

    def queued(self) -> int:
        """The spans waiting in the processor's queue (0 where the SDK keeps no ``_queue``)."""
        return queued_spans(self.processor)

    def shutdown(self, timeout_millis: int | None = None) -> None:
        if isinstance(self.processor, CountingBatchSpanProcessor):
            self.processor.shutdown(timeout_millis)
        else:
            self.processor.shutdown()


def queued_spans(processor: Any) -> int:
    """The spans waiting in an SDK batch processor's queue (0 for another processor, or where the SDK
    keeps no ``_queue``); not the batch being exported."""
    try:
        return len(getattr(getattr(processor, "_batch_processor", None), "_queue", ()))
    except Exception:  # another SDK's object of that name: nothing known
        return 0


_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
_SDK_GRPC_DEFAULT = "http://localhost:4317"  # the OTLP exporter's default (OTEL_EXPORTER_OTLP_ENDPOINT)


def sdk_exports_to(endpoint: str, environ: Any = os.environ) -> str | None:
    """Whether the OpenTelemetry SDK's own OTLP/gRPC trace exporter, as configured from the
    environment (``opentelemetry-instrument`` with the distro: ``OTEL_TRACES_EXPORTER=otlp``), sends
    to ``endpoint`` already: a second exporter there would send every span twice. Returns the SDK's
    endpoint when it does, else None."""
    exporters = {name.strip() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",")}
    if "otlp" not in exporters:
        return None
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")
    if protocol != "grpc":
        return None  # OTLP/HTTP goes to another port; not pathwatch's gRPC endpoint
    sdk = (environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
           or _SDK_GRPC_DEFAULT)
    return sdk if _host_port(sdk) == _host_port(endpoint) else None


def provider_exports(provider: Any = None) -> bool | None:
    """Whether spans of ``provider`` (default: the global one) can leave the process at all: False
    when it is no SDK provider (``opentelemetry-instrument`` without opentelemetry-distro leaves the
    API's no-op proxy) or an SDK provider without any span processor (the distro with
    ``OTEL_TRACES_EXPORTER=none``); True when it has a processor; None for a provider of another
    SDK, which cannot be told."""
    if provider is None:
        provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        processors = getattr(getattr(provider, "_active_span_processor", None), "_span_processors", None)
        return None if processors is None else bool(processors)
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return False
    return None


def no_exporter_message(provider: Any = None, environ: Any = os.environ) -> str | None:
    """The warning for a start where no span leaves the process (neither pathwatch's exporter nor
    the SDK's), naming what to set; None when something exports (or it cannot be told)."""
    if provider_exports(provider) is not False:
        return None
    configured = sorted(name for name in environ if name.startswith("OTEL_EXPORTER_OTLP_")
                        and name.endswith("ENDPOINT"))
    if isinstance(provider if provider is not None else trace.get_tracer_provider(), TracerProvider):
        why = "the OpenTelemetry SDK's tracer provider has no span processor (OTEL_TRACES_EXPORTER=%s)" % (
            environ.get("OTEL_TRACES_EXPORTER") or "unset")
    else:
        why = "no OpenTelemetry SDK tracer provider is configured"
        if configured:
            why += (f" ({', '.join(configured)} is set, but only opentelemetry-distro's configurator, "
                    "not installed or not run here, builds an exporter from OTEL_EXPORTER_OTLP_*)")
    return ("pathwatch: no span exporter is configured, so no span leaves this process: "
            f"PATHWATCH_OTLP_ENDPOINT is not set and {why}. Set PATHWATCH_OTLP_ENDPOINT to the "
            "sidecar's OTLP/gRPC receiver (e.g. PATHWATCH_OTLP_ENDPOINT=127.0.0.1:4317) and "
            "OTEL_TRACES_EXPORTER=none, or call instrument(endpoint=...)")


def _host_port(endpoint: str) -> tuple[str, str]:
    address = endpoint.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = address.rpartition(":")
    host = host.lower() or address.lower()
    return ("loopback" if host in _LOOPBACK_NAMES else host), port


#: gRPC's own target schemes, read by gRPC as written (the OTLP exporter passes a target without
#: ``//`` on whole); a unix socket's path or abstract name has no authority (an ``@`` there is a name's)
_GRPC_SCHEMES = ("unix:", "unix-abstract:", "vsock:", "dns:", "ipv4:", "ipv6:")
_SOCKET_SCHEMES = ("unix:", "unix-abstract:")


def endpoint_problem(endpoint: str) -> str | None:
    """What is wrong with an OTLP/gRPC ``endpoint`` (``HOST:PORT``, or an ``http(s)://`` URL of one),
    or None. gRPC itself takes a port beyond 65535 modulo 65536 (``127.0.0.1:99999`` connected to
    34463), no port as 443 (an ``http://`` URL's too, in plaintext), and an IPv6 address without
    brackets (``::1:4317``) whole as the address, on 443: spans went elsewhere with no word of the
    setting. A target of another scheme (``unix:``, ``unix-abstract:``, ``dns:///``) is gRPC's to read."""
    lowered = endpoint.lower()
    if "@" in _authority(endpoint):
        # the exporter hands 'user:password@host' to gRPC as its target: never sent as credentials
        return ("credentials before the host (not quoted): gRPC does not send them; give them as "
                "headers (OTEL_EXPORTER_OTLP_HEADERS) and write HOST:PORT")
    if lowered.startswith(("http://", "https://")):
        address = _authority(endpoint)  # what the exporter keeps: no path, query or fragment
        if not address.rpartition("]")[2].count(":"):
            if lowered.startswith("https://"):
                return None  # a URL's own default port (https://collector.example: 443, as meant)
            # the exporter keeps the host alone, and gRPC takes 443, not http's 80: plaintext to 443
            return ("no port (gRPC would connect to 443, in plaintext): expected http://HOST:PORT, "
                    "e.g. http://127.0.0.1:4317")
    elif "://" in endpoint or lowered.startswith(_GRPC_SCHEMES):
        return None
    else:
        address = endpoint
    if not address.startswith("[") and address.count(":") > 1:
        return ("an IPv6 address without brackets (gRPC would read it whole as the address, on "
                "port 443): expected [ADDRESS]:PORT, e.g. [::1]:4317")
    host, sep, port = address.rpartition(":")
    if not sep or not host or host.endswith(":") or (address.startswith("[") and not host.endswith("]")):
        return "no port (gRPC would connect to 443): expected HOST:PORT, e.g. 127.0.0.1:4317"
    if not (port.isascii() and port.isdigit()):
        return f"the port {port!r} is not a number: expected HOST:PORT, e.g. 127.0.0.1:4317"
    if not 1 <= int(port) <= 65535:
        return f"the port {int(port)} is not in 1..65535"
    return None


#: an authority without userinfo: a host (a bracketed IP literal, or no ':' in it) and a port of digits
_HOST_PORT = re.compile(r"(\[[^\[\]]*\]|[^\[\]:@]*)(:[0-9]*)?")


def _authority(endpoint: str) -> str:
    """The ``[userinfo@]host[:port]`` part of an endpoint: a URL's (up to its path, query or
    fragment), the whole ``HOST:PORT``, none for a unix socket's path or abstract name. A password
    holding a ``/``, ``?`` or ``#`` not percent-encoded ends the authority early (``ops:pa/ss@host``:
    ``ops:pa`` is no host:port, and an ``@`` follows): then it runs to the host after the last
    ``@``, so that no part of the password is read as the host or port, nor quoted."""
    if endpoint.lower().startswith(_SOCKET_SCHEMES):
        return ""
    if "://" in endpoint:
        rest, ends = endpoint.split("://", 1)[1], r"[/?#]"
    else:
        rest, ends = endpoint, r"/"
    authority = re.split(ends, rest, maxsplit=1)[0]
    if "@" not in authority and "@" in rest[len(authority):] and not _HOST_PORT.fullmatch(authority):
        userinfo, _, host = rest.rpartition("@")
        authority = f"{userinfo}@{re.split(ends, host, maxsplit=1)[0]}"
    return authority


def shown_endpoint(endpoint: str) -> str:
    """``endpoint`` as a message may quote it: what comes before ``@`` in its authority (a user and
    a password) replaced by ``***``."""
    authority = _authority(endpoint)
    if "@" not in authority:
        return endpoint
    start = endpoint.find(authority)
    return f"{endpoint[:start]}***@{authority.rpartition('@')[2]}{endpoint[start + len(authority):]}"


GLOBAL_PROVIDER_MESSAGE = (
    "pathwatch: no OpenTelemetry SDK tracer provider was configured, so pathwatch made one (exporting "
    "to %s) and set it as the global tracer provider. OpenTelemetry configured after this cannot "
    "replace it ('Overriding of current TracerProvider is not allowed'; its exporter gets nothing): "
    "configure OpenTelemetry before pathwatch's instrument(), or add your span processors to "
    "opentelemetry.trace.get_tracer_provider()")


def configure(endpoint: str = DEFAULT_ENDPOINT, *, tracer_provider: Any = None,
              exporter: SpanExporter | None = None, insecure: bool = True,
              schedule_delay_millis: int | None = None, max_queue_size: int | None = None,
              max_export_batch_size: int | None = None,
              service_version: str | None = None) -> ExportSetup:
    """Send spans to ``endpoint`` (OTLP/gRPC) through a large batch processor.

    The app's SDK provider (given, or the global one) gets the processor added; without one, a
    provider with pathwatch's Resource is created and made global. Sizes not given come from the
    ``OTEL_BSP_*`` variables, else pathwatch's defaults (``batch_settings``).

    Global, not private: the FastAPI request spans (every call's parent, its user and entry point)
    are made by the OpenTelemetry FastAPI instrumentation, which ``opentelemetry-instrument`` or the
    app starts with the global provider; a private one would leave them unrecorded, and would split
    each trace between two providers. OpenTelemetry refuses to replace a global provider, so an app
    that configures its own afterwards would get only OpenTelemetry's "Overriding of current
    TracerProvider is not allowed" and its exporter nothing: one warning says so when it is made.
    """
    settings = batch_settings(schedule_delay_millis=schedule_delay_millis,
                              max_queue_size=max_queue_size,
                              max_export_batch_size=max_export_batch_size)
    provider = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
    created = False
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider(resource=build_resource(service_version))
        trace.set_tracer_provider(provider)
        created = trace.get_tracer_provider() is provider
        if not created:  # another provider won the race to be global: use it
            provider = trace.get_tracer_provider()
        else:
            _logger.warning(GLOBAL_PROVIDER_MESSAGE, endpoint)
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=insecure)
    processor = CountingBatchSpanProcessor(CountingExporter(exporter),
                                           max_queue_size=settings.max_queue_size,
                                           schedule_delay_millis=settings.schedule_delay_millis,
                                           max_export_batch_size=settings.max_export_batch_size)
    provider.add_span_processor(processor)
    drops.install()
    return ExportSetup(provider, processor, created, settings)


def _new_trace_id() -> int:
    # from the OS, not ``random``: nothing here depends on whether ``random`` was reseeded at a fork
    while True:
        trace_id = secrets.randbits(128)
        if trace_id != trace.INVALID_TRACE_ID:
            return trace_id


_heartbeat_trace_id = _new_trace_id()


def heartbeat_trace_id() -> int:
    """The trace id of this process's heartbeats: one for the process's life (every ``Heartbeat``,
    an ``instrument()`` after an ``uninstrument()`` too), a new one in a forked child."""
    return _heartbeat_trace_id


class _HeartbeatIds(RandomIdGenerator):
    """The id generator of the heartbeats' own provider: its spans, all roots, take the process's
    heartbeat trace id; span ids stay random."""

    def generate_trace_id(self) -> int:
        return _heartbeat_trace_id


def _heartbeat_tracer(provider: Any, processor: SpanProcessor | None) -> Any:
    """A tracer whose spans are roots of the process's heartbeat trace, with ``provider``'s resource
    (default: the global provider), exported through ``processor`` (pathwatch's own), else through
    ``provider``'s span processors. Never sampled out (one span per interval; a sampler deciding by
    trace id would keep all of a process's heartbeats or none). None when ``provider`` is no SDK
    provider (not yet, or another SDK's): its own tracer then (a random trace per heartbeat)."""
    if provider is None:
        provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        return None
    shared = None
    if processor is None:
        shared = getattr(provider, "_active_span_processor", None)  # the SDK's, since 1.0
        if shared is None:
            return None
    own = TracerProvider(sampler=ALWAYS_ON, resource=provider.resource, shutdown_on_exit=False,
                         active_span_processor=shared, id_generator=_HeartbeatIds())
    if processor is not None:
        own.add_span_processor(processor)  # shut down by its ExportSetup, not by this provider
    return own.get_tracer(TRACER_NAME, SDK_VERSION)


class Heartbeat:
    """A daemon thread that emits ``pathwatch.heartbeat`` as it starts, then every ``interval_s``,
    and once at stop.

    Every heartbeat of the process is a root span of one trace (``heartbeat_trace_id``), exported
    through ``processor`` (pathwatch's own, when it exports) or else ``tracer_provider``'s span
    processors; ``tracer_provider`` (default: the global one) also gives the resource.

    The heartbeat sent as the process stops cleanly is *final* (``pathwatch.sdk.heartbeat_final``
    true; false on every other): the one at ``stop`` (``uninstrument()``, the exit) and the one of
    the app's ASGI lifespan shutdown (``beat(final=True)``), after which uvicorn ends the process by
    its signal, no exit handler run. A process whose heartbeats stop without a final one was killed
    outright, and the sidecar counts what its exporter still held as lost. After a final beat the
    periodic one pauses — until the app starts again (``resume``: a test client's next cycle), at
    most ``PAUSE_AFTER_FINAL_S`` — so that a periodic beat while the shutdown flushes, or in the
    moment before the process ends, does not say it lives on: the sidecar would then take the
    clean stop for a kill."""

    #: the longest the periodic beat pauses after a final one: a process still running then serves on
    PAUSE_AFTER_FINAL_S = 60.0

    def __init__(self, interval_s: float = DEFAULT_HEARTBEAT_S, tracer_provider: Any = None,
                 counter: DropCounter = drops, processor: SpanProcessor | None = None) -> None:
        self.interval_s = float(interval_s)
        self._provider = tracer_provider
        self._processor = processor
        self._tracer: Any = None  # built at the first beat: the global provider may be set by then
        self._counter = counter
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = False
        self._paused_until = 0.0  # monotonic: no periodic beat before (after a final one)
        # held by a periodic beat from its check of the pause to its end, and by a final beat to
        # set the pause: a periodic beat under way when the final one comes goes out before it
        self._pause_lock = threading.Lock()
        self.beats = 0

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        atexit.register(self.stop)  # the final beat at exit, also when the periodic one is off (0)
        _heartbeats.add(self)
        if self.interval_s > 0:
            self._start_thread()

    def _start_thread(self, at_once: bool = True) -> None:
        self._thread = threading.Thread(target=self._run, args=(at_once,),
                                        name="pathwatch-heartbeat", daemon=True)
        self._thread.start()

    def after_fork_in_child(self) -> None:
        """A forked child has none of its parent's threads: a running heartbeat starts again there
        (with a new event: the old one's lock may have been held by the parent's thread). Its tracer
        is built again at the next beat, with the resource the SDK renews in the child."""
        self._tracer = None
        self._paused_until = 0.0  # the parent's final beat is not the child's
        self._pause_lock = threading.Lock()  # the parent's thread may have held it at the fork
        if not self._started or self._stop.is_set():
            return
        self._stop = threading.Event()
        if self.interval_s > 0:
            # not at once: the fork handlers after this one (the SDK's, renewing the provider's
            # service.instance.id) have not run yet, and a beat now could carry the parent's id
            self._start_thread(at_once=False)

    def _run(self, at_once: bool = True) -> None:
        # the first beat at once: the sidecar follows a process (is it still there?) from its first
        # heartbeat, and one killed before it would go unjudged (a crash loop's early OOM kills)
        if not at_once and self._stop.wait(self.interval_s):
            return
        while True:
            with self._pause_lock:
                if time.monotonic() >= self._paused_until and not self._stop.is_set():
                    self.beat()
            if self._stop.wait(self.interval_s):
                return

    def resume(self) -> None:
        """The app starts (again) after a final beat: the periodic beat goes on at its next turn."""
        self._paused_until = 0.0

    def _heartbeat_tracer(self) -> Any:
        tracer = self._tracer
        if tracer is None:
            tracer = self._tracer = _heartbeat_tracer(self._provider, self._processor)
        if tracer is None:  # no SDK provider (yet): asked again at the next beat
            return trace.get_tracer(TRACER_NAME, SDK_VERSION, self._provider)
        return tracer

    def beat(self, final: bool = False) -> None:
        """Emit one heartbeat span with the cumulative counts; ``final``: the process stops."""
        if final:
            # a periodic beat stuck in a hung exporter holds the lock: the final one waits a while
            # only (the exit must not hang on it), and pauses the periodic beat all the same
            locked = self._pause_lock.acquire(timeout=2.0)
            try:
                self._paused_until = time.monotonic() + self.PAUSE_AFTER_FINAL_S
            finally:
                if locked:
                    self._pause_lock.release()
        try:
            tracer = self._heartbeat_tracer()
            span = tracer.start_span(HEARTBEAT_SPAN_NAME, context=_ROOT_CONTEXT, attributes={
                attr.SPAN_KIND: SpanKinds.HEARTBEAT,
                attr.DROPPED_SPANS: self._counter.dropped,
                attr.INSTRUMENTATION_ERRORS: instrumentation_error_count(),
                attr.PENDING_EMITS_EVICTED: pending_emits.evicted,
                attr.HEARTBEAT_INTERVAL_S: self.interval_s,
                attr.HEARTBEAT_SEQUENCE: self._counter.next_report(),
                attr.COUNTS_SINCE_S: self._counter.since_s,
                attr.HEARTBEAT_FINAL: final,
            })
            span.end()
            self.beats += 1
        except Exception:  # the heartbeat must never take the process down
            _logger.debug("pathwatch heartbeat failed", exc_info=True)

    def stop(self) -> None:
        """Stop the thread and emit the final heartbeat (shutdown flushes the last counts)."""
        if self._stop.is_set():
            return
        self._stop.set()
        _heartbeats.discard(self)
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self.beat(final=True)


HEARTBEAT_SPAN_NAME = attr.HEARTBEAT_SPAN_NAME
_ROOT_CONTEXT = trace.set_span_in_context(trace.INVALID_SPAN)  # heartbeats are roots, never children
_heartbeats: weakref.WeakSet[Heartbeat] = weakref.WeakSet()  # started and not stopped


# --- os.fork(): gunicorn's workers are forks of a master that may have started pathwatch -------------
in_forked_child(drops.after_fork_in_child)


@in_forked_child
def _new_heartbeat_trace() -> None:
    """A forked child is a backend process of its own: its heartbeats are a trace of their own (a
    traceID router may send them to another replica than its parent's)."""
    global _heartbeat_trace_id
    _heartbeat_trace_id = _new_trace_id()


@in_forked_child
def _restart_heartbeats() -> None:
    for heartbeat in list(_heartbeats):
        try:
            heartbeat.after_fork_in_child()
        except Exception:  # pragma: no cover - one that fails leaves the others their restart
            pass
