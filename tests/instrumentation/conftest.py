"""Fixtures: an in-memory span exporter behind a private SDK provider, and pathwatch instrumented
with a path map (uninstrumented after each test, so every test starts from the original classes)."""

from __future__ import annotations

import itertools
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import instrumentation
from instrumentation.errors import errors

from tests.instrumentation.helpers import HMAC_KEY, SAMPLE_PATHMAP


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    return tracer_provider


@pytest.fixture
def hmac_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("PATHWATCH_HMAC_KEY", HMAC_KEY)
    monkeypatch.delenv("PATHWATCH_ALLOW_RAW_USER_IDS", raising=False)
    return HMAC_KEY


@pytest.fixture
def instrument(provider: TracerProvider, hmac_key: str) -> Iterator[Callable[..., Any]]:
    """instrument(pathmap=SAMPLE_PATHMAP, **kwargs): start pathwatch for this test only."""
    errors.reset_for_tests()

    def start(pathmap: Any = SAMPLE_PATHMAP, **kwargs: Any) -> Any:
        kwargs.setdefault("tracer_provider", provider)
        kwargs.setdefault("heartbeat_interval_s", 0)
        return instrumentation.instrument(pathmap, **kwargs)

    yield start
    if instrumentation.PathwatchInstrumentor().is_instrumented_by_opentelemetry:
        instrumentation.uninstrument()
    instrumentation.set_enabled(True)


@pytest.fixture
def instrumented(instrument: Callable[..., Any]) -> Any:
    return instrument()


_backend_names = itertools.count()  # a module name is imported once: wrapt's post-import hooks fire once


@pytest.fixture
def backend(instrument: Callable[..., Any], tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """backend(source, pathmap): write a new module ``pw_backend_<n>`` and its path map,
    instrument, import it (``{mod}`` in the path map is the module's name)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    made: list[str] = []

    def make(source: str, pathmap: str, **kwargs: Any) -> Any:
        name = f"pw_backend_{next(_backend_names)}"
        made.append(name)
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        (tmp_path / f"{name}.yaml").write_text(textwrap.dedent(pathmap).replace("{mod}", name))
        instrument(tmp_path / f"{name}.yaml", **kwargs)
        __import__(name)
        return sys.modules[name]

    yield make
    for name in made:
        sys.modules.pop(name, None)
