"""Where alerts go: Alertmanager's v2 API and a generic JSON webhook. One POST per incident.

A sink raises ``RetryableSinkError`` for what may pass on a later try (connection errors, timeouts,
5xx, 429) and ``PermanentSinkError`` for what will not (other 4xx: the payload or URL is wrong).
"""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol
from urllib.parse import urlsplit

import httpx

from sidecar.alerting.payload import (DEFAULT_RESOLVE_AFTER_S, DEFAULT_RUNBOOK_URL, alertmanager_alert,
                                      webhook_body)
from sidecar.model import Incident
from sidecar.threads import name_os_thread

log = logging.getLogger(__name__)

_BODY_EXCERPT = 200


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
    Prometheus sends, and counts as delivered when one of them took it — the cluster's gossip shares
    it and deduplicates the notification. An instance that fails is logged once.

    The instances are posted to at once (a thread each, ``close`` ends them), so an instance that
    never answers does not hold the alert back from the others for the client's timeout; a send
    returns when every instance answered or timed out."""

    name = "alertmanager"
    refreshes = True

    def __init__(self, base_url: str, client: httpx.Client, *, external_url: str = "",
                 runbook_url: str = DEFAULT_RUNBOOK_URL,
                 resolve_after_s: float = DEFAULT_RESOLVE_AFTER_S, peers: Sequence[str] = ()) -> None:
        # each instance once (a peer listed twice, or as the main URL with a trailing /, is one)
        self.urls = list(dict.fromkeys(url.rstrip("/") + "/api/v2/alerts" for url in (base_url, *peers)))
        self.url = self.urls[0]
        self._client = client
        self._external_url = external_url
        self._runbook_url = runbook_url
        self._resolve_after_s = resolve_after_s
        self._failing: set[str] = set()  # instances whose failure was logged
        self._pool = ThreadPoolExecutor(len(self.urls), thread_name_prefix="pathwatch-alertmanager",
                                        initializer=name_os_thread) if len(self.urls) > 1 else None

    def send(self, incident: Incident) -> None:
        self._post(alertmanager_alert(incident, external_url=self._external_url,
                                      runbook_url=self._runbook_url,
                                      resolve_after_s=self._resolve_after_s))

    def resolve(self, incident: Incident) -> None:
        """The same alert (same labels) with ``endsAt`` = now: Alertmanager resolves it."""
        self._post(alertmanager_alert(incident, external_url=self._external_url,
                                      runbook_url=self._runbook_url, ended_ns=time.time_ns()))

    def close(self) -> None:
        """Ends the threads of a cluster's posts (a post under way finishes on its own)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def _post(self, alert: dict) -> None:
        if self._pool is None:
            post_json(self._client, self.url, [alert])
            return
        posts = {url: self._pool.submit(post_json, self._client, url, [alert]) for url in self.urls}
        errors: list[SinkError] = []
        for url, post in posts.items():
            try:
                post.result()
            except SinkError as exc:
                errors.append(exc)
                if url not in self._failing:
                    self._failing.add(url)
                    log.warning("Alertmanager instance %s failed (%s); each alert still goes to every "
                                "instance (further failures of this one are not logged)",
                                redacted(url), exc)
            else:
                self._failing.discard(url)
        if len(errors) == len(self.urls):  # none took it: retried as a whole if any may pass later
            retryable = [exc for exc in errors if isinstance(exc, RetryableSinkError)]
            if not retryable:
                raise errors[0]
            waits = [exc.retry_after_s for exc in retryable if exc.retry_after_s is not None]
            raise RetryableSinkError(str(retryable[0]), max(waits) if waits else None)


class WebhookSink:
    name = "webhook"
    refreshes = False

    def __init__(self, url: str, client: httpx.Client, *, external_url: str = "",
                 runbook_url: str = DEFAULT_RUNBOOK_URL,
                 resolve_after_s: float = DEFAULT_RESOLVE_AFTER_S) -> None:
        self.url = url
        self._client = client
        self._external_url = external_url
        self._runbook_url = runbook_url
        self._resolve_after_s = resolve_after_s

    def send(self, incident: Incident) -> None:
        body = webhook_body(incident, external_url=self._external_url, runbook_url=self._runbook_url,
                            resolve_after_s=self._resolve_after_s)
        post_json(self._client, self.url, body)

    def resolve(self, incident: Incident) -> None:
        raise PermanentSinkError("the webhook gets pages only")

    def close(self) -> None:
        """Nothing of its own to end (the client is the dispatcher's)."""


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


def post_json(client: httpx.Client, url: str, body: object) -> None:
    try:
        response = client.post(url, json=body)
    except httpx.TransportError as exc:  # connect refused, timeouts, resets (messages name no URL)
        raise RetryableSinkError(f"POST {redacted(url)}: {type(exc).__name__}: {exc}") from None
    status = response.status_code
    if status < 300:
        return
    detail = f"POST {redacted(url)}: HTTP {status}: {response.text[:_BODY_EXCERPT]}"
    if status >= 500 or status == 429:
        raise RetryableSinkError(detail, _retry_after_s(response.headers.get("Retry-After")))
    raise PermanentSinkError(detail)


def _retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` in seconds (RFC 9110: delay-seconds or an HTTP date); None if absent or
    unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, moment.timestamp() - time.time())
