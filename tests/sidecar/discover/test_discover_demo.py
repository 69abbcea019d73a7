"""Discovery on the demo backend agrees with the demo's hand-written path map."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest
import yaml

from sidecar.discover import discover, render_yaml

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "examples" / "agent_backend"


@pytest.fixture(scope="module")
def found():
    return discover(DEMO)


@pytest.fixture(scope="module")
def written() -> dict:
    return yaml.safe_load((DEMO / "pathmap.yaml").read_text())["roles"]


def expand(patterns: list[str], classes) -> set[str]:
    """The hand-written map may use globs in the class part; expand them over the indexed classes."""
    out = set()
    for pattern in patterns:
        module, _, cls = pattern.rpartition(".")
        out |= {key for key, info in classes.items() if info.module == module and fnmatch.fnmatchcase(info.name, cls)}
    return out


def test_same_roles_and_implementations(found, written):
    proposed = {role.name: set(role.implementations) for role in found.roles}
    expected = {name: expand(role["implementations"], found.classes) for name, role in written.items()}
    assert proposed == expected


def test_same_kinds(found, written):
    assert {role.name: role.kind for role in found.roles} == {name: role["kind"] for name, role in written.items()}


def test_hand_picked_canonical_and_retired_are_among_the_guesses(found, written):
    assert {role.name for role in found.roles} == set(written)
    picked = [role for role in found.roles if written[role.name].get("canonical")]
    assert picked and any(written[role.name].get("retired") for role in found.roles)  # checked below
    for role in found.roles:
        canonical = written[role.name].get("canonical")
        if canonical:
            assert canonical in role.canonical_candidates, role.name
        assert set(written[role.name].get("retired", [])) <= set(role.retired), role.name


def test_the_draft_imports_cleanly_under_the_instrumentation_checks(found):
    # the test may import the demo; discovery itself never does (see test_discover_cli)
    from instrumentation.pathmap import PathMap

    path_map = PathMap.from_yaml(render_yaml(found), source="draft.yaml")
    resolved = path_map.check_imports()   # imports every module, checks every class and method
    assert {r.cls.__name__ for r in resolved} >= {"UserExecutionEngine", "AgentWebSocketBridge", "WebSocketManager"}
