"""The alert dispatcher: ``notify`` returns at once; one worker thread per sink pushes, paced and retried.

Decisions, so they are visible:
- Dedupe: an incident is *paged* once. The ledger (the incident store) remembers it across restarts;
  incidents already alerted, or already queued, are counted ``deduplicated``. It counts as alerted when
  at least one sink accepted it.
- Sinks are independent: each has its own queue, worker, token bucket and retries, so an Alertmanager
  that is down (retrying for ~15 s an alert) never delays the webhook's page, nor the other way round.
- Alertmanager is told how long the alert lasts: ``endsAt`` = the incident's last finding +
  ``resolve_after_s``, and an incident that keeps producing findings is sent again (``refreshed``, at
  most once per ``REFRESH_EVERY_S``, or a third of ``resolve_after_s`` if that is shorter, per
  incident) so that it stays firing; one that stops resolves ``resolve_after_s`` after its last
  finding. Alertmanager deduplicates by labels: a refresh is no second page. (Without ``endsAt`` Alertmanager resolves an alert ``resolve_timeout``, 5 minutes by
  default, after it was last sent, while the leak may go on: its clients are expected to re-send.)
  The webhook gets the page only.
- Rate limit (token bucket per sink, ``max_per_minute``): a page over the limit is *kept* in the queue
  and sent when a token frees up — a bleed page must not vanish — and counted ``rate_limited`` once.
  Refreshes take no token. The queues are bounded: when a backlog is full, new alerts are ``dropped``
  (counted, logged once).
- Retries: connection errors, timeouts, 5xx and 429 are retried ``retry_attempts`` times with
  exponential backoff (``retry_backoff_s`` * 2^n, at most 60 s), each retry counted ``retried``; then
  ``failed``. Other 4xx fail at once.
- ``close(timeout)`` keeps draining until the timeout, then counts what is left as ``dropped``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

import httpx

from sidecar.alerting.payload import DEFAULT_RUNBOOK_URL
from sidecar.alerting.ratelimit import TokenBucket
from sidecar.alerting.sinks import (AlertmanagerSink, PermanentSinkError, RetryableSinkError, Sink,
                                   WebhookSink)
from sidecar.config import AlertingConfig
from sidecar.incidents.grouping import severity_rank
from sidecar.model import Incident, Severity
from sidecar.telemetry import Telemetry
from sidecar.threads import name_os_thread

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 1000
MAX_BACKOFF_S = 60.0
REFRESH_EVERY_S = 60.0
_POLL_S = 0.25  # longest uninterrupted wait, so a paused bucket notices a changed clock
_PAGE, _REFRESH = "page", "refresh"


class AlertLedger(Protocol):
    """Remembers which incidents were alerted (``IncidentStore`` is one, persisted)."""

    def is_alerted(self, incident_id: str) -> bool: ...

    def mark_alerted(self, incident_id: str) -> object: ...


class MemoryLedger:
    """A bounded in-process ledger, for when there is no store."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def is_alerted(self, incident_id: str) -> bool:
        with self._lock:
            return incident_id in self._ids

    def mark_alerted(self, incident_id: str) -> bool:
        with self._lock:
            self._ids[incident_id] = None
            if len(self._ids) > self._capacity:
                self._ids.popitem(last=False)
            return True


