"""Backend processes killed outright: heartbeats that stop without a final one.

A backend process killed outright (SIGKILL, an OOM kill, a node lost) takes with it the spans its
exporter still held — its last export interval, more while its exports were failing — and sends no
more heartbeats. One that stops cleanly sends a final heartbeat first
(``pathwatch.sdk.heartbeat_final`` true: the app's ASGI lifespan shutdown, ``uninstrument()``, the
exit). ``ProcessWatch`` follows each process (as ``HeartbeatTracker`` keys it) whose heartbeats say
it can (the attribute false; an older instrumentation sends none, and its processes are not
followed) and that gives its heartbeat interval, and judges it gone once it has not been heard for
``SILENCE_INTERVALS`` intervals plus ``SILENCE_SLACK_S`` (exporters batch and retry: a heartbeat may
come seconds late) without a final heartbeat. The pipeline reports that as a span loss
(``PROCESS_VANISHED``) from its last heartbeat less one interval to the moment it was judged gone.

Only processes heard since this sidecar started are followed: a restarted sidecar knows none, so
it judges none it has not heard since. A process is judged once per silence, then no longer
followed; heard again (it was stalled, or its heartbeats delayed), it is followed again and the
loss stands. Time the sidecar did not watch is no silence: a pause of the pipeline's clock between
two judgements longer than ``UNWATCHED_AFTER_S`` (the sidecar frozen or suspended, a step that ran
long) moves every deadline on by the excess, as heartbeats sent meanwhile may still come. Nor is
time the receivers refused requests for overload (the memory limiter): any refused request may
have been a process's heartbeat, which its exporter retried and may have given up, so a process is
judged only once a whole bound has passed unheard after the last refusal, as if heard then.

Bounded by the heartbeat tracker's table (it forgets a process here when it forgets its totals);
heartbeats only, never per span; judged on the pipeline's tick, the table scanned only once the
earliest deadline has come.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

PROCESS_VANISHED = "process_vanished"  # the reason of its span loss (SpanLossObserver)
SILENCE_INTERVALS = 3  # heartbeat intervals a process may go unheard ...
SILENCE_SLACK_S = 10.0  # ... plus this, before it is judged gone
#: a pause of the pipeline's clock between two judgements longer than this was not watched
UNWATCHED_AFTER_S = 1.0
#: an interval above this (the instrumentation's own maximum, a year) is no interval: not followed
MAX_INTERVAL_S = 365 * 86400.0


def silence_bound_ns(interval_s: float | None) -> int | None:
    """How long a process heartbeating every ``interval_s`` may go unheard before it is judged
    gone; None for no usable interval (not followed)."""
    if interval_s is None or not math.isfinite(interval_s) or not 0 < interval_s <= MAX_INTERVAL_S:
        return None
    return SILENCE_INTERVALS * int(interval_s * 1e9) + int(SILENCE_SLACK_S * 1e9)


class ProcessWatch:
    """Processes that can say they stop, and when each is due to be judged gone."""

    def __init__(self) -> None:
        # process -> (last heard ns, interval ns, deadline ns): the pipeline's clock
        self._followed: dict[Hashable, tuple[int, int, int]] = {}
        self._next_due_ns: int | None = None  # no deadline comes before it (None: none followed)
        self._judged_ns: int | None = None  # the pipeline's clock at the last judgement
        self._refused_ns: int | None = None  # the last overload refusal (None: none yet)

    def __len__(self) -> int:
        return len(self._followed)

    def __contains__(self, process: Hashable) -> bool:
        return process in self._followed

    def heard(self, process: Hashable, interval_s: float | None, final: bool | None,
              now_ns: int) -> None:
        """A heartbeat of ``process`` (not one it sent already) at ``now_ns``."""
        bound_ns = silence_bound_ns(interval_s)
        if final is not False or bound_ns is None:
            # it stops cleanly, or cannot say it does, or sends no usable interval: not followed
            self._followed.pop(process, None)
            return
        interval_ns = int(interval_s * 1e9)
        deadline_ns = now_ns + bound_ns
        self._followed.pop(process, None)  # the least recently heard first
        self._followed[process] = (now_ns, interval_ns, deadline_ns)
        if self._next_due_ns is None or deadline_ns < self._next_due_ns:
            self._next_due_ns = deadline_ns

    def refused(self, last_ns: int) -> None:
        """The receivers refused requests for overload until ``last_ns`` (the pipeline's clock):
        any of them may have been a heartbeat. Applied when a deadline comes (``gone``)."""
        if self._refused_ns is None or last_ns > self._refused_ns:
            self._refused_ns = last_ns

    def forget(self, process: Hashable) -> None:
        self._followed.pop(process, None)

    def gone(self, now_ns: int) -> list[tuple[Hashable, int, int]]:
        """The processes judged gone at ``now_ns`` (each once), with the interval whose spans they
        may have taken with them: (process, from ns, to ns)."""
        judged_ns, self._judged_ns = self._judged_ns, now_ns
        if judged_ns is not None and now_ns - judged_ns > UNWATCHED_AFTER_S * 1e9:
            self._move_on(now_ns - judged_ns - int(UNWATCHED_AFTER_S * 1e9))
        if self._next_due_ns is None or now_ns < self._next_due_ns:
            return []
        gone = []
        next_due_ns = None
        refused_ns = self._refused_ns
        for process, (heard_ns, interval_ns, deadline_ns) in list(self._followed.items()):
            if deadline_ns <= now_ns and refused_ns is not None:
                # a refusal since it was heard: silent a whole bound after the last one
                deadline_ns = max(deadline_ns, refused_ns + SILENCE_INTERVALS * interval_ns
                                  + int(SILENCE_SLACK_S * 1e9))
                self._followed[process] = (heard_ns, interval_ns, deadline_ns)
            if deadline_ns <= now_ns:
                del self._followed[process]
                gone.append((process, heard_ns - interval_ns, now_ns))
            elif next_due_ns is None or deadline_ns < next_due_ns:
                next_due_ns = deadline_ns
        self._next_due_ns = next_due_ns
        return gone

    def _move_on(self, unwatched_ns: int) -> None:
        """The sidecar did not watch for ``unwatched_ns``: no process's silence counts it."""
        self._followed = {process: (heard_ns, interval_ns, deadline_ns + unwatched_ns)
                          for process, (heard_ns, interval_ns, deadline_ns) in self._followed.items()}
        if self._next_due_ns is not None:
            self._next_due_ns += unwatched_ns
