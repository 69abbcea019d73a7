"""Callers: which functions still route to each implementation — the consolidation's to-do list.

The instrumentation stamps non-nested execute spans with ``pathwatch.caller`` (``module.qualname`` of
the nearest frame outside pathwatch and the role's own classes). Counted per (role, implementation):
at most ``max_callers`` distinct callers each, at most ``max_implementations`` (role, implementation)
pairs in all (roles come from the backend too); calls beyond either are counted in ``overflow``.
Pipeline thread writes; ``snapshot`` copies before reading.
"""

from __future__ import annotations

MAX_IMPLEMENTATIONS = 512
MAX_CALLERS = 32


class _Caller:
    __slots__ = ("calls", "last_seen_s", "entry_points")

    def __init__(self) -> None:
        self.calls = 0
        self.last_seen_s = 0.0
        self.entry_points: set[str] = set()


class CallerIndex:
    def __init__(self, max_callers: int = MAX_CALLERS,
                 max_implementations: int = MAX_IMPLEMENTATIONS) -> None:
        self._max_implementations = max_implementations
        self._max_callers = max_callers
        self.callers: dict[tuple[str, str], dict[str, _Caller]] = {}
        self.overflow = 0

    def observe_calls(self, role: str | None, implementation: str | None, name: str | None,
                      nested: bool, entry_point: str | None, count: int, now_s: float) -> None:
        """``count`` calls of ``implementation`` by the caller ``name`` (nested calls have none)."""
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
            if len(by_name) >= self._max_callers:
                self.overflow += count
                return
            caller = by_name[name] = _Caller()
        caller.calls += count
        caller.last_seen_s = now_s
        if entry_point and len(caller.entry_points) < 8:
            caller.entry_points.add(entry_point)

    def of(self, role: str, implementation: str) -> list[dict]:
        """The callers of one implementation, most calls first."""
        by_name = dict(self.callers.get((role, implementation), {}))
        return [{"caller": name, "calls": c.calls, "last_seen": c.last_seen_s,
                 "entry_points": sorted(c.entry_points)}
                for name, c in sorted(by_name.items(), key=lambda kv: (-kv[1].calls, kv[0]))]

    def to_migrate(self, canonical: set[tuple[str, str]],
                   retired: set[tuple[str, str]]) -> list[dict]:
        """Per implementation to move away from — retired, or not the canonical one of a role that
        has one — the callers that still route to it."""
        roles_with_canonical = {role for role, _ in canonical}
        rows = []
        for role, implementation in sorted(list(self.callers)):
            key = (role, implementation)
            if key in canonical or (key not in retired and role not in roles_with_canonical):
                continue
            rows.append({"role": role, "implementation": implementation,
                         "callers": self.of(role, implementation)})
        return rows
