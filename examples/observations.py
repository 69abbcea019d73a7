"""What the simulated clients saw: the ground truth a scenario is judged by.

Every run is started by one client, on a thread id only that client uses, so each event a client
receives either belongs to one of its own runs or is a leak of another user's run.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

REQUIRED_EVENTS = ("agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed")
TERMINAL_EVENTS = ("agent_completed", "agent_error")
AGENT_EVENTS = frozenset(REQUIRED_EVENTS) | frozenset(TERMINAL_EVENTS)
CANONICAL_ENGINE = "UserExecutionEngine"
RETIRED_ENGINE = "IsolatedExecutionEngine"


@dataclass(slots=True)
class RunRecord:
    """One run as its own client saw it."""

    user: str
    thread_id: str
    via: str  # "http" | "websocket"
    order: int  # when the client asked for it, across all clients of the scenario
    run_id: str | None = None
    status: str | None = None  # from the HTTP response / run_finished; None if it never came
    engine: str | None = None  # engine the backend reported for the run
    rollout_percent: float | None = None  # S11 only
    trace_id: str | None = None  # the trace its spans are in, as the backend answered (None: not traced)
    received: Counter[str] = field(default_factory=Counter)  # event type -> times received
    event_engines: set[str] = field(default_factory=set)  # engines named in the events' payloads

    def missing(self) -> list[str]:
        absent = [kind for kind in REQUIRED_EVENTS[:-1] if not self.received[kind]]
        if not any(self.received[kind] for kind in TERMINAL_EVENTS):
            absent.append(REQUIRED_EVENTS[-1])
        return absent

    def duplicates(self) -> dict[str, int]:
        """Event type -> copies received beyond the first."""
        return {kind: count - 1 for kind, count in self.received.items() if count > 1}

    @property
    def executions(self) -> int:
        """How many different engines' events reached the client for this run."""
        return len(self.event_engines)


@dataclass(frozen=True, slots=True)
class Leak:
    """An event of ``owner``'s run that arrived on ``recipient``'s socket."""

    recipient: str
    owner: str | None  # None: a thread no client of this drive started
    run_id: str | None
    thread_id: str | None
    event_type: str


@dataclass(slots=True)
class Observation:
    scenario: str
    runs: list[RunRecord]
    leaks: list[Leak]
    errors: list[str] = field(default_factory=list)  # protocol errors the backend answered with

    @property
    def runs_started(self) -> int:
        return len(self.runs)

    @property
    def events_expected(self) -> int:
        return len(REQUIRED_EVENTS) * len(self.runs)

    @property
    def events_received(self) -> int:
        """Events received by the run's own client (copies included)."""
        return sum(sum(run.received.values()) for run in self.runs)

    @property
    def missing_events(self) -> int:
        return sum(len(run.missing()) for run in self.runs)

    @property
    def duplicate_events(self) -> int:
        return sum(sum(run.duplicates().values()) for run in self.runs)

    @property
    def runs_with_missing(self) -> int:
        return sum(1 for run in self.runs if run.missing())

    @property
    def runs_with_duplicates(self) -> int:
        return sum(1 for run in self.runs if run.duplicates())

    @property
    def runs_with_two_executions(self) -> int:
        return sum(1 for run in self.runs if run.executions > 1)

    def leak_pairs(self) -> Counter[tuple[str | None, str]]:
        """(owner of the run, recipient of its event) -> events."""
        return Counter((leak.owner, leak.recipient) for leak in self.leaks)

    def engine_timeline(self) -> list[str | None]:
        return [run.engine for run in sorted(self.runs, key=lambda run: run.order)]

    def canonical_share(self, part: int, parts: int = 3) -> float | None:
        """Share of runs on the canonical engine in one slice (0-based) of the runs in request order."""
        timeline = self.engine_timeline()
        size = len(timeline)
        chunk = timeline[size * part // parts: size * (part + 1) // parts]
        return sum(engine == CANONICAL_ENGINE for engine in chunk) / len(chunk) if chunk else None

    @property
    def is_clean(self) -> bool:
        return not (self.leaks or self.missing_events or self.duplicate_events
                    or self.runs_with_two_executions or self.errors
                    or any(run.status != "completed" for run in self.runs))

    def summary(self) -> dict[str, Any]:
        engines = Counter(engine or "?" for engine in self.engine_timeline())
        return {
            "scenario": self.scenario,
            "runs_started": self.runs_started,
            "events_expected": self.events_expected,
            "events_received": self.events_received,
            "missing_events": self.missing_events,
            "runs_with_missing": self.runs_with_missing,
            "duplicate_events": self.duplicate_events,
            "runs_with_duplicates": self.runs_with_duplicates,
            "leaked_events": len(self.leaks),
            "leak_pairs": len(self.leak_pairs()),
            "top_leak_pairs": [[owner, recipient, count]  # victim (run owner), recipient, events
                               for (owner, recipient), count in self.leak_pairs().most_common(5)],
            "runs_with_two_executions": self.runs_with_two_executions,
            "engines": dict(engines),
            "canonical_share_by_third": [self.canonical_share(i) for i in range(3)],
            "errors": len(self.errors),
            "clean": self.is_clean,
        }
