"""The benchmark's generated messy tree, small: every file is accounted for, and the public API."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import sidecar.discover
from sidecar.discover import discover

BENCH = Path(__file__).resolve().parents[3] / "benchmarks" / "discover_large_tree.py"


def load_generator():
    spec = importlib.util.spec_from_file_location("discover_large_tree", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_generated_file_is_read_or_reported(tmp_path: Path):
    stats = load_generator().generate(tmp_path / "bigapp", files=400, seed=3)
    found = discover(tmp_path / "bigapp")
    reasons = [item.reason for item in found.skipped]
    assert found.files_read + len(found.skipped) == stats["files"] + 1    # + the symlink loop
    assert sum(r.startswith("syntax error") for r in reasons) == stats["unparsable"] > 0
    assert sum(r.startswith("too large") for r in reasons) == stats["oversized"]
    assert sum(r.startswith("symlink loop") for r in reasons) == 1
    # its latin-1 byte is in a string: Python's import cannot decode the file
    assert sum(r.startswith("not importable: Python's import cannot decode it") for r in reasons) == stats["non_utf8"] > 0
    assert {role.name for role in found.roles} == {"execution_engine", "supervisor", "event_emitter", "socket_manager"}
    assert found.aliases


def test_public_api():
    assert sorted(sidecar.discover.__all__) == [
        "Discovery", "DiscoveryError", "RoleProposal", "discover", "main", "pathmap_dict", "render_json",
        "render_yaml", "run"]
