"""Where alerts go: Alertmanager's v2 API and a generic JSON webhook. One POST per incident.

A sink raises ``RetryableSinkError`` for what may pass on a later try (connection errors, timeouts,
5xx, 429, an answer whose status has not come by the post's deadline) and ``PermanentSinkError`` for
what will not (other 4xx: the payload or URL is wrong); once the status came it decides, whatever
becomes of the body after it. Each post ends by ``deadline_s`` (``deadline.py``): the
client's timeout bounds each read, not a server that trickles its answer.
"""

from __future__ import annotations

import email.utils
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from sidecar.alerting import deadline
from sidecar.alerting.outcomes import AlertOutcomes
from sidecar.alerting.payload import (DEFAULT_RESOLVE_AFTER_S, DEFAULT_RUNBOOK_URL,
                                      RESOLVE_CLOCK_ALLOWANCE_S, alertmanager_alert, webhook_body)
from sidecar.model import Incident
from sidecar.telemetry import Telemetry
from sidecar.threads import name_os_thread

log = logging.getLogger(__name__)

_BODY_EXCERPT = 200
#: posts one instance of an Alertmanager cluster may have waiting or under way; beyond, it is skipped
#: for a firing alert or refresh (it answers slower than alerts come — the others got it). A post
#: waiting for an alert is replaced by the alert's newer post, and a resolve is never skipped.
INSTANCE_BACKLOG = 16
#: a post's longest time where the client sets no bound on a phase of it (connect, write, read, pool)
UNBOUNDED_POST_S = 300.0
#: a post's longest time as a whole, from its connect to the end of the answer (its excerpt): as
#: Prometheus's alertmanager_config ``timeout``, 10 s by default
DEFAULT_POST_DEADLINE_S = 10.0
#: alerts one instance of a cluster missed (down, or failing, when they were posted) kept for it, each
#: alert's last state: posted again once it takes an alert (it was restarted: it has none of them)
INSTANCE_MISSED = 1000


class SinkError(Exception):
    """Base of the sink errors."""


class RetryableSinkError(SinkError):
    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s  # the server's Retry-After, when it gave one


class PermanentSinkError(SinkError):
    pass


class Sink(Protocol):
    name: str  # the ``sink`` label of pathwatch_alerts_sent
    refreshes: bool  # sent again while the incident keeps firing (the dispatcher's docstring)

    def send(self, incident: Incident) -> None: ...

    def resolve(self, incident: Incident) -> None:
        """The incident was resolved by hand (only called where ``refreshes``)."""


