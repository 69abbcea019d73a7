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


def promql_mismatches(tmp_path: Path, series: list[tuple[str, str]],
                      checks: list[tuple[str, str, dict[str, float]]], *,
                      interval: str = "15s") -> str:
    """What promtool reports wrong when it evaluates each ``(expr, eval_time, {labels: value})``
    exactly over synthetic ``series`` (``input_series`` notation, one sample per ``interval`` from
    0 s, so a ``_created`` value is a time on that clock); "" when every check holds. ``{}`` expects
    no result. promtool compares values exactly: round the ones that are not."""
    test = {"evaluation_interval": interval, "tests": [{
        "interval": interval,
        "input_series": [{"series": name, "values": values} for name, values in series],
        "promql_expr_test": [
            {"expr": expr, "eval_time": eval_time,
             "exp_samples": [{"labels": labels, "value": value}
                             for labels, value in expected.items()]}
            for expr, eval_time, expected in checks]}]}
    path = tmp_path / "expressions.test.yaml"
    path.write_text(yaml.safe_dump(test))
    result = promtool("test", "rules", str(path))
    return "" if result.returncode == 0 else result.stdout + result.stderr


def promtool_check_metrics(exposition: str) -> subprocess.CompletedProcess[str]:
    """`promtool check metrics` over a text-format exposition (promtool 2.42 reads no OpenMetrics)."""
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is not on PATH: run `scripts/setup.sh debian`")
    return subprocess.run([exe, "check", "metrics"], input=exposition, capture_output=True, text=True,
                          timeout=120, check=False)
