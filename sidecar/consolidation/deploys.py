"""Deploy-aware comparison: runs, findings and paths split by the backend's ``service.version``.

A version is a (``service.name``, ``service.version``) pair: a gateway sidecar sees several services,
and one service's new version is compared with that service's previous one, not another's. Versions
are kept in the order they were first seen, at most ``max_versions`` (a hard bound). A new version
that finds the book full makes room by dropping the version that matters least, by activity (its
last run, finding or path), not by age — a gateway's stable service keeps its live version however
often the others deploy (see ``VersionBook._evictable``):

1. an old version of a service that a newer one already superseded, and is no one's comparison base;
2. the latest version of a service that has not run for ``LIVE_S`` (the service stopped);
3. the comparison base of a service's latest version;

least recently active first within each group. A service's latest version is its newest, unless that
went quiet for ``LIVE_S`` while an older one ran since: after a rollback (1 -> 2 -> 1), 1. The latest
version of a service that still runs, and the version a newcomer will be compared with (its base,
below), are never dropped: when nothing else can go the newcomer waits untracked (``refused``,
logged) and gets in once there is room. A dropped old version stays
dropped (its spans and findings are counted in ``ignored``): a straggler of an old release would
otherwise come back as the newest version and be judged as a deploy after the real newest one. A
service's latest version dropped (or turned away) waits instead and may come back; it is dropped for
good once a newer version of its service comes. ``overflow()`` shows all of it.

Each version is compared with its comparison base, per entry point (the same kind of traffic), once
both have at least ``min_runs`` runs there. The base is recorded when the version is first seen: the
newest of its service's tracked versions still running then (active within ``CONCURRENT_S`` of the
most recently active one) — the version it replaces: in a rolling deploy 1 -> 2, or beside a
canary, 2, whichever of them sent the last span; after a rollback (1 -> 2 -> 1) the one rolled
back to, so that 3 is compared with 1 (what ran before it), not with the abandoned 2, whether the
book is full or not. A version whose
base is no longer tracked (dropped, or dropped and back since: then a newer version than it) is
compared with nothing.

Across restarts (``KnownVersion``, persisted by the ledger: ``take_known`` on each flush, ``known``
at start; at most ``MAX_KNOWN_VERSIONS``, the least recently active forgotten first): a version seen
again keeps its first sighting and base — also one forgotten among the dropped that comes back —
and tracked versions are kept in the order first seen; a version new since the start takes as base
its service's most recently active tracked version (one that ran since the start), or else, none
running, the most recently active one the last process saw and this one has not yet
(``_carried``). A sidecar restarted in the middle of a rolling deploy 1 -> 2 may get 2's spans
first: 2 is compared with 1 still, and 1 is not judged as a deploy after 2. The counts of the
tracked versions are persisted too (``VersionCounts``: ``take_counts`` on each flush, ``counts`` at
start): a version tracked again goes on from them, so a restart does not make each version count
``min_runs`` runs again before it is compared. A fresh ledger knows
nothing: its versions are in the order first seen (nothing is guessed from version strings).
What is compared:

- ``deploy.regression``: for a family (bleed, duplicate, delivery), findings per run rose beyond
  ``previous + max(floor, factor * previous)``;
- ``deploy.retired_revived``: a retired implementation runs in the new version and never ran in the
  previous one (which had ``min_runs`` runs in all), retired or not (a class the new path map only
  marked retired is not revived). What a version ran is recorded as its call spans arrive, as its
  runs are counted: from its judged paths it would lag them (a WebSocket run settles for a minute),
  and a class the previous version's unsettled runs went through would look revived;
- ``deploy.new_path``: a path the previous version never took at that entry point.

Findings are counted for the (service, version) of the span they carry (``Finding.service_name``
and ``service_version``), as runs are: never for a service guessed from the version string (two
services of a gateway may run the same one), and a finding that comes before its version's first
call span starts that version as a run would.

Each is raised once per (version, entry point, family / implementation / path), also when the
version waited untracked in between (what was raised is forgotten only when it is dropped for good,
or forgotten among too many waiting versions). A run counts in its version's rates (and in what is
persisted) ``settle_s`` after its first span arrived, and a finding ``settle_s`` after the span it
carries arrived (``settle``): by then every family has judged a run whose spans came together, so a
rate is over runs judged — counted when they open, a version's runs not yet judged diluted its rate
(its base's understated: a false regression of the next version), and runs a stopping sidecar never
judged were persisted with no findings. A run still settling when the sidecar stops is neither
counted nor persisted (its remaining spans go to the next sidecar, which counts it). A longer run,
or a finding held beyond ``settle_s``, counts its later findings when they are raised: a rate may lag
low, never high. Findings
of rules raised once per time window or per change (``NOT_PER_RUN``: retired_invoked at most once a
minute, entry_point_paths once per new implementation) are not counted: their count per run follows
traffic density, not code (a quiet version would look worse than a busy one running the same code);
a revived retired implementation is ``deploy.retired_revived``'s business.
Everything is bounded: versions, entry points per version (``max_entry_points``), paths and
implementations per version.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from sidecar.consolidation.paths import CompletedPath, Step, describe
from sidecar.model import Finding, SpanRecord
from sidecar.rules import DUPLICATE_ENTRY_POINT_PATHS, DUPLICATE_RETIRED_INVOKED

#: the rule families whose findings per run ``deploy.regression`` compares between versions (and the
#: ``family`` label of pathwatch_version_findings_total), not every family: a new one is compared only
#: once it is added here
COMPARED_FAMILIES = ("bleed", "duplicate", "delivery")
NOT_PER_RUN = frozenset({DUPLICATE_RETIRED_INVOKED, DUPLICATE_ENTRY_POINT_PATHS})
MAX_ENTRY_POINTS = 256
MAX_PATHS = 1024
MAX_CULPRITS = 16
MAX_KNOWN_VERSIONS = 1024  # versions whose first sighting and base are remembered (persisted)
#: runs and findings still within ``settle_s`` wait in time buckets of ``settle_s`` divided by this
#: (see ``VersionBook.settle``); beyond ``MAX_SETTLING_BUCKETS`` buckets (a clock that ran ahead,
#: ``settle`` not called) the oldest is counted at once
SETTLE_BUCKETS = 8
MAX_SETTLING_BUCKETS = 4 * SETTLE_BUCKETS
#: (version, entry point) pairs of runs, and of findings, one bucket holds (entry points are the
#: spans' own until they count); a run or finding of a further pair counts at once
MAX_SETTLING_KEYS = 4096
LIVE_S = 3600.0  # a service's latest version active this recently still runs: never dropped
#: versions of a service active within this of its most recently active one run side by side (a
#: rolling deploy, a canary): a newcomer's base is the newest of them (``VersionBook._base_for``).
#: Short: a canary rolled back (stopped) this long before the next version is first seen would be
#: that version's base; under traffic the versions that serve send spans every few seconds (the
#: SDK's exporter every 5 s, pathwatch's every 0.2 s), and one that sends less often is judged as
#: before, the most recently active one being the base
CONCURRENT_S = 10.0

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Thresholds:
    min_runs: int = 20
    floor: float = 0.05
    factor: float = 0.5

    def regressed(self, previous: float, current: float) -> bool:
        return current > previous + max(self.floor, self.factor * previous)


class _Rate:
    """Findings of one family at one entry point of one version, with who they blame."""

    __slots__ = ("count", "culprits", "trace_id")

    def __init__(self) -> None:
        self.count = 0
        self.culprits: dict[tuple[str | None, str | None], int] = {}
        self.trace_id: str | None = None

    def add(self, finding: Finding) -> None:
        self.count += 1
        key = (finding.role, finding.implementation)
        if key in self.culprits or len(self.culprits) < MAX_CULPRITS:
            self.culprits[key] = self.culprits.get(key, 0) + 1
        self.trace_id = finding.trace_id or self.trace_id

    def merge(self, other: _Rate) -> None:
        """``other``'s findings, later than this one's, counted here (culprits bounded alike)."""
        self.count += other.count
        culprits = self.culprits
        for key, count in other.culprits.items():
            if key in culprits or len(culprits) < MAX_CULPRITS:
                culprits[key] = culprits.get(key, 0) + count
        self.trace_id = other.trace_id or self.trace_id

    def top_culprit(self) -> tuple[str | None, str | None]:
        if not self.culprits:
            return None, None
        return max(self.culprits.items(), key=lambda kv: (kv[1], str(kv[0])))[0]


class _Settling:
    """Runs opened, and findings of spans received, within one time bucket (``end_s`` on the book's
    clock), not yet counted: a version's rates count them once ``settle_s`` has passed."""

    __slots__ = ("end_s", "received_ns", "runs", "findings")

    def __init__(self, end_s: float) -> None:
        self.end_s = end_s
        # the earliest receipt (monotonic, ``SpanRecord.received_ns``) of a span of a batch in it:
        # a finding whose span was received since waits in it, or in a later one (``_settling_of``)
        self.received_ns: int | None = None
        self.runs: dict[tuple[VersionStats, str], int] = {}  # (version, entry point) -> runs
        self.findings: dict[tuple[VersionStats, str, str], _Rate] = {}  # (.., family) -> findings