class AlertmanagerSink:
    """One Alertmanager, or the instances of a cluster (``peers``): every alert goes to each, as
    Prometheus sends, and counts as delivered when one of them took it — the instances gossip the
    notifications they sent: the cluster sends one. An instance that fails is logged once; the
    alerts it failed to take are posted to it again, each in its last state, once it takes one
    (``_Instance._catch_up``: a restarted Alertmanager has no alerts, and ours are re-sent only
    with new findings).

    A cluster's instances each have a thread of their own, which posts that instance's alerts in
    order (a resolve never overtakes the firing alert it ends); ``send`` and ``resolve`` return as
    soon as one instance took the alert, or once every one failed, and the slower instances' posts go
    on in the background: an instance that never answers costs the others nothing, neither this
    alert nor the next ones. An instance holds at most one waiting post per alert (its labels, the
    alert's identity in Alertmanager): a newer post of the alert — a refresh, a resolve, a firing
    alert again — replaces the waiting one where it stands, so an instance never gets an alert's
    older state after its newer one. Each instance has at most ``backlog`` posts waiting or under
    way; while it is full the instance is skipped for a firing alert or refresh of an alert that has
    no post waiting there (logged once, counted ``instance_skipped`` in ``pathwatch_alerts_sent``) —
    it gets a later refresh. A resolve is never skipped: beyond the bound it waits all the same (at
    most one per alert), else a slow instance would keep an alert the others ended firing until its
    ``endsAt``. ``close`` drops the posts still waiting and does not wait for one under way.

    An instance whose thread cannot start (``can't start new thread``) fails that post (logged once)
    and tries again at its next one; an error of pathwatch's own on the thread fails the post under
    way and the thread goes on. ``send`` and ``resolve`` wait at most ``answer_wait_s`` — each
    instance's backlog and one more post, each at the client's timeout: generous — and then fail as
    a timeout (retried), so the caller can never block for ever."""

    name = "alertmanager"
    refreshes = True

    def __init__(self, base_url: str, client: httpx.Client, *, external_url: str = "",
                 runbook_url: str = DEFAULT_RUNBOOK_URL,
                 resolve_after_s: float = DEFAULT_RESOLVE_AFTER_S, peers: Sequence[str] = (),
                 backlog: int = INSTANCE_BACKLOG, telemetry: Telemetry | None = None,
                 authorization: str | None = None,
                 deadline_s: float | None = DEFAULT_POST_DEADLINE_S) -> None:
        # each instance once (a peer listed twice, or as the main URL with a trailing /, is one)
        self.urls = list(dict.fromkeys(url.rstrip("/") + "/api/v2/alerts" for url in (base_url, *peers)))
        self.url = self.urls[0]
        self._client = client
        deadline.bound(client)
        self._deadline_s = deadline_s
        # every instance's (alerting.alertmanager_username / _bearer_token_env): one cluster
        self._headers = {"Authorization": authorization} if authorization else None
        self._external_url = external_url
        self._runbook_url = runbook_url
        self._resolve_after_s = resolve_after_s
        self._telemetry = telemetry
        self._backlog = max(1, backlog)
        self._closed = False
        self._skew = ClockSkew(self.name, min(RESOLVE_CLOCK_ALLOWANCE_S, resolve_after_s), telemetry)
        self._instances = [_Instance(url, index, client, self._answered, self._skew, self._headers,
                                     deadline_s)
                           for index, url in enumerate(self.urls)] if len(self.urls) > 1 else []
        self.answer_wait_s = answer_wait_s(client.timeout, self._backlog)
        self._wait_logged = False

    def send(self, incident: Incident) -> None:
        self._post(alertmanager_alert(incident, external_url=self._external_url,
                                      runbook_url=self._runbook_url,
                                      resolve_after_s=self._resolve_after_s))

    def resolve(self, incident: Incident) -> None:
        """The same alert (same labels) with ``endsAt`` in the past: Alertmanager resolves it.

        ``endsAt`` = now - ``RESOLVE_CLOCK_ALLOWANCE_S`` (never before ``startsAt``): Alertmanager
        takes the resolve only if its ``endsAt`` has passed by Alertmanager's own clock — else it
        merges it with the firing alert and keeps that one's later ``endsAt`` (up to
        ``resolve_after_s``), so an ``endsAt`` of now was lost to a clock a few ms behind ours."""
        ended_ns = time.time_ns() - int(RESOLVE_CLOCK_ALLOWANCE_S * 1e9)
        self._post(alertmanager_alert(incident, external_url=self._external_url,
                                      runbook_url=self._runbook_url, ended_ns=ended_ns),
                   resolving=True)

    def pending(self) -> dict[str, int]:
        """Posts waiting or under way, per instance URL (a cluster's; none for one Alertmanager)."""
        return {instance.url: instance.pending for instance in self._instances}

    def close(self) -> None:
        """Ends the threads of a cluster's posts: the posts still waiting are dropped, one under way
        finishes on its own (at the client's timeout at the latest)."""
        self._closed = True
        for instance in self._instances:
            for post in instance.close():
                for delivery in post.deliveries:
                    delivery.failed(instance.url, RetryableSinkError(
                        f"POST {redacted(instance.url)}: dropped, the Alertmanager sink closed"))

    def _post(self, alert: dict, *, resolving: bool = False) -> None:
        if not self._instances:  # one Alertmanager: posted on the caller's thread
            post_json(self._client, self.url, [alert], skew=self._skew, headers=self._headers,
                      deadline_s=self._deadline_s)
            return
        delivery = _Delivery(len(self._instances))
        key = tuple(sorted(alert["labels"].items()))  # the alert's identity (its fingerprint)
        for instance in self._instances:
            if not self._submit(instance, key, alert, delivery, resolving):
                delivery.skipped(instance.url)
        # one took it, or each failed or was skipped; bounded: a stuck instance thread (a bug) must
        # not hold the dispatcher's sink worker for ever
        if not delivery.done.wait(self.answer_wait_s):
            if not self._wait_logged:
                self._wait_logged = True
                log.warning("no Alertmanager instance answered within %.0f s (each one's backlog at "
                            "the client's timeout): the alert is retried (logged once)",
                            self.answer_wait_s)
            raise RetryableSinkError(f"no Alertmanager instance answered within "
                                     f"{self.answer_wait_s:.0f} s")
        if delivery.accepted:
            return
        errors = [delivery.errors[url] for url in self.urls if url in delivery.errors]
        retryable = [exc for exc in errors if isinstance(exc, RetryableSinkError)]
        if errors and not retryable and not delivery.any_skipped:
            raise errors[0]  # every instance refused it: the payload or the URLs are wrong
        # retried as a whole (an instance skipped may take it later)
        waits = [exc.retry_after_s for exc in retryable if exc.retry_after_s is not None]
        message = (str(retryable[0]) if retryable else
                   "every Alertmanager instance failed or has a full backlog")
        raise RetryableSinkError(message, max(waits) if waits else None)

    def _submit(self, instance: _Instance, key: tuple, alert: dict, delivery: _Delivery,
                resolving: bool) -> bool:
        """Queue the post on the instance's thread — in place of the alert's post waiting there, if
        one is; False when its backlog is full and the post is not a resolve (skipped)."""
        try:
            outcome = instance.submit(key, alert, delivery, self._backlog, resolving)
        except Exception as exc:  # noqa: BLE001 (its thread could not start; the post was taken back)
            if not instance.start_failure_logged:
                instance.start_failure_logged = True
                log.warning("the thread of Alertmanager instance %s could not start (%s): its "
                            "posts fail until one starts, tried again at each post (logged once)",
                            redacted(instance.url), exc)
            delivery.failed(instance.url, RetryableSinkError(
                f"POST {redacted(instance.url)}: its thread could not start: "
                f"{type(exc).__name__}: {exc}"))
            return True
        if outcome == "closed":
            delivery.failed(instance.url, RetryableSinkError(
                f"POST {redacted(instance.url)}: the Alertmanager sink is closed"))
            return True
        if outcome != "full":
            return True
        with instance.lock:
            log_full = not instance.full_logged
            instance.full_logged = True
        if self._telemetry is not None:
            self._telemetry.alerts_sent.labels(sink=self.name, outcome=AlertOutcomes.INSTANCE_SKIPPED).inc()
        if log_full:
            log.warning("Alertmanager instance %s has %d posts waiting or under way (it answers "
                        "slower than alerts come): it is skipped for new alerts until it has "
                        "caught up, the other instances get them (counted in "
                        "pathwatch_alerts_sent_total{outcome=\"instance_skipped\"}, logged once "
                        "until then; resolves still wait for it)", redacted(instance.url),
                        self._backlog)
        return False

    def _answered(self, instance: _Instance, post: _Post, exc: BaseException | None) -> None:
        """On the instance's thread once its post ended: every delivery it carries (its own and
        those of the posts of the alert it replaced) learns the answer."""
        if exc is None:
            instance.failure_logged = False
            for delivery in post.deliveries:
                delivery.accept(instance.url)
            return
        if not instance.failure_logged and not self._closed:
            instance.failure_logged = True
            log.warning("Alertmanager instance %s failed (%s); each alert still goes to every "
                        "instance (further failures of this one are not logged)",
                        redacted(instance.url),
                        exc if isinstance(exc, SinkError) else type(exc).__name__)
        for delivery in post.deliveries:
            delivery.failed(instance.url, exc)


