"""scripts/compat.sh (make test's run of the instrumentation tests on the newer Pythons a machine
has), on stand-ins for the interpreters (no network, no real venv)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# a venv's python: pip and pytest answer (pytest with $PYTEST_STATUS), every call logged
_VENV_PYTHON = """#!/bin/sh
echo "venv python $*" >> "$COMPAT_LOG"
case "$*" in
  "-m pytest"*) exit "${PYTEST_STATUS:-0}" ;;
  *platform*) echo 3.99.2 ;;
esac
exit 0
"""
# a base interpreter: `-m venv DIR` makes DIR/bin/python the venv python above
_BASE_PYTHON = """#!/bin/sh
echo "base python $0 $*" >> "$COMPAT_LOG"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin" && cp "$VENV_PYTHON" "$3/bin/python" && chmod +x "$3/bin/python"
fi
exit 0
"""
# pyenv's shim for a version that is not the active one: found on PATH, runs nothing
_SHIM = """#!/bin/sh
echo "pyenv: $(basename "$0"): command not found" >&2
exit 127
"""


def _script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _compat(tmp_path: Path, versions: str, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    repo = tmp_path / "repo"
    if not repo.exists():  # a second run: the same checkout
        (repo / "scripts").mkdir(parents=True)
        shutil.copy(ROOT / "scripts" / "compat.sh", repo / "scripts" / "compat.sh")
        shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    log = tmp_path / "calls.log"
    log.write_text("")
    full_env = {**os.environ, "COMPAT_PYTHONS": versions, "COMPAT_LOG": str(log),
                "PYENV_ROOT": str(tmp_path / "pyenv"),
                "VENV_PYTHON": str(_script(tmp_path / "venv-python", _VENV_PYTHON)), **env}
    done = subprocess.run(["bash", "scripts/compat.sh"], cwd=repo, env=full_env, capture_output=True,
                          text=True, timeout=60)
    return done, log.read_text().splitlines()


def test_a_version_the_machine_lacks_is_skipped_with_a_message_not_failed(tmp_path: Path) -> None:
    done, calls = _compat(tmp_path, "3.98 3.99")
    assert done.returncode == 0, done.stderr
    assert "SKIPPED Python 3.98: not on this machine" in done.stdout
    assert "SKIPPED Python 3.99: not on this machine" in done.stdout
    assert "tests/instrumentation tests/test_conventions.py not run on it" in done.stdout
    assert "no newer Python tested here" in done.stdout
    assert calls == []


def test_pyenvs_build_is_used_past_a_shim_that_runs_nothing(tmp_path: Path) -> None:
    shims = tmp_path / "shims"
    _script(shims / "python3.99", _SHIM)
    _script(tmp_path / "pyenv" / "versions" / "3.99.1" / "bin" / "python3.99", _BASE_PYTHON)
    newest = _script(tmp_path / "pyenv" / "versions" / "3.99.2" / "bin" / "python3.99", _BASE_PYTHON)
    done, calls = _compat(tmp_path, "3.99", PATH=f"{shims}:{os.environ['PATH']}")
    assert done.returncode == 0, done.stderr
    assert any(call.startswith(f"base python {newest} -m venv") for call in calls)
    assert any(call.startswith("venv python -m pip install") and ".[sidecar,test]" in call
               for call in calls)
    assert "venv python -m pytest -q -p no:cacheprovider tests/instrumentation tests/test_conventions.py" in calls
    assert "==> compat: tests/instrumentation tests/test_conventions.py on Python 3.99.2" in done.stdout
    # the venv is kept, its packages stamped: a second run only tests
    again, calls = _compat(tmp_path, "3.99", PATH=f"{shims}:{os.environ['PATH']}")
    assert again.returncode == 0
    assert not any("-m venv" in call or "pip install" in call for call in calls)
    assert any(call.startswith("venv python -m pytest") for call in calls)


def test_a_failing_test_run_fails_the_script(tmp_path: Path) -> None:
    _script(tmp_path / "pyenv" / "versions" / "3.99.2" / "bin" / "python3.99", _BASE_PYTHON)
    done, _ = _compat(tmp_path, "3.99", PYTEST_STATUS="1")
    assert done.returncode == 1


def test_make_test_runs_it_after_the_whole_suite_only() -> None:
    def commands(*args: str) -> str:
        return subprocess.run(["make", "-n", "test", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=30, check=True).stdout
    assert "bash scripts/compat.sh" in commands()
    assert "bash scripts/compat.sh" not in commands("PYTEST_ARGS=tests/test_config.py")
