"""The alert dispatcher: ``notify`` returns at once; one worker thread per sink pushes, paced and retried.

Decisions, so they are visible:
- Dedupe: an incident is *paged* once per sink. The ledger (the incident store) remembers which sinks
  accepted it, across restarts; pages to a sink that has it, or already queued there, are counted
  ``deduplicated``.
- A page is never given up while the incident may still matter: one that failed after its retries is
  tried again later (``REPAGE_AFTER_S``, doubling up to ``MAX_REPAGE_AFTER_S``) while the process
  runs, and at start the sidecar offers every open incident seen within ``resolve_after_s`` again,
  and every one a sink still owes its page however long ago it was seen (``IncidentStore.owe_pages``;
  ``AlertDispatcher.resume``): the sinks that have it skip it, a sink that missed it — down, or cut
  by the last shutdown — is paged now, however many they are: each sink's worker keeps its share
  (at most the store's alertable set) and offers them to its queue one at a time, the most severe and
  most recent first, whenever it holds fewer pages than the queue's size, so that they never crowd
  out the pages of new findings nor lose a page to a full queue; while they wait they are
  ``pathwatch_alerts_resume_waiting{sink}``. Pages go out critical first. Nothing more is sent for an
  incident resolved by hand (``cancelled``; also between a page's retries, and an Alertmanager,
  which may have taken an attempt that timed out, is then sent the resolve; and while a page waits
  for its rate-limit token).
- Sinks are independent: each has its own queue, worker, token bucket and retries, so an Alertmanager
  that is down (retrying for ~15 s an alert) never delays the webhook's page, nor the other way round.
- Alertmanager is told how long the alert lasts: ``endsAt`` = the incident's last finding +
  ``resolve_after_s``, and an incident that keeps producing findings is sent again (``refreshed``, at
  most once per ``REFRESH_EVERY_S``, or a third of ``resolve_after_s`` if that is shorter, per
  incident) so that it stays firing; one that stops resolves ``resolve_after_s`` after the last
  finding that was sent — findings within the refresh interval after it are not, so at most that
  interval sooner after the very last one (14 to 15 minutes by default). Alertmanager deduplicates
  by labels: a refresh is no second page. (Without ``endsAt`` Alertmanager resolves an alert
  ``resolve_timeout``, 5 minutes by default, after it was last sent, while the leak may go on: its
  clients are expected to re-send.)
  The webhook gets the page only. An incident resolved through the API is sent with ``endsAt`` a
  minute ago (``payload.RESOLVE_CLOCK_ALLOWANCE_S``, never before ``startsAt``), so that
  Alertmanager resolves it at once, even with its clock behind ours; its next finding reopens and
  refreshes it.
- Refreshes and resolves are the alert's *state*: a sink's worker holds at most one waiting per
  incident, and the newest replaces the one waiting, where it stands (a resolve replaces a refresh
  not sent yet, the refresh of an incident that reopened replaces its resolve not sent yet); one
  offered while the incident's last one is being pushed waits and goes out after it. So the last
  state a sink gets is the incident's last, as on each instance of an Alertmanager cluster
  (``AlertmanagerSink``). A refresh that could not be queued (the queue full) does not count as
  the incident's last refresh: its next finding offers one again.
- Rate limit (token bucket per sink, ``max_per_minute``): a page over the limit is *kept* in the queue
  and sent when a token frees up — a bleed page must not vanish — and counted ``rate_limited`` once
  (a more severe page that comes while one waits for its token takes that token, the other going
  back in the queue, not counted again);
  the first page held is logged (a warning naming the sink, again once the queue has emptied).
  Refreshes take no token. The queues are bounded: when a backlog is full, new alerts are ``dropped``
  (counted, logged once) — except a page more severe than one held: the least severe page (the
  newest of those in the queue, the least recently seen of those waiting to be tried again) is
  dropped in its place, so a sink that is down for hours under a flood of warnings still gets the
  bleed first when it is back. A page dropped stays unpaged in the store: its next finding offers it
  again, and the next start pages it.
- Retries: connection errors, timeouts (a post not done within ``post_deadline_s`` as a whole is
  one: a server trickling its answer, each read within the client's timeout), 5xx and 429 are
  retried ``retry_attempts`` times with
  exponential backoff (``retry_backoff_s`` * 2^n, or the server's ``Retry-After`` if longer; at most
  60 s), each retry counted ``retried``; then ``failed``. Other 4xx fail at once, and the page waits
  as one whose retries failed (``REPAGE_AFTER_S`` doubling to ``MAX_REPAGE_AFTER_S``), but a new
  finding does not make it due: the sink would refuse it again (each new finding re-posted a
  refused page, as fast as the token bucket let it — 60 a minute to a webhook with a wrong path —
  and spent the tokens the other incidents' pages wait for).
- ``close(timeout)`` keeps draining until the timeout, then counts what is left as ``dropped``; the
  store still says those were not paged, so the next start pages them (``resume``) — as it does the
  pages ``resume`` had not offered yet (logged).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import httpx

from sidecar.alerting.outcomes import AlertOutcomes
from sidecar.alerting.payload import DEFAULT_RUNBOOK_URL
from sidecar.alerting.ratelimit import TokenBucket
from sidecar.alerting.sinks import (DEFAULT_POST_DEADLINE_S, AlertmanagerSink, PermanentSinkError,
                                   RetryableSinkError, Sink, SinkError, WebhookSink)
from sidecar.config import AlertingConfig
from sidecar.incidents.grouping import severity_rank
from sidecar.model import Incident, Severity
from sidecar.telemetry import Telemetry
from sidecar.threads import WatchedThread, name_os_thread

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 1000
MAX_BACKOFF_S = 60.0
REFRESH_EVERY_S = 60.0
REPAGE_AFTER_S = 30.0  # a page that failed after its retries is tried again this much later ...
MAX_REPAGE_AFTER_S = 300.0  # ... doubling up to this
_POLL_S = 0.25  # longest uninterrupted wait, so a paused bucket notices a changed clock
_PAGE, _REFRESH, _RESOLVE = "page", "refresh", "resolve"
_REQUEUED = float("inf")  # the due time of a deferred page back in the queue
_CANCELLED = PermanentSinkError("the incident was resolved by hand between the page's retries")


class AlertLedger(Protocol):
    """Remembers which sinks accepted which incident's page (``IncidentStore`` is one, persisted)."""

    def is_alerted(self, incident_id: str, sink: str) -> bool: ...

    def mark_alerted(self, incident_id: str, sink: str) -> object: ...

    def is_open(self, incident_id: str) -> bool:
        """Not resolved (by hand) since: a page or refresh of a resolved incident is not sent."""