class _Post:
    """An alert waiting for (or under way to) one instance, and the deliveries waiting for its
    answer: a newer post of the same alert takes the waiting one's place and its deliveries."""

    __slots__ = ("alert", "deliveries")

    def __init__(self, alert: dict, deliveries: list[_Delivery]) -> None:
        self.alert = alert
        self.deliveries = deliveries


class _Instance:
    """One instance of an Alertmanager cluster: a thread of its own posts its alerts in order, at
    most one waiting per alert (by key)."""

    def __init__(self, url: str, index: int, client: httpx.Client,
                 answered: Callable[[_Instance, _Post, BaseException | None], None],
                 skew: ClockSkew | None = None, headers: Mapping[str, str] | None = None,
                 deadline_s: float | None = None) -> None:
        self.url = url
        self._client = client
        self._skew = skew
        self._headers = headers
        self._deadline_s = deadline_s
        self.lock = threading.Lock()
        self.full_logged = False  # its full backlog was logged (until it drains)
        self.failure_logged = False  # its failure was logged (until it takes an alert)
        self.start_failure_logged = False  # its thread's failed start was logged (until one starts)
        self.error_logged = False  # an error of pathwatch's own on its thread was logged
        self._name = f"pathwatch-alertmanager-{index}"
        self._answered = answered
        self._ready = threading.Condition(self.lock)
        self._waiting: OrderedDict[tuple, _Post] = OrderedDict()
        # alert key -> the alert's last state this instance failed to take (retryably): posted again
        # once it takes one, so an instance back from a restart has the alerts the others have
        self._missed: OrderedDict[tuple, dict] = OrderedDict()
        self._under_way: _Post | None = None
        self._thread: threading.Thread | None = None  # started with the first post
        self._closed = False

    @property
    def pending(self) -> int:
        """Posts waiting or under way."""
        with self.lock:
            return self._pending()

    def _pending(self) -> int:
        return len(self._waiting) + (self._under_way is not None)

    def submit(self, key: tuple, alert: dict, delivery: _Delivery, backlog: int,
               resolving: bool) -> str:
        """"queued", "replaced" (the alert's waiting post), "full" (skipped) or "closed". Raises
        what starting the thread raised (the post is taken back, the next post starts it again)."""
        with self.lock:
            if self._closed:
                return "closed"
            waiting = self._waiting.get(key)
            if waiting is not None:  # newer state of the alert: in its place, where it stands
                self._waiting[key] = _Post(alert, [*waiting.deliveries, delivery])
                return "replaced"
            if self._pending() >= backlog and not resolving:
                return "full"
            self._missed.pop(key, None)  # this newer state of the alert goes in its place
            self._waiting[key] = _Post(alert, [delivery])
            if self._thread is None:
                thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                try:
                    thread.start()
                except BaseException:
                    del self._waiting[key]  # the post just queued: no thread would ever post it
                    raise
                self._thread = thread
                self.start_failure_logged = False
            self._ready.notify()
            return "queued"

    def close(self) -> list[_Post]:
        """Ends the thread once its post under way ended; returns the posts dropped."""
        with self.lock:
            self._closed = True
            dropped = list(self._waiting.values())
            self._waiting.clear()
            self._ready.notify()
        return dropped

    def _run(self) -> None:
        name_os_thread()
        while True:
            with self.lock:
                while not self._waiting and not self._closed:
                    self._ready.wait()
                if not self._waiting:  # closed
                    return
                key, post = self._waiting.popitem(last=False)
                self._under_way = post
            try:
                self._post(post, key)
            except Exception as error:  # noqa: BLE001 (our own: the post fails, the thread goes on)
                self._broken(post, error)

    def _post(self, post: _Post, key: tuple) -> None:
        exc: BaseException | None = None
        try:
            post_json(self._client, self.url, [post.alert], skew=self._skew, headers=self._headers,
                      deadline_s=self._deadline_s)
        except Exception as error:  # noqa: BLE001 (reported to the deliveries)
            exc = error
        self._catch_up(key, post.alert, exc)
        self._ended()
        self._answered(self, post, exc)

    def _catch_up(self, key: tuple, alert: dict, exc: BaseException | None) -> None:
        """An alert this instance failed to take (down, 5xx) is kept, its last state only; once it
        takes an alert, those it missed are posted again (no delivery waits for them: the others took
        them), as the backlog has room — the dispatcher re-sends only with a new finding, and an
        instance back from a restart has none of the alerts the others have."""
        with self.lock:
            if exc is not None:
                if isinstance(exc, RetryableSinkError) and key not in self._waiting:
                    self._missed[key] = alert
                    self._missed.move_to_end(key)
                    while len(self._missed) > INSTANCE_MISSED:
                        self._missed.popitem(last=False)
                return
            self._missed.pop(key, None)
            while self._missed and len(self._waiting) < INSTANCE_BACKLOG:
                missed_key, missed = self._missed.popitem(last=False)
                if missed_key not in self._waiting:  # else a newer state of it waits already
                    self._waiting[missed_key] = _Post(missed, [])

    def _ended(self) -> None:
        with self.lock:
            self._under_way = None
            if not self._pending():  # caught up: a full backlog is logged again
                self.full_logged = False

    def _broken(self, post: _Post, error: Exception) -> None:
        """An error of pathwatch's own while posting ``post``: its deliveries (those that have no
        answer from this instance yet) fail, logged once."""
        self._ended()
        if not self.error_logged:
            self.error_logged = True
            log.error("error on the thread of Alertmanager instance %s: the post fails, the thread "
                      "goes on (logged once)", redacted(self.url), exc_info=error)
        failure = RetryableSinkError(f"POST {redacted(self.url)}: pathwatch's own error: "
                                     f"{type(error).__name__}: {error}")
        for delivery in post.deliveries:
            delivery.failed(self.url, failure)


