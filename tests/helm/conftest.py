from __future__ import annotations

from pathlib import Path

import pytest

from tests.helm.charting import CHART, HELM_BINARIES, Helm


@pytest.fixture(scope="session", params=sorted(HELM_BINARIES), ids=sorted(HELM_BINARIES))
def helm(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    binary = HELM_BINARIES[request.param]
    assert binary.is_file(), f"{binary} is missing: run `scripts/setup.sh helm`"
    return Helm(binary, tmp_path_factory.mktemp(f"{request.param}-home"))


@pytest.fixture(scope="session")
def chart() -> Path:
    return CHART