class MemoryLedger:
    """A bounded in-process ledger, for when there is no store."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._paged: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def is_alerted(self, incident_id: str, sink: str) -> bool:
        with self._lock:
            return (incident_id, sink) in self._paged

    def is_open(self, incident_id: str) -> bool:
        return True  # no store, no PATCH

    def mark_alerted(self, incident_id: str, sink: str) -> bool:
        with self._lock:
            self._paged[(incident_id, sink)] = None
            if len(self._paged) > self._capacity:
                self._paged.popitem(last=False)
            return True


class AlertDispatcher:
    """Implements ``sidecar.types.AlertSink``. Starts one worker thread per sink at construction."""

    def __init__(self, config: AlertingConfig, *, ledger: AlertLedger | None = None,
                 telemetry: Telemetry | None = None, sinks: Sequence[Sink] | None = None,
                 queue_size: int = DEFAULT_QUEUE_SIZE, runbook_url: str = DEFAULT_RUNBOOK_URL,
                 http_timeout_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 refresh_every_s: float = REFRESH_EVERY_S,
                 post_deadline_s: float = DEFAULT_POST_DEADLINE_S) -> None:
        """``http_timeout_s`` bounds each step of a post (connect, each read and write),
        ``post_deadline_s`` the post as a whole (the sinks built here)."""
        if not 0 < post_deadline_s < float("inf"):
            raise ValueError(f"post_deadline_s: expected a number of seconds > 0, got "
                             f"{post_deadline_s!r}")
        # only where a configured sink needs it: httpx reads the proxy variables at construction and
        # refuses a SOCKS proxy (ALL_PROXY=socks5://...) without the socksio package, which made a
        # sidecar with no alert sink at all fail to start
        self._client: httpx.Client | None = None
        if sinks is None and (config.alertmanager_url or config.webhook_url):
            self._client = httpx.Client(timeout=http_timeout_s)
        # the sinks built here are closed with the client (the caller closes those it passes)
        self._own_sinks = ([] if self._client is None else
                           _configured_sinks(config, self._client, runbook_url, telemetry,
                                             post_deadline_s))
        self.sinks: list[Sink] = list(sinks) if sinks is not None else list(self._own_sinks)
        self._ledger: AlertLedger = ledger if ledger is not None else MemoryLedger()
        self._telemetry = telemetry
        self._min_rank = severity_rank(Severity(config.min_severity))
        self._clock = clock
        # a third of resolve_after_s at most: two refreshes may be lost before the alert resolves
        self._refresh_every_s = min(refresh_every_s, config.resolve_after_s / 3)
        self._refreshed: OrderedDict[str, float] = OrderedDict()  # incident id -> last refresh offered
        self._max_refreshed = max(queue_size * 100, 1)
        self._queue_size = queue_size
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
                self._count(AlertOutcomes.FAILED)
                self._warn_once("notify", "alert dispatcher: cannot queue an incident", exc_info=True)

    def _offer(self, incident: Incident, refresh: bool = True) -> None:
        if not self._workers or severity_rank(incident.severity) < self._min_rank:
            return
        with self._lock:
            if self._closing:
                self._count(AlertOutcomes.DROPPED)
                return
            if not self._ledger.is_open(incident.id):  # resolved by hand since this copy was made
                return
            paged = []  # the refreshing sinks that have the page: a new finding keeps it firing
            for worker in self._workers:
                sink = worker.sink.name
                if incident.paged_to(sink):  # a new finding of a paged incident: maybe a refresh
                    paged.append(worker)
                elif self._ledger.is_alerted(incident.id, sink):  # a stale copy, offered again
                    worker.count(AlertOutcomes.DEDUPLICATED)
                    paged.append(worker)
                else:
                    worker.offer(_PAGE, incident)
            if refresh:
                self._offer_refresh(incident, [worker for worker in paged if worker.sink.refreshes])

    def _offer_refresh(self, incident: Incident, workers: Sequence[_SinkWorker]) -> None:
        if not workers:
            return
        now = self._clock()
        last = self._refreshed.get(incident.id)
        if last is not None and now - last < self._refresh_every_s:
            return  # refreshed recently: the alert's endsAt covers this finding's neighbourhood
        taken = [worker.offer(_REFRESH, incident) for worker in workers]
        if all(taken):  # one not queued (a full queue) is offered again with the next finding
            self._remember_refresh(incident.id, now)

    def _remember_refresh(self, incident_id: str, now: float) -> None:
        """Bounded: the least recently refreshed incident is forgotten first (it is then refreshed
        with its next finding, a harmless extra send)."""
        self._refreshed[incident_id] = now
        self._refreshed.move_to_end(incident_id)
        while len(self._refreshed) > self._max_refreshed:
            self._refreshed.popitem(last=False)

    def resume(self, incidents: Iterable[Incident]) -> None:
        """At start: the open incidents that may still be firing (``IncidentStore.alertable``). Each
        sink that has not got its page is paged, the most severe and most recent first: its worker
        keeps them (``_SinkWorker.wait_to_offer``, as many as the store's alertable set) and offers
        them to its page queue one at a time as the queue has room, so that none is lost however
        many there are, and they never crowd out the pages of new findings. While they wait they are
        ``pathwatch_alerts_resume_waiting{sink}``. No refreshes: an alert Alertmanager has keeps its
        ``endsAt``, and the incident's next finding refreshes it."""
        unpaged = [incident for incident in incidents
                   if severity_rank(incident.severity) >= self._min_rank
                   and any(not incident.paged_to(worker.sink.name) for worker in self._workers)]
        with self._lock:
            if self._closing:  # the store still says unpaged: the next start pages them
                return
        for worker in self._workers:
            worker.wait_to_offer([incident for incident in unpaged
                                  if not incident.paged_to(worker.sink.name)])

    def resolved(self, incident: Incident) -> None:
        """The incident was resolved by hand (the API's PATCH): sinks that keep alerts firing are
        told it ended now — unless the ledger says it is open again (a finding reopened it after
        this copy was made, and was offered after the resolve; with ``MemoryLedger``, which knows
        no PATCH, always). Never blocks, never raises."""
        try:
            with self._lock:
                if self._closing:
                    return
                if self._ledger.is_open(incident.id):  # reopened by a finding since this copy was
                    return  # made: that finding was offered after the resolve, the alert fires on
                self._refreshed.pop(incident.id, None)  # its next finding fires it again at once
                for worker in self._refreshing:
                    if incident.paged_to(worker.sink.name):
                        worker.offer(_RESOLVE, incident)
        except Exception:
            self._count(AlertOutcomes.FAILED)
            self._warn_once("resolved", "alert dispatcher: cannot queue a resolved incident",
                            exc_info=True)

    def has_paged(self, incident_id: str, sink: Sink) -> bool:
        return bool(self._ledger.is_alerted(incident_id, sink.name))

    def is_open(self, incident_id: str) -> bool:
        return bool(self._ledger.is_open(incident_id))

    def paged(self, incident: Incident, sink: Sink) -> None:
        """``sink`` accepted the page (called on that sink's worker thread)."""
        self._ledger.mark_alerted(incident.id, sink.name)
        if sink.refreshes:  # its refreshes start from now
            with self._lock:
                self._remember_refresh(incident.id, self._clock())

    # -- lifecycle ------------------------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking alerts, push what is queued for up to ``timeout`` seconds, drop the rest (pages
        waiting to be tried again are left to the next start's ``resume``)."""
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
        for sink in self._own_sinks:
            sink.close()
        if self._client is not None:
            self._client.close()

    @property
    def threads(self) -> dict[str, WatchedThread]:
        """Each sink's worker thread, by the sink's name: the liveness check watches them."""
        return {worker.sink.name: worker.thread for worker in self._workers}

    def pending(self) -> int:
        """Alerts queued, being pushed, or waiting to be offered (``resume``), over all sinks."""
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
    """One sink's queues and thread: pages (critical first, paced by the token bucket, retried, and
    tried again later when the retries fail) and refreshes and resolves (no token; sent first, also
    while a page waits for its token, so that a backlog of rate-limited pages never lets a firing
    alert expire)."""

    def __init__(self, dispatcher: AlertDispatcher, sink: Sink, config: AlertingConfig,
                 queue_size: int, clock: Callable[[], float]) -> None:
        self.sink = sink
        self._dispatcher = dispatcher
        self._attempts = config.retry_attempts
        self._backoff_s = config.retry_backoff_s
        self._clock = clock
        self._bucket = TokenBucket(config.max_per_minute, clock)
        self._max_per_minute = config.max_per_minute
        self._limit_logged = False  # pages were held by the rate limit (logged until the queue empties)
        # (-severity rank, arrival, incident): the most severe page first, then first come
        self._pages: queue.PriorityQueue[tuple[int, int, Incident]] = queue.PriorityQueue(
            maxsize=queue_size)
        self._arrival = itertools.count()
        # refreshes and resolves waiting, first come first served, at most one per incident (its
        # newest state): incident id -> (kind, incident)
        self._updates: OrderedDict[str, tuple[str, Incident]] = OrderedDict()
        self._updating = 0  # updates taken off _updates and being pushed (0 or 1: one thread)
        self._queued: set[str] = set()  # incident ids whose page is queued, pushed or deferred
        # incident id -> (due, delay, incident, refused): pages whose retries failed, or that the
        # sink refused (a 4xx: ``refused``), tried again when due
        self._deferred: dict[str, tuple[float, float, Incident, bool]] = {}
        self._renewed: set[str] = set()  # pages offered again while queued or being pushed
        # pages of incidents not paged at start (``resume``), most severe and most recent first,
        # offered to the page queue one at a time when this sink has room for one more page
        self._waiting: deque[Incident] = deque()
        self._waiting_queued: str | None = None  # the one of them in the page queue, not taken yet
        self._queue_size = queue_size
        self._taken_arrival = 0  # the arrival of the page taken off the queue (_swap_for_more_severe)
        self._limited: set[str] = set()  # pages counted rate_limited, put back behind a more severe
        self._lock = threading.Lock()
        self.closing = threading.Event()  # stop when the queue is empty
        self.abort = threading.Event()  # the drain timeout passed: stop waiting, drop the rest
        self.thread = WatchedThread(target=self._run, name=f"pathwatch-alerts-{sink.name}",
                                    daemon=True)
        self._show_waiting()
        self.thread.start()

    def offer(self, kind: str, incident: Incident) -> bool:
        """Queue a page, refresh or resolve; False when it was dropped (the queue full)."""
        if kind is not _PAGE:
            return self._offer_update(kind, incident)
        with self._lock:
            if incident.id in self._queued:
                deferred = self._deferred.get(incident.id)
                if deferred is not None and deferred[0] != _REQUEUED:  # a new finding while it
                    # waits to be tried again: tried again now — unless the sink refused it (a 4xx):
                    # its answer to the same page would be the same, only its delay passing hurries
                    due, delay, _, refused = deferred
                    self._deferred[incident.id] = (due if refused else min(due, self._clock()),
                                                   delay, incident, refused)
                    if refused:
                        self.count(AlertOutcomes.DEDUPLICATED)
                else:
                    self.count(AlertOutcomes.DEDUPLICATED)
                    if deferred is None:  # queued or being pushed: should it fail, try again at once
                        self._renewed.add(incident.id)
                return True
            if self._dispatcher.has_paged(incident.id, self.sink):
                # paged between the dispatcher's look at the ledger and now: this worker marks the
                # ledger before it lets go of the key, so under this lock the ledger is up to date
                self.count(AlertOutcomes.DEDUPLICATED)
                return True
            entry = (-severity_rank(incident.severity), next(self._arrival), incident)
            try:
                self._pages.put_nowait(entry)
            except queue.Full:
                if not self._displace_queued(entry):
                    self._dropped_full()
                    return False
            self._queued.add(incident.id)
            return True

    def _displace_queued(self, entry: tuple[int, int, Incident]) -> bool:
        """The page queue is full: its least severe page (the newest of those) gives its place to
        ``entry`` if ``entry`` is more severe — a bleed is never turned away to keep a warning. The
        page put out is counted ``dropped`` and stays unpaged in the store (its next finding offers
        it again, the next start pages it); one of ``resume``'s goes back to wait. Under ``_lock``."""
        pages = self._pages
        with pages.mutex:  # the queue's own lock: its heap is changed in place, its size unchanged
            if not pages.queue:
                return False
            worst = max(pages.queue)  # (-rank, arrival): arrivals are unique, incidents never compared
            if worst[0] <= entry[0]:
                return False  # none is less severe than the new page
            pages.queue.remove(worst)
            heapq.heapify(pages.queue)
            heapq.heappush(pages.queue, entry)
        displaced = worst[2]
        self._queued.discard(displaced.id)
        self._limited.discard(displaced.id)
        self._deferred.pop(displaced.id, None)  # a page tried again, back in the queue
        self._renewed.discard(displaced.id)
        if displaced.id == self._waiting_queued:  # resume's: it waits again, in its place
            self._waiting_queued = None
            self._waiting = deque(sorted((*self._waiting, displaced), key=_page_order))
            self._show_waiting()
        else:
            self._dropped_full()
        return True

    def wait_to_offer(self, incidents: Iterable[Incident]) -> None:
        """``resume``'s pages for this sink: kept, and offered as the queue has room
        (``_offer_waiting``), the most severe and most recent first."""
        with self._lock:
            known = {incident.id for incident in self._waiting}
            waiting = list(self._waiting) + [incident for incident in incidents
                                             if incident.id not in known]
            waiting.sort(key=_page_order)
            self._waiting = deque(waiting)
            self._show_waiting()
            if waiting:
                log.info("%d incident(s) not paged to %s yet are paged now, the most severe and most "
                         "recent first, as its alert queue (%d) has room", len(waiting),
                         self.sink.name, self._queue_size)

    def _offer_waiting(self) -> None:
        """The next of ``resume``'s pages into the page queue, if none of them is there and this sink
        holds fewer pages than its queue (queued, being pushed, or waiting to be tried again): one
        at a time, they never fill the queue that the pages of new findings need, nor the pages to
        be tried again. After ``close`` they stay unpaged in the store: the next start pages them."""
        if not self._waiting or self._waiting_queued is not None or self.closing.is_set():
            return  # (an unlocked look: only this thread takes from _waiting)
        with self._lock:
            while self._waiting and len(self._queued) < self._queue_size:
                incident = self._waiting.popleft()
                if not self._dispatcher.is_open(incident.id):
                    continue  # resolved by hand, or evicted, since the start: nothing to page
                if incident.id in self._queued or self._dispatcher.has_paged(incident.id, self.sink):
                    self.count(AlertOutcomes.DEDUPLICATED)  # a new finding offered it since the start
                    continue
                try:
                    self._pages.put_nowait((-severity_rank(incident.severity), next(self._arrival),
                                            incident))
                except queue.Full:  # not expected: the queue holds only pages in _queued
                    self._waiting.appendleft(incident)
                    break
                self._queued.add(incident.id)
                self._waiting_queued = incident.id
                break
            self._show_waiting()

    def _show_waiting(self) -> None:
        telemetry = self._dispatcher._telemetry
        if telemetry is not None:
            telemetry.alerts_resume_waiting.labels(sink=self.sink.name).set(len(self._waiting))

    def _offer_update(self, kind: str, incident: Incident) -> bool:
        """A refresh or resolve: the incident's newest state replaces the one waiting, where it
        stands; behind one being pushed it waits (the module docstring)."""
        with self._lock:
            if incident.id not in self._updates and len(self._updates) >= self._queue_size:
                self._dropped_full()
                return False
            self._updates[incident.id] = (kind, incident)
            return True

    def pending(self) -> int:
        with self._lock:
            return len(self._queued) + len(self._updates) + self._updating + len(self._waiting)

    def count(self, outcome: str) -> None:
        self._dispatcher._count(outcome, self.sink)

    def _run(self) -> None:
        name_os_thread()
        while True:
            self._send_updates()
            self._requeue_due()
            self._offer_waiting()
            try:
                _, self._taken_arrival, incident = self._pages.get(timeout=_POLL_S)  # an update
                # waits at most this long
            except queue.Empty:
                self._limit_logged = False  # caught up: the next rate-limited burst is logged again
                if self.closing.is_set() and not self._updates:
                    self._leave_deferred()
                    return
                continue
            if incident.id == self._waiting_queued:
                self._waiting_queued = None  # the next one may go in
            self._handle(_PAGE, incident)

    def _send_updates(self) -> None:
        while True:
            with self._lock:
                if not self._updates:
                    return
                _, (kind, incident) = self._updates.popitem(last=False)
                self._updating += 1
            self._handle(kind, incident)

    def _handle(self, kind: str, incident: Incident) -> None:
        deferred = False
        try:
            if self.abort.is_set():
                self.count(AlertOutcomes.DROPPED)
            elif kind is _PAGE:
                # the page handled: a more severe one may have taken this one's place (_take_token)
                deferred, incident = self._page(incident)
            elif kind is _RESOLVE:
                if self._push(incident, self.sink.resolve) is None:
                    self.count(AlertOutcomes.RESOLVED)
            elif self._push(incident, self.sink.send) is None:
                self.count(AlertOutcomes.REFRESHED)
        except Exception:
            self.count(AlertOutcomes.FAILED)
            self._dispatcher._warn_once(f"worker:{self.sink.name}",
                                        "alert dispatcher: unexpected error", exc_info=True)
        finally:
            if not deferred:  # done with: sent, failed for good, or dropped
                with self._lock:
                    if kind is _PAGE:
                        self._queued.discard(incident.id)
                        self._limited.discard(incident.id)
                        self._deferred.pop(incident.id, None)
                        self._renewed.discard(incident.id)
                    else:
                        self._updating -= 1

    def _page(self, incident: Incident) -> tuple[bool, Incident]:
        """Push one page, or a more severe one that came while it waited for its token (it goes back
        in the queue); True when it failed for now and waits to be tried again, and the incident
        whose page was handled."""
        # no "already paged?" check here: a page is queued once per sink (``offer``), only when the
        # ledger says this sink has not got it, and an incident evicted from the store and back is
        # new (its page is due again)
        if not self._dispatcher.is_open(incident.id):
            self.count(AlertOutcomes.CANCELLED)  # resolved by hand while it waited
            return False, incident
        taken, incident = self._take_token(incident)
        self._limited.discard(incident.id)
        if taken is None:  # resolved by hand while it waited for its token: nothing went out
            self.count(AlertOutcomes.CANCELLED)
            return False, incident
        if not taken:
            self.count(AlertOutcomes.DROPPED)
            return False, incident
        error = self._push(incident, self.sink.send, page=True)
        if error is _CANCELLED:  # resolved by hand between its retries
            self.count(AlertOutcomes.CANCELLED)
            # an attempt that failed (a timeout) may have been taken all the same: end it there
            if self.sink.refreshes and self._push(incident, self.sink.resolve) is None:
                self.count(AlertOutcomes.RESOLVED)
            return False, incident
        if error is None:
            self._sent(incident)
            if self.sink.refreshes and not self._dispatcher.is_open(incident.id):
                # resolved while it was being sent
                if self._push(incident, self.sink.resolve) is None:
                    self.count(AlertOutcomes.RESOLVED)
            return False, incident
        # a sink that is down may take it later; one that refused it (a 4xx: a wrong URL or payload,
        # credentials) may too once fixed on its side, but not at once: not with each new finding
        return self._defer(incident, refused=isinstance(error, PermanentSinkError)), incident

    def _sent(self, incident: Incident) -> None:
        self.count(AlertOutcomes.SENT)
        self._dispatcher.paged(incident, self.sink)

    def _defer(self, incident: Incident, refused: bool = False) -> bool:
        with self._lock:
            previous = self._deferred.get(incident.id)
            if previous is None and len(self._deferred) >= self._queue_size:
                if not self._displace_deferred(incident):
                    self._dropped_full()
                    return False
            delay = REPAGE_AFTER_S if previous is None else min(previous[1] * 2, MAX_REPAGE_AFTER_S)
            # a new finding came while it was being pushed: due now, as it would be had it waited
            # (not after a refusal: ``offer``)
            renewed = incident.id in self._renewed and not refused
            due = self._clock() + (0.0 if renewed else delay)
            self._renewed.discard(incident.id)
            self._deferred[incident.id] = (due, delay, incident, refused)
            return True

    def _displace_deferred(self, incident: Incident) -> bool:
        """The pages waiting to be tried again are as many as the queue's size: the least severe of
        them (the least recently seen of those; not one back in the page queue already) gives its
        place to ``incident``'s if that is more severe — counted ``dropped``, left unpaged in the
        store. Under ``_lock``."""
        rank = severity_rank(incident.severity)
        candidates = [(severity_rank(waiting.severity), waiting.last_seen_ns, incident_id)
                      for incident_id, (due, _, waiting, _) in self._deferred.items()
                      if due != _REQUEUED]
        if not candidates:
            return False
        its_rank, _, displaced = min(candidates)
        if its_rank >= rank:
            return False
        del self._deferred[displaced]
        self._queued.discard(displaced)
        self._renewed.discard(displaced)
        self._dropped_full()
        return True

    def _requeue_due(self) -> None:
        """Deferred pages that are due go back in the page queue (they stay ``_queued``)."""
        if not self._deferred or self.closing.is_set():
            return
        now = self._clock()
        with self._lock:
            for due, _, incident, _ in list(self._deferred.values()):
                if due > now:
                    continue
                try:
                    self._pages.put_nowait((-severity_rank(incident.severity), next(self._arrival),
                                            incident))
                except queue.Full:
                    return  # the next turn
                self._deferred[incident.id] = (_REQUEUED, *self._deferred[incident.id][1:])

    def _leave_deferred(self) -> None:
        """At shutdown: pages still waiting to be tried again stay unpaged in the store, and the next
        start pages them (``AlertDispatcher.resume``)."""
        with self._lock:
            if self._deferred:
                log.info("%d page(s) to %s that failed are offered again at the next start (if "
                         "the incident is still open and seen within alerting.resolve_after_s)",
                         len(self._deferred), self.sink.name)
                self._queued.difference_update(self._deferred)
                self._deferred.clear()
            if self._waiting:  # the store still says unpaged
                log.info("%d page(s) to %s of incidents not paged at start are offered at the next "
                         "start (if the incident is still open and seen within "
                         "alerting.resolve_after_s)", len(self._waiting), self.sink.name)

    def _take_token(self, incident: Incident) -> tuple[bool | None, Incident]:
        """Wait for the rate limit's token for ``incident``'s page, or for a more severe page that
        came meanwhile (this one goes back in the queue, in its place): the page's incident, and
        True when taken, False when the drain timed out, None when the incident was resolved by
        hand while its page waited (the token is left). A page held counts ``rate_limited`` once,
        also when put back behind a more severe one."""
        held = False
        while not self.abort.is_set():
            if held and not self._dispatcher.is_open(incident.id):
                return None, incident
            wait_s = self._bucket.try_take()
            if wait_s == 0.0:
                return True, incident
            more_severe = self._swap_for_more_severe(incident)
            if more_severe is not None:
                incident, held = more_severe, False
                if not self._dispatcher.is_open(incident.id):
                    return None, incident
            if not held:
                held = True
                if incident.id not in self._limited:
                    self._limited.add(incident.id)
                    self.count(AlertOutcomes.RATE_LIMITED)
                if not self._limit_logged:
                    self._limit_logged = True
                    with self._lock:
                        waiting = len(self._queued) - len(self._deferred)
                    log.warning("alert pages to %s come faster than alerting.max_per_minute (%d): "
                                "%d wait for the rate limit, the most severe first; counted in "
                                "pathwatch_alerts_sent_total{outcome=\"rate_limited\"} (logged again "
                                "after the queue has emptied)", self.sink.name,
                                self._max_per_minute, waiting)
            self._send_updates()  # they take no token: not behind this page
            self.abort.wait(min(wait_s, _POLL_S))
        return False, incident

    def _swap_for_more_severe(self, incident: Incident) -> Incident | None:
        """The most severe page queued, if it is more severe than ``incident``'s, which waits for a
        token: that page is taken off the queue and ``incident``'s put back (its arrival kept)."""
        rank = -severity_rank(incident.severity)
        with self._lock, self._pages.mutex:
            heap = self._pages.queue
            if not heap or heap[0][0] >= rank:
                return None
            _, arrival, more_severe = heapq.heapreplace(heap, (rank, self._taken_arrival, incident))
            self._taken_arrival = arrival
            if more_severe.id == self._waiting_queued:
                self._waiting_queued = None  # the next of resume's may go in
            return more_severe

    def _push(self, incident: Incident, send: Callable[[Incident], None],
              page: bool = False) -> SinkError | None:
        """``send`` with retries: None when it went through, else the last error (counted), or, for
        a ``page``, ``_CANCELLED`` when the incident was resolved by hand before a retry (a page of
        a resolved incident is not sent: the module docstring)."""
        attempt = 0
        while True:
            try:
                send(incident)
            except PermanentSinkError as exc:
                return self._failed(exc)
            except RetryableSinkError as exc:
                if attempt >= self._attempts or self.abort.is_set():
                    return self._failed(exc)
                self.count(AlertOutcomes.RETRIED)
                wait_s = max(self._backoff_s * 2 ** attempt, exc.retry_after_s or 0.0)
                if self.abort.wait(min(wait_s, MAX_BACKOFF_S)):
                    return self._failed(exc)
                if page and not self._dispatcher.is_open(incident.id):
                    return _CANCELLED
                attempt += 1
            else:
                return None

    def _failed(self, exc: SinkError) -> SinkError:
        self.count(AlertOutcomes.FAILED)
        self._dispatcher._warn_once(f"failed:{self.sink.name}", "alert push to %s failed: %s (further "
                                    "failures are only counted)", self.sink.name, exc)
        return exc

    def _dropped_full(self) -> None:
        self.count(AlertOutcomes.DROPPED)
        self._dispatcher._warn_once(
            f"full:{self.sink.name}", "alert queue of %s full (%d): alerts are dropped and counted in "
            "pathwatch_alerts_sent_total{outcome=\"dropped\"}", self.sink.name, self._queue_size)


def _page_order(incident: Incident) -> tuple[int, int, str]:
    """The most severe first, then the most recently seen."""
    return -severity_rank(incident.severity), -incident.last_seen_ns, incident.id


def _configured_sinks(config: AlertingConfig, client: httpx.Client, runbook_url: str,
                      telemetry: Telemetry | None = None,
                      deadline_s: float = DEFAULT_POST_DEADLINE_S) -> list[AlertmanagerSink | WebhookSink]:
    sinks: list[AlertmanagerSink | WebhookSink] = []
    if config.alertmanager_url:
        sinks.append(AlertmanagerSink(config.alertmanager_url, client, external_url=config.external_url,
                                      runbook_url=runbook_url, resolve_after_s=config.resolve_after_s,
                                      peers=config.alertmanager_peers, telemetry=telemetry,
                                      authorization=config.alertmanager_authorization,
                                      deadline_s=deadline_s))
    if config.webhook_url:
        sinks.append(WebhookSink(config.webhook_url, client, external_url=config.external_url,
                                 runbook_url=runbook_url, resolve_after_s=config.resolve_after_s,
                                 deadline_s=deadline_s))
    return sinks
