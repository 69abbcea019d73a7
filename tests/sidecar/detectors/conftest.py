import pytest
from prometheus_client import CollectorRegistry

from sidecar.telemetry import Telemetry


@pytest.fixture
def telemetry() -> Telemetry:
    return Telemetry(CollectorRegistry())
