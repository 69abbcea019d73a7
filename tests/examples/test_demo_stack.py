"""``DemoStack.start``: the sidecar and the backend it starts, from a state directory given relative to
the caller's working directory (``python -m examples.demo --state-dir demo-state``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from examples.demo_stack import DemoStack


def test_a_relative_state_dir_starts_both_processes_with_their_state_in_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the sidecar runs in the state directory and was given its config file and incidents.path relative
    # to the demo's: it exited 2 ("relstate/sidecar.yaml: cannot read"), and then 1 (its lock file)
    monkeypatch.chdir(tmp_path)
    stack = DemoStack.start(Path("demo-state"))
    try:
        assert stack.exited() is None
        assert stack.runs_judged() == 0  # its API answers
        assert stack.state_dir == tmp_path / "demo-state"
    finally:
        stack.stop()
    assert stack.sidecar.process.returncode == 0
    assert (tmp_path / "demo-state" / "incidents.sqlite").exists()
