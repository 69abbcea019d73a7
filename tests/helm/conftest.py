from __future__ import annotations

from pathlib import Path

import pytest

from tests.helm.charting import HELM_BINARIES, Helm, stage_chart


@pytest.fixture(scope="session", params=sorted(HELM_BINARIES), ids=sorted(HELM_BINARIES))
def helm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    binary = HELM_BINARIES[request.param]
    assert binary.is_file(), f"{binary} is missing: run `scripts/setup.sh helm`"
    return Helm(binary, tmp_path_factory.mktemp(f"{request.param}-home"))


@pytest.fixture(scope="session")
def staged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(chart dir, the root its dashboards/ symlinks resolve under)."""
    return stage_chart(tmp_path_factory.mktemp("chart"))


@pytest.fixture(scope="session")
def chart(staged: tuple[Path, Path]) -> Path:
    return staged[0]
