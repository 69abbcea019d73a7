"""A backend module under ``instrumentation.instrument`` for the detectors' tests on real spans: its
finished spans encoded as an OTLP request (the SDK's own encoder) and decoded by the sidecar's
``SpanDecoder``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import instrumentation
from sidecar.model import SpanRecord
from sidecar.receiver import SpanDecoder
from tests.sidecar.detectors.factory import NOW


@contextmanager
def instrumented_backend(tmp_path: Path, monkeypatch, module: str, source: str,
                         pathmap: str) -> Iterator[tuple[ModuleType, InMemorySpanExporter]]:
    """(the module ``module`` of ``source``, the exporter of its spans) under pathwatch with the path
    map ``pathmap`` (``{module}`` in it replaced). A module is hooked once per name: give each test a
    new one."""
    monkeypatch.setenv("PATHWATCH_HMAC_KEY", "detector-tests-not-secret")
    monkeypatch.delenv("PATHWATCH_ALLOW_RAW_USER_IDS", raising=False)
    (tmp_path / f"{module}.py").write_text(source)
    (tmp_path / "pathmap.yaml").write_text(pathmap.replace("{module}", module))
    monkeypatch.syspath_prepend(str(tmp_path))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    def start() -> None:
        instrumentation.instrument(tmp_path / "pathmap.yaml", tracer_provider=provider,
                                   heartbeat_interval_s=0)

    def rotate_key(key: str) -> None:  # a key rotation in the running backend
        instrumentation.uninstrument()
        monkeypatch.setenv("PATHWATCH_HMAC_KEY", key)
        start()

    start()
    _rotations[id(exporter)] = rotate_key
    try:
        yield importlib.import_module(module), exporter
    finally:
        del _rotations[id(exporter)]
        instrumentation.uninstrument()
        sys.modules.pop(module, None)


_rotations: dict[int, Callable[[str], None]] = {}


def rotate_key(exporter: InMemorySpanExporter, key: str) -> None:
    """``uninstrument()`` and ``instrument()`` again with the HMAC key ``key`` in the backend whose
    spans ``exporter`` holds (``instrumented_backend``), as an app rotating its key does."""
    _rotations[id(exporter)](key)


def decoded(exporter: InMemorySpanExporter) -> list[SpanRecord]:
    """The exporter's finished spans as the sidecar's receiver decodes them."""
    request = encode_spans(exporter.get_finished_spans())
    return SpanDecoder().decode(request.SerializeToString(), NOW).spans
