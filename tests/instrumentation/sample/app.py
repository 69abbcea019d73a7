"""Test backend: a FastAPI app with an HTTP route and WebSocket routes using the sample classes.

``build_app()`` constructs the app at call time, so the zero-code hook on ``FastAPI.__init__`` sees it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import BackgroundTasks, FastAPI, Request, WebSocket, WebSocketDisconnect

from tests.instrumentation.sample.emitters import AgentWebSocketBridge, ConnectionManager, QueuedEmitter
from tests.instrumentation.sample.engines import UserContext, UserExecutionEngine


def build_app() -> tuple[FastAPI, ConnectionManager]:
    app = FastAPI()
    manager = ConnectionManager()

    @app.post("/api/runs/{run_id}")
    async def start_run(run_id: str, request: Request) -> dict[str, Any]:
        user_id = request.headers.get("x-user-id", "anonymous")
        context = UserContext(user_id, run_id=run_id)
        engine = UserExecutionEngine(context)
        result = engine.execute_agent(context, user_context=context)
        bridge = AgentWebSocketBridge(manager, context)
        await bridge.notify_agent_started(run_id, "triage", user_context=context)
        return {"result": result}

    @app.post("/api/later/{run_id}")
    async def run_later(run_id: str, request: Request, tasks: BackgroundTasks) -> dict[str, Any]:
        """The run goes on after the response, in a background task of the request."""
        user_id = request.headers.get("x-user-id", "anonymous")

        async def run() -> None:
            await asyncio.sleep(0.002)
            context = UserContext(user_id, run_id=run_id)
            UserExecutionEngine(context).execute_agent(context, user_context=context)
        tasks.add_task(run)
        return {"started": run_id}

    @app.websocket("/ws")
    async def socket(websocket: WebSocket) -> None:
        user_id = websocket.query_params.get("user_id", "anonymous")
        await websocket.accept()
        manager.register(user_id, websocket)
        try:
            while True:
                message = await websocket.receive_json()
                await handle(websocket, user_id, message)
        except WebSocketDisconnect:
            manager.unregister(user_id, websocket)

    async def handle(websocket: WebSocket, user_id: str, message: dict) -> None:
        kind = message.get("type")
        run_id = message.get("run_id", "ws-run")
        context = UserContext(user_id, run_id=run_id)
        if kind == "run":
            engine = UserExecutionEngine(context)
            engine.execute_agent(context, user_context=context)
            bridge = AgentWebSocketBridge(manager, context)
            await bridge.notify_agent_started(run_id, "triage", user_context=context)
            await bridge.notify_agent_completed(run_id, user_context=context,
                                                event_id=message.get("event_id"))
        elif kind == "queued":
            emitter = QueuedEmitter(user_id)
            for tool in ("search", "fetch"):
                emitter.notify_tool_executing(run_id, tool)
            # the flusher runs in another task: no context variables reach it from the emit
            await asyncio.get_running_loop().create_task(_flush_later(emitter, websocket))
        elif kind == "raw":
            await websocket.send_text('{"type": "raw_text", "run_id": "%s"}' % run_id)
            await websocket.send_bytes(b"\x00binary")
            await websocket.send({"type": "websocket.send", "text": "plain"})
        elif kind == "broadcast":
            await manager.broadcast({"type": "notice", "run_id": run_id})
        elif kind == "login":  # logged in as another user on the open socket
            websocket.state.user_id = message["user_id"]
        elif kind == "dispatch_nobody":
            await manager.send_to_user("nobody", {"type": "agent_thinking", "run_id": run_id})
        elif kind == "close_then_send":
            await websocket.close()
            try:
                await websocket.send_json({"type": "late", "run_id": run_id})
            except RuntimeError:
                pass
            raise WebSocketDisconnect(1000)
        await websocket.send_json({"type": "ack", "run_id": run_id})

    return app, manager


async def _flush_later(emitter: QueuedEmitter, websocket: WebSocket) -> None:
    await asyncio.sleep(0)
    await emitter.flush_to(websocket, 2)
