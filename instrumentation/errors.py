"""pathwatch's exceptions, and the fail-safe counter for its own errors.

Two kinds of failure exist. Configuration errors (a bad path map, a missing HMAC key) are raised at
start-up, where the operator can fix them. Everything that goes wrong later, inside a wrapped call,
must never reach the observed backend: it is counted (reported on the heartbeat span) and logged
once per site, and the backend's call proceeds.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from opentelemetry.attributes import BoundedAttributes
from opentelemetry.trace import Status, StatusCode

from instrumentation.forks import in_forked_child

_logger = logging.getLogger("instrumentation")

#: distinct sites remembered for "log once"; beyond it, errors are still counted but not logged
_MAX_LOGGED_SITES = 1024


class PathwatchError(Exception):
    """Base class of every error pathwatch raises on purpose."""


class ConfigurationError(PathwatchError):
    """The instrumentation cannot start as configured (e.g. no HMAC key for pseudonyms)."""


class PathMapError(PathwatchError):
    """The path map is invalid. The message names the file, the line and the key path."""

    def __init__(self, message: str, *, file: str = "<pathmap>", key_path: str = "",
                 line: int | None = None) -> None:
        self.file = file
        self.key_path = key_path
        self.line = line
        self.reason = message
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where} {key_path}: {message}" if key_path else f"{where}: {message}")


class _ErrorCounter:
    """Counts pathwatch's internal errors; logs the first one of each site."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._logged: set[str] = set()

    @property
    def count(self) -> int:
        return self._count

    def record(self, site: str, exc: BaseException | None = None, detail: str = "",
               message: str | None = None) -> None:
        # Must not raise: it runs inside except blocks on the backend's hot path.
        try:
            with self._lock:
                self._count += 1
                first = site not in self._logged and len(self._logged) < _MAX_LOGGED_SITES
                if first:
                    self._logged.add(site)
            if first and message is not None:
                _logger.error("pathwatch: %s", message)
            elif first:
                _logger.warning("pathwatch: internal error at %s (%s%s); counted, further ones at "
                                "this site are not logged", site,
                                # the type only: a message may quote app data such as a user id
                                type(exc).__name__ if exc is not None else "", detail)
        except Exception:  # pragma: no cover - logging itself failed
            pass

    def reset_for_tests(self) -> None:
        with self._lock:
            self._count = 0
            self._logged.clear()

    def after_fork_in_child(self) -> None:
        """A forked child counts (and logs) its own errors, under a new lock: another thread of the
        parent may have held the old one at the fork, and would never release it here."""
        self._lock = threading.Lock()
        self._count = 0
        self._logged = set()


errors = _ErrorCounter()


in_forked_child(errors.after_fork_in_child)


def record_error(site: str, exc: BaseException | None = None, detail: str = "",
                 message: str | None = None) -> None:
    """Count an internal error at ``site`` and log it (``message`` as an error, if given) the first
    time it happens there."""
    errors.record(site, exc, detail, message)


def instrumentation_error_count() -> int:
    return errors.count


_EXCEPTION_EVENT = "exception"
_EXCEPTION_TYPE = "exception.type"
#: what an exception event keeps: its type, and whether it escaped the span
_EXCEPTION_KEPT = (_EXCEPTION_TYPE, "exception.escaped")


def by_type_only(span: Any) -> None:
    """Reduce what the app recorded itself on a span pathwatch exports to what pathwatch records of
    the app's exceptions (``mark_app_error``): the current span is pathwatch's inside a traced call,
    the server span inside a request, and ``trace.get_current_span().record_exception(exc)`` or
    ``.set_status(Status(ERROR, "quota exceeded for alice"))`` there would export a message, a stack
    trace or the app's own words, which may carry user ids. So, before the span ends: every
    ``exception`` event keeps only its type (and whether it escaped), and the status description only
    as the type of an exception recorded on the span (``KeyError: 'alice'`` -> ``KeyError``), else none.
    An SDK span's events can only be changed through its internals; a span without them (another
    SDK's, a non-recording one) is left as it is."""
    try:
        queue = span._events._dq  # the SDK's BoundedList: no public way to replace an event
        status = span._status
    except AttributeError:
        return
    try:
        if not queue and (status is None or not status.description):
            return  # nearly every span: nothing recorded
        description = status.description if status is not None else None
        types: set[str] = set()
        for index, event in enumerate(queue):
            if event.name != _EXCEPTION_EVENT:
                continue
            attributes = event.attributes or {}
            kind = attributes.get(_EXCEPTION_TYPE)
            if isinstance(kind, str):
                types.update((kind, kind.rpartition(".")[2]))
            if any(key not in _EXCEPTION_KEPT for key in attributes):
                from opentelemetry.sdk.trace import Event  # the span is the SDK's: loaded already
                kept = {key: attributes[key] for key in _EXCEPTION_KEPT if key in attributes}
                queue[index] = Event(_EXCEPTION_EVENT, BoundedAttributes(attributes=kept, immutable=True),
                                     event.timestamp)
        if description:
            prefix = description.partition(":")[0].strip()
            reduced = prefix if prefix in types else None
            if reduced != description:
                span.set_status(Status(status.status_code, reduced))
    except Exception as exc:  # the span still ends
        record_error("app_records", exc)


def mark_app_error(span: Any, error: BaseException) -> None:
    """Record the app's exception on a span by its type only: exception messages and stack traces may carry
    user ids (``KeyError('alice')``), which must not leave the process in clear."""
    name = type(error).__name__
    span.add_event("exception", {"exception.type": name,
                                 "exception.escaped": True})
    span.set_status(Status(StatusCode.ERROR, name))
