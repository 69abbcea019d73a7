"""Helpers shared by the instrumentation tests."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

SAMPLE_PATHMAP = Path(__file__).parent / "sample" / "pathmap.yaml"
HMAC_KEY = "test-key-not-secret"


def nested_too_deep_for_json() -> str:
    """A JSON array nested deeper than ``json.loads`` parses on this interpreter: about 1,000 levels
    on Python 3.11, 1,500 on 3.12, 10,000 on 3.13 (the json module's own C recursion limit there)."""
    depth = 1000
    while depth <= 10_000_000:
        text = "[" * depth + "]" * depth
        try:
            json.loads(text)
        except RecursionError:
            return text
        depth *= 4
    raise AssertionError("json.loads parsed 10 million nested arrays")


def pseudonym(raw: str, key: str = HMAC_KEY) -> str:
    """The pseudonym docs/conventions.md specifies, computed independently of the code under test."""
    return hmac.new(key.encode(), raw.encode(), hashlib.sha256).hexdigest()[:32]


def attrs(span: Any) -> dict[str, Any]:
    return dict(span.attributes or {})


def spans_named(exporter: Any, name: str) -> list[Any]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def only_span(exporter: Any, name: str) -> Any:
    found = spans_named(exporter, name)
    names = [s.name for s in exporter.get_finished_spans()]
    assert len(found) == 1, f"expected one span {name!r}, got {names}"
    return found[0]


def spans_of_kind(exporter: Any, kind: str) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if (s.attributes or {}).get("pathwatch.kind") == kind]
