"""How a backend heartbeat's numbering is read, the same way by the pipeline's tracker (counters,
drops within this run) and the consolidation ledger (drops across restarts).

A heartbeat carries its process's sequence number (``pathwatch.sdk.heartbeat_sequence``, 1 for the
first) and when its counts started (``pathwatch.sdk.counts_since_s``, the backend's wall clock);
either may be absent (an older instrumentation) or unusable (a broken sender).
"""

from __future__ import annotations

import math

#: a start of counts at or past this is not a Unix time in seconds (ms or ns sent by mistake)
MAX_UNIX_TIME_S = 1e11


def numbering(sequence: int | None, since_s: float | None) -> tuple[int | None, float | None]:
    """The heartbeat's sequence number and start of counts, each None when not sent or unusable:
    a number below 1, a start that is not a finite number."""
    if sequence is not None and sequence < 1:  # a broken sender: no number
        sequence = None
    if since_s is not None and not math.isfinite(since_s):
        since_s = None
    return sequence, since_s


def is_unix_time(since_s: float | None) -> bool:
    """``since_s`` can be a Unix time in seconds (nan and inf are not)."""
    return since_s is not None and 0 <= since_s < MAX_UNIX_TIME_S


def counts_started(since_s: float | None, now: float, per_s: int = 1) -> float:
    """When a backend process's counts started, on the clock and scale of ``now`` (``per_s`` units a
    second: 1 for seconds, 1_000_000_000 for ns): at most ``now`` (a backend clock ahead of ours),
    ``now`` when unknown or not a Unix time."""
    if not is_unix_time(since_s):
        return now
    return min(since_s if per_s == 1 else int(since_s * per_s), now)
