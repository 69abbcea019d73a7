"""Inhibition: an informational finding is not reported when a more severe one already covers it.

The same idea as Alertmanager's ``inhibit_rules`` (source severity above the target's, ``equal: [role,
entry_point]``): an info finding — "this entry point now reaches a second implementation of the role" —
about a (role, entry point) that a warning or critical finding names within ``window_s``, before or
after, adds nothing to that incident; the fact itself stays in the inventory and its metrics. So info
findings wait ``window_s`` before they are reported. The wait is bounded in count: when too many are
held, the oldest is reported at once rather than lost. What is inhibited is counted per rule.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

from sidecar.model import Finding, Severity
from sidecar.telemetry import Telemetry

_Key = tuple[str | None, str | None]


def _key(finding: Finding) -> _Key:
    return finding.role, finding.entry_point


class Inhibitor:
    def __init__(self, window_s: float, telemetry: Telemetry | None = None, *,
                 max_held: int = 10_000, max_sources: int = 10_000) -> None:
        self._window_ns = int(window_s * 1e9)
        self._telemetry = telemetry
        self._max_held = max_held
        self._max_sources = max_sources
        self._sources: OrderedDict[_Key, int] = OrderedDict()  # key -> last seen (ns), oldest first
        self._held: deque[tuple[int, Finding]] = deque()  # (due ns, finding), in due order

    def admit(self, findings: Sequence[Finding], now_ns: int) -> list[Finding]:
        """The findings to report now; info findings are held (or inhibited) instead."""
        self._expire_sources(now_ns)
        report: list[Finding] = []
        new_sources: set[_Key] = set()
        for finding in findings:
            key = _key(finding)
            if Severity(finding.severity) is not Severity.INFO:
                report.append(finding)
                new_sources.add(key)
                self._remember(key, now_ns)
            elif key in self._sources:
                self._inhibited(finding)
            else:
                if len(self._held) >= self._max_held:
                    report.append(self._held.popleft()[1])  # overflow: report early, never lose
                self._held.append((now_ns + self._window_ns, finding))
        if new_sources and self._held:
            self._drop_held(new_sources)
        return report

    def release(self, now_ns: int) -> list[Finding]:
        """Held findings whose window passed with no source naming them."""
        released: list[Finding] = []
        while self._held and self._held[0][0] <= now_ns:
            released.append(self._held.popleft()[1])
        return released

    def release_all(self) -> list[Finding]:
        """Every held finding, due or not (the pipeline is stopping: a finding is never dropped)."""
        released = [finding for _, finding in self._held]
        self._held.clear()
        return released

    @property
    def held(self) -> int:
        return len(self._held)

    def _remember(self, key: _Key, now_ns: int) -> None:
        self._sources[key] = now_ns
        self._sources.move_to_end(key)
        if len(self._sources) > self._max_sources:
            self._sources.popitem(last=False)

    def _expire_sources(self, now_ns: int) -> None:
        horizon = now_ns - self._window_ns
        while self._sources:
            key, seen = next(iter(self._sources.items()))
            if seen >= horizon:
                break
            del self._sources[key]

    def _drop_held(self, keys: set[_Key]) -> None:
        kept: deque[tuple[int, Finding]] = deque()
        for due, finding in self._held:
            if _key(finding) in keys:
                self._inhibited(finding)
            else:
                kept.append((due, finding))
        self._held = kept

    def _inhibited(self, finding: Finding) -> None:
        if self._telemetry is not None:
            self._telemetry.findings_inhibited.labels(rule=finding.rule).inc()
