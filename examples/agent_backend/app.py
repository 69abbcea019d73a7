"""The demo backend's routes: ``uvicorn examples.agent_backend.app:app``.

HTTP:      ``POST /api/runs`` (header ``x-user-id``; optional ``x-scenario``, ``x-request-id``; JSON
           body ``{thread_id, agent, tools, scenario, request_id}``, all optional) runs an agent and
           answers when it is done; its events go to the user's sockets.
WebSocket: ``/ws?user_id=U`` (or a first message ``{"type": "auth", "user_id": U}``) receives the
           user's events; ``{"type": "start_run", ...same fields as the body}`` runs an agent over the
           socket, answered by ``{"type": "run_finished", ...}``; ``{"type": "ping"}`` -> ``pong``.
Debug:     ``GET /healthz``, ``GET /debug/engines`` (runs per scenario and engine, S11 rollout),
           ``POST /debug/reset``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import FastAPI, Header, HTTPException, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, ConfigDict, Field

from examples.agent_backend.registry import run_registry
from examples.agent_backend.runs import RunRequest, execute_run
from examples.agent_backend.scenarios import ScenarioError, parse_scenario
from examples.agent_backend.settings import settings
from examples.agent_backend.sockets import legacy_websocket_manager, websocket_manager
from examples.agent_backend.wiring import engine_rollout, engine_usage

logger = logging.getLogger(__name__)

app = FastAPI(title="pathwatch demo agent backend")

MAX_ID_LENGTH = 200


class RunBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    thread_id: str | None = Field(None, min_length=1, max_length=MAX_ID_LENGTH)
    request_id: str | None = Field(None, min_length=1, max_length=MAX_ID_LENGTH)
    agent: str = Field("triage", min_length=1, max_length=MAX_ID_LENGTH)
    tools: list[str] = Field(default_factory=lambda: ["search"], min_length=1, max_length=20)
    scenario: str | None = None


def _run_request(user_id: str, body: RunBody, scenario: str | None, request_id: str | None,
                 connection_id: str | None = None) -> RunRequest:
    return RunRequest(user_id=user_id, scenario=parse_scenario(scenario or body.scenario),
                      thread_id=body.thread_id, request_id=request_id or body.request_id,
                      agent=body.agent, tools=tuple(body.tools), websocket_connection_id=connection_id)


def _check_user_id(user_id: str | None, where: str) -> str:
    if not user_id or len(user_id) > MAX_ID_LENGTH:
        raise ValueError(f"{where} is required: a user id of 1 to {MAX_ID_LENGTH} characters")
    return user_id


@app.post("/api/runs")
async def start_run(body: RunBody | None = None,
                    x_user_id: str | None = Header(None),
                    x_scenario: str | None = Header(None),
                    x_request_id: str | None = Header(None)) -> dict[str, Any]:
    try:
        user_id = _check_user_id(x_user_id, "header x-user-id")
    except ValueError as exc:
        raise HTTPException(status_code=401, detail=str(exc)) from None
    try:
        request = _run_request(user_id, body or RunBody(), x_scenario, x_request_id)
    except ScenarioError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    return await execute_run("http", request)


@app.websocket("/ws")
async def events_socket(websocket: WebSocket, user_id: str | None = None) -> None:
    await websocket.accept()
    try:
        user_id = _check_user_id(user_id or await _first_message_user(websocket),
                                 "query parameter user_id or a first message {type: auth, user_id}")
    except (ValueError, WebSocketDisconnect) as exc:
        await _close_unauthenticated(websocket, str(exc))
        return
    connection_id = await websocket_manager.connect(user_id, websocket)
    runs: set[asyncio.Task[None]] = set()
    try:
        await websocket_manager.reply(connection_id, {"type": "connected", "connection_id": connection_id})
        while True:
            message = await websocket.receive_json()
            _handle_message(message, user_id, connection_id, runs)
    except WebSocketDisconnect:
        pass
    finally:
        websocket_manager.disconnect(connection_id)
        for task in runs:
            task.cancel()


async def _first_message_user(websocket: WebSocket) -> str | None:
    message = await websocket.receive_json()
    if isinstance(message, dict) and message.get("type") == "auth":
        return message.get("user_id")
    return None


async def _close_unauthenticated(websocket: WebSocket, reason: str) -> None:
    try:
        await websocket.send_json({"type": "error", "error": reason})
        await websocket.close(code=1008)
    except Exception:  # the client is already gone
        pass


def _handle_message(message: Any, user_id: str, connection_id: str, runs: set[asyncio.Task[None]]) -> None:
    kind = message.get("type") if isinstance(message, dict) else None
    if kind == "start_run":
        task = asyncio.create_task(_socket_run(message, user_id, connection_id))
        runs.add(task)
        task.add_done_callback(runs.discard)
    elif kind == "ping":
        _reply_later(connection_id, {"type": "pong", "nonce": message.get("nonce")}, runs)
    else:
        _reply_later(connection_id, {"type": "error", "error": f"unknown message type {kind!r}; "
                                     "expected start_run or ping"}, runs)


def _reply_later(connection_id: str, message: dict[str, Any], runs: set[asyncio.Task[None]]) -> None:
    # Replies go through a task too, so a pong is queued behind nothing the receive loop awaits.
    task = asyncio.create_task(_reply(connection_id, message))
    runs.add(task)
    task.add_done_callback(runs.discard)


async def _reply(connection_id: str, message: dict[str, Any]) -> None:
    await websocket_manager.reply(connection_id, message)


async def _socket_run(message: dict[str, Any], user_id: str, connection_id: str) -> None:
    fields = {key: value for key, value in message.items() if key != "type"}
    try:
        request = _run_request(user_id, RunBody(**fields), None, None, connection_id)
    except (ScenarioError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        error = {"type": "error", "request_id": fields.get("request_id"), "error": str(exc)}
        await _reply(connection_id, error)
        return
    outcome = await execute_run("websocket", request)
    await _reply(connection_id, {"type": "run_finished", **outcome})


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/debug/engines")
async def debug_engines() -> dict[str, Any]:
    return {
        "runs": engine_usage.snapshot(),
        "rollout_percent": engine_rollout.percent,
        "s11_ramp_runs": engine_rollout.ramp_runs,
        "default_scenario": settings.default_scenario,
        "connections": websocket_manager.connection_count(),
        "legacy_queued": legacy_websocket_manager.queued_count(),
    }


@app.post("/debug/reset")
async def debug_reset() -> dict[str, str]:
    engine_rollout.reset()
    engine_usage.reset()
    run_registry.clear()
    return {"status": "reset"}
