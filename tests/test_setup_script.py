"""scripts/setup.sh's Python step, on stand-ins for the interpreter (no network, no real venv)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A venv's python as `python -m venv` makes it: answers pip and the import check, logs each call
_WORKING_VENV_PYTHON = """#!/bin/sh
echo "venv python $*" >> "$SETUP_LOG"
exit 0
"""
# What an interrupted or failed `python -m venv` leaves (Ctrl-C during ensurepip; Debian without
# python3-venv): an interpreter without pip
_PIPLESS_VENV_PYTHON = """#!/bin/sh
echo "pipless python $*" >> "$SETUP_LOG"
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "$0: No module named pip" >&2; exit 1; fi
exit 0
"""
# $PYTHON: 3.11 or newer; `-m venv DIR` makes DIR/bin/python a working venv python
_BASE_PYTHON = """#!/bin/sh
echo "base python $*" >> "$SETUP_LOG"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  for dir; do :; done
  mkdir -p "$dir/bin" && cp "$WORKING_VENV_PYTHON" "$dir/bin/python" && chmod +x "$dir/bin/python"
fi
exit 0
"""


def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _checkout(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", repo / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    return repo


def _setup_python(repo: Path, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    log = tmp_path / "calls.log"
    log.touch()
    env = {**os.environ, "SETUP_LOG": str(log),
           "PYTHON": str(_script(tmp_path / "python3", _BASE_PYTHON)),
           "WORKING_VENV_PYTHON": str(_script(tmp_path / "venv-python", _WORKING_VENV_PYTHON))}
    done = subprocess.run(["bash", "scripts/setup.sh", "python"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=60)
    return done, log.read_text().splitlines()


def test_a_venv_left_without_pip_is_made_again(tmp_path: Path) -> None:
    # a `make demo` interrupted while `python -m venv` ran ensurepip left .venv/bin/python without pip:
    # every later run skipped the venv and failed, "No module named pip"
    repo = _checkout(tmp_path)
    (repo / ".venv" / "bin").mkdir(parents=True)
    _script(repo / ".venv" / "bin" / "python", _PIPLESS_VENV_PYTHON)
    done, calls = _setup_python(repo, tmp_path)
    assert done.returncode == 0, done.stderr
    assert any(call.startswith("base python -m venv") for call in calls)
    assert any(call.startswith("venv python -m pip install") and ".[sidecar,demo,test]" in call
               for call in calls)
    assert (repo / ".venv" / ".pathwatch-installed").exists()


def test_a_working_venv_is_kept(tmp_path: Path) -> None:
    repo = _checkout(tmp_path)
    (repo / ".venv" / "bin").mkdir(parents=True)
    _script(repo / ".venv" / "bin" / "python", _WORKING_VENV_PYTHON)
    (repo / ".venv" / "kept").touch()
    done, calls = _setup_python(repo, tmp_path)
    assert done.returncode == 0, done.stderr
    assert not any(call.startswith("base python -m venv") for call in calls)
    assert (repo / ".venv" / "kept").exists()


# $PYTHON as Debian's python3 without python3-venv: no ensurepip (`python -m venv` fails) until the
# stand-in apt-get has installed the package
_PYTHON_WITHOUT_ENSUREPIP = """#!/bin/sh
echo "base python $*" >> "$SETUP_LOG"
case "$*" in
  *ensurepip*) [ -f "$VENV_PACKAGE" ] || exit 1 ;;
  *-venv\\"*) echo python3.11-venv ;;
esac
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  [ -f "$VENV_PACKAGE" ] || { echo "ensurepip is not available" >&2; exit 1; }
  for dir; do :; done
  mkdir -p "$dir/bin" && cp "$WORKING_VENV_PYTHON" "$dir/bin/python" && chmod +x "$dir/bin/python"
fi
exit 0
"""
_APT_GET = """#!/bin/sh
echo "apt-get $*" >> "$SETUP_LOG"
if [ "$1" = "install" ]; then touch "$VENV_PACKAGE"; fi
exit 0
"""
_APT_CACHE = """#!/bin/sh
echo "apt-cache $*" >> "$SETUP_LOG"
exit 0
"""
_SUDO = """#!/bin/sh
exec "$@"
"""


def _path_without_apt(tmp_path: Path) -> Path:
    """A PATH directory with every command of /usr/bin and /bin but apt-get and apt-cache."""
    bin_dir = tmp_path / "system-bin"
    bin_dir.mkdir()
    for directory in (Path("/usr/bin"), Path("/bin")):
        for command in directory.iterdir():
            if command.name not in ("apt-get", "apt-cache", "sudo") and not (bin_dir / command.name).exists():
                (bin_dir / command.name).symlink_to(command)
    return bin_dir


def _setup_without_ensurepip(tmp_path: Path, with_apt: bool):
    repo = _checkout(tmp_path)
    log = tmp_path / "calls.log"
    log.touch()
    tools = tmp_path / "tools"
    tools.mkdir()
    _script(tools / "sudo", _SUDO)
    if with_apt:
        _script(tools / "apt-get", _APT_GET)
        _script(tools / "apt-cache", _APT_CACHE)
    env = {**os.environ, "SETUP_LOG": str(log), "VENV_PACKAGE": str(tmp_path / "venv-installed"),
           "PYTHON": str(_script(tmp_path / "python3", _PYTHON_WITHOUT_ENSUREPIP)),
           "WORKING_VENV_PYTHON": str(_script(tmp_path / "venv-python", _WORKING_VENV_PYTHON)),
           "PATH": f"{tools}:{_path_without_apt(tmp_path)}"}
    done = subprocess.run(["bash", "scripts/setup.sh", "python"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=60)
    return repo, done, log.read_text().splitlines()


def test_python3_venv_is_installed_when_the_interpreter_has_no_ensurepip(tmp_path: Path) -> None:
    # Debian's python3 without python3-venv: `python3 -m venv` fails ("ensurepip is not available"),
    # so a fresh machine's first `make demo` stopped there, though nothing is to be installed by hand
    repo, done, calls = _setup_without_ensurepip(tmp_path, with_apt=True)
    assert done.returncode == 0, done.stderr
    installs = [call for call in calls if call.startswith("apt-get install")]
    assert len(installs) == 1 and installs[0].split()[-2:] == ["python3-venv", "python3.11-venv"]
    assert calls.index(installs[0]) < next(i for i, call in enumerate(calls)
                                            if call.startswith("base python -m venv"))
    assert (repo / ".venv" / ".pathwatch-installed").exists()


def test_without_ensurepip_or_apt_the_error_says_what_to_install(tmp_path: Path) -> None:
    repo, done, calls = _setup_without_ensurepip(tmp_path, with_apt=False)
    assert done.returncode == 1
    assert "cannot make a virtual environment" in done.stderr and "venv package" in done.stderr
    assert not any(call.startswith("base python -m venv") for call in calls)
    assert not (repo / ".venv").exists()
