"""pathwatch instrumentation: wrap the classes a path map names and emit the spans of the contract.

Explicit use::

    import instrumentation
    instrumentation.instrument("pathmap.yaml", endpoint="127.0.0.1:4317")  # endpoint: optional export

Zero-code use: ``PATHWATCH_PATHMAP=pathmap.yaml opentelemetry-instrument uvicorn app:app`` loads
``PathwatchInstrumentor`` through its ``opentelemetry_instrumentor`` entry point.

Environment: ``PATHWATCH_PATHMAP`` (path map file), ``PATHWATCH_HMAC_KEY`` (pseudonym key, at least
16 bytes; required unless ``PATHWATCH_ALLOW_RAW_USER_IDS=1``), ``PATHWATCH_OTLP_ENDPOINT`` (export to the sidecar with
pathwatch's own batch processor, sized by the standard ``OTEL_BSP_*`` variables when set),
``PATHWATCH_HEARTBEAT_INTERVAL_S`` (default 10; 0 = off),
``PATHWATCH_CHECK_IMPORTS=1`` (import every path-map module at start, failing on any bad entry).

This module only re-exports, lazily: the sidecar imports ``instrumentation.attributes`` (the span
contract) and must not load the OpenTelemetry SDK, wrapt and the FastAPI hooks for it.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ConfigurationError",
    "PathMap",
    "PathMapError",
    "PathwatchError",
    "PathwatchInstrumentor",
    "configure",
    "instrument",
    "instrument_app",
    "is_enabled",
    "set_enabled",
    "uninstrument",
]

_EXPORTS = {
    "ConfigurationError": "instrumentation.errors",
    "PathMapError": "instrumentation.errors",
    "PathwatchError": "instrumentation.errors",
    "PathMap": "instrumentation.pathmap",
    "configure": "instrumentation.exporting",
    "is_enabled": "instrumentation.runtime",
    "set_enabled": "instrumentation.runtime",
    "instrument_app": "instrumentation.instrumentor",
    "PathwatchInstrumentor": "instrumentation.instrumentor",
    "instrument": "instrumentation.instrumentor",
    "uninstrument": "instrumentation.instrumentor",
    "instrumentation_errors": "instrumentation.instrumentor",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        return importlib.import_module("instrumentation.runtime").SDK_VERSION
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'instrumentation' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
