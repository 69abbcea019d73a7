"""One scenario per rule: the backend bug that must raise exactly that rule, and, walked by the
right users (or with the fix's flag), the nearest correct behaviour that must raise nothing.

A scenario drives ``fixture_app`` through real HTTP requests and WebSocket connections and returns
the trace id the culprit span belongs to and how many agent runs it started (the sidecar judges
each run once it is idle; the tests wait for that judgement).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

from starlette.testclient import WebSocketTestSession

from sidecar import rules as R
from tests.e2e.fixture_app import Backend

MODULE = "tests.e2e.fixture_backend"
CANONICAL_ENGINE = f"{MODULE}.UserExecutionEngine"
DUPLICATE_ENGINE = f"{MODULE}.RequestScopedExecutionEngine"
RETIRED_ENGINE = f"{MODULE}.IsolatedExecutionEngine"
EMITTER = f"{MODULE}.AgentEventEmitter"
MANAGER = f"{MODULE}.ConnectionManager"
TRANSPORT = "starlette.websockets.WebSocket"
RUN_EVENTS = ("agent_started", "agent_completed")


@dataclass(frozen=True)
class Outcome:
    trace_id: str  # the trace of the span the finding must blame
    runs: int  # agent runs started (each judged by the sidecar once idle)


@dataclass
class CaseEnv:
    """One case's routes, walked as the positive (bug) or the negative (correct) variant."""

    backend: Backend
    case: str
    positive: bool

    @property
    def route(self) -> str:
        return f"/{'pos' if self.positive else 'neg'}/{self.case}"

    @property
    def ws_route(self) -> str:
        return f"{self.route}/ws"

    @property
    def entry_points(self) -> tuple[str, str]:
        return self.route, self.ws_route

    def post(self, user: str, **body: Any) -> str:
        response = self.backend.client.post(self.route, json=body, headers={"x-user-id": user})
        assert response.status_code == 200, response.text
        return response.json()["trace_id"]

    @contextmanager
    def socket(self, user: str, thread_id: str | None = None) -> Iterator[WebSocketTestSession]:
        query = f"user_id={user}" + (f"&thread_id={thread_id}" if thread_id else "")
        with self.backend.client.websocket_connect(f"{self.ws_route}?{query}") as websocket:
            yield websocket


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def expect(websocket: WebSocketTestSession, *event_types: str) -> None:
    """The socket receives exactly these events next, in order (the backend did write them)."""
    received = [websocket.receive_json()["type"] for _ in event_types]
    assert received == list(event_types)


def maybe(condition: bool, context: Any) -> Any:
    return context if condition else nullcontext()


# --- bleed ------------------------------------------------------------------------------------------
def owner_vs_ambient(env: CaseEnv) -> Outcome:
    """Bob's request prewarms the thread's engine; Alice's run on that thread takes it."""
    thread = new_id("thread")
    with env.socket("alice") as alice:
        env.post("bob" if env.positive else "alice", step="prewarm", thread_id=thread)
        trace_id = env.post("alice", run_id=new_id("run"), thread_id=thread)
        expect(alice, *RUN_EVENTS)
    return Outcome(trace_id, runs=1)


def subject_vs_ambient(env: CaseEnv) -> Outcome:
    """Bob joined Alice's thread last: Alice's run context is rebuilt with Bob's user."""
    thread = new_id("thread")
    with env.socket("alice", thread) as alice, maybe(env.positive, env.socket("bob", thread)):
        trace_id = env.post("alice", run_id=new_id("run"), thread_id=thread)
        expect(alice, *RUN_EVENTS)
    return Outcome(trace_id, runs=1)


def span_vs_root_user(env: CaseEnv) -> Outcome:
    """Bob's socket started the job worker, which sends Alice's completion inside Alice's trace."""
    with env.socket("bob" if env.positive else "alice") as first:
        with maybe(env.positive, env.socket("alice")) as second:
            trace_id = env.post("alice", run_id=new_id("run"))
            expect(second or first, *RUN_EVENTS)
    return Outcome(trace_id, runs=1)


def target_vs_socket_owner(env: CaseEnv) -> Outcome:
    """Events go to the thread, and Bob joined Alice's thread: Alice's events reach Bob's socket."""
    thread = new_id("thread")
    with env.socket("alice", thread) as alice, \
            maybe(env.positive, env.socket("bob", thread)) as bob:
        trace_id = env.post("alice", run_id=new_id("run"), thread_id=thread)
        expect(alice, *RUN_EVENTS)
        if bob is not None:
            expect(bob, *RUN_EVENTS)  # the bug in plain sight
    return Outcome(trace_id, runs=1)


def shared_instance(env: CaseEnv) -> Outcome:
    """One engine built for no one serves Alice, then Bob (the negative: Alice twice)."""
    second = "bob" if env.positive else "alice"
    with env.socket("alice") as alice, maybe(env.positive, env.socket("bob")) as bob:
        env.post("alice", run_id=new_id("run"))
        expect(alice, *RUN_EVENTS)
        trace_id = env.post(second, run_id=new_id("run"))
        expect(bob or alice, *RUN_EVENTS)
    return Outcome(trace_id, runs=2)


def leaked_context(env: CaseEnv) -> Outcome:
    """The follow-up task outlives its request (the negative awaits it before answering)."""
    with env.socket("alice") as alice:
        trace_id = env.post("alice", run_id=new_id("run"), await_follow_up=not env.positive)
        expect(alice, *RUN_EVENTS)
        if env.positive:
            # the request has ended by now; the task starts well past rules.leaked_context_tolerance_ms
            # (a start within it of the request's end is taken for clock skew, not a leak)
            time.sleep(0.05)
            alice.send_json({"type": "release"})
        expect(alice, "agent_thinking")
    return Outcome(trace_id, runs=1)


