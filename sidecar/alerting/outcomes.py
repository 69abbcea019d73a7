"""The values of ``pathwatch_alerts_sent_total{outcome}``: what became of one alert push, per sink.

One closed set, so the alert rules and dashboards that select outcomes (``PathwatchAlertPagesFailing``
on ``failed|dropped``) are checked against what the code counts (tests/dashboards/catalog.py).
"""

from __future__ import annotations

from typing import Final


class AlertOutcomes:
    SENT: Final = "sent"  # a page accepted by the sink
    REFRESHED: Final = "refreshed"  # a paged incident's alert pushed again (a new finding)
    RESOLVED: Final = "resolved"  # the incident's resolve accepted
    RETRIED: Final = "retried"  # a push failed for now and is tried again
    FAILED: Final = "failed"  # a push failed after its retries, or for good (a 4xx)
    DEDUPLICATED: Final = "deduplicated"  # this sink has the incident's page already
    RATE_LIMITED: Final = "rate_limited"  # a page held for alerting.max_per_minute (it waits)
    DROPPED: Final = "dropped"  # a page never pushed: the queue was full, or the sidecar stopped
    CANCELLED: Final = "cancelled"  # the page of an incident resolved before it went out
    INSTANCE_SKIPPED: Final = "instance_skipped"  # an Alertmanager cluster instance's backlog was full
    ALL: Final = frozenset({SENT, REFRESHED, RESOLVED, RETRIED, FAILED, DROPPED, DEDUPLICATED,
                            CANCELLED, RATE_LIMITED, INSTANCE_SKIPPED})
