"""Execution paths: per run of a request, the implementations it went through, in order.

A *unit of work* is one run inside one trace: spans grouped by (trace id, run id); spans with no run
id group by trace alone. (A WebSocket trace spans the whole socket session and holds many runs; an
HTTP request usually holds one.) Its *path* is the distinct (role, implementation, nested) steps of
its execute / emit / dispatch spans, ordered by when each step was first entered (span start). Nested
calls are kept and marked: an alias delegating to the canonical engine is a different path from
calling the canonical engine directly, and both need to be seen during a consolidation. Repeats
collapse into one step (repeats are the duplicate detectors' business).

A unit is judged when its trace's request span arrives (spans end child first, so the request span
comes last) or after ``idle_s`` without a new span. A unit with a run id judged for being idle then
*settles* for ``settle_s`` (a WebSocket run's spans can come minutes apart: a slow model or tool
call): a late span of it reopens it — no new run — and its next judgement moves the run from the
path it was judged with to the one it took. The path table shows a run at once; the run is handed on
(``take_completed``: versions, ``pathwatch_path_runs``) only once final: settled, or its trace's
request span arrived. Bounded: units live in a ``BoundedTable``
(capacity and idle TTL; an evicted unit is judged with what it has), at most ``MAX_STEPS`` steps per
unit, entry points through ``BoundedLabels`` and at most ``max_paths`` distinct paths per entry point
(runs of further paths are counted per entry point in ``overflow_runs``, in its runs and shares'
denominator, and handed on with ``overflowed`` set: their metric label is ``other``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from instrumentation.attributes import SpanKinds
from sidecar.model import SpanRecord
from sidecar.state import EVICTED_TTL, BoundedLabels, BoundedTable

CALL_KINDS = frozenset({SpanKinds.EXECUTE, SpanKinds.EMIT, SpanKinds.DISPATCH})
MAX_STEPS = 32
MAX_ENTRY_POINTS = 512
MAX_SHARED_STEPS = 4096
NO_ENTRY_POINT = "(none)"
UNKNOWN_VERSION = "(unknown)"
UNKNOWN_SERVICE = "(unknown)"
SETTLE_S = 60.0

Step = tuple[str, str, bool]  # (role, implementation, nested)


def path_id(steps: tuple[Step, ...]) -> str:
    """A short stable id for a path (metric label; the API maps it back to its steps)."""
    text = "\x1f".join(f"{role}={impl}{'~' if nested else ''}" for role, impl, nested in steps)
    return "p-" + hashlib.sha1(text.encode()).hexdigest()[:8]


def describe(steps: Iterable[Step]) -> str:
    """``supervisor=SupervisorAgent > execution_engine=ExecutionEngine > ...`` (nested marked)."""
    return " > ".join(f"{role}={impl.rsplit('.', 1)[-1]}{' (nested)' if nested else ''}"
                      for role, impl, nested in steps)


@dataclass(slots=True, frozen=True)
class CompletedPath:
    """One judged unit of work: where it entered, which backend version ran it, the path it took."""

    entry_point: str
    version: str
    steps: tuple[Step, ...]
    id: str
    truncated: bool
    overflowed: bool = False  # a new path beyond max_paths at its entry point: not stored
    service: str = UNKNOWN_SERVICE


class _Unit:
    __slots__ = ("entry_point", "service", "version", "first_start", "truncated", "judged")

    def __init__(self, entry_point: str, service: str, version: str) -> None:
        self.entry_point = entry_point
        self.service = service
        self.version = version
        self.first_start: dict[Step, int] = {}
        self.truncated = False
        self.judged: tuple[str, tuple[Step, ...], bool] | None = None  # (path id, steps, overflowed)


class _PathStats:
    __slots__ = ("steps", "runs", "first_seen_s", "last_seen_s", "versions")

    def __init__(self, steps: tuple[Step, ...], now_s: float) -> None:
        self.steps = steps
        self.runs = 0
        self.first_seen_s = now_s
        self.last_seen_s = now_s
        # (service, version) -> runs: two services of a gateway may run the same version string
        self.versions: dict[tuple[str, str], int] = {}


class PathTracker:
    """Groups call spans into units, judges their paths, keeps the per-entry-point path table.

    Pipeline thread only, except ``snapshot`` (API thread), which copies before reading.
    """

    def __init__(self, *, max_units: int, idle_s: float, max_paths: int,
                 max_entry_points: int = MAX_ENTRY_POINTS, max_versions_per_path: int = 16,
                 settle_s: float = SETTLE_S) -> None:
        self._completed: list[CompletedPath] = []
        self._units: BoundedTable[tuple[str, str], _Unit] = BoundedTable(
            "consolidation_units", max_units, idle_s, on_evict=self._on_evict,
            resolution_s=min(idle_s / 4, 1.0))
        self._settling: BoundedTable[tuple[str, str], _Unit] = BoundedTable(
            "consolidation_settling_units", max_units, settle_s, on_evict=self._on_settled,
            resolution_s=min(settle_s / 4, 1.0))
        self._trace_runs: dict[str, list[str]] = {}  # trace id -> run keys of its open units
        self._entry_points = BoundedLabels("consolidation_entry_points", max_entry_points)
        self._max_paths = max_paths
        self._max_versions = max_versions_per_path
        self.paths: dict[str, dict[str, _PathStats]] = {}  # entry point -> path id -> stats
        self.overflow = 0  # runs whose path was new beyond max_paths for its entry point
        self.overflow_runs: dict[str, int] = {}  # the same per entry point
        self.units_started = 0
        # one tuple object per distinct step, shared by every unit that holds it (bounded: cleared
        # when full, which only costs new copies)
        self._steps: dict[Step, Step] = {}
        self._path_ids: dict[tuple[Step, ...], str] = {}  # steps -> path_id(steps), bounded alike
        self._last_trace: str | None = None  # the unit of the previous call span (see observe)
        self._last_run: str | None = None
        self._last_unit: _Unit | None = None
        self._now_s = 0.0  # of the current batch or tick (see batch_started, advance)

    @property
    def tables(self) -> list[BoundedTable]:
        return [self._units, self._settling]

    # --- the data path ---------------------------------------------------------------------------
    def batch_started(self, now_s: float) -> None:
        """Forget the unit of the previous span (tick and capacity may have removed it since);
        ``now_s`` dates the units judged during the batch (capacity evictions)."""
        self._now_s = now_s
        self._last_trace = self._last_run = self._last_unit = None

    def observe(self, span: SpanRecord) -> bool:
        """Add a call span to its unit; True when the span opened a new unit (a new run)."""
        run = span.run_id or ""
        trace_id = span.trace_id
        opened = False
        if (trace_id is self._last_trace or trace_id == self._last_trace) and run == self._last_run:
            unit = self._last_unit  # the previous span's unit, refreshed then: nothing since
        else:
            key = (trace_id, run)
            unit = self._units.touch(key)
            if unit is None:
                unit = self._settling.pop(key, None)  # a late span of a run judged idle: reopened
                if unit is None:
                    opened = True
                    unit = _Unit(self._entry_points(span.entry_point, NO_ENTRY_POINT),
                                 span.service_name or UNKNOWN_SERVICE,
                                 span.service_version or UNKNOWN_VERSION)
                    self._trace_runs.setdefault(trace_id, []).append(run)
                    self.units_started += 1
                self._units.put(key, unit)
            self._last_trace, self._last_run, self._last_unit = trace_id, run, unit
        step = (span.role or "?", span.implementation or "?", span.nested)
        seen = unit.first_start.get(step)
        if seen is None:
            if len(unit.first_start) >= MAX_STEPS:
                unit.truncated = True
            else:
                unit.first_start[self._shared_step(step)] = span.start_ns
        elif span.start_ns < seen:
            unit.first_start[step] = span.start_ns
        return opened

    def _shared_step(self, step: Step) -> Step:
        shared = self._steps.get(step)
        if shared is None:
            if len(self._steps) >= MAX_SHARED_STEPS:
                self._steps.clear()
            shared = self._steps[step] = step
        return shared

    def request_ended(self, trace_id: str, now_s: float) -> None:
        """The trace's request span arrived: every unit of that trace is complete."""
        self._last_trace = self._last_run = self._last_unit = None
        for run in self._trace_runs.pop(trace_id, ()):
            unit = self._units.pop((trace_id, run), None)
            if unit is not None:
                self._judge(unit, now_s)
            else:
                unit = self._settling.pop((trace_id, run), None)
            if unit is not None:
                self._finish(unit)

    def advance(self, now_ns: int) -> None:
        """Judge units idle for ``idle_s`` (through the table's TTL eviction)."""
        self._now_s = now_ns / 1e9
        self._units.advance(now_ns)
        self._settling.advance(now_ns)

    def take_completed(self) -> list[CompletedPath]:
        completed, self._completed = self._completed, []
        return completed

    def _on_evict(self, key: object, unit: object, reason: str) -> None:
        self._judge(unit, self._now_s)  # type: ignore[arg-type]
        if reason == EVICTED_TTL and key[1]:  # type: ignore[index]  # a run: late spans may come
            self._settling.put(key, unit)  # type: ignore[arg-type]
            return
        self._forget(key)  # type: ignore[arg-type]
        self._finish(unit)  # type: ignore[arg-type]

    def _on_settled(self, key: object, unit: object, reason: str) -> None:
        self._forget(key)  # type: ignore[arg-type]
        self._finish(unit)  # type: ignore[arg-type]

    def _forget(self, key: tuple[str, str]) -> None:
        trace_id, run = key
        runs = self._trace_runs.get(trace_id)
        if runs is not None:
            if run in runs:
                runs.remove(run)
            if not runs:
                del self._trace_runs[trace_id]

    def _finish(self, unit: _Unit) -> None:
        """The unit's run is final: handed on (versions, metrics)."""
        if unit.judged is not None:
            pid, steps, overflowed = unit.judged
            self._completed.append(CompletedPath(unit.entry_point, unit.version, steps, pid,
                                                 unit.truncated, overflowed, unit.service))

    def _judge(self, unit: _Unit, now_s: float) -> None:
        if not unit.first_start:
            return
        steps = tuple(sorted(unit.first_start, key=unit.first_start.__getitem__))
        pid = self._path_ids.get(steps)
        if pid is None:  # a hash per distinct path, not per run
            if len(self._path_ids) >= MAX_SHARED_STEPS:
                self._path_ids.clear()
            pid = self._path_ids[steps] = path_id(steps)
        entry = unit.entry_point
        by_id = self.paths.setdefault(entry, {})
        if unit.judged is not None:  # reopened by a late span
            if unit.judged[0] == pid:
                stats = by_id.get(pid)
                if stats is not None:
                    stats.last_seen_s = max(stats.last_seen_s, now_s)
                return
            self._unjudge(unit, by_id)
        stats = by_id.get(pid)
        overflowed = stats is None and len(by_id) >= self._max_paths
        unit.judged = (pid, steps, overflowed)
        if overflowed:
            self.overflow += 1
            self.overflow_runs[entry] = self.overflow_runs.get(entry, 0) + 1
            return
        if stats is None:
            stats = by_id[pid] = _PathStats(steps, now_s)
        stats.runs += 1
        stats.last_seen_s = max(stats.last_seen_s, now_s)
        key = (unit.service, unit.version)
        if key in stats.versions or len(stats.versions) < self._max_versions:
            stats.versions[key] = stats.versions.get(key, 0) + 1

    def _unjudge(self, unit: _Unit, by_id: dict[str, _PathStats]) -> None:
        """Take the unit's run off the path it was judged with (it went on after all)."""
        pid, _, overflowed = unit.judged  # type: ignore[misc]
        if overflowed:
            self.overflow -= 1
            self.overflow_runs[unit.entry_point] -= 1
            return
        stats = by_id.get(pid)
        if stats is None:
            return
        stats.runs -= 1
        key = (unit.service, unit.version)
        if key in stats.versions:
            stats.versions[key] -= 1
            if not stats.versions[key]:
                del stats.versions[key]
        if stats.runs <= 0:  # no run took that path: it was a part of one
            del by_id[pid]

    # --- views -----------------------------------------------------------------------------------
    def recent_path_counts(self, now_s: float, window_s: float) -> dict[str, int]:
        """Per entry point, the distinct paths taken within the last ``window_s``."""
        cutoff = now_s - window_s
        return {entry: sum(1 for s in list(paths.values()) if s.last_seen_s >= cutoff)
                for entry, paths in list(self.paths.items())}

    def snapshot(self, canonical: set[tuple[str, str]]) -> dict:
        """Per entry point its paths, most taken first, with shares; ``canonical`` marks steps."""
        entry_points = {}
        for entry, paths in sorted(list(self.paths.items())):
            rows = sorted(list(paths.items()), key=lambda item: (-item[1].runs, item[0]))
            overflow_runs = self.overflow_runs.get(entry, 0)
            runs = sum(stats.runs for _, stats in rows) + overflow_runs
            entry_points[entry] = {
                "runs": runs,
                "overflow_runs": overflow_runs,  # runs of paths beyond the limit (not listed)
                "paths": [_path_row(pid, stats, runs or 1, canonical) for pid, stats in rows],
            }
        return {"entry_points": entry_points, "overflow": {
            "paths": self.overflow, "entry_points": self._entry_points.overflowed},
            "limits": {"paths_per_entry_point": self._max_paths,
                       "entry_points": self._entry_points.limit, "steps": MAX_STEPS}}


def _path_row(pid: str, stats: _PathStats, total: int, canonical: set[tuple[str, str]]) -> dict:
    versions: dict[str, int] = {}
    services: dict[str, dict[str, int]] = {}
    for (service, version), runs in sorted(list(stats.versions.items())):
        versions[version] = versions.get(version, 0) + runs
        services.setdefault(service, {})[version] = runs
    return {
        "id": pid,
        "path": describe(stats.steps),
        "steps": [{"role": role, "implementation": impl, "nested": nested,
                   "canonical": (role, impl) in canonical} for role, impl, nested in stats.steps],
        "runs": stats.runs,
        "share": round(stats.runs / total, 4),
        "first_seen": stats.first_seen_s,
        "last_seen": stats.last_seen_s,
        "versions": versions,  # by version string, the services' runs added up
        "services": services,
    }