class VersionStats:
    __slots__ = ("service", "version", "first_seen_s", "last_active_s", "base", "runs", "findings",
                 "retired", "paths", "settled", "ran", "overflow")

    def __init__(self, service: str, version: str, first_seen_s: float,
                 base: tuple[str, str] | None = None) -> None:
        self.service = service
        self.version = version
        self.first_seen_s = first_seen_s
        self.base = base  # the version it is compared with, recorded when it was first seen
        self.last_active_s = first_seen_s  # its last run, finding or path: who goes when full
        self.runs: dict[str, int] = {}  # entry point -> runs
        self.findings: dict[tuple[str, str], _Rate] = {}  # (entry point, family) -> rate
        self.retired: dict[tuple[str, str], tuple[str, str]] = {}  # (role, impl) -> (entry, trace)
        self.paths: dict[tuple[str, str], tuple[Step, ...]] = {}  # (entry, path id) -> steps
        self.settled: dict[str, int] = {}  # entry point -> runs whose path is known (judged)
        self.ran: set[tuple[str, str]] = set()  # (role, impl) of its call spans, as they arrive
        self.overflow = 0

    @property
    def key(self) -> tuple[str, str]:
        return self.service, self.version

    @property
    def total_runs(self) -> int:
        return sum(self.runs.values())

    def rate(self, entry_point: str, family: str) -> float:
        runs = self.runs.get(entry_point, 0)
        rate = self.findings.get((entry_point, family))
        return (rate.count / runs) if runs and rate else 0.0

    def steps_at(self, entry_point: str) -> set[tuple[str, str]]:
        return {(role, impl) for (entry, _), steps in self.paths.items() if entry == entry_point
                for role, impl, _ in steps}


