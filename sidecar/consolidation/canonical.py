"""Which implementation of each role is canonical now: the one rule the inventory and the verdicts share.

A span says whether the path map of the service that made it (``service.name``) names its class the
role's canonical one. That is a service's word, and only while it keeps saying it:

- per (service, role), the classes it called as canonical, each with its last such call and its
  last call *without* the flag (a path map that no longer names it);
- a class is canonical while some service called it as such within the window — a class that no
  live path map names canonical (its service renamed or gone, or every service's path map moved
  on) is canonical no longer than the window, however often other services still call it
  unflagged (they are callers to migrate: its verdict is ``in_use`` then, never
  ``safe_to_delete`` while it is called);
- and, for that service, once it is not superseded: called as canonical within ``CONCURRENT_S``
  of the last call the service made as canonical of any class of the role (the newest path map's
  class), and of its own last call without the flag. While both hold for two classes (a rolling
  deploy that moves the canonical class: the old version's pods call the old class as canonical,
  the new version's the new one), both are canonical; once the old one has not been called as
  canonical for a minute before the new one's last such call, it is demoted — unless still
  another service's canonical (a gateway's services each keep theirs, whichever called last).

``CanonicalBook`` holds that, bounded: at most ``MAX_CANONICAL_KEYS`` (service, role) pairs (the
least recently called as canonical forgotten first: its class is canonical again at that service's
next such call) and ``MAX_EARLIER_CANONICAL`` classes each besides the latest; the pairs whose rows
the table is owed (changed or forgotten since the last write) at most twice ``MAX_CANONICAL_KEYS``,
else the table is rewritten whole (writes failing while services came and went). The consolidation
ledger (``sidecar.consolidation.verdicts``) owns the sidecar's one book, persists it and answers the
verdicts from it; the inventory (``sidecar.inventory``) asks the ledger, so ``/api/v1/inventory``'s
``canonical`` and the verdicts cannot disagree, before or after a restart. An inventory without a
ledger (tests, a stand-alone use) keeps a book of its own, fed from its spans.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

MAX_CANONICAL_KEYS = 1024  # (service, role) pairs whose canonical classes are remembered
#: classes a (service, role) called as canonical before its latest, remembered
MAX_EARLIER_CANONICAL = 8
#: a class called as canonical this close to the service's latest canonical call (of another class,
#: or of this one without the flag) still serves as canonical beside it: a rolling deploy
CONCURRENT_S = 60.0

Pair = tuple  # (service: str | None, role: str)
Key = tuple[str, str]  # (role, implementation)
#: one persisted entry: service, role, implementation, last call as canonical, last call without
Entry = tuple[str | None, str, str, float, float]


class _Named:
    """One class a (service, role) called as canonical: its last such call, its last call without
    the flag (0.0: none since)."""

    __slots__ = ("canonical_s", "plain_s")

    def __init__(self, canonical_s: float, plain_s: float = 0.0) -> None:
        self.canonical_s = canonical_s
        self.plain_s = plain_s


class CanonicalBook:
    def __init__(self, max_pairs: int | None = None, max_earlier: int | None = None) -> None:
        # read at construction (not as defaults) so that a test may lower the module's bounds
        self._max_pairs = MAX_CANONICAL_KEYS if max_pairs is None else max_pairs
        self._max_per_pair = 1 + (MAX_EARLIER_CANONICAL if max_earlier is None else max_earlier)
        # (service, role) -> implementation -> its calls; least recently called as canonical first
        self._pairs: OrderedDict[Pair, dict[str, _Named]] = OrderedDict()
        self._changed: set[Pair] = set()  # pairs changed since ``take_changed``
        # too many pairs changed (forgotten ones too, while writes failed): the table is to be
        # rewritten whole, and no pair is remembered until then
        self._whole = False

    def called(self, service: str | None, role: str, implementation: str, canonical: bool,
               at_s: float) -> None:
        """``service`` called ``implementation`` at ``at_s``; ``canonical``: flagged canonical (its
        path map names it)."""
        pair = (service, role)
        named = self._pairs.get(pair)
        if not canonical:
            entry = None if named is None else named.get(implementation)
            if entry is not None and at_s > entry.plain_s:
                if at_s - entry.canonical_s > CONCURRENT_S:  # demoted: nothing more to weigh
                    self._drop(pair, implementation)
                else:
                    entry.plain_s = at_s
                    self._mark(pair)
            return
        if named is None:
            named = self._pairs[pair] = {}
            if len(self._pairs) > self._max_pairs:
                self._mark(self._pairs.popitem(last=False)[0])
        entry = named.get(implementation)
        if entry is None:
            named[implementation] = _Named(at_s)
            if len(named) > self._max_per_pair:
                del named[min(named, key=lambda impl: named[impl].canonical_s)]
        elif at_s > entry.canonical_s:
            entry.canonical_s = at_s
        else:
            return
        self._pairs.move_to_end(pair)
        self._mark(pair)
        if service is not None and (None, role) in self._pairs:
            # a ledger of an older release's canonical of the role, until a service names one
            del self._pairs[(None, role)]
            self._mark((None, role))

    def _drop(self, pair: Pair, implementation: str) -> None:
        """The service's path map no longer names ``implementation`` canonical: gone, with the
        classes it had superseded (they must not count as that service's latest again)."""
        named = self._pairs[pair]
        superseded_before_s = named.pop(implementation).canonical_s - CONCURRENT_S
        for impl in [i for i, entry in named.items() if entry.canonical_s < superseded_before_s]:
            del named[impl]
        if not named:
            del self._pairs[pair]
        self._mark(pair)

    @staticmethod
    def _latest_s(named: dict[str, _Named]) -> float:
        return max(entry.canonical_s for entry in named.values())

    # --- the answer (any thread: copies first) ---------------------------------------------------
    def by_service(self, window_s: float, now_s: float) -> dict[Pair, frozenset[Key]]:
        """(service, role) -> the classes canonical for that service now (see the module)."""
        since_s = now_s - window_s
        answer = {}
        for pair, named in list(self._pairs.items()):
            entries = list(named.items())
            if not entries:
                continue
            latest_s = max(entry.canonical_s for _, entry in entries)
            live = frozenset((pair[1], impl) for impl, entry in entries
                             if entry.canonical_s > since_s
                             and entry.canonical_s >= latest_s - CONCURRENT_S
                             and entry.canonical_s >= entry.plain_s - CONCURRENT_S)
            if live:
                answer[pair] = live
        return answer

    def canonical(self, window_s: float, now_s: float) -> set[Key]:
        """The (role, implementation) pairs canonical now, for any service."""
        return {key for keys in self.by_service(window_s, now_s).values() for key in keys}

    def named(self) -> set[Key]:
        """The classes some service calls canonical, its latest, windows aside (the ledger rows'
        ``canonical`` column, for a release that reads only that)."""
        return {(pair[1], max(named, key=lambda impl: named[impl].canonical_s))
                for pair, named in list(self._pairs.items()) if named}

    def latest(self) -> list[tuple[str | None, str, str]]:
        """(service, role, implementation) of each pair's latest canonical class, least recently
        called as canonical first (``canonical_by_service`` of the release before)."""
        return [(pair[0], pair[1], max(named, key=lambda impl: named[impl].canonical_s))
                for pair, named in list(self._pairs.items()) if named]

    # --- persistence ------------------------------------------------------------------------------
    def _mark(self, pair: Pair) -> None:
        """``pair``'s rows are to be written again (deleted, if it is gone). Bounded: pairs
        forgotten while writes fail would pile up (services that come and go); past twice the
        bound of pairs, the table is rewritten whole instead."""
        if self._whole:
            return
        self._changed.add(pair)
        if len(self._changed) > 2 * self._max_pairs:
            self._whole = True
            self._changed.clear()

    def take_changed(self) -> tuple[bool, dict[Pair, list[Entry]]]:
        """(whole, pairs): the pairs changed since the last call, each with all its entries now
        (empty: gone); whole: every row of the table is to be replaced by these, every pair's."""
        if self._whole:
            self._whole = False
            return True, {pair: self.entries_of(pair) for pair in list(self._pairs)}
        changed, self._changed = self._changed, set()
        return False, {pair: self.entries_of(pair) for pair in changed}

    def mark_changed(self, pairs: Iterable[Pair], whole: bool = False) -> None:
        """A write of ``take_changed``'s pairs (``whole``: and of the whole table) failed: they
        are written with the next one."""
        if whole:
            self._whole = True
            self._changed.clear()
        for pair in pairs:
            self._mark(pair)

    def entries_of(self, pair: Pair) -> list[Entry]:
        named = self._pairs.get(pair, {})
        return [(pair[0], pair[1], impl, entry.canonical_s, entry.plain_s)
                for impl, entry in named.items()]

    def entries(self) -> list[Entry]:
        return [entry for pair in list(self._pairs) for entry in self.entries_of(pair)]

    def restore(self, entries: Iterable[Entry]) -> None:
        """Entries as persisted (any order): the least recently called as canonical pair first, as
        they were held. Marks nothing changed."""
        by_pair: dict[Pair, dict[str, _Named]] = {}
        for service, role, implementation, canonical_s, plain_s in entries:
            by_pair.setdefault((service, role), {})[implementation] = _Named(canonical_s, plain_s)
        for pair, named in sorted(by_pair.items(), key=lambda item: self._latest_s(item[1])):
            self._pairs.pop(pair, None)
            self._pairs[pair] = named
            while len(named) > self._max_per_pair:
                del named[min(named, key=lambda impl: named[impl].canonical_s)]
        while len(self._pairs) > self._max_pairs:
            self._mark(self._pairs.popitem(last=False)[0])

    def clear(self) -> None:
        self._pairs.clear()
        self._changed.clear()
        self._whole = False