class AlertDispatcher:
    """Implements ``sidecar.types.AlertSink``. Starts one worker thread per sink at construction."""

    def __init__(self, config: AlertingConfig, *, ledger: AlertLedger | None = None,
                 telemetry: Telemetry | None = None, sinks: Sequence[Sink] | None = None,
                 queue_size: int = DEFAULT_QUEUE_SIZE, runbook_url: str = DEFAULT_RUNBOOK_URL,
                 http_timeout_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 refresh_every_s: float = REFRESH_EVERY_S) -> None:
        self._client = httpx.Client(timeout=http_timeout_s)
        self.sinks: list[Sink] = list(sinks) if sinks is not None else _configured_sinks(
            config, self._client, runbook_url)
        self._ledger: AlertLedger = ledger if ledger is not None else MemoryLedger()
        self._telemetry = telemetry
        self._min_rank = severity_rank(Severity(config.min_severity))
        self._clock = clock
        # a third of resolve_after_s at most: two refreshes may be lost before the alert resolves
        self._refresh_every_s = min(refresh_every_s, config.resolve_after_s / 3)
        self._refreshed: OrderedDict[str, float] = OrderedDict()  # incident id -> last refresh offered
        self._max_refreshed = max(queue_size * 100, 1)
        self._lock = threading.Lock()  # _refreshed, and offering to the workers
        self._closing = False
        self._warned: set[str] = set()
        self._workers = [_SinkWorker(self, sink, config, queue_size, clock) for sink in self.sinks]
        self._refreshing = [worker for worker in self._workers if worker.sink.refreshes]

    # -- the data path (pipeline thread): never blocks, never raises --------------------------------

    def notify(self, incidents: Sequence[Incident]) -> None:
        """Incidents that got findings: new ones are paged, alerted ones refreshed where a sink
        wants it (Alertmanager)."""
        for incident in incidents:
            try:
                self._offer(incident)
            except Exception:  # pathwatch's own error: counted as a failed alert, logged once
                self._count("failed")
                self._warn_once("notify", "alert dispatcher: cannot queue an incident", exc_info=True)

    def _offer(self, incident: Incident) -> None:
        if not self._workers or severity_rank(incident.severity) < self._min_rank:
            return
        with self._lock:
            if self._closing:
                self._count("dropped")
                return
            if incident.alerted:  # a new finding of a paged incident: not a page, maybe a refresh
                self._offer_refresh(incident)
                return
            if self._ledger.is_alerted(incident.id):  # a stale copy, or offered again after a page
                self._count("deduplicated")
                self._offer_refresh(incident)
                return
            for worker in self._workers:
                worker.offer(_PAGE, incident)

    def _offer_refresh(self, incident: Incident) -> None:
        if not self._refreshing:
            return
        now = self._clock()
        last = self._refreshed.get(incident.id)
        if last is not None and now - last < self._refresh_every_s:
            return  # refreshed recently: the alert's endsAt covers this finding's neighbourhood
        self._remember_refresh(incident.id, now)
        for worker in self._refreshing:
            worker.offer(_REFRESH, incident)

    def _remember_refresh(self, incident_id: str, now: float) -> None:
        """Bounded: the least recently refreshed incident is forgotten first (it is then refreshed
        with its next finding, a harmless extra send)."""
        self._refreshed[incident_id] = now
        self._refreshed.move_to_end(incident_id)
        while len(self._refreshed) > self._max_refreshed:
            self._refreshed.popitem(last=False)

    def paged(self, incident: Incident) -> None:
        """A worker's sink accepted the page (called on that worker's thread)."""
        self._ledger.mark_alerted(incident.id)
        if self._refreshing:  # its refreshes start from now
            with self._lock:
                self._remember_refresh(incident.id, self._clock())

    # -- lifecycle ------------------------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking alerts, push what is queued for up to ``timeout`` seconds, drop the rest."""
        with self._lock:
            self._closing = True
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            worker.closing.set()
        for worker in self._workers:
            worker.thread.join(max(0.0, deadline - time.monotonic()))
        for worker in self._workers:
            if worker.thread.is_alive():
                worker.abort.set()
        for worker in self._workers:
            worker.thread.join(_POLL_S * 4 + 1.0)
        self._client.close()

    def pending(self) -> int:
        """Alerts queued or being pushed, over all sinks."""
        return sum(worker.pending() for worker in self._workers)

    # -- internals ------------------------------------------------------------------------------------

    def _count(self, outcome: str, sink: Sink | None = None) -> None:
        if self._telemetry is None:
            return
        for target in (sink,) if sink is not None else self.sinks:
            self._telemetry.alerts_sent.labels(sink=target.name, outcome=outcome).inc()

    def _warn_once(self, key: str, message: str, *args: object, exc_info: bool = False) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args, exc_info=exc_info)