@dataclass(frozen=True, slots=True)
class KnownVersion:
    """What the ledger remembers of a version across restarts: when it was first seen (by this
    sidecar or an earlier process on the same ledger), the version of its service it was compared
    with then (its base, or None), and its last activity as of the last write."""
    service: str
    version: str
    first_seen_s: float
    base: str | None
    last_active_s: float


@dataclass(frozen=True, slots=True)
class VersionCounts:
    """What the ledger remembers of a tracked version's counts across restarts (``take_counts``):
    its runs per entry point, its findings per (entry point, family) — with the class they blame
    most, how often, and the last trace — and the classes it ran (``deploy.retired_revived`` is
    judged against them: restored runs without them would make every retired class the new version
    runs look revived), and the retired classes it ran, with an entry point and a trace of each
    (a revival not judged yet — its base had fewer than ``min_runs`` runs — is judged after a
    restart too, not only if it runs that class again). Paths are not kept: ``deploy.new_path``
    waits for runs judged since the start."""
    service: str
    version: str
    runs: tuple[tuple[str, int], ...]
    findings: tuple[tuple[str, str, int, str | None, str | None, int, str | None], ...]
    ran: tuple[tuple[str, str], ...]
    retired: tuple[tuple[str, str, str, str | None], ...] = ()  # role, class, entry point, trace

    def to_json(self) -> list:
        value = [self.service, self.version, [list(r) for r in self.runs],
                 [list(f) for f in self.findings], [list(r) for r in self.ran]]
        if self.retired:  # left out when none: a ledger the release before reads as it wrote it
            value.append([list(r) for r in self.retired])
        return value

    @classmethod
    def from_json(cls, value: Any) -> VersionCounts:
        """One persisted version's counts; ValueError when it is of another shape (damaged).
        Bounded as the book bounds a version's tables."""
        service, version, stored_runs, stored_findings, stored_ran, *more = value  # ValueError,
        # TypeError: another shape
        if len(more) > 1:
            raise ValueError("a value of another shape")
        stored_retired = more[0] if more else []  # none: the release before, or none ran
        if not (isinstance(service, str) and isinstance(version, str)):
            raise ValueError("a version that is not a string")
        if not all(isinstance(table, list)
                   for table in (stored_runs, stored_findings, stored_ran, stored_retired)):
            # an object's [:n] is a KeyError from Python 3.12 (slices are hashable), a TypeError before
            raise ValueError("a table that is not a list")
        runs = tuple((entry, persisted_int(n)) for entry, n in stored_runs[:MAX_ENTRY_POINTS]
                     if _str(entry))
        findings = tuple(
            (entry, family, persisted_int(n), role, impl, persisted_int(blamed), trace_id)
            for entry, family, n, role, impl, blamed, trace_id
            in stored_findings[:MAX_ENTRY_POINTS * len(COMPARED_FAMILIES)]
            if _str(entry) and family in COMPARED_FAMILIES and _str(role, True) and _str(impl, True)
            and _str(trace_id, True))
        ran = tuple((role, impl) for role, impl in stored_ran[:MAX_PATHS]
                    if _str(role) and _str(impl))
        retired = tuple((role, impl, entry, trace_id)
                        for role, impl, entry, trace_id in stored_retired[:MAX_PATHS]
                        if _str(role) and _str(impl) and _str(entry) and _str(trace_id, True))
        return cls(service, version, runs, findings, ran, retired)


