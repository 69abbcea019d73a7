"""Why the receivers refused requests: counted by reason, and an overload logged once, not per request.

``pathwatch_receiver_spans_total{outcome="refused"}`` says how many spans were refused and
``pathwatch_receiver_requests_total{status}`` how each request was answered, but neither says why:
over gRPC a full pending-span budget (retry later) and a request of too many spans (never retry)
are both RESOURCE_EXHAUSTED, and over HTTP 503 is both "more than 64 requests in flight" and
"shutting down". ``pathwatch_receiver_refused_requests_total{protocol,reason}`` counts each refused
request once under one of ``REASONS``; every series of an enabled receiver exists at 0 from its
start (``declare``), as the other receiver counters' do.

The log: the sidecar refusing because it cannot keep up (``OVERLOAD_REASONS``) is a state, not an
event per request — under a sustained overload it refuses hundreds of requests a second, and a line
for each would flood the log pipeline exactly when the node is busiest. As the Collector's
memory_limiter logs when it starts refusing and when it resumes, a warning says when refusing
starts (the reason and the setting to look at), a warning at most every ``SUMMARY_S`` while it goes
on says how much was refused meanwhile, and an info line says when requests are accepted again after
``QUIET_S`` without an overload refusal (none accepted by then — the clients gave up, or went idle
— at the next refusal, if ``SUMMARY_S`` after the last one, before the warning that starts
another overload). A request refused for
good (too many spans, a body too large: the client's batch size, not the sidecar's load) is logged
once per reason for the process's life: the client gets the message in its answer, and the counter
says how often.

An overload refusal is also told to the pipeline (``on_overload``): the exporter retries the
request for up to its timeout, and the delivery detector does not judge a deadline that ended
after the refusal until the retry may have come (docs/rules.md, delivery).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sidecar.telemetry import Telemetry

log = logging.getLogger(__name__)

#: pathwatch_receiver_refused_requests_total{reason}
OVER_BUDGET = "over_budget"  # receiver.max_pending_spans: the memory limiter (retryable)
IN_FLIGHT = "in_flight"  # OTLP/HTTP: more requests in flight than it reads at once (retryable)
SHUTTING_DOWN = "shutting_down"  # retryable, at the next sidecar
TOO_MANY_SPANS = "too_many_spans"  # receiver.max_spans_per_request: permanent
TOO_MANY_ATTRIBUTES = "too_many_attributes"  # receiver.max_attributes_per_request (OTLP/JSON): permanent
TOO_LARGE = "too_large"  # receiver.max_message_bytes, OTLP/HTTP (grpc refuses it unseen): permanent
REASONS = (OVER_BUDGET, IN_FLIGHT, SHUTTING_DOWN, TOO_MANY_SPANS, TOO_MANY_ATTRIBUTES, TOO_LARGE)
#: refusals because the sidecar cannot keep up: logged as a state (start, summaries, end)
OVERLOAD_REASONS = frozenset({OVER_BUDGET, IN_FLIGHT})
_SETTING = {OVER_BUDGET: "receiver.max_pending_spans", IN_FLIGHT: "OTLP/HTTP requests in flight",
            TOO_MANY_SPANS: "receiver.max_spans_per_request",
            TOO_MANY_ATTRIBUTES: "receiver.max_attributes_per_request",
            TOO_LARGE: "receiver.max_message_bytes"}

SUMMARY_S = 60.0  # while refusing goes on, one summary line at most this often
QUIET_S = 10.0  # an accepted request this long after the last overload refusal ends the overload


class Refusals:
    """Counts refusals by reason and logs an overload as a state. Called from every receiver
    thread: a lock guards the overload's bookkeeping (never taken on an acceptance outside one)."""

    def __init__(self, telemetry: Telemetry, monotonic: Callable[[], float] = time.monotonic,
                 on_overload: Callable[[], None] | None = None) -> None:
        self._counter = telemetry.receiver_refused_requests
        # told of each overload refusal (the pipeline's ``overload_refused``: the delivery
        # detector's judgements wait for its retry); not of refusals for good nor while stopping
        self._on_overload = on_overload
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._logged_permanent: set[str] = set()
        # the overload under way: None, or [started, last refusal, last line, requests and spans
        # refused since the last line, in all, by reason since the last line]
        self._overload: list | None = None

    def declare(self, protocol: str, reasons: tuple[str, ...] = REASONS) -> None:
        for reason in reasons:
            self._counter.labels(protocol=protocol, reason=reason)

    def refused(self, protocol: str, reason: str, spans: int, message: str = "") -> None:
        """A request refused for ``reason``; ``spans``: the spans it held, as counted refused."""
        self._counter.labels(protocol=protocol, reason=reason).inc()
        if reason not in OVERLOAD_REASONS:
            if reason != SHUTTING_DOWN and reason not in self._logged_permanent:
                self._logged_permanent.add(reason)
                log.warning("receiver: refused a request for good (%s): %s (logged once; counted "
                            'in pathwatch_receiver_refused_requests_total{reason="%s"})',
                            _SETTING.get(reason, reason), message, reason)
            return
        if self._on_overload is not None:
            self._on_overload()
        now = self._monotonic()
        with self._lock:
            overload = self._overload
            if overload is not None and now - overload[1] >= SUMMARY_S:
                # no request accepted to end it (the clients gave up, or went idle): that overload
                # ended with its last refusal, and this refusal starts another, said as such. Not
                # after QUIET_S: a stalled pipeline refuses a backing-off exporter's retries some
                # 10-30 s apart, each then two lines; a minute apart, at most what a summary costs
                log.info("receiver: the overload had ended, none refused for %.0fs; it lasted "
                         "%.0fs, %d request(s) refused in all", now - overload[1],
                         overload[1] - overload[0], overload[5])
                self._overload = overload = None
            if overload is None:
                self._overload = [now, now, now, 1, spans, 1, {reason: 1}]
                log.warning("receiver: refusing requests, the sidecar cannot keep up (%s): "
                            "exporters are told to retry later (RESOURCE_EXHAUSTED / HTTP 429 or "
                            "503 with a retry delay); logged when it starts, every %gs while it "
                            "goes on and when it ends; counted in "
                            'pathwatch_receiver_refused_requests_total{reason="%s"}',
                            message or _SETTING[reason], SUMMARY_S, reason)
                return
            overload[1] = now
            overload[3] += 1
            overload[4] += spans
            overload[5] += 1
            overload[6][reason] = overload[6].get(reason, 0) + 1
            if now - overload[2] >= SUMMARY_S:
                log.warning("receiver: still refusing requests (for %.0fs): %d request(s), %d "
                            "span(s) at least, refused in the last %.0fs (%s)", now - overload[0],
                            overload[3], overload[4], now - overload[2], _by_reason(overload[6]))
                overload[2], overload[3], overload[4], overload[6] = now, 0, 0, {}

    def accepted(self) -> None:
        """A request accepted: ends an overload once none was refused for ``QUIET_S``."""
        if self._overload is None:
            return
        now = self._monotonic()
        with self._lock:
            overload = self._overload
            if overload is None or now - overload[1] < QUIET_S:
                return
            self._overload = None
        log.info("receiver: accepting requests again, none refused for %.0fs; the overload lasted "
                 "%.0fs, %d request(s) refused in all", now - overload[1],
                 overload[1] - overload[0], overload[5])


def _by_reason(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items())) or "none"
