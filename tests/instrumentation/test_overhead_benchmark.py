"""``benchmarks/instrumentation_overhead.py`` cleans up after itself: it generated its backend and path
map in a temporary directory that it never removed (dozens piled up in /tmp). Tiny counts: nothing is
measured here."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "instrumentation_overhead.py"


def test_a_run_leaves_no_temporary_directory(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(BENCH), "--calls", "5", "--repeat", "1"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrapped call (pathwatch)" in done.stdout  # it ran to the end
    assert list(tmp_path.iterdir()) == []


def test_a_failing_run_leaves_no_temporary_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("instrumentation_overhead", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script adds the repository root
    spec.loader.exec_module(module)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    made: list[Path] = []

    def fail(*_: object) -> float:  # the first measurement, after the files are written
        made.extend(tmp_path.iterdir())
        raise RuntimeError("measurement failed")

    monkeypatch.setattr(module, "per_call_us", fail)
    try:
        with pytest.raises(RuntimeError, match="measurement failed"):
            module.main(["--calls", "5", "--repeat", "1"])
    finally:
        sys.modules.pop("pw_bench_backend", None)
    assert [path.name.startswith("pw-bench-") for path in made] == [True]
    assert list(tmp_path.iterdir()) == []
    assert not any(entry.startswith(str(tmp_path)) for entry in sys.path)