class _Delivery:
    """One alert's posts to a cluster: ``done`` once an instance took it (``accepted``) or every
    instance failed (``errors``, by URL) or was skipped. Each instance's first answer counts, a
    second one (an error after an answer) is ignored."""

    def __init__(self, instances: int) -> None:
        self.done = threading.Event()
        self.accepted = False
        self.any_skipped = False
        self.errors: dict[str, BaseException] = {}
        self._left = instances
        self._answered: set[str] = set()
        self._lock = threading.Lock()

    def accept(self, url: str) -> None:
        with self._lock:
            if self._end(url):
                self.accepted = True
                self.done.set()

    def failed(self, url: str, exc: BaseException) -> None:
        with self._lock:
            if self._end(url):
                self.errors[url] = exc

    def skipped(self, url: str) -> None:
        with self._lock:
            if self._end(url):
                self.any_skipped = True

    def _end(self, url: str) -> bool:
        """False if the instance had answered already."""
        if url in self._answered:
            return False
        self._answered.add(url)
        self._left -= 1
        if self._left == 0:
            self.done.set()
        return True


class WebhookSink:
    name = "webhook"
    refreshes = False

    def __init__(self, url: str, client: httpx.Client, *, external_url: str = "",
                 runbook_url: str = DEFAULT_RUNBOOK_URL,
                 resolve_after_s: float = DEFAULT_RESOLVE_AFTER_S,
                 deadline_s: float | None = DEFAULT_POST_DEADLINE_S) -> None:
        self.url = url
        self._client = client
        deadline.bound(client)
        self._deadline_s = deadline_s
        self._external_url = external_url
        self._runbook_url = runbook_url
        self._resolve_after_s = resolve_after_s

    def send(self, incident: Incident) -> None:
        body = webhook_body(incident, external_url=self._external_url, runbook_url=self._runbook_url,
                            resolve_after_s=self._resolve_after_s)
        post_json(self._client, self.url, body, deadline_s=self._deadline_s)

    def resolve(self, incident: Incident) -> None:
        raise PermanentSinkError("the webhook gets pages only")

    def close(self) -> None:
        """Nothing of its own to end (the client is the dispatcher's)."""


