"""End-to-end tests: real sidecar processes, instrumented apps, real clients (see each module)."""

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # starlette's TestClient still works on httpx; its deprecation notice is not about pathwatch
    config.addinivalue_line("filterwarnings", "ignore:Using `httpx` with `starlette.testclient`")
