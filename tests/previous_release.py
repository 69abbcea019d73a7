"""A release's own code, taken from git (``git archive``) and run in a subprocess with it alone on
PYTHONPATH — the real release, not a copy of its SQL: what a rollback runs on a store this release
wrote. A checkout without that history (a shallow clone, a source archive) skips the test, saying
so; a full clone (CI's) runs it."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# printed last by a script run as a release: every module of ``sidecar`` and ``instrumentation`` it
# ran, so that the test can tell it ran that release's code (not this checkout's installed one)
CODE_RAN = r"""
ours = sorted({getattr(module, "__file__", None) or "?" for name, module in sys.modules.items()
               if name.split(".")[0] in ("sidecar", "instrumentation")})
"""


def _git(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, timeout=60)


def release_tree(commit: str, into: Path) -> Path:
    """The ``sidecar`` and ``instrumentation`` packages of ``commit`` (its ``sidecar.config``
    imports ``instrumentation.yaml_loader``), extracted into ``into``."""
    if shutil.which("git") is None:
        pytest.skip(f"git is not installed: the release ({commit}) comes from git")
    if _git("cat-file", "-e", f"{commit}^{{commit}}").returncode != 0:
        shallow = _git("rev-parse", "--is-shallow-repository").stdout.decode().strip() == "true"
        pytest.skip(f"the release's commit {commit} is not in the git history of {REPO} "
                    f"({'a shallow clone' if shallow else 'not a git clone of pathwatch'}): "
                    f"run in a full clone, or `git fetch --unshallow`")
    archive = _git("archive", commit, "sidecar", "instrumentation")
    assert archive.returncode == 0, archive.stderr.decode()
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        # our own repository's files; the data filter (Python 3.11.4+) where there is one
        tar.extractall(into, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return into


def run_release(tree: Path, script: str, *args: str) -> dict:
    """Runs ``script`` (which ends printing ``CODE_RAN``'s ``ours`` as ``"code"`` in a JSON object)
    with ``tree`` alone on PYTHONPATH; that object."""
    env = {**os.environ, "PYTHONPATH": str(tree)}  # its code alone: not this checkout's
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, cwd=tree,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"the release could not use the store:\n{done.stderr}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # it really ran that release, every module of it (not this checkout's installed ones)
    assert result["code"] and all(Path(code).is_relative_to(tree) for code in result["code"]), (
        result)
    return result
