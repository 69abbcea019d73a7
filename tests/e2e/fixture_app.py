"""The FastAPI app over ``fixture_backend``, instrumented by pathwatch and exporting to a sidecar.

Every case gets its own routes and state, ``POST /{variant}/{case}`` and ``WS /{variant}/{case}/ws``
(variant ``pos`` or ``neg``), so a case's findings carry its own entry point and one case's sockets
never receive another case's events. The handlers are the backend's code paths, bugs included; the
tests choose which users walk them. ``POST /barrier`` runs one engine call outside any agent run: the
tests use it as a marker that the sidecar processed everything sent before it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from starlette.testclient import TestClient

import instrumentation
from instrumentation.identity import Pseudonymizer
from tests.e2e.fixture_backend import (ENGINES, AgentEventEmitter, ConnectionManager, UserContext,
                                       UserExecutionEngine, agent_run)

PATHMAP = Path(__file__).with_name("fixture_pathmap.yaml")
HMAC_KEY = b"e2e-key-not-secret"
BARRIER_ROUTE = "/barrier"
SERVICE_NAME = "e2e-fixture-backend"


class JobBus:
    """Jobs handed to a background worker, with the submitter's trace context propagated (W3C).

    The worker task is started by the first socket that connects, so it inherits that socket's
    request context for its whole life: the bug ``bleed.span_vs_root_user`` is about.
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._started_by: object = None

    def ensure_worker(self, starter: object) -> None:
        if self._worker is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._work())  # copies the caller's context
            self._started_by = starter

    def stop(self, starter: object) -> None:
        if self._worker is not None and self._started_by is starter:
            self._worker.cancel()
            self._worker = self._queue = None

    async def run(self, job: Callable[[], Awaitable[None]]) -> None:
        if self._queue is None:
            raise RuntimeError("no worker: no socket connected")
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        done = asyncio.Event()
        await self._queue.put((carrier, job, done))
        await done.wait()

    async def _work(self) -> None:
        while True:
            carrier, job, done = await self._queue.get()
            token = otel_context.attach(propagate.extract(carrier))
            try:
                await job()
            finally:
                otel_context.detach(token)
                done.set()


@dataclass
class Site:
    """The backend state behind one case's routes."""

    manager: ConnectionManager = field(default_factory=ConnectionManager)
    thread_joiners: dict[str, str] = field(default_factory=dict)  # thread id -> last user to join
    pool: dict[str, Any] = field(default_factory=dict)  # prewarmed engines by thread id
    shared_engine: Any = None
    bus: JobBus = field(default_factory=JobBus)
    release: asyncio.Event | None = None
    tasks: set = field(default_factory=set)


Handler = Callable[[Site, str, dict], Awaitable[None]]


# --- the code paths ---------------------------------------------------------------------------------
async def standard_run(site: Site, user: str, body: dict) -> None:
    """A run through the engine the flags pick, events to the user (optionally batched)."""
    context = UserContext(user, body["run_id"], body.get("thread_id"))
    engine = ENGINES[body.get("engine", "canonical")](context)
    emitter = AgentEventEmitter(user, site.manager, buffered=body.get("buffered", False))
    await agent_run(engine, emitter, context, attempts=body.get("attempts", 1),
                    completions=body.get("completions", 1))
    if body.get("flush"):
        await emitter.flush()


async def pooled_engine_run(site: Site, user: str, body: dict) -> None:
    """Engines prewarmed per conversation thread; a run takes the thread's engine (whoever it was
    built for: the pool is keyed by thread, not by user)."""
    thread = body["thread_id"]
    if body.get("step") == "prewarm":
        site.pool[thread] = UserExecutionEngine(UserContext(user, thread_id=thread))
        return
    context = UserContext(user, body["run_id"], thread)
    engine = site.pool.pop(thread, None) or UserExecutionEngine(context)
    await agent_run(engine, AgentEventEmitter(user, site.manager), context)


async def thread_context_run(site: Site, user: str, body: dict) -> None:
    """The run's context is rebuilt from the thread's last joiner, not from the request's user."""
    thread = body["thread_id"]
    context = UserContext(site.thread_joiners.get(thread, user), body["run_id"], thread)
    engine = UserExecutionEngine(UserContext(user, thread_id=thread))
    await agent_run(engine, AgentEventEmitter(user, site.manager), context)


async def queued_completion_run(site: Site, user: str, body: dict) -> None:
    """The completion event is sent by the background worker, in this request's trace."""
    context = UserContext(user, body["run_id"])
    emitter = AgentEventEmitter(user, site.manager)
    UserExecutionEngine(context).execute_agent(context)
    await emitter.notify_agent_started(context.run_id)
    await site.bus.run(lambda: emitter.notify_agent_completed(context.run_id))


