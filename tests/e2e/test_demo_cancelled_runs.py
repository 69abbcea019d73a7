"""End to end: a run the demo backend cancels because the socket that started it closed (its handler
cancels the socket's runs as it returns) owes nobody the events it never got to.

The real sidecar process and the real demo backend under ``opentelemetry-instrument`` (S0, the
correct path), its steps made long so the run is cancelled mid-step: one user with two tabs starts a
run from one, sees ``agent_started`` on the other, and closes the first. Each such run was a
``delivery.missing_required_events`` (a page, PathwatchRunsMissingRequiredEvents): 6 of 6 in the s32
drive (/tmp/s32_fp/sc_slow.py, phase E). Its execute spans now say ``pathwatch.cancelled``, and the
run is counted ``cancelled``, not judged.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect

from examples import demo_stack
from examples.agent_backend.server import launch_backend
from examples.demo_stack import DemoStack
from sidecar.testing import SidecarProcess

pytestmark = pytest.mark.timeout(180)

#: the step the run is cancelled in: far longer than the test, so it never ends on its own
STEP_DELAY_S = 120


@pytest.fixture
def stack(tmp_path):
    with SidecarProcess(demo_stack.sidecar_config(tmp_path), state_dir=tmp_path, console_script=True) as sidecar:
        grpc_port = int(sidecar.grpc_endpoint.rpartition(":")[2])
        env = demo_stack.backend_env(grpc_port) | {"DEMO_STEP_DELAY_S": str(STEP_DELAY_S)}
        with launch_backend(env=env, launcher=[demo_stack._executable("opentelemetry-instrument")],
                            log_path=tmp_path / "backend.log") as backend:
            backend.wait_ready(60.0)
            yield DemoStack(sidecar, backend, tmp_path)


async def close_the_tab_that_started_a_run(url: str, user: str) -> dict:
    base = url.replace("http://", "ws://")
    async with connect(f"{base}/ws?user_id={user}") as other, connect(f"{base}/ws?user_id={user}") as starter:
        for websocket in (other, starter):
            assert json.loads(await websocket.recv())["type"] == "connected"
        await starter.send(json.dumps({"type": "start_run", "request_id": "r1", "tools": ["search"]}))
        started = json.loads(await asyncio.wait_for(other.recv(), 30))  # the run is in its first step
        await starter.close()  # the backend cancels the run as the socket's handler returns
        return started


def test_a_run_cancelled_as_its_socket_closes_is_counted_cancelled_not_missing_its_events(stack):
    judged = stack.runs_judged()
    cursor = stack.findings_cursor()
    started = asyncio.run(close_the_tab_that_started_a_run(stack.backend.url, "alice"))
    assert started["type"] == "agent_started"
    stack.wait_judged(judged, 1, timeout_s=60)
    assert stack.findings(after=cursor) == []
    outcomes = {key: value for key, value in stack.metrics().items()
                if key.startswith("pathwatch_runs_completed_total{")}
    assert outcomes == {'pathwatch_runs_completed_total{outcome="cancelled"}': 1.0}