def answer_wait_s(timeout: httpx.Timeout, backlog: int) -> float:
    """How long ``send`` waits at most for a cluster's answer: an instance's backlog and one more
    post, each at the client's timeout (its phases added up; ``UNBOUNDED_POST_S`` where it has none)."""
    phases = (timeout.connect, timeout.write, timeout.read, timeout.pool)
    post_s = UNBOUNDED_POST_S if any(phase is None for phase in phases) else sum(phases)
    return (max(1, backlog) + 1) * max(post_s, 1.0)


def redacted(url: str) -> str:
    """``scheme://host[:port]`` of a URL, for logs: credentials in it, and webhook paths that are
    themselves secrets (``/services/T0/B0/TOKEN``), stay out."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    host = f"[{host}]" if ":" in host else host
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # a port out of range: the error message must not fail in turn
        port = ":?"
    return f"{parts.scheme}://{host}{port}" + ("/…" if parts.path not in ("", "/") or parts.query else "")


class ClockSkew:
    """The receiver's clock against the sidecar's, read from the ``Date`` header of each answer.

    Alertmanager judges ``startsAt``/``endsAt`` — set from the sidecar's wall clock — by its own: an
    Alertmanager whose clock is behind by more than ``resolve_after_s`` takes a page as already
    resolved and never notifies it, one ahead by more than ``RESOLVE_CLOCK_ALLOWANCE_S`` ignores a
    resolve (its ``endsAt`` is still to come there) and the alert fires on. ``Date`` has a 1 s
    resolution (truncated) and was written somewhere in the request's round trip: the estimate is
    Date + 0.5 s against the round trip's midpoint, uncertain by half the round trip + 0.5 s. Beyond
    ``bound_s`` (the uncertainty allowed for) it is logged as a warning once per receiver URL, and
    again only after it came back within it. On the sink's threads: never on the span path."""

    def __init__(self, sink: str, bound_s: float, telemetry: Telemetry | None) -> None:
        self.sink = sink
        self.bound_s = bound_s
        self._gauge = telemetry.alerts_clock_skew.labels(sink=sink) if telemetry is not None else None
        self._lock = threading.Lock()
        self._skews: dict[str, float] = {}  # by URL (a cluster's instances: bounded by its peers)
        self._warned: set[str] = set()

    def observe(self, url: str, date: str | None, sent_s: float, answered_s: float) -> None:
        if not date:
            return
        try:
            moment = email.utils.parsedate_to_datetime(date)
        except (TypeError, ValueError, IndexError):
            return
        if moment.tzinfo is None:  # RFC 9110 requires GMT; a date without a zone says nothing sure
            return
        skew = moment.timestamp() + 0.5 - (sent_s + answered_s) / 2
        uncertainty = max(0.0, answered_s - sent_s) / 2 + 0.5
        with self._lock:
            self._skews[url] = skew
            if self._gauge is not None:
                self._gauge.set(max(self._skews.values(), key=abs))
            off = abs(skew) - uncertainty > self.bound_s
            warn = off and url not in self._warned
            back = not off and url in self._warned
            if warn:
                self._warned.add(url)
            elif back:
                self._warned.discard(url)
        if warn:
            log.warning(
                "the clock of %s (sink %s) is %+.0f s off the sidecar's (from its Date header; "
                "positive: ahead), more than %.0f s: %s (logged once until it is back within)",
                redacted(url), self.sink, skew, self.bound_s,
                "alerts end that much sooner there (a page arrives already resolved, never "
                "notified, once it is behind by more than resolve_after_s)" if skew < 0 else
                "a resolve is ignored there and its alert fires on until its endsAt")
        elif back:
            log.info("the clock of %s (sink %s) is back within %.0f s of the sidecar's (%+.1f s)",
                     redacted(url), self.sink, self.bound_s, skew)