class _SinkWorker:
    """One sink's queues and thread: pages (paced by the token bucket, retried) and refreshes (no
    token; sent first, also while a page waits for its token, so that a backlog of rate-limited
    pages never lets a firing alert expire)."""

    def __init__(self, dispatcher: AlertDispatcher, sink: Sink, config: AlertingConfig,
                 queue_size: int, clock: Callable[[], float]) -> None:
        self.sink = sink
        self._dispatcher = dispatcher
        self._attempts = config.retry_attempts
        self._backoff_s = config.retry_backoff_s
        self._bucket = TokenBucket(config.max_per_minute, clock)
        self._pages: queue.Queue[Incident] = queue.Queue(maxsize=queue_size)
        self._refreshes: queue.Queue[Incident] = queue.Queue(maxsize=queue_size)
        self._queued: set[tuple[str, str]] = set()  # (kind, incident id) queued or being pushed
        self._lock = threading.Lock()
        self.closing = threading.Event()  # stop when the queue is empty
        self.abort = threading.Event()  # the drain timeout passed: stop waiting, drop the rest
        self.thread = threading.Thread(target=self._run, name=f"pathwatch-alerts-{sink.name}",
                                       daemon=True)
        self.thread.start()

    def offer(self, kind: str, incident: Incident) -> None:
        key = (kind, incident.id)
        with self._lock:
            if key in self._queued:
                if kind is _PAGE:
                    self._count("deduplicated")
                return
            into = self._pages if kind is _PAGE else self._refreshes
            try:
                into.put_nowait(incident)
            except queue.Full:
                self._count("dropped")
                self._dispatcher._warn_once(
                    f"full:{self.sink.name}", "alert queue of %s full (%d): alerts are dropped and "
                    "counted in pathwatch_alerts_sent_total{outcome=\"dropped\"}", self.sink.name,
                    into.maxsize)
                return
            self._queued.add(key)

    def pending(self) -> int:
        with self._lock:
            return len(self._queued)

    def _run(self) -> None:
        name_os_thread()
        while True:
            self._send_refreshes()
            try:
                incident = self._pages.get(timeout=_POLL_S)  # a refresh waits at most this long
            except queue.Empty:
                if self.closing.is_set() and self._refreshes.empty():
                    return
                continue
            self._handle(_PAGE, incident)

    def _send_refreshes(self) -> None:
        while True:
            try:
                incident = self._refreshes.get_nowait()
            except queue.Empty:
                return
            self._handle(_REFRESH, incident)

    def _handle(self, kind: str, incident: Incident) -> None:
        try:
            if self.abort.is_set():
                self._count("dropped")
            elif kind is _PAGE:
                self._page(incident)
            elif self._push(incident):
                self._count("refreshed")
        except Exception:
            self._count("failed")
            self._dispatcher._warn_once(f"worker:{self.sink.name}",
                                        "alert dispatcher: unexpected error", exc_info=True)
        finally:
            with self._lock:
                self._queued.discard((kind, incident.id))

    def _page(self, incident: Incident) -> None:
        # no "already paged?" check here: the ledger may say so because another sink accepted it
        # (this one still pages), and an incident evicted from the store and back is new (its page
        # is due again); a page is queued once per sink (``offer``), offered only when not alerted
        if not self._take_token():
            self._count("dropped")
            return
        if self._push(incident):
            self._count("sent")
            self._dispatcher.paged(incident)

    def _take_token(self) -> bool:
        counted = False
        while not self.abort.is_set():
            wait_s = self._bucket.try_take()
            if wait_s == 0.0:
                return True
            if not counted:
                self._count("rate_limited")
                counted = True
            self._send_refreshes()  # they take no token: not behind this page
            self.abort.wait(min(wait_s, _POLL_S))
        return False

    def _push(self, incident: Incident) -> bool:
        attempt = 0
        while True:
            try:
                self.sink.send(incident)
            except PermanentSinkError as exc:
                return self._failed(exc)
            except RetryableSinkError as exc:
                if attempt >= self._attempts or self.abort.is_set():
                    return self._failed(exc)
                self._count("retried")
                if self.abort.wait(min(self._backoff_s * 2 ** attempt, MAX_BACKOFF_S)):
                    return self._failed(exc)
                attempt += 1
            else:
                return True

    def _failed(self, exc: Exception) -> bool:
        self._count("failed")
        self._dispatcher._warn_once(f"failed:{self.sink.name}", "alert push to %s failed: %s (further "
                                    "failures are only counted)", self.sink.name, exc)
        return False

    def _count(self, outcome: str) -> None:
        self._dispatcher._count(outcome, self.sink)


def _configured_sinks(config: AlertingConfig, client: httpx.Client, runbook_url: str) -> list[Sink]:
    sinks: list[Sink] = []
    if config.alertmanager_url:
        sinks.append(AlertmanagerSink(config.alertmanager_url, client, external_url=config.external_url,
                                      runbook_url=runbook_url, resolve_after_s=config.resolve_after_s))
    if config.webhook_url:
        sinks.append(WebhookSink(config.webhook_url, client, external_url=config.external_url,
                                 runbook_url=runbook_url))
    return sinks
