"""Overload refusals whose retries may still come, for detectors that judge a timed wait.

A request the receivers refused for overload (``RefusalObserver.requests_refused``) comes again on
its exporter's retry, up to ``rules.export_retry_window_s`` after the refusal. A wait that ended at
T (a deadline, an idle time, a hold for more evidence) is therefore not judged while a refusal made
at or before T may still be retried: the evidence it waits for may be in that request.
"""

from __future__ import annotations

from collections import deque

#: overload refusals less than this apart are kept as one stretch of refusals: a wait ending in
#: such a gap waits as if a refusal had been made then, up to this much longer
REFUSALS_MERGED_WITHIN_S = 1.0


class RefusalStretches:
    """[first, last] stretches of refusals on the pipeline's clock, oldest first: at most one a
    ``REFUSALS_MERGED_WITHIN_S`` within the retry window (``rules.export_retry_window_s``: a
    handful at 10 s, about 300 at its bound of 300 s). False when none may still be retried, so
    that a detector asks nothing more per entry then."""

    __slots__ = ("_stretches", "_retry_ns", "_merged_ns")

    def __init__(self, retry_window_s: float) -> None:
        """``retry_window_s``: how long after a refusal its retry may still come."""
        self._stretches: deque[list[int]] = deque()
        self._retry_ns = int(retry_window_s * 1e9)
        self._merged_ns = int(REFUSALS_MERGED_WITHIN_S * 1e9)

    def __bool__(self) -> bool:
        return bool(self._stretches)

    def add(self, first_ns: int, last_ns: int) -> None:
        """Requests were refused from ``first_ns`` to ``last_ns`` (``requests_refused``)."""
        stretches = self._stretches
        if stretches and first_ns - stretches[-1][1] <= self._merged_ns:
            stretches[-1][1] = max(stretches[-1][1], last_ns)
        else:
            stretches.append([first_ns, last_ns])

    def expire(self, now_ns: int) -> None:
        """Let go of the stretches whose retries are over (on tick)."""
        stretches = self._stretches
        while stretches and stretches[0][1] + self._retry_ns <= now_ns:
            stretches.popleft()

    def retry_pending(self, ended_ns: int, now_ns: int) -> bool:
        """Whether a wait that ended at ``ended_ns`` is not judged at ``now_ns``: a request refused
        at or before its end may still come on a retry. True for any later end too, so that tables
        popped in end order stop there."""
        for first_ns, last_ns in reversed(self._stretches):
            if first_ns <= ended_ns:  # the latest refusal made by the end
                return min(last_ns, ended_ns) + self._retry_ns > now_ns
        return False
