"""One demo backend (a real uvicorn subprocess on a free port) and one drive of every scenario."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from examples.agent_backend.scenarios import ALL_SCENARIOS
from examples.agent_backend.server import BackendProcess, start_backend
from examples.observations import Observation
from examples.traffic import drive

USERS = 20
RUNS_PER_USER = 3
S11_RAMP_RUNS = 40  # < USERS * RUNS_PER_USER, so the rollout reaches 100% within the drive


@pytest.fixture(scope="session")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackendProcess]:
    log = tmp_path_factory.mktemp("demo-backend") / "backend.log"
    with start_backend(env={"DEMO_S11_RAMP_RUNS": str(S11_RAMP_RUNS), "DEMO_SCENARIO": "S0"},
                       log_path=log) as process:
        yield process


def get_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@dataclass(frozen=True)
class Drive:
    observations: dict[str, Observation]
    debug_after: dict[str, Any]  # /debug/engines right after the drive


@pytest.fixture(scope="session")
def driven(backend: BackendProcess) -> Drive:
    observations = asyncio.run(drive(backend.url, [s.value for s in ALL_SCENARIOS], users=USERS,
                                     runs_per_user=RUNS_PER_USER))
    return Drive(observations, get_json(f"{backend.url}/debug/engines"))