# --- duplicates -------------------------------------------------------------------------------------
def standard(**flags: Any) -> Callable[[CaseEnv], Outcome]:
    """A run through ``standard_run`` with the bug's flags (positive) or none (negative)."""
    def scenario(env: CaseEnv) -> Outcome:
        body = flags if env.positive else {}
        completions = body.get("completions", 1)
        with env.socket("alice") as alice:
            trace_id = env.post("alice", run_id=new_id("run"), **body)
            if not body.get("buffered"):
                expect(alice, "agent_started", *["agent_completed"] * completions)
        return Outcome(trace_id, runs=1)
    return scenario


def two_engines(env: CaseEnv) -> Outcome:
    """Two runs at one entry point, the second through another engine (the negative: canonical)."""
    second = "request_scoped" if env.positive else "canonical"
    with env.socket("alice") as alice:
        env.post("alice", run_id=new_id("run"), engine="canonical")
        expect(alice, *RUN_EVENTS)
        trace_id = env.post("alice", run_id=new_id("run"), engine=second)
        expect(alice, *RUN_EVENTS)
    return Outcome(trace_id, runs=2)


def buffered_events(env: CaseEnv) -> Outcome:
    """A batching emitter whose flush is forgotten (the negative flushes)."""
    with env.socket("alice") as alice:
        trace_id = env.post("alice", run_id=new_id("run"), buffered=True, flush=not env.positive)
        if not env.positive:
            expect(alice, *RUN_EVENTS)
    return Outcome(trace_id, runs=1)


def closed_socket(env: CaseEnv) -> Outcome:
    """The server closed Alice's idle socket but left it registered; the run writes to it."""
    with env.socket("alice") as alice:
        if env.positive:
            alice.send_json({"type": "bye"})
            assert alice.receive()["type"] == "websocket.close"
        trace_id = env.post("alice", run_id=new_id("run"))
        if not env.positive:
            expect(alice, *RUN_EVENTS)
    return Outcome(trace_id, runs=1)


def offline_user(env: CaseEnv) -> Outcome:
    """Alice's events with no socket of hers open (the negative: she is connected)."""
    with maybe(not env.positive, env.socket("alice")) as alice:
        trace_id = env.post("alice", run_id=new_id("run"))
        if alice is not None:
            expect(alice, *RUN_EVENTS)
    return Outcome(trace_id, runs=1)


@dataclass(frozen=True)
class RuleCase:
    case: str  # route name
    handler: str  # fixture_app.HANDLERS key
    scenario: Callable[[CaseEnv], Outcome]
    role: str
    implementation: str
    culprit_on_socket: bool = False  # the culprit span runs under the case's socket, not its POST


RULE_CASES: dict[str, RuleCase] = {
    R.BLEED_OWNER_VS_AMBIENT: RuleCase(
        "owner", "pooled_engine", owner_vs_ambient, "execution_engine", CANONICAL_ENGINE),
    R.BLEED_SUBJECT_VS_AMBIENT: RuleCase(
        "subject", "thread_context", subject_vs_ambient, "execution_engine", CANONICAL_ENGINE),
    # the first offending span of the trace to arrive: the worker's socket write (child first)
    R.BLEED_SPAN_VS_ROOT_USER: RuleCase(
        "root_user", "queued_completion", span_vs_root_user, "transport", TRANSPORT,
        culprit_on_socket=True),
    R.BLEED_TARGET_VS_SOCKET_OWNER: RuleCase(
        "target", "thread_broadcast", target_vs_socket_owner, "event_emitter", EMITTER),
    R.BLEED_SHARED_INSTANCE: RuleCase(
        "shared", "shared_engine", shared_instance, "execution_engine", CANONICAL_ENGINE),
    # the first late span to arrive: the follow-up's socket write (child first)
    R.BLEED_LEAKED_CONTEXT: RuleCase(
        "leak", "follow_up", leaked_context, "transport", TRANSPORT),
    R.DUPLICATE_EXECUTION: RuleCase(
        "dup_exec", "standard", standard(attempts=2), "execution_engine", CANONICAL_ENGINE),
    R.DUPLICATE_EMISSION: RuleCase(
        "dup_emit", "standard", standard(completions=2), "event_emitter", EMITTER),
    R.DUPLICATE_ENTRY_POINT_PATHS: RuleCase(
        "paths", "standard", two_engines, "execution_engine", DUPLICATE_ENGINE),
    R.DUPLICATE_RETIRED_INVOKED: RuleCase(
        "retired", "standard", standard(engine="isolated"), "execution_engine", RETIRED_ENGINE),
    R.DELIVERY_UNDELIVERED: RuleCase(
        "undelivered", "standard", buffered_events, "event_emitter", EMITTER),
    R.DELIVERY_WRITE_FAILED: RuleCase(
        "write_failed", "standard", closed_socket, "transport", TRANSPORT),
    R.DELIVERY_NO_CONNECTION: RuleCase(
        "no_connection", "standard", offline_user, "socket_manager", MANAGER),
    R.DELIVERY_MISSING_REQUIRED_EVENTS: RuleCase(
        "missing", "standard", standard(completions=0), "execution_engine", CANONICAL_ENGINE),
}

CLEAN_CASE = "clean"
clean_run = standard()

#: every route of the fixture app: case -> handler
APP_CASES: dict[str, str] = {c.case: c.handler for c in RULE_CASES.values()} | {CLEAN_CASE: "standard"}