def post_json(client: httpx.Client, url: str, body: object, *, skew: ClockSkew | None = None,
              headers: Mapping[str, str] | None = None, deadline_s: float | None = None) -> None:
    """POST ``body``; raises ``RetryableSinkError`` or ``PermanentSinkError`` (module docstring).
    The answer's body is read no further than the excerpt an error message shows (``_excerpt``):
    an answer that never ends, or a large one, is cut there and its connection closed. The post
    (connect, request, that much of the answer) ends within ``deadline_s`` where the client is
    ``deadline.bound`` — the sinks bind theirs —, a timeout past it."""
    sent_s = time.time()
    with deadline.post(deadline_s):
        try:
            with client.stream("POST", url, json=body, headers=headers) as response:
                excerpt = _excerpt(response)
        except httpx.TimeoutException as exc:
            if deadline.passed():  # each read within the timeout, the whole not within the deadline
                raise RetryableSinkError(f"POST {redacted(url)}: not answered within the post's "
                                         f"deadline of {deadline_s:g} s ({type(exc).__name__}; the "
                                         "server answers too slowly)") from None
            raise RetryableSinkError(f"POST {redacted(url)}: {type(exc).__name__}: {exc}") from None
        except httpx.HTTPError as exc:  # connect refused, resets, and an answer whose body does not
            # decode (DecodingError: a Content-Encoding it does not have); messages name no URL
            raise RetryableSinkError(f"POST {redacted(url)}: {type(exc).__name__}: {exc}") from None
    if skew is not None:
        skew.observe(url, response.headers.get("Date"), sent_s, time.time())
    status = response.status_code
    if status < 300:
        return
    detail = f"POST {redacted(url)}: HTTP {status}: {excerpt}"
    if status >= 500 or status == 429:
        raise RetryableSinkError(detail, _retry_after_s(response.headers.get("Retry-After")))
    raise PermanentSinkError(detail)


