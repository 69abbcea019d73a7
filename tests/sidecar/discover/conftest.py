from __future__ import annotations

import shutil
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def agent_app(tmp_path: Path) -> Path:
    """A private copy of the fixture backend, so a test may add messy files to it."""
    target = tmp_path / "agent_app"
    shutil.copytree(FIXTURES / "agent_app", target, ignore=shutil.ignore_patterns("__pycache__"))
    return target
