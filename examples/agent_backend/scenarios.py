"""The scenario switches S0-S11 (the table in ``examples/README.md``) and which one the current run uses.

A request picks its scenario (header ``x-scenario``, a body or socket-message field ``scenario``, else
the ``DEMO_SCENARIO`` default). The active scenario rides in a context variable, so the few places
where a seeded bug lives can ask ``is_active(Scenario.S6)`` without threading a flag through every call.
"""

from __future__ import annotations

import enum
from contextvars import ContextVar, Token

from examples.agent_backend.settings import settings


class Scenario(str, enum.Enum):
    S0 = "S0"  # clean: canonical engine and emitter, every event written once to the right socket
    S1 = "S1"  # process-wide agent factory reconfigured per request: tool events reach another user
    S2 = "S2"  # progress event resolved run -> thread and sent to "user = thread id"
    S3 = "S3"  # emitter built with positional arguments swapped: its user is the thread id
    S4 = "S4"  # the same run executed by the HTTP supervisor and by the WebSocket supervisor
    S5 = "S5"  # agent_started sent three times (engine, execution core, tracker)
    S6 = "S6"  # the socket send reports no success value: the bridge re-sends each event 3x
    S7 = "S7"  # events emitted into a freshly built manager that holds no connections
    S8 = "S8"  # a notify call fails inside the emitter, the error is swallowed, the agent "succeeds"
    S9 = "S9"  # events queued in one manager instance; the socket registered on another; never flushed
    S10 = "S10"  # two runs share a run id; the run -> thread map keeps the last writer
    S11 = "S11"  # traffic moves from a retired engine to the canonical one over time


ALL_SCENARIOS: tuple[Scenario, ...] = tuple(Scenario)


class ScenarioError(ValueError):
    """A request named a scenario that does not exist."""


def parse_scenario(value: str | None) -> Scenario:
    """``"S3"`` / ``"s3"`` -> ``Scenario.S3``; ``None`` or ``""`` -> the configured default."""
    text = (value or settings.default_scenario).strip().upper()
    try:
        return Scenario(text)
    except ValueError:
        known = ", ".join(s.value for s in Scenario)
        raise ScenarioError(f"unknown scenario {value!r}; expected one of {known}") from None


def _check_default() -> None:
    if settings.default_scenario not in Scenario.__members__:
        known = ", ".join(Scenario.__members__)
        raise ScenarioError(f"environment variable DEMO_SCENARIO={settings.default_scenario!r} is not "
                            f"one of {known}")


_check_default()  # fail at start, not on the first request

_active: ContextVar[Scenario] = ContextVar("demo_scenario", default=Scenario.S0)


def activate(scenario: Scenario) -> Token[Scenario]:
    return _active.set(scenario)


def deactivate(token: Token[Scenario]) -> None:
    _active.reset(token)


def active() -> Scenario:
    return _active.get()


def is_active(scenario: Scenario) -> bool:
    return _active.get() is scenario
