"""Paths of the artefacts under test, and promtool (from Debian's prometheus package)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards"
RULES = DASHBOARDS / "rules" / "pathwatch-rules.yaml"
RULE_TESTS = DASHBOARDS / "rules" / "pathwatch-rules.test.yaml"
RUNBOOKS = ROOT / "docs" / "runbooks"
RUNBOOK_BASE = "https://github.com/pathwatch/pathwatch/blob/main/docs/runbooks/"
DASHBOARD_FILES = ("pathwatch-consolidation.json", "pathwatch-isolation.json",
                   "pathwatch-delivery.json")


def load_dashboard(name: str) -> dict[str, Any]:
    return json.loads((DASHBOARDS / name).read_text())


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is not on PATH: run `scripts/setup.sh debian` "
                    "(installs Debian's prometheus package, which ships promtool)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, check=False)
