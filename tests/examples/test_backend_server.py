"""``start_backend`` without a ``log_path``: the temporary log it makes goes when the backend stops (one
``demo-backend-*.log`` was left in the temp directory per start)."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest

from examples.agent_backend.server import BackendError, launch_backend, start_backend


@pytest.fixture
def temp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_a_backend_started_without_a_log_path_leaves_no_log_behind(temp_dir: Path) -> None:
    with start_backend() as backend:
        assert backend.log_path.parent == temp_dir and backend.log_path.exists()
    assert backend.process.returncode is not None
    assert list(temp_dir.iterdir()) == []


def test_a_backend_that_fails_to_start_says_why_and_leaves_no_log_behind(temp_dir: Path) -> None:
    with pytest.raises(BackendError, match="DEMO_SCENARIO='S99' is not one of"):
        start_backend(env={"DEMO_SCENARIO": "S99"})
    assert list(temp_dir.iterdir()) == []


def test_a_log_path_given_is_kept(tmp_path: Path) -> None:
    log = tmp_path / "backend.log"
    with start_backend(log_path=log):
        pass
    assert log.exists()


def test_the_port_is_held_from_the_launch_on_and_a_client_connecting_then_is_served() -> None:
    # the port was chosen by binding port 0 and closing the socket, and uvicorn bound it a second
    # later, after its imports: until then any outgoing connection could take it as its source port
    # (/tmp/s29_ports/repro.py). The socket is bound before the launch now, and uvicorn serves it
    backend = launch_backend()
    try:
        early = socket.create_connection(("127.0.0.1", backend.port), timeout=30)  # refused before
        with early:
            early.sendall(b"GET /healthz HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := early.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer
        backend.wait_ready(20)
    finally:
        backend.stop()