async def thread_broadcast_run(site: Site, user: str, body: dict) -> None:
    """Events go to the conversation thread: to everyone who joined it."""
    context = UserContext(user, body["run_id"], body["thread_id"])
    emitter = AgentEventEmitter(user, site.manager, thread_id=context.thread_id)
    await agent_run(UserExecutionEngine(context), emitter, context)


async def shared_engine_run(site: Site, user: str, body: dict) -> None:
    """One engine built at startup, for no one, serves every request."""
    if site.shared_engine is None:
        site.shared_engine = UserExecutionEngine(None)
    context = UserContext(user, body["run_id"])
    await agent_run(site.shared_engine, AgentEventEmitter(user, site.manager), context)


async def follow_up_run(site: Site, user: str, body: dict) -> None:
    """A follow-up update sent by a task spawned in the request, once released."""
    context = UserContext(user, body["run_id"])
    emitter = AgentEventEmitter(user, site.manager)
    await agent_run(UserExecutionEngine(context), emitter, context)
    release = site.release = asyncio.Event()

    async def follow_up() -> None:
        await release.wait()
        await emitter.notify_agent_thinking(context.run_id, "follow-up")

    task = asyncio.create_task(follow_up())  # carries this request's context, maybe past its end
    site.tasks.add(task)
    task.add_done_callback(site.tasks.discard)
    if body.get("await_follow_up"):
        release.set()
        await task


HANDLERS: dict[str, Handler] = {
    "standard": standard_run,
    "pooled_engine": pooled_engine_run,
    "thread_context": thread_context_run,
    "queued_completion": queued_completion_run,
    "thread_broadcast": thread_broadcast_run,
    "shared_engine": shared_engine_run,
    "follow_up": follow_up_run,
}


# --- the app ----------------------------------------------------------------------------------------
def current_trace_id() -> str:
    return format(trace.get_current_span().get_span_context().trace_id, "032x")


def build_app(cases: dict[str, str]) -> FastAPI:
    """``cases``: case name -> handler name. Build after ``instrument()`` (its FastAPI hook)."""
    app = FastAPI()
    for case, handler_name in cases.items():
        for variant in ("pos", "neg"):
            site = Site()
            app.add_api_route(f"/{variant}/{case}", _http_route(HANDLERS[handler_name], site),
                              methods=["POST"])
            app.add_api_websocket_route(f"/{variant}/{case}/ws", _socket_route(site))
    app.add_api_route(BARRIER_ROUTE, barrier, methods=["POST"])
    return app


def _http_route(handler: Handler, site: Site) -> Callable:
    async def route(request: Request) -> dict[str, str]:
        user = request.headers["x-user-id"]
        await handler(site, user, await request.json())
        return {"trace_id": current_trace_id()}
    return route


def _socket_route(site: Site) -> Callable:
    async def socket(websocket: WebSocket) -> None:
        user = websocket.query_params["user_id"]
        thread = websocket.query_params.get("thread_id")
        await websocket.accept()
        site.manager.register(user, thread, websocket)
        if thread:
            site.thread_joiners[thread] = user
        site.bus.ensure_worker(websocket)
        try:
            while True:
                message = await websocket.receive_json()
                if message["type"] == "release":
                    site.release.set()
                elif message["type"] == "bye":
                    await websocket.close()  # idle close; the socket stays registered (a bug)
                    return
        except WebSocketDisconnect:
            site.manager.unregister(user, thread, websocket)
        finally:
            site.bus.stop(websocket)
    return socket


async def barrier(request: Request) -> dict[str, str]:
    context = UserContext(request.headers["x-user-id"])  # no run: judged by no delivery rule
    UserExecutionEngine(context).execute_agent(context)
    return {"trace_id": current_trace_id()}


@dataclass
class Backend:
    client: TestClient
    provider: TracerProvider
    pseudonym: Callable[[str], str | None]

    def flush(self) -> None:
        """Export every finished span now (the sidecar has accepted them when this returns)."""
        assert self.provider.force_flush(10_000), "the span exporter did not flush"


@contextmanager
def instrumented_backend(otlp_endpoint: str, cases: dict[str, str]) -> Iterator[Backend]:
    """pathwatch instrumenting the fixture app, exporting with its OTLP/gRPC batch processor."""
    provider = TracerProvider(resource=Resource.create(
        {"service.name": SERVICE_NAME, "service.version": "e2e"}))
    pseudonymizer = Pseudonymizer(HMAC_KEY)
    instrumentation.instrument(PATHMAP, tracer_provider=provider, endpoint=otlp_endpoint,
                               heartbeat_interval_s=0, pseudonymizer=pseudonymizer,
                               check_imports=True)
    try:
        app = build_app(cases)
        with TestClient(app) as client:
            yield Backend(client, provider, pseudonymizer)
    finally:
        instrumentation.uninstrument()
        provider.shutdown()
