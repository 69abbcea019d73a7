"""Fixtures: an in-memory span exporter behind a private SDK provider, and pathwatch instrumented
with a path map (uninstrumented after each test, so every test starts from the original classes)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