def persisted_int(value: object, minimum: int = 0) -> int:
    """An int read back from the ledger (a count, a heartbeat number from 1): ValueError when it
    is another type (a bool or a float is damage) or below ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"not an int from {minimum}: {value!r}")
    return value


def _str(value: object, none: bool = False) -> bool:
    if isinstance(value, str) or (none and value is None):
        return True
    raise ValueError(f"not a string: {value!r}")


class VersionBook:
    def __init__(self, thresholds: Thresholds, max_versions: int = 16,
                 known: list[KnownVersion] | None = None,
                 counts: list[VersionCounts] | None = None, settle_s: float = 0.0) -> None:
        self.thresholds = thresholds
        self._max_versions = max_versions
        # runs and findings wait this long before they count (``settle``); 0: they count at once
        self.settle_s = settle_s
        self._bucket_s = settle_s / SETTLE_BUCKETS
        self._settling: deque[_Settling] = deque()
        self.versions: OrderedDict[tuple[str, str], VersionStats] = OrderedDict()  # (service, version)
        # every version first seen (bounded, least recently active first), persisted by the ledger:
        # a version that comes back (after a restart, or forgotten among the dropped) keeps its first
        # sighting and its base, so the order of a service's versions survives a restart
        self._known: OrderedDict[tuple[str, str], KnownVersion] = OrderedDict()
        # of those, the versions an earlier process saw and this one has not yet: candidates for
        # the base of a version new since the start (a restart in the middle of a rolling deploy)
        self._carried: dict[str, set[str]] = {}  # service -> versions
        for record in known or ():
            key = (record.service, record.version)
            self._known.pop(key, None)
            self._known[key] = record
            self._carried.setdefault(record.service, set()).add(record.version)
        self._known_dirty = False
        # the counts an earlier process had of the versions it tracked, until each is tracked again
        # (``_track``: it goes on from them) or forgotten (dropped, or among MAX_KNOWN_VERSIONS)
        self._carried_counts: dict[tuple[str, str], VersionCounts] = {
            (c.service, c.version): c for c in counts or () if (c.service, c.version) in self._known}
        self._counts_written: list[VersionCounts] | None = None  # as ``take_counts`` last gave them
        # what was already reported, of the tracked and the waiting versions (bounded with them):
        # a version that waits and comes back is not reported again
        self._raised: set[tuple] = set()
        self._dropped: OrderedDict[tuple[str, str], None] = OrderedDict()  # superseded: ignored
        self._waiting: OrderedDict[str, str] = OrderedDict()  # service -> untracked latest version
        self.dropped = 0  # versions dropped for good
        self.refused = 0  # new versions turned away (every tracked one still needed): they wait
        self.ignored = 0  # spans and findings of dropped or waiting versions

    # --- the data path ---------------------------------------------------------------------------
    def stats(self, service: str, version: str, now_s: float) -> VersionStats | None:
        """The version's stats, None when it is not tracked: dropped (its late spans are ignored),
        or waiting for room."""
        key = (service, version)
        stats = self.versions.get(key)
        if stats is None:
            if key in self._dropped or not self._make_room(key, now_s):
                self.ignored += 1
                return None
            stats = self._track(key, now_s)
            waiting = self._waiting.pop(service, None)
            if waiting is not None and waiting != version:  # superseded before it got in
                self._drop((service, waiting))
        elif now_s > stats.last_active_s:
            stats.last_active_s = now_s
        return stats

    def _track(self, key: tuple[str, str], now_s: float) -> VersionStats:
        """A version not tracked now gets in: as it was first seen and with the base it got then,
        when that is known (an earlier process, persisted, or earlier in this one); else first seen
        now, its base the service's newest tracked version still running (``_base_for``), or else
        one an earlier process saw and this one has not yet (``_carried_base``)."""
        service, version = key
        carried = self._carried.get(service)
        if carried is not None:
            carried.discard(version)
            if not carried:
                del self._carried[service]
        known = self._known.get(key)
        if known is not None:
            stats = VersionStats(service, version, known.first_seen_s,
                                 (service, known.base) if known.base is not None else None)
            stats.last_active_s = max(now_s, known.first_seen_s)
            counts = self._carried_counts.pop(key, None)
            if counts is not None:  # an earlier process's counts: this one goes on from them
                _restore(stats, counts)
        else:
            base = self._base_for(service)
            carried_base = self._carried_base(service, base)
            base_key = (service, carried_base) if carried_base is not None else (
                base.key if base is not None else None)
            stats = VersionStats(service, version, now_s, base_key)
            self._known[key] = KnownVersion(service, version, now_s,
                                            base_key[1] if base_key is not None else None, now_s)
            self._known_dirty = True
            self._trim_known()
        versions = self.versions
        newest = next(reversed(versions.values()), None)
        versions[key] = stats
        if newest is not None and newest.first_seen_s > stats.first_seen_s:
            # a version first seen before some tracked ones (an earlier process saw it): kept in the
            # order first seen, which is what ``_evictable`` reads as older and newer
            self.versions = OrderedDict(sorted(versions.items(),
                                               key=lambda item: item[1].first_seen_s))
        return stats

    def _carried_base(self, service: str, base: VersionStats | None) -> str | None:
        """The base of a version new since the start when no version of its service ran since the
        start (``base``, the most recently active tracked version, is None: every tracked version
        ran since the start): the most recently active version an earlier process saw. After a
        restart in the middle of a rolling deploy 1 -> 2, version 2 may send the first span: it is
        compared with 1 (which ran before the restart), and 1, once seen again, keeps its own first
        sighting and base. Not a comparison of times across processes: the last process's clock
        may have been ahead of this one's (or a damaged ledger hold a time to come), and a carried
        version would then win over one running now."""
        if base is not None:
            return None
        found: KnownVersion | None = None
        for version in self._carried.get(service, ()):
            record = self._known.get((service, version))
            if record is None:
                continue
            if found is None or (record.last_active_s, record.first_seen_s) > (
                    found.last_active_s, found.first_seen_s):
                found = record
        return found.version if found is not None else None

    def _trim_known(self) -> None:
        while len(self._known) > MAX_KNOWN_VERSIONS:
            service, version = self._known.popitem(last=False)[0]
            self._carried_counts.pop((service, version), None)
            carried = self._carried.get(service)
            if carried is not None:
                carried.discard(version)
                if not carried:
                    del self._carried[service]

    def take_known(self) -> list[KnownVersion] | None:
        """The versions to persist (least recently active first), when they changed since the last
        call: a version first seen, or a tracked one active since (its last activity refreshed
        here, per flush, not per span: moved to the end, where the ledger writes it, the unchanged
        ones kept as the very objects it was given); None when nothing changed."""
        known = self._known
        for key, stats in list(self.versions.items()):
            record = known.get(key)
            if record is None:  # forgotten among MAX_KNOWN_VERSIONS while tracked
                base = stats.base[1] if stats.base is not None else None
                known[key] = KnownVersion(*key, stats.first_seen_s, base, stats.last_active_s)
            elif stats.last_active_s > record.last_active_s:
                known.pop(key)
                known[key] = KnownVersion(record.service, record.version, record.first_seen_s,
                                          record.base, stats.last_active_s)
            else:
                continue
            self._known_dirty = True
        if not self._known_dirty:
            return None
        self._trim_known()
        self._known_dirty = False
        return list(known.values())

    def take_counts(self) -> list[VersionCounts] | None:
        """The counts to persist, when they changed since the last call (None when not): of every
        tracked version, and of the versions an earlier process counted that this one has not seen
        yet (a second restart keeps them, as the very objects it was given: the ledger writes only
        the versions whose counts changed); at most ``MAX_KNOWN_VERSIONS``, the tracked ones kept
        first. Built here, on the ledger's flush, never per span."""
        counts = [*self._carried_counts.values(),
                  *(_counts_of(stats) for stats in list(self.versions.values()))]
        counts = counts[-MAX_KNOWN_VERSIONS:]
        if counts == self._counts_written:
            return None
        self._counts_written = counts
        return counts

    def _make_room(self, key: tuple[str, str], now_s: float) -> bool:
        """Room for the new version ``key`` within ``max_versions``; False (it waits) when every
        tracked version is still needed."""
        if len(self.versions) < self._max_versions:
            return True
        evictable = self._evictable(key[0], now_s)
        if not evictable:
            if self._waiting.get(key[0]) != key[1]:  # counted and logged once per version
                self.refused += 1
                self._wait(key)
                log.warning("consolidation.max_versions (%d) are all live versions or comparison "
                            "bases: version %s of %s is not tracked until one is free (raise "
                            "max_versions)", self._max_versions, key[1], key[0])
            return False
        gone = min(evictable, key=evictable.__getitem__)
        del self.versions[gone]
        if evictable[gone][0] == 1:  # a service's latest version: it may come back
            self._wait(gone)
        else:
            self._drop(gone)
        return True

    def _base_for(self, service: str) -> VersionStats | None:
        """The comparison base of a version of ``service`` first seen now: the newest (last first
        seen) of the service's tracked versions that still run — active within ``CONCURRENT_S`` of
        its most recently active one. After a rollback (1 -> 2 -> 1), 1; in a rolling deploy
        (1 -> 2, both serving) or beside a canary, 2, whichever of them sent the last span: a
        canary 3 started while 1's last pods still serve replaces 2, and compared with 1 it missed
        a retired class 1 ran, 2 dropped and 3 revives (``deploy.retired_revived``)."""
        mine = [stats for stats in self.versions.values() if stats.service == service]
        if not mine:
            return None
        live_from_s = max(stats.last_active_s for stats in mine) - CONCURRENT_S
        base = None
        for stats in mine:  # in the order first seen: the last of equals wins
            if stats.last_active_s >= live_from_s and (base is None
                                                       or stats.first_seen_s >= base.first_seen_s):
                base = stats
        return base

    def _base_of(self, stats: VersionStats) -> VersionStats | None:
        """The tracked version ``stats`` is compared with: its recorded base, while that is the
        one it was (not dropped and back since, newer than ``stats`` then)."""
        base = self.versions.get(stats.base) if stats.base is not None else None
        if base is None or base.first_seen_s > stats.first_seen_s:
            return None
        return base

    def _evictable(self, newcomer_service: str, now_s: float) -> dict[tuple[str, str], tuple]:
        """Tracked versions that may go, each with its sort key (lowest goes first): (group, last
        activity). Never in it: a service's latest version that ran within ``LIVE_S`` (dropping it
        would ignore a live service's runs and leave its next deploy nothing to be compared with),
        and the newcomer's comparison base (``_base_for``: what it will be compared with)."""
        chains: dict[str, list[VersionStats]] = {}
        for stats in self.versions.values():
            chains.setdefault(stats.service, []).append(stats)
        evictable = {}
        for service, chain in chains.items():
            *older, latest = chain
            if older and now_s - latest.last_active_s >= LIVE_S:
                # the newest version went quiet while an older one runs: a rollback (1 -> 2 -> 1),
                # and the version that runs is the live one (a straggler span of an old version
                # right after a deploy is not)
                latest = max(chain, key=lambda stats: stats.last_active_s)
            needed: VersionStats | None = None  # a comparison base, kept as long as possible
            if service == newcomer_service:
                latest = None  # superseded by the newcomer
                needed = self._base_for(service)  # never dropped
            elif service in self._waiting:
                # its latest version is untracked: it will be compared with ``_base_for`` ...
                needed, latest = self._base_for(service), None
                if now_s - needed.last_active_s >= LIVE_S:  # ... kept while it still runs
                    evictable[needed.key] = (2, needed.last_active_s)
            else:
                if now_s - latest.last_active_s >= LIVE_S:
                    evictable[latest.key] = (1, latest.last_active_s)  # the service stopped
                needed = self._base_of(latest)
                # a base that still runs (a rollback or a canary within the hour) stays: dropping it
                # would ignore its live runs for good
                if needed is not None and now_s - needed.last_active_s >= LIVE_S:
                    evictable[needed.key] = (2, needed.last_active_s)
            for stats in chain:
                if stats is not latest and stats is not needed:
                    evictable[stats.key] = (0, stats.last_active_s)  # superseded, no one's base
        return evictable

    def _drop(self, key: tuple[str, str]) -> None:
        """``key`` is ignored from now on (bounded memory of dropped versions)."""
        self.dropped += 1
        self._carried_counts.pop(key, None)
        self._forget(key)
        self._dropped[key] = None
        if len(self._dropped) > 4 * self._max_versions:
            self._dropped.popitem(last=False)

    def _wait(self, key: tuple[str, str]) -> None:
        """``key``, its service's latest version, is not tracked for now but may come back."""
        service, version = key
        before = self._waiting.pop(service, None)
        if before is not None and before != version:
            self._drop((service, before))  # superseded while waiting
        self._waiting[service] = version
        if len(self._waiting) > 4 * self._max_versions:
            self._forget(self._waiting.popitem(last=False))

    def _forget(self, key: tuple[str, str]) -> None:
        """What was reported of ``key``, a version gone for good, is forgotten."""
        self._raised = {raised for raised in self._raised if raised[1] != key}

    def count_run(self, service: str, version: str, entry_point: str, now_s: float) -> bool:
        """A run of the version opened (it counts ``settle_s`` later: ``settle``); False when the
        version is not tracked (ignored)."""
        stats = self.stats(service, version, now_s)
        if stats is None:
            return False
        if self.settle_s > 0:
            runs = self._settling_at(now_s).runs
            key = (stats, entry_point)
            if key in runs or len(runs) < MAX_SETTLING_KEYS:
                runs[key] = runs.get(key, 0) + 1
                return True
        _add_runs(stats, entry_point, 1)
        return True

    def count_finding(self, service: str, version: str, entry_point: str, family: str,
                      finding: Finding, now_s: float) -> bool:
        """A finding of the version of ``service`` (the finding's own: two services may run the
        same version string); False when the version is not tracked (ignored). A finding that
        comes before the version's first call span (a failed socket write ends before the emit
        that made it) starts the version, as a run would."""
        stats = self.stats(service, version, now_s)
        if stats is None:
            return False
        settling = self._settling_of(finding.received_ns) if self._settling else None
        key = (stats, entry_point, family)
        if settling is not None and (key in settling.findings
                                     or len(settling.findings) < MAX_SETTLING_KEYS):
            # its span came with runs still settling: it waits with them
            rate = settling.findings.get(key)
            if rate is None:
                rate = settling.findings[key] = _Rate()
        else:
            rate = _rate_of(stats, entry_point, family)
            if rate is None:
                return True
        rate.add(finding)
        return True

    # --- settling: what counts once every family could have judged it -----------------------------
    def batch_received(self, now_s: float, received_ns: int) -> None:
        """A batch of spans received at ``received_ns`` (monotonic) is processed at ``now_s``: the
        findings of its spans wait with the runs it opens (per batch, not per span)."""
        if self.settle_s <= 0 or not received_ns:
            return
        settling = self._settling_at(now_s)
        if settling.received_ns is None or received_ns < settling.received_ns:
            settling.received_ns = received_ns

    def _settling_at(self, now_s: float) -> _Settling:
        """The bucket of ``now_s``: the newest one while ``now_s`` is before its end (a clock that
        went back included: ``settle`` moves the buckets back with a step past the newest's start),
        else a new one."""
        queue = self._settling
        if queue and now_s < queue[-1].end_s:
            return queue[-1]
        width = self._bucket_s
        queue.append(_Settling((math.floor(now_s / width) + 1) * width))
        if len(queue) > MAX_SETTLING_BUCKETS:
            self._count(queue.popleft())
        return queue[-1]

    def _settling_of(self, received_ns: int) -> _Settling | None:
        """The bucket a finding waits in: the newest one whose batches' spans were received by
        then — its run's bucket, or a later one (never an earlier: its run opened before its span
        came) — None when its span came before any still settling (it counts at once)."""
        if not received_ns:
            return None
        for settling in reversed(self._settling):
            if settling.received_ns is not None and settling.received_ns <= received_ns:
                return settling
        return None

    def settle(self, now_s: float) -> None:
        """Runs opened, and findings of spans received, ``settle_s`` or more before ``now_s`` count
        now: by then every family has judged a run whose spans came within a bucket (the longest
        wait of a detector that is not drained at shutdown: ``rules.run_idle_s``,
        ``rules.delivery_deadline_s``). Runs and findings count together, so a version's rate is
        over runs judged, neither diluted by runs not judged yet nor raised by findings of runs not
        counted yet; and what was still settling when the sidecar stopped (its clock stands at the
        intake's close) is never counted nor persisted: those runs were not judged here, and their
        remaining spans go to the next sidecar, which counts them."""
        queue = self._settling
        if queue:
            # the wall clock stepped back past the newest bucket (an NTP step): every bucket is
            # moved back with it, keeping the wait each had left, or what opens from now on would
            # join the newest (dated ahead) and wait as long as the step before counting
            behind = queue[-1].end_s - self._bucket_s - now_s
            if behind > 0:
                for settling in queue:
                    settling.end_s -= behind
        cutoff = now_s - self.settle_s
        while queue and queue[0].end_s <= cutoff:
            self._count(queue.popleft())

    def _count(self, settling: _Settling) -> None:
        for (stats, entry_point), runs in settling.runs.items():
            _add_runs(stats, entry_point, runs)
        for (stats, entry_point, family), pending in settling.findings.items():
            rate = _rate_of(stats, entry_point, family, pending.count)
            if rate is not None:
                rate.merge(pending)

    def see_retired(self, service: str, version: str, span: SpanRecord, entry_point: str,
                    now_s: float) -> None:
        stats = self.stats(service, version, now_s)
        if stats is None:
            return
        key = (span.role or "?", span.implementation or "?")
        if key not in stats.retired and len(stats.retired) < MAX_PATHS:
            stats.retired[key] = (entry_point, span.trace_id)

    def see_ran(self, service: str, version: str, role: str, implementation: str,
                now_s: float) -> None:
        """A call span of ``implementation`` arrived: the version ran it (whatever its flags)."""
        stats = self.stats(service, version, now_s)
        if stats is not None and len(stats.ran) < MAX_PATHS:
            stats.ran.add((role, implementation))

    def see_path(self, path: CompletedPath, now_s: float) -> None:
        stats = self.stats(path.service, path.version, now_s)
        if stats is None:
            return
        stats.settled[path.entry_point] = stats.settled.get(path.entry_point, 0) + 1
        key = (path.entry_point, path.id)
        if key in stats.paths:
            return
        if len(stats.paths) < MAX_PATHS:
            stats.paths[key] = path.steps

    # --- judging (on tick) -----------------------------------------------------------------------
    def judge(self) -> list[dict]:
        """New regressions, revived retired implementations and new paths, each reported once."""
        found: list[dict] = []
        for previous, current in self._pairs():
            found += self._regressions(previous, current)
            found += self._revived(previous, current)
            found += self._new_paths(previous, current)
        return found

    def _pairs(self) -> list[tuple[VersionStats, VersionStats]]:
        """Each version with its comparison base, while that is tracked."""
        pairs = []
        for stats in list(self.versions.values()):
            base = self._base_of(stats)
            if base is not None:
                pairs.append((base, stats))
        return pairs

    def _comparable(self, previous: VersionStats, current: VersionStats) -> list[str]:
        n = self.thresholds.min_runs
        return [entry for entry, runs in current.runs.items()
                if runs >= n and previous.runs.get(entry, 0) >= n]

    def _once(self, key: tuple) -> bool:
        if key in self._raised:
            return False
        self._raised.add(key)
        return True

    def _regressions(self, previous: VersionStats, current: VersionStats) -> list[dict]:
        found = []
        for entry in self._comparable(previous, current):
            for family in COMPARED_FAMILIES:
                before, now = previous.rate(entry, family), current.rate(entry, family)
                if not self.thresholds.regressed(before, now):
                    continue
                if not self._once(("regression", current.key, entry, family)):
                    continue
                rate = current.findings[(entry, family)]
                role, impl = rate.top_culprit()
                found.append({
                    "kind": "regression", "service": current.service, "version": current.version,
                    "previous_version": previous.version, "entry_point": entry, "family": family,
                    "rate": round(now, 4), "previous_rate": round(before, 4),
                    "runs": current.runs[entry], "previous_runs": previous.runs[entry],
                    "findings": rate.count, "role": role, "implementation": impl,
                    "trace_id": rate.trace_id})
        return found

    def _revived(self, previous: VersionStats, current: VersionStats) -> list[dict]:
        if previous.total_runs < self.thresholds.min_runs:
            return []
        found = []
        for (role, impl), (entry, trace_id) in list(current.retired.items()):
            if (role, impl) in previous.retired or (role, impl) in previous.ran:
                continue
            if self._once(("revived", current.key, role, impl)):
                found.append({"kind": "retired_revived", "service": current.service,
                              "version": current.version,
                              "previous_version": previous.version, "entry_point": entry,
                              "role": role, "implementation": impl, "trace_id": trace_id})
        return found

    def _new_paths(self, previous: VersionStats, current: VersionStats) -> list[dict]:
        n = self.thresholds.min_runs
        found = []
        for (entry, pid), steps in list(current.paths.items()):
            # the previous version's paths count once as many of its runs settled: a run counts at
            # its first span but its path is known only when it is judged, and a path it took in a
            # run still settling is no new path of this version
            if (previous.settled.get(entry, 0) < n or current.runs.get(entry, 0) < n
                    or (entry, pid) in previous.paths):
                continue
            if not self._once(("new_path", current.key, entry, pid)):
                continue
            known = previous.steps_at(entry)
            new_steps = [(role, impl) for role, impl, _ in steps if (role, impl) not in known]
            role, impl = new_steps[0] if new_steps else (None, None)
            found.append({"kind": "new_path", "service": current.service, "version": current.version,
                          "previous_version": previous.version, "entry_point": entry,
                          "path_id": pid, "path": describe(steps), "role": role,
                          "implementation": impl, "trace_id": None})
        return found

    # --- views -----------------------------------------------------------------------------------
    def overflow(self) -> dict:
        """What ``max_versions`` cost: versions dropped for good, versions waiting untracked (a
        service's latest, turned away or dropped while idle), and the spans and findings ignored."""
        return {"max_versions": self._max_versions, "dropped": self.dropped, "refused": self.refused,
                "waiting": [{"service": service, "version": version}
                            for service, version in list(self._waiting.items())],
                "ignored": self.ignored}

    def snapshot(self) -> list[dict]:
        rows = []
        previous_of = {current.key: previous.version for previous, current in self._pairs()}
        for stats in list(self.versions.values()):
            entries = {}
            for entry, runs in sorted(list(stats.runs.items())):
                entries[entry] = {"runs": runs, "rates": {
                    family: round(stats.rate(entry, family), 4) for family in COMPARED_FAMILIES}}
            rows.append({
                "service": stats.service,
                "version": stats.version,
                "previous_version": previous_of.get(stats.key),
                "first_seen": stats.first_seen_s, "runs": stats.total_runs,
                "findings": {family: sum(r.count for (_, f), r in list(stats.findings.items())
                                         if f == family) for family in COMPARED_FAMILIES},
                "entry_points": entries,
                "retired_seen": sorted(f"{role} {impl}" for role, impl in list(stats.retired)),
                "paths": len(stats.paths),
            })
        return rows