def _excerpt(response: httpx.Response) -> str:
    """The first ``_BODY_EXCERPT`` characters of the answer's body, decoded, reading no more than it
    takes (``Client.post`` read a whole body into memory: one that never ended — a streaming URL —
    held the sink's worker for ever while memory grew), nor past the post's deadline.

    The status has come: it decides, whatever becomes of the body — a 2xx took the page, which must
    not be posted again. A body that breaks off (the post's deadline or a read's timeout passed, the
    connection closed before its end, a ``Content-Encoding`` it does not have) ends the excerpt
    there, the error named after it (before, such a 2xx was retried: a second page of the incident;
    such a 4xx was retried as well, though the receiver had refused the page)."""
    read = bytearray()
    cut = ""
    try:
        for chunk in response.iter_bytes():  # decoded: a Content-Encoding it does not have raises here
            read += chunk
            if len(read) >= _BODY_EXCERPT * 4:  # enough bytes for as many characters in UTF-8
                break
    except httpx.HTTPError as exc:
        cut = f" [the body broke off: {type(exc).__name__}]"
    text = bytes(read).decode(response.encoding or "utf-8", errors="replace")[:_BODY_EXCERPT]
    return text + cut


def _retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` in seconds (RFC 9110: delay-seconds or an HTTP date); None if absent or
    unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit alone takes '\u00b2', which float refuses
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, moment.timestamp() - time.time())
