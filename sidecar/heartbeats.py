"""The backend's heartbeat spans: ``HeartbeatTracker`` turns them into the pipeline's counters and
the span losses within this run; their numbering is read here the same way by the tracker and by
the consolidation ledger (drops across restarts).

A heartbeat carries its process's sequence number (``pathwatch.sdk.heartbeat_sequence``, 1 for the
first) and when its counts started (``pathwatch.sdk.counts_since_s``, the backend's wall clock);
either may be absent (an older instrumentation) or unusable (a broken sender).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

from sidecar.model import SpanRecord
from sidecar.process_watch import SILENCE_SLACK_S, ProcessWatch, silence_bound_ns
from sidecar.state import EVICTED_CAPACITY, EVICTED_TTL, BoundedLabels
from sidecar.telemetry import Telemetry

log = logging.getLogger(__name__)

#: a start of counts at or past this is not a Unix time in seconds (ms or ns sent by mistake)
MAX_UNIX_TIME_S = 1e11
#: the stopped processes are looked through for those whose time is up at most this often
EXPIRY_RESOLUTION_S = 1.0
#: a process whose life this tracker did not watch counts its past totals only when first heard
#: within this long of its service's first heartbeat (the birth of the service's series): the
#: alerts skip the first minute of each life of a series, and a 30 s scrape shows what was learned
#: in its first half-minute before that minute is over. Heard later, it is a baseline
RELEARN_S = 30.0


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


#: (service, instance, counts_since_s) -> the dropped-spans total the ledger holds of that process
HeldDropped = Callable[[str | None, str | None, float | None], int | None]


class HeartbeatTracker:
    """Turns the backend's cumulative heartbeat counts into counter increments.

    Heartbeats carry totals since the backend *process* started its counts (``counts_since_s``:
    pathwatch's import, or the fork), so the totals are kept per process: per (service,
    ``service.instance.id``, ``counts_since_s``). Several processes may share one
    ``service.instance.id`` (set in ``OTEL_RESOURCE_ATTRIBUTES`` — the OpenTelemetry Operator's
    namespace.pod.container — for every worker of ``uvicorn --workers`` or of a gunicorn that loads
    the app after the fork, or a container's several processes); each is one entry, its totals
    compared only with its own. A backend restarted under the same id is another process too. An
    instrumentation that sends no ``counts_since_s`` (an older one) is keyed by its instance alone,
    as before. The increment is the difference from the process's last totals (or the whole total
    for a process first seen, or after a restart, seen as a total going down — or, keyed by
    instance, a heartbeat numbered 1 of an instance seen before). A total missing from a heartbeat
    keeps its last value. A process first seen whose life this tracker did not watch (below) more
    than ``RELEARN_S`` after its service's first heartbeat here is a baseline instead: its totals
    may be all past (before this sidecar started, or counted before it was forgotten), and the
    alerts on these counters take only their series' first minute for such past totals (a restarted
    sidecar learning them), so counted then they would page as new. But for its dropped spans,
    counted from the total the consolidation ledger holds of it (``held_dropped``: that of its last
    heartbeat the last sidecar saw, or one seen since): the drops while no sidecar listened. A
    heartbeat whose number its process sent already (``heartbeat_sequence`` not above the last one
    seen) is that heartbeat delivered twice (an export retried) or overtaken by a later one: nothing
    new, ignored.

    ``observe`` also says when spans were dropped: the interval from a process's previous heartbeat
    to this one when its dropped total rose (or, after a restart, is above zero). The first
    heartbeat of a process dates nothing (its total may be from before this sidecar started; the
    ledger, which persists the totals, judges it) unless its total covers a life this sidecar
    watched: numbered 1 (the process's first heartbeat, e.g. a backend restarted alone with a new
    instance id), or numbered past 1 from a process whose counts started after this tracker did
    (its earlier heartbeats were lost: a restart under the same id whose first heartbeat its
    exporter gave up) and not before the last heartbeat of a process this tracker forgot (it may be
    that one). A total above zero then is a loss from when its counts started (``counts_since_s``,
    at most now; now when absent) to this heartbeat. An instrumentation that sends no sequence
    number keeps the baseline.

    ``vanished`` (on the pipeline's tick) says when processes whose heartbeats say they can send a
    final one stopped heartbeating without it (``sidecar.process_watch``): killed outright, the
    spans their exporters held are lost, from a process's last heartbeat less one interval to then;
    counted per service in ``pathwatch_backend_processes_vanished_total``. Not while the receivers
    refuse requests for overload (``requests_refused``): a refused request may have been its
    heartbeat.

    A process known to have stopped — its final heartbeat seen, or judged gone — is kept for
    ``IDLE_PROCESS_S`` after it was (or, stopped cleanly, a silent live one would have been) judged
    gone, then forgotten, counted as an expiry in ``pathwatch_state_evictions_total{table=
    "heartbeats", reason="ttl"}``: its entry is what tells a heartbeat of it that comes later (an
    earlier one an exporter or a Collector retried, overtaken by the final one; the process serving
    on after its final heartbeat, its periodic beat paused a minute at most; a stalled process heard
    again) from a new process — without it that heartbeat would be a baseline (or, within its
    service's first ``RELEARN_S``, count its process's totals again) and, not a final one, be
    followed and judged gone once more. The ledger keeps its own totals
    (``sidecar.consolidation.verdicts``), not these. A process that cannot say it stops (an older
    instrumentation) or lives on is never expired: the table is bounded (``max_instances``
    processes): the least recently seen goes when it was idle for ``IDLE_PROCESS_S`` (reason
    ``ttl`` in the same series), else one known to have stopped (the earliest), else the least
    recently seen (both ``capacity``; a live process forgotten is logged once: its next heartbeat is
    a baseline, what it counted since its last one before not counted but for the drops above the
    ledger's total of it). Like every state table it
    publishes its size (``pathwatch_state_entries``, on tick) and capacity
    (``pathwatch_state_capacity``).
    """

    #: SpanRecord field of each cumulative total -> the Telemetry counter it feeds
    TOTALS = (("dropped_spans", "backend_dropped_spans"),
              ("instrumentation_errors", "backend_instrumentation_errors"),
              ("pending_emits_evicted", "backend_pending_emits_evicted"))
    TABLE = "heartbeats"  # the table label of its evictions
    IDLE_PROCESS_S = 3600.0  # a process without a heartbeat for this long has stopped

    def __init__(self, telemetry: Telemetry, max_instances: int = 10_000,
                 max_services: int = 200, started_ns: int | None = None,
                 held_dropped: HeldDropped | None = None) -> None:
        self._telemetry = telemetry
        # the consolidation ledger's dropped-spans total of a process, if it holds one
        self._held_dropped = held_dropped
        self._logged_held = False
        self._counters = [getattr(telemetry, counter) for _, counter in self.TOTALS]
        self._max_instances = max_instances
        # wall clock ns when this tracker started: a process whose counts started later lived
        # entirely under its watch
        self._started_ns = time.time_ns() if started_ns is None else started_ns
        # (service, instance, counts_since_s or None) -> its last totals, heartbeat number and the
        # wall-clock ns they were seen at, least recently seen first
        self._last: dict[tuple[str | None, str | None, float | None], tuple] = {}
        # the last heartbeat (ns) of the latest process forgotten; None: none forgotten
        self._forgotten_until_ns: int | None = None
        self._service_label = BoundedLabels("heartbeat_service", max_services)  # label values too
        # each service label -> its first heartbeat (ns): when its counters' series were born
        self._born_ns: dict[str, int] = {}
        self._evictions = {reason: telemetry.state_evictions.labels(self.TABLE, reason)
                           for reason in (EVICTED_TTL, EVICTED_CAPACITY)}
        # its size on tick and its capacity, in the series every state table publishes
        self._entries = telemetry.state_entries.labels(self.TABLE)
        telemetry.state_capacity.labels(self.TABLE).set(max_instances)
        self._logged_capacity = False
        self._watch = ProcessWatch()  # processes that send a final heartbeat: are they still there?
        self._logged_vanished = False
        # the processes known to have stopped -> when their entry expires (ns, the pipeline's clock)
        self._stopped: dict[tuple[str | None, str | None, float | None], int] = {}
        self._next_expiry_ns: int | None = None  # none expires before it (None: none stopped)

    def observe(self, heartbeats: Iterable[SpanRecord],
                now_ns: int | None = None) -> tuple[int, int] | None:
        """Count the increments; the (from, to) wall-clock ns in which spans were dropped, if any."""
        now_ns = time.time_ns() if now_ns is None else now_ns
        zeros = (0,) * len(self.TOTALS)
        dropped: tuple[int, int] | None = None
        for span in heartbeats:
            service = self._service_label(span.service_name, missing="unknown")
            # each counter's series exists from the service's first heartbeat, at 0 until it has an
            # increment: a series born at its first value would be invisible to increase()
            children = [counter.labels(service_name=service) for counter in self._counters]
            self._telemetry.backend_processes_vanished.labels(service_name=service)
            born_ns = self._born_ns.setdefault(service, now_ns)
            sequence, since_s = numbering(span.heartbeat_sequence, span.counts_since_s)
            key = (span.service_name, span.service_instance, since_s)
            entry = self._last.get(key)  # left in its place when nothing new
            last, last_sequence, seen_ns = ((zeros, None, None) if entry is None
                                            else (entry[:-2], entry[-2], entry[-1]))
            totals = tuple(last_total if total is None else total for total, last_total in
                           zip((getattr(span, field) for field, _ in self.TOTALS), last))
            if min(totals) < 0 or (since_s is not None and sequence is not None
                                   and last_sequence is not None and sequence <= last_sequence):
                # totals never go negative: a broken sender, not a restart. A number this process
                # sent already: the same heartbeat again (an export retried), or one overtaken.
                # Nothing new: its process is not seen more recently for it
                continue
            if any(total < last_total for total, last_total in zip(totals, last)) or (
                    entry is not None and since_s is None and sequence == 1):
                # the backend process restarted: totals from zero (keyed by instance, a first
                # heartbeat, numbered 1, of an instance seen before: a restart that kept its
                # service.instance.id)
                last = zeros
            watched = entry is None and self._watched_life(sequence, since_s)
            if entry is None and not watched and now_ns - born_ns > RELEARN_S * 1e9:
                # its totals may be all past (drops before this sidecar started, or counted before
                # it was forgotten), heard after its service's first RELEARN_S: a baseline, but
                # for the drops since the total the ledger holds of it (while no sidecar listened)
                held = self._held(span.service_name, span.service_instance, since_s)
                last = totals if held is None or held > totals[0] else (held, *totals[1:])
            for child, total, last_total in zip(children, totals, last):
                if total > last_total:
                    child.inc(total - last_total)
            if seen_ns is not None and totals[0] > last[0]:  # dropped since its last heartbeat
                start = seen_ns if dropped is None else min(dropped[0], seen_ns)
                dropped = (start, now_ns)
            elif watched and totals[0] > 0:
                # everything the process counted was dropped since it started
                since_ns = counts_started(since_s, now_ns, per_s=1_000_000_000)
                dropped = (since_ns if dropped is None else min(dropped[0], since_ns), now_ns)
            self._telemetry.backend_last_heartbeat.labels(service_name=service).set(time.time())
            self._last.pop(key, None)  # to the back: the most recently seen
            if len(self._last) >= self._max_instances:
                self._evict_oldest(now_ns)
            self._last[key] = (*totals, sequence, now_ns)
            self._watch.heard(key, span.heartbeat_interval_s, span.heartbeat_final, now_ns)
            if span.heartbeat_final is True:  # it stopped cleanly: when a silent one is judged gone
                bound_ns = silence_bound_ns(span.heartbeat_interval_s)
                self._stop(key, now_ns + (int(SILENCE_SLACK_S * 1e9) if bound_ns is None
                                          else bound_ns))
            elif key in self._stopped:  # it lives on
                del self._stopped[key]
        return dropped

    def tick(self, now_ns: int) -> tuple[int, int] | None:
        """On the pipeline's tick: the processes judged gone now (``vanished``), those stopped
        long enough forgotten, and the table's size published."""
        lost = self.vanished(now_ns)
        if self._next_expiry_ns is not None and now_ns >= self._next_expiry_ns:
            self._expire(now_ns)
        self._entries.set(len(self._last))
        return lost

    def requests_refused(self, first_ns: int, last_ns: int) -> None:
        """The receivers refused requests for overload from ``first_ns`` to ``last_ns`` (the
        pipeline's clock): heartbeats may have been among them, no process is judged gone for a
        silence they may explain (``ProcessWatch.refused``)."""
        self._watch.refused(last_ns)

    def vanished(self, now_ns: int) -> tuple[int, int] | None:
        """The (from, to) wall-clock ns in which the processes judged gone now (heartbeats stopped
        without a final one: killed outright) may have lost spans, if any; each counted."""
        lost: tuple[int, int] | None = None
        for key, from_ns, to_ns in self._watch.gone(now_ns):
            service, instance, _ = key
            if key in self._last:
                self._stop(key, now_ns)
            label = self._service_label(service, missing="unknown")
            self._telemetry.backend_processes_vanished.labels(service_name=label).inc()
            if not self._logged_vanished:
                self._logged_vanished = True
                log.warning("heartbeats: a backend process of service %r (instance %r) stopped "
                            "heartbeating without a final heartbeat: killed outright, the spans "
                            "its exporter still held are lost (logged once; counted in "
                            "pathwatch_backend_processes_vanished_total)", service, instance)
            lost = (from_ns if lost is None else min(lost[0], from_ns), to_ns)
        return lost

    def _held(self, service: str | None, instance: str | None,
              since_s: float | None) -> int | None:
        """The ledger's dropped-spans total of the process, None when unknown (or it raised: its
        error must not cost the batch's heartbeats)."""
        if self._held_dropped is None or since_s is None:
            return None
        try:
            held = self._held_dropped(service, instance, since_s)
        except Exception:
            if not self._logged_held:
                self._logged_held = True
                log.exception("heartbeats: the ledger's dropped-spans total could not be read; a "
                              "process first heard late is a baseline (logged once)")
            return None
        return held if isinstance(held, int) and held >= 0 else None

    def _watched_life(self, sequence: int | None, since_s: float | None) -> bool:
        """A process first seen whose total covers only time this tracker watched: its first
        heartbeat (numbered 1), or one numbered past 1 whose counts started after this tracker did
        (its earlier heartbeats were lost) and after the last heartbeat of a process it forgot."""
        if sequence == 1:
            return True
        if sequence is None or since_s is None or not is_unix_time(since_s):
            return False
        since_ns = int(since_s * 1e9)
        forgotten_ns = self._forgotten_until_ns
        return since_ns >= self._started_ns and (forgotten_ns is None or since_ns > forgotten_ns)

    def _stop(self, key: tuple[str | None, str | None, float | None], judged_ns: int) -> None:
        """The process ``key`` stopped; a silent one would be (or was) judged gone at
        ``judged_ns``."""
        expires_ns = judged_ns + int(self.IDLE_PROCESS_S * 1e9)
        self._stopped[key] = expires_ns
        if self._next_expiry_ns is None or expires_ns < self._next_expiry_ns:
            self._next_expiry_ns = expires_ns

    def _expire(self, now_ns: int) -> None:
        """Forget the stopped processes whose time is up (an expiry). The stopped ones are looked
        through only once the earliest's time has come, at most every ``EXPIRY_RESOLUTION_S``."""
        expired = []
        next_ns: int | None = None
        for key, expires_ns in self._stopped.items():
            if expires_ns <= now_ns:
                expired.append(key)
            elif next_ns is None or expires_ns < next_ns:
                next_ns = expires_ns
        for key in expired:
            self._forget(key)
        self._next_expiry_ns = (None if next_ns is None
                                else max(next_ns, now_ns + int(EXPIRY_RESOLUTION_S * 1e9)))
        if expired:
            self._evictions[EVICTED_TTL].inc(len(expired))

    def _forget(self, key: tuple[str | None, str | None, float | None]) -> int:
        """Forget the process ``key`` (in the table); the wall-clock ns it was last seen."""
        seen_ns: int = self._last.pop(key)[-1]
        self._stopped.pop(key, None)
        self._watch.forget(key)
        # a heartbeat of it that comes later must not be taken for a process whose life this
        # tracker watched whole (``_watched_life``)
        self._forgotten_until_ns = max(self._forgotten_until_ns or seen_ns, seen_ns)
        return seen_ns

    def _evict_oldest(self, now_ns: int) -> None:
        key = next(iter(self._last))  # dicts keep insertion order: the least recently seen
        if now_ns - self._last[key][-1] >= self.IDLE_PROCESS_S * 1e9:
            self._forget(key)
            self._evictions[EVICTED_TTL].inc()
            return
        self._evictions[EVICTED_CAPACITY].inc()
        if self._stopped:
            # the earliest stopped before any live one: forgetting a live process makes its next
            # heartbeat a baseline, what it counted meanwhile lost; a stopped one loses only the
            # protection of its entry against its late heartbeats
            self._forget(next(iter(self._stopped)))
            return
        self._forget(key)
        if not self._logged_capacity:
            self._logged_capacity = True
            log.warning("heartbeats: more than %d backend processes heartbeat within an hour; "
                        "the least recently seen are forgotten (their next heartbeat is a "
                        "baseline), counted in pathwatch_state_evictions_total{table=%r}",
                        self._max_instances, self.TABLE)
