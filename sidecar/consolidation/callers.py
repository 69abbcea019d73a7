"""Callers: which functions still route to each implementation — the consolidation's to-do list.

The instrumentation stamps non-nested execute spans with ``pathwatch.caller`` (``module.qualname`` of
the nearest frame outside pathwatch and the role's own classes). Counted per (role, implementation):
at most ``max_callers`` distinct callers each — a new caller of a full list takes the place of the
least recently seen one (counted in ``dropped``: that one comes back with its next call), so the
caller still left to migrate is listed however many were migrated before it —, and at most
``max_implementations`` (role, implementation) pairs in all (roles come from the backend too); calls
of pairs beyond it are counted in ``overflow``. A caller not seen for ``window_s`` (the
safe-to-delete window: it no longer calls) is aged out, and a pair left without callers goes; so
is an entry point through which a caller has not reached the implementation for the window (the
route was migrated, the caller still reaches it from another: left out of ``of``, kept until a
newer one takes its place), and each caller keeps its ``MAX_ENTRY_POINTS`` most recently seen.
Pipeline thread writes; ``snapshot`` copies before reading.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

MAX_IMPLEMENTATIONS = 512
MAX_CALLERS = 32
MAX_ENTRY_POINTS = 8  # per caller: the most recently seen
MAX_SERVICES = 8  # per caller: the services (service.name) it was seen in, the most recent
WINDOW_S = 14 * 86400.0


class _Caller:
    __slots__ = ("calls", "last_seen_s", "entry_points", "services", "retired_in")

    def __init__(self) -> None:
        self.calls = 0
        self.last_seen_s = 0.0
        self.entry_points: dict[str, float] = {}  # entry point -> its last call through it
        self.services: dict[str, float] = {}  # service -> its last call from it
        # the services (of ``services``) whose path map retired the class at this caller's latest
        # call from it
        self.retired_in: set[str] = set()


class CallerIndex:
    def __init__(self, max_callers: int = MAX_CALLERS,
                 max_implementations: int = MAX_IMPLEMENTATIONS, window_s: float = WINDOW_S) -> None:
        self._max_implementations = max_implementations
        self._max_callers = max_callers
        self.window_s = window_s
        self.callers: dict[tuple[str, str], dict[str, _Caller]] = {}
        # (role, implementation) -> callers taken off its full list to make room for a newer one
        self.dropped: dict[tuple[str, str], int] = {}
        self.overflow = 0  # calls of (role, implementation) pairs beyond max_implementations

    def observe_calls(self, role: str | None, implementation: str | None, name: str | None,
                      nested: bool, entry_point: str | None, count: int, now_s: float,
                      service: str | None = None, retired: bool = False) -> None:
        """``count`` calls of ``implementation`` by the caller ``name`` (nested calls have none),
        in ``service``; ``retired``: that service's path map retires it."""
        if name is None or nested:
            return
        key = (role or "?", implementation or "?")
        by_name = self.callers.get(key)
        if by_name is None:
            if len(self.callers) >= self._max_implementations:
                self.overflow += count
                return
            by_name = self.callers[key] = {}
        caller = by_name.get(name)
        if caller is None:
            if len(by_name) >= self._max_callers:  # the least recently seen makes room
                del by_name[min(by_name, key=lambda n: by_name[n].last_seen_s)]
                self.dropped[key] = self.dropped.get(key, 0) + 1
            caller = by_name[name] = _Caller()
        caller.calls += count
        if now_s > caller.last_seen_s:
            caller.last_seen_s = now_s
        if entry_point:
            entry_points = caller.entry_points
            if entry_point not in entry_points and len(entry_points) >= MAX_ENTRY_POINTS:
                del entry_points[min(entry_points, key=entry_points.__getitem__)]
            if now_s > entry_points.get(entry_point, float("-inf")):
                entry_points[entry_point] = now_s
        if service is not None:
            services = caller.services
            if service not in services and len(services) >= MAX_SERVICES:
                gone = min(services, key=services.__getitem__)
                del services[gone]
                caller.retired_in.discard(gone)
            if now_s >= services.get(service, float("-inf")):
                services[service] = now_s
                if retired:
                    caller.retired_in.add(service)
                else:
                    caller.retired_in.discard(service)

    def expire(self, now_s: float) -> None:
        """Age out the callers not seen for ``window_s``, and the pairs left with none (pipeline
        thread, now and then)."""
        cutoff = now_s - self.window_s
        for key, by_name in list(self.callers.items()):
            for name in [n for n, c in by_name.items() if c.last_seen_s <= cutoff]:
                del by_name[name]
            if not by_name:
                del self.callers[key]
                self.dropped.pop(key, None)

    def of(self, role: str, implementation: str, now_s: float | None = None,
           keep: Callable[[_Caller, float], bool] | None = None) -> list[dict]:
        """The callers of one implementation seen within the window, most calls first (those
        ``keep`` keeps, given the caller and the cutoff). Within: less than the window ago, as a
        verdict's ``in_use`` — a call exactly a window ago is out of it (``safe_to_delete``
        from that moment)."""
        by_name = dict(self.callers.get((role, implementation), {}))
        cutoff = float("-inf") if now_s is None else now_s - self.window_s
        return [{"caller": name, "calls": c.calls, "last_seen": c.last_seen_s,
                 "entry_points": sorted(e for e, seen_s in list(c.entry_points.items())
                                        if seen_s > cutoff)}
                for name, c in sorted(by_name.items(), key=lambda kv: (-kv[1].calls, kv[0]))
                if c.last_seen_s > cutoff and (keep is None or keep(c, cutoff))]

    def to_migrate(self, canonical: set[tuple[str, str]], retired: set[tuple[str, str]],
                   now_s: float | None = None,
                   canonical_of: Mapping[tuple[str | None, str],
                                         Collection[tuple[str, str]]] | None = None,
                   ) -> list[dict]:
        """Per implementation to move away from — retired, or not the canonical one of a role that
        has one — the callers that still route to it, and how many were dropped from its list.
        ``canonical_of``: (service, role) -> the canonical implementations that service's path map
        names now (a gateway's services each have theirs; two while a rolling deploy moves it,
        ``ActivityLedger.canonical_by_service``): a class one service names canonical is to
        move away from for the callers seen, within the window, in a service that names another or
        whose path map retires it (at that caller's latest call from it: its own path map's word;
        ``canonical`` alone kept it off the list for every service, and ``retired`` — the latest
        call's flag, whichever service made it — put every caller on it, those of the service
        that names it canonical too)."""
        roles_with_canonical = {role for role, _ in canonical}
        canonical_of = dict(canonical_of or {})
        rows = []
        for role, implementation in sorted(list(self.callers)):
            key = (role, implementation)
            keep = None
            if key in canonical:
                elsewhere = {service for (service, of_role), named in canonical_of.items()
                             if of_role == role and key not in named}
                keep = _to_move_in(elsewhere)
            elif key not in retired and role not in roles_with_canonical:
                continue
            callers = self.of(role, implementation, now_s, keep)
            if callers:
                rows.append({"role": role, "implementation": implementation, "callers": callers,
                             "callers_dropped": self.dropped.get(key, 0)})
        return rows

    def limits(self) -> dict:
        """What the bounds cost (``/api/v1/consolidation``'s ``callers_overflow``)."""
        return {"max_callers": self._max_callers, "max_implementations": self._max_implementations,
                "window_s": self.window_s, "untracked_calls": self.overflow}


def _to_move_in(services: set[str | None]) -> Callable[[_Caller, float], bool]:
    """A caller seen, within the window (``cutoff``), in one of ``services`` or in a service whose
    path map retired the class at its latest call from there."""
    def keep(caller: _Caller, cutoff: float) -> bool:
        retired_in = caller.retired_in
        return any(seen_s > cutoff and (service in services or service in retired_in)
                   for service, seen_s in list(caller.services.items()))
    return keep
