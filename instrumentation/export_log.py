"""pathwatch's exporter failing, in the app's log: the first line of an outage, not one per batch.

pathwatch exports through OpenTelemetry's OTLP/gRPC exporter, which logs every failed attempt: a
warning per retry ("Transient error StatusCode.UNAVAILABLE encountered while exporting traces to
HOST:PORT, retrying in 2.00s") and an error per batch given up ("Failed to export traces to
HOST:PORT"). With the sidecar down, that was a line every few seconds in the app's log for as long as
it stayed down (13 in 40 s), where pathwatch logs each of its errors once. So, on that exporter's
logger, a record naming pathwatch's endpoint passes for the first failure of an outage, the later
ones are held back, and the first export that succeeds again says, in one line, how many were; a
next outage is logged again. The spans lost meanwhile are counted (``pathwatch.sdk.dropped_spans``).
Records naming another endpoint (an exporter of the app's own) pass as they are.
"""

from __future__ import annotations

import logging
import threading
import weakref

from instrumentation.forks import in_forked_child

_logger = logging.getLogger(__name__)
#: where the OTLP/gRPC exporter (1.45) logs its failed attempts, the endpoint among their arguments
EXPORTER_LOGGER = "opentelemetry.exporter.otlp.proto.grpc.exporter"


class OutageLog(logging.Filter):
    """On the exporter's logger: its records naming ``endpoint``, once an outage."""

    def __init__(self, endpoint: str) -> None:
        super().__init__()
        self.endpoint = endpoint
        self._lock = threading.Lock()
        self._down = False
        self.held = 0  # records held back in this outage
        _filters.add(self)

    def filter(self, record: logging.LogRecord) -> bool:
        # runs inside the exporter's log call, on the export thread: it must never raise
        try:
            args = record.args
            if not isinstance(args, tuple) or self.endpoint not in args:
                return True
            with self._lock:
                if not self._down:
                    self._down = True
                    return True
                self.held += 1
                return False
        except Exception:  # pragma: no cover - the record passes, as without the filter
            return True

    def exported(self) -> None:
        """An export succeeded: an outage is over."""
        if not self._down:  # every export while the sidecar is up: no lock
            return
        with self._lock:
            held, self._down, self.held = self.held, False, 0
        _logger.warning("pathwatch: its exporter reaches %s again (%d later failure message(s) of "
                        "the outage left out of the log; the spans lost are counted in the "
                        "heartbeat's pathwatch.sdk.dropped_spans)", self.endpoint, held)

    def install(self) -> None:
        logger = logging.getLogger(EXPORTER_LOGGER)
        if self not in logger.filters:
            logger.filters.insert(0, self)

    def uninstall(self) -> None:
        logging.getLogger(EXPORTER_LOGGER).removeFilter(self)


_filters: weakref.WeakSet[OutageLog] = weakref.WeakSet()


@in_forked_child
def _new_locks() -> None:
    """A forked child logs under new locks: the parent's export thread may have held one at the fork."""
    for log in list(_filters):
        log._lock = threading.Lock()
