"""The backend's HTTP and WebSocket protocol: authentication, bad input, debug endpoints."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from examples.agent_backend.server import BackendProcess
from examples.observations import REQUIRED_EVENTS


def _post_run(backend: BackendProcess, headers: dict[str, str],
              body: dict[str, Any] | None = None) -> httpx.Response:
    return httpx.post(f"{backend.url}/api/runs", headers=headers, json=body or {}, timeout=10)


def test_http_run_without_user_is_refused(backend: BackendProcess) -> None:
    response = _post_run(backend, {})
    assert response.status_code == 401
    assert "x-user-id" in response.json()["detail"]


def test_http_run_with_unknown_scenario_names_it(backend: BackendProcess) -> None:
    response = _post_run(backend, {"x-user-id": "proto-user", "x-scenario": "S99"})
    assert response.status_code == 400
    assert "'S99'" in response.json()["detail"] and "S11" in response.json()["detail"]


def test_http_run_rejects_unknown_body_fields(backend: BackendProcess) -> None:
    response = _post_run(backend, {"x-user-id": "proto-user"}, {"thread": "t1"})
    assert response.status_code == 422


def test_http_run_reports_run_thread_and_engine(backend: BackendProcess) -> None:
    response = _post_run(backend, {"x-user-id": "proto-user", "x-request-id": "r-1"}, {"thread_id": "t-proto"})
    assert response.status_code == 200
    outcome = response.json()
    assert outcome["thread_id"] == "t-proto" and outcome["request_id"] == "r-1"
    assert outcome["run_id"].startswith("run_") and outcome["status"] == "completed"
    assert outcome["engine"] == "UserExecutionEngine" and outcome["scenario"] == "S0"
    assert outcome["trace_id"] is None  # this backend is not traced; under opentelemetry-instrument, its trace


async def _socket_session(url: str, first: dict[str, Any] | None, send: dict[str, Any]) -> list[dict[str, Any]]:
    """Open a socket, optionally authenticate by first message, send one message, read until an answer."""
    received: list[dict[str, Any]] = []
    async with connect(url, open_timeout=10) as socket:
        if first is not None:
            await socket.send(json.dumps(first))
        received.append(json.loads(await asyncio.wait_for(socket.recv(), 10)))
        await socket.send(json.dumps(send))
        while received[-1]["type"] not in ("run_finished", "error"):
            received.append(json.loads(await asyncio.wait_for(socket.recv(), 10)))
    return received


def test_socket_run_by_query_user_receives_the_five_events_then_the_answer(backend: BackendProcess) -> None:
    url = backend.url.replace("http", "ws") + "/ws?user_id=proto-ws"
    messages = asyncio.run(_socket_session(url, None, {"type": "start_run", "thread_id": "t-ws",
                                                       "request_id": "q-1", "scenario": "S0"}))
    assert messages[0]["type"] == "connected"
    assert [m["type"] for m in messages[1:-1]] == list(REQUIRED_EVENTS)
    assert all(m["thread_id"] == "t-ws" and "event_id" not in m for m in messages[1:-1])
    assert messages[-1]["type"] == "run_finished" and messages[-1]["request_id"] == "q-1"
    assert "trace_id" in messages[-1]  # None here: this backend is not traced
    assert {m["run_id"] for m in messages[1:]} == {messages[-1]["run_id"]}


def test_socket_user_may_authenticate_by_first_message(backend: BackendProcess) -> None:
    url = backend.url.replace("http", "ws") + "/ws"
    messages = asyncio.run(_socket_session(url, {"type": "auth", "user_id": "proto-first"},
                                           {"type": "start_run", "request_id": "q-2"}))
    assert messages[0]["type"] == "connected"
    assert messages[-1]["type"] == "run_finished" and messages[-1]["status"] == "completed"
    assert len(messages) == 2 + len(REQUIRED_EVENTS)


async def _unauthenticated(url: str) -> tuple[dict[str, Any], int | None]:
    async with connect(url, open_timeout=10) as socket:
        await socket.send(json.dumps({"type": "start_run"}))
        error = json.loads(await asyncio.wait_for(socket.recv(), 10))
        await asyncio.wait_for(socket.wait_closed(), 10)
        return error, socket.close_code


def test_socket_without_user_is_closed_with_a_reason(backend: BackendProcess) -> None:
    error, code = asyncio.run(_unauthenticated(backend.url.replace("http", "ws") + "/ws"))
    assert error["type"] == "error" and "user_id" in error["error"]
    assert code == 1008


@pytest.mark.parametrize("message, expected", [
    ({"type": "dance"}, "unknown message type 'dance'"),
    ({"type": "start_run", "request_id": "q-3", "scenario": "S42"}, "unknown scenario 'S42'"),
    ({"type": "start_run", "request_id": "q-4", "colour": "red"}, "colour"),
])
def test_socket_bad_messages_get_an_error_naming_the_problem(backend: BackendProcess, message: dict[str, Any],
                                                             expected: str) -> None:
    url = backend.url.replace("http", "ws") + "/ws?user_id=proto-bad"
    messages = asyncio.run(_socket_session(url, None, message))
    assert messages[-1]["type"] == "error" and expected in messages[-1]["error"]


def test_debug_endpoints_report_and_reset(backend: BackendProcess) -> None:
    assert _post_run(backend, {"x-user-id": "proto-user"}).status_code == 200
    before = httpx.get(f"{backend.url}/debug/engines", timeout=10).json()
    assert before["runs"]["S0"]["UserExecutionEngine"] >= 1
    assert set(before) >= {"rollout_percent", "s11_ramp_runs", "connections", "legacy_queued"}
    assert httpx.post(f"{backend.url}/debug/reset", timeout=10).json() == {"status": "reset"}
    after = httpx.get(f"{backend.url}/debug/engines", timeout=10).json()
    assert after["runs"] == {} and after["rollout_percent"] == 0
