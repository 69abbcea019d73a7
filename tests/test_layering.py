"""Imports point one way: the sidecar knows only the span contract of the instrumentation, and reading
that contract does not load the backend side (OpenTelemetry SDK, wrapt, the FastAPI hooks)."""

import subprocess
import sys

from tests.conftest import ROOT

BACKEND_SIDE = ("opentelemetry.sdk", "wrapt", "instrumentation.wrapping", "instrumentation.instrumentor")


def loaded_after(statement: str) -> set[str]:
    probe = (f"import sys; {statement}; "
             f"print(' '.join(m for m in {BACKEND_SIDE!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=True)
    return set(result.stdout.split())


def test_the_span_contract_loads_nothing_of_the_backend_side():
    assert loaded_after("import instrumentation.attributes") == set()


def test_the_sidecar_app_loads_nothing_of_the_backend_side():
    assert loaded_after("import sidecar.app, sidecar.detectors, sidecar.receiver") == set()


def test_the_public_api_still_loads_on_use():
    assert "instrumentation.instrumentor" in loaded_after(
        "import instrumentation; instrumentation.PathwatchInstrumentor")
