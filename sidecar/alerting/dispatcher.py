"""The alert dispatcher: ``notify`` returns at once; one worker thread pushes, paced and retried.

Decisions, so they are visible:
- Dedupe: an incident is pushed once. The ledger (the incident store) remembers it across restarts;
  incidents already alerted, or already queued, are counted ``deduplicated``.
- Rate limit (token bucket, ``max_per_minute``): an alert over the limit is *kept* in the queue and
  sent when a token frees up — a bleed page must not vanish — and counted ``rate_limited`` once.
  The queue is bounded: when the backlog is full, new alerts are ``dropped`` (counted, logged once).
- Retries: connection errors, timeouts, 5xx and 429 are retried ``retry_attempts`` times with
  exponential backoff (``retry_backoff_s`` * 2^n, at most 60 s), each retry counted ``retried``; then
  ``failed``. Other 4xx fail at once. Sinks are independent; an incident counts as alerted when at
  least one sink accepted it.
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
_POLL_S = 0.25  # longest uninterrupted wait, so a paused bucket notices a changed clock


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
    """Implements ``sidecar.types.AlertSink``. Starts its worker thread at construction."""

    def __init__(self, config: AlertingConfig, *, ledger: AlertLedger | None = None,
                 telemetry: Telemetry | None = None, sinks: Sequence[Sink] | None = None,
                 queue_size: int = DEFAULT_QUEUE_SIZE, runbook_url: str = DEFAULT_RUNBOOK_URL,
                 http_timeout_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._client = httpx.Client(timeout=http_timeout_s)
        self.sinks: list[Sink] = list(sinks) if sinks is not None else _configured_sinks(
            config, self._client, runbook_url)
        self._ledger: AlertLedger = ledger if ledger is not None else MemoryLedger()
        self._telemetry = telemetry
        self._min_rank = severity_rank(Severity(config.min_severity))
        self._attempts = config.retry_attempts
        self._backoff_s = config.retry_backoff_s
        self._bucket = TokenBucket(config.max_per_minute, clock)
        self._queue: queue.Queue[Incident] = queue.Queue(maxsize=queue_size)
        self._queued: set[str] = set()
        self._queued_lock = threading.Lock()
        self._closing = threading.Event()  # stop when the queue is empty
        self._abort = threading.Event()  # the drain timeout passed: stop waiting, drop the rest
        self._warned: set[str] = set()
        self._worker = threading.Thread(target=self._run, name="pathwatch-alerts", daemon=True)
        self._worker.start()

    # -- the data path (pipeline thread): never blocks, never raises --------------------------------

    def notify(self, incidents: Sequence[Incident]) -> None:
        for incident in incidents:
            try:
                self._offer(incident)
            except Exception:  # pathwatch's own error: counted as a failed alert, logged once
                self._count("failed")
                self._warn_once("notify", "alert dispatcher: cannot queue an incident", exc_info=True)

    def _offer(self, incident: Incident) -> None:
        if not self.sinks or severity_rank(incident.severity) < self._min_rank:
            return
        if self._closing.is_set():
            self._count("dropped")
            return
        with self._queued_lock:
            if incident.alerted or incident.id in self._queued or self._ledger.is_alerted(incident.id):
                self._count("deduplicated")
                return
            try:
                self._queue.put_nowait(incident)
            except queue.Full:
                self._count("dropped")
                self._warn_once("full", "alert queue full (%d): alerts are dropped and counted in "
                                "pathwatch_alerts_sent_total{outcome=\"dropped\"}", self._queue.maxsize)
                return
            self._queued.add(incident.id)

    # -- the worker thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        name_os_thread()
        while True:
            try:
                incident = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self._closing.is_set():
                    return
                continue
            try:
                if self._abort.is_set():
                    self._count("dropped")
                else:
                    self._deliver(incident)
            except Exception:
                self._count("failed")
                self._warn_once("worker", "alert dispatcher: unexpected error", exc_info=True)
            finally:
                with self._queued_lock:
                    self._queued.discard(incident.id)

    def _deliver(self, incident: Incident) -> None:
        if self._ledger.is_alerted(incident.id):  # alerted while it waited in the queue
            self._count("deduplicated")
            return
        if not self._take_token():
            self._count("dropped")
            return
        accepted = [self._push(sink, incident) for sink in self.sinks]
        if any(accepted):
            self._ledger.mark_alerted(incident.id)

    def _take_token(self) -> bool:
        counted = False
        while not self._abort.is_set():
            wait_s = self._bucket.try_take()
            if wait_s == 0.0:
                return True
            if not counted:
                self._count("rate_limited")
                counted = True
            self._abort.wait(min(wait_s, _POLL_S))
        return False

    def _push(self, sink: Sink, incident: Incident) -> bool:
        attempt = 0
        while True:
            try:
                sink.send(incident)
            except PermanentSinkError as exc:
                return self._failed(sink, exc)
            except RetryableSinkError as exc:
                if attempt >= self._attempts or self._abort.is_set():
                    return self._failed(sink, exc)
                self._count("retried", sink)
                if self._abort.wait(min(self._backoff_s * 2 ** attempt, MAX_BACKOFF_S)):
                    return self._failed(sink, exc)
                attempt += 1
            else:
                self._count("sent", sink)
                return True

    def _failed(self, sink: Sink, exc: Exception) -> bool:
        self._count("failed", sink)
        self._warn_once(f"failed:{sink.name}", "alert push to %s failed: %s (further failures are only "
                        "counted)", sink.name, exc)
        return False

    # -- lifecycle ------------------------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking alerts, push what is queued for up to ``timeout`` seconds, drop the rest."""
        self._closing.set()
        self._worker.join(timeout)
        if self._worker.is_alive():
            self._abort.set()
            self._worker.join(_POLL_S * 4 + 1.0)
        self._client.close()

    def pending(self) -> int:
        """Alerts queued or being pushed."""
        with self._queued_lock:
            return len(self._queued)

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


def _configured_sinks(config: AlertingConfig, client: httpx.Client, runbook_url: str) -> list[Sink]:
    sinks: list[Sink] = []
    if config.alertmanager_url:
        sinks.append(AlertmanagerSink(config.alertmanager_url, client, external_url=config.external_url,
                                      runbook_url=runbook_url))
    if config.webhook_url:
        sinks.append(WebhookSink(config.webhook_url, client, external_url=config.external_url,
                                 runbook_url=runbook_url))
    return sinks