def _add_runs(stats: VersionStats, entry_point: str, runs: int) -> None:
    if entry_point in stats.runs or len(stats.runs) < MAX_ENTRY_POINTS:
        stats.runs[entry_point] = stats.runs.get(entry_point, 0) + runs
    else:
        stats.overflow += runs


def _rate_of(stats: VersionStats, entry_point: str, family: str, count: int = 1) -> _Rate | None:
    """The version's findings of ``family`` at ``entry_point``; None (``count`` in its overflow)
    past ``MAX_ENTRY_POINTS`` entry points."""
    rate = stats.findings.get((entry_point, family))
    if rate is None:
        if len(stats.findings) >= MAX_ENTRY_POINTS * len(COMPARED_FAMILIES):
            stats.overflow += count
            return None
        rate = stats.findings[(entry_point, family)] = _Rate()
    return rate


def _counts_of(stats: VersionStats) -> VersionCounts:
    findings = []
    for (entry, family), rate in list(stats.findings.items()):
        role, implementation = rate.top_culprit()
        findings.append((entry, family, rate.count, role, implementation,
                         rate.culprits.get((role, implementation), 0), rate.trace_id))
    return VersionCounts(stats.service, stats.version, tuple(list(stats.runs.items())),
                         tuple(findings), tuple(sorted(list(stats.ran))),
                         tuple(sorted((role, impl, entry, trace_id) for (role, impl), (entry, trace_id)
                                      in list(stats.retired.items()))))


def _restore(stats: VersionStats, counts: VersionCounts) -> None:
    """``stats``, a version tracked again, goes on from the counts an earlier process had (of its
    culprits, the one blamed most)."""
    stats.runs.update(counts.runs)
    for entry, family, count, role, implementation, blamed, trace_id in counts.findings:
        rate = stats.findings[(entry, family)] = _Rate()
        rate.count, rate.trace_id = count, trace_id
        if blamed:
            rate.culprits[(role, implementation)] = blamed
    stats.ran.update(counts.ran)
    for role, implementation, entry, trace_id in counts.retired:
        if len(stats.retired) < MAX_PATHS:
            stats.retired.setdefault((role, implementation), (entry, trace_id))
