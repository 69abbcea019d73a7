"""README "Adding a role or a detector": every file it sends a newcomer to exists, and every name it
says is in a file is there (the section is followed by hand; a rename must not leave it stale)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: name the section mentions -> the module it says holds it
NAMES = {
    "CATALOG": "sidecar.rules", "Rule": "sidecar.rules",
    "Detector": "sidecar.types",
    "make_finding": "sidecar.detectors._findings",
    "build_detectors": "sidecar.detectors",
    "_ALERTNAMES": "sidecar.alerting.payload", "_CATEGORIES": "sidecar.alerting.payload",
    "_RUNBOOKS": "sidecar.alerting.payload",
    "COMPARED_FAMILIES": "sidecar.consolidation.deploys",
    "ROLE_KINDS": "sidecar.discover.naming", "_ROLE_TOKENS": "sidecar.discover.naming",
    "RULE_CASES": "tests.e2e.rules_scenarios",
    "RulesConfig": "sidecar.config",
    "SidecarProcess": "sidecar.testing",
}


def section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Adding a role or a detector")
    return text[start:text.index("\n## ", start + 1)]


def test_every_path_of_the_section_exists() -> None:
    paths = [p for p in re.findall(r"`([\w./-]+/[\w./-]*|[\w-]+\.(?:py|yaml|json|md))`", section())
             if "NAME" not in p and not p.startswith("/")]  # "/api/...": the sidecar's API
    assert len(paths) > 15
    for path in paths:
        candidates = [ROOT / path, ROOT / "dashboards" / "rules" / path]
        assert any(c.exists() for c in candidates), f"README names {path}, which does not exist"


def test_every_name_is_where_the_section_says() -> None:
    text = section()
    for name, module in NAMES.items():
        assert re.search(rf"`{name}\b", text), f"the section no longer names {name}: update this test"
        assert module.replace(".", "/") in text.replace(".py", "").replace("/__init__", ""), (name, module)
        assert hasattr(importlib.import_module(module), name), f"{module} has no {name}"
    from sidecar.types import Detector
    assert {"consume", "tick", "name"} <= set(Detector.__annotations__) | set(vars(Detector))


def test_every_test_the_section_cites_exists() -> None:
    """The section backs its advice with tests (``path::test_name``): a renamed test must not leave
    it citing nothing."""
    cited = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", section())
    assert cited, "the section cites no test"
    for path, name in cited:
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{path} has no {name}"


def test_every_metric_the_section_names_is_one_the_sidecar_exports() -> None:
    from prometheus_client import CollectorRegistry

    from sidecar.telemetry import Telemetry

    registry = CollectorRegistry()
    Telemetry(registry)
    exported = {f"{metric.name}_total" if metric.type == "counter" else metric.name
                for metric in registry.collect()}
    named = re.findall(r"`(pathwatch_\w+)", section())
    assert named, "the section names no metric"
    for metric in named:
        assert metric in exported, f"README names {metric}, which the sidecar does not export"
