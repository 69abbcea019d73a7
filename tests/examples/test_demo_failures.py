"""``make demo`` when it cannot judge as usual: more findings than the sidecar keeps, connections closed
under the clients, a backend that dies mid-run, a signal while the processes start."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from examples import demo, demo_stack, traffic
from examples.agent_backend.server import APP, BackendProcess
from examples.demo import Progress, run_scenario
from examples.demo_stack import DemoError, DemoStack
from examples.observations import Observation
from sidecar.api import create_api
from sidecar.incidents.recent import FindingPage, FindingQuery, RecentFindings
from sidecar.receiver.asgi_server import ThreadedAsgiServer
from tests.sidecar.incidents.findings import bleed
from tests.support import wait_until

RING = 50  # findings the sidecar's ring keeps here (10,000 in a real sidecar)
REPO_ROOT = Path(__file__).resolve().parents[2]


class WatchedRing(RecentFindings):
    """A ring of recent findings that tells how far its readers have read (the ``after`` they ask for)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._read_up_to = 0
        self._asked = threading.Condition()

    def page(self, query: FindingQuery = FindingQuery()) -> FindingPage:
        with self._asked:
            self._read_up_to = max(self._read_up_to, query.after or 0)
            self._asked.notify_all()
        return super().page(query)

    def wait_read(self, seq: int, timeout_s: float = 3.0) -> bool:
        with self._asked:
            return self._asked.wait_for(lambda: self._read_up_to >= seq, timeout_s)


@pytest.fixture
def ring() -> WatchedRing:
    return WatchedRing(RING)


@pytest.fixture
def stack(ring: WatchedRing, tmp_path: Path) -> Iterator[DemoStack]:
    """A stack whose sidecar is the real HTTP API over ``ring`` (no processes)."""
    app = create_api(SimpleNamespace(), None, CollectorRegistry(), lambda: True, None, findings=ring)
    server = ThreadedAsgiServer(app, "127.0.0.1:0", "api.endpoint", name="test-api")
    server.start()
    running = SimpleNamespace(poll=lambda: None)
    sidecar = SimpleNamespace(api_url=f"http://{server.endpoint}", process=running, log_path=tmp_path / "s.log")
    backend = SimpleNamespace(process=running, log_path=tmp_path / "backend.log")
    demo_stack = DemoStack(sidecar, backend, tmp_path)  # type: ignore[arg-type]
    try:
        yield demo_stack
    finally:
        demo_stack._http.close()
        server.stop()


def test_a_scenario_of_more_findings_than_the_sidecar_keeps_is_judged_on_all_of_them(
        monkeypatch: pytest.MonkeyPatch, ring: WatchedRing, stack: DemoStack) -> None:
    def traffic(stack: DemoStack, scenario: str, users: int, runs: int) -> Observation:
        read = True
        for start in range(0, 3 * RING, RING // 2):  # half a ring at a time, 3 rings in all
            ring.add([bleed(f"t{n}") for n in range(start, start + RING // 2)])
            read = read and ring.wait_read(ring.last_seq)  # by the demo, before the next half comes
        return Observation(scenario, [], [])

    monkeypatch.setattr(demo, "drive_judged", traffic)
    _, findings, _ = run_scenario(stack, "S3", 1, 1, Progress(io.StringIO()))
    assert [finding["seq"] for finding in findings] == list(range(1, 3 * RING + 1))


def test_findings_dropped_before_they_were_read_are_an_error_not_a_verdict(
        monkeypatch: pytest.MonkeyPatch, ring: WatchedRing, stack: DemoStack) -> None:
    def traffic(stack: DemoStack, scenario: str, users: int, runs: int) -> Observation:
        ring.add([bleed(f"t{n}") for n in range(2 * RING)])  # at once: half of them are evicted unread
        return Observation(scenario, [], [])

    monkeypatch.setattr(demo, "drive_judged", traffic)
    with pytest.raises(DemoError, match=rf"ring of recent findings \(the last {RING}\) dropped {RING} findings "
                                        r"before the demo read them.*run fewer --users x --runs"):
        run_scenario(stack, "S3", 1, 1, Progress(io.StringIO()))


def test_pooled_connections_expire_before_uvicorn_closes_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                               backend: BackendProcess) -> None:
    """A POST on a pooled connection the server closes meanwhile fails (ReadError, never retried): the
    race itself takes a hundred users and luck, so this pins what prevents it. The demo backend and the
    sidecar's API run uvicorn with its default keep-alive timeout."""
    limits: list[httpx.Limits] = []

    def recording(client: type[httpx.Client] | type[httpx.AsyncClient]):
        def make(*args, **kwargs):
            limits.append(kwargs.get("limits", httpx.Limits()))  # httpx.Limits(): the default expiry
            return client(*args, **kwargs)
        return make

    monkeypatch.setattr(httpx, "AsyncClient", recording(httpx.AsyncClient))
    monkeypatch.setattr(httpx, "Client", recording(httpx.Client))
    asyncio.run(traffic.drive(backend.url, ["S0"], users=1, runs_per_user=1))
    demo_stack.DemoStack(SimpleNamespace(api_url=backend.url), SimpleNamespace(), tmp_path)._http.close()

    server_closes_after_s = uvicorn.Config(APP).timeout_keep_alive
    assert len(limits) == 2
    assert all(limit.keepalive_expiry is not None and limit.keepalive_expiry <= server_closes_after_s - 2
               for limit in limits), (limits, server_closes_after_s)


@pytest.mark.parametrize("when", ["before the scenario", "after its first run"])
def test_a_backend_killed_mid_demo_is_named_with_its_log(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str], when: str) -> None:
    """The error was '' (httpx.ReadError), 'Server disconnected ...' or '[Errno 111] ...', never the backend."""
    stacks: list[DemoStack] = []

    def kill_backend() -> None:
        stacks[0].backend.process.send_signal(signal.SIGKILL)
        stacks[0].backend.process.wait(10)  # not the point here: when its exit is seen

    def drive_judged(stack: DemoStack, *args: object) -> Observation:
        stacks.append(stack)
        if when == "before the scenario":
            kill_backend()
        return real_drive_judged(stack, *args)

    async def run_once(user: traffic.SimulatedUser, *args: object) -> object:
        record = await real_run_once(user, *args)
        if when == "after its first run" and stacks[0].backend.process.poll() is None:
            kill_backend()
        return record

    real_drive_judged, real_run_once = demo.drive_judged, traffic.SimulatedUser.run_once
    monkeypatch.setattr(demo, "drive_judged", drive_judged)
    monkeypatch.setattr(traffic.SimulatedUser, "run_once", run_once)
    assert demo.main(["--scenarios", "S1", "--users", "4", "--runs", "3", "--state-dir", str(tmp_path)]) == 2

    error = capsys.readouterr().err
    backend = re.escape(f"(the backend exited with code -{signal.SIGKILL} (log: {tmp_path / 'backend.log'}))")
    assert re.fullmatch(rf"error: \S.* {backend}\n", error), error
    assert stacks[0].sidecar.process.poll() is not None  # stopped all the same


@pytest.mark.parametrize(("exc", "said"), [
    (httpx.ReadError(""), "ReadError"),
    (httpx.RemoteProtocolError("Server disconnected"), "RemoteProtocolError: Server disconnected"),
    (DemoError("the sidecar did not answer"), "the sidecar did not answer")])
def test_an_error_without_a_message_is_named_by_its_type(exc: Exception, said: str) -> None:
    assert demo._describe(exc) == said


def test_waiting_for_judgement_stops_when_the_backend_has_exited(stack: DemoStack, tmp_path: Path) -> None:
    stack.backend = SimpleNamespace(process=SimpleNamespace(poll=lambda: -9), log_path=tmp_path / "backend.log")
    exited = re.escape(f"the backend exited with code -9 (log: {tmp_path / 'backend.log'})")
    with pytest.raises(DemoError, match=rf"^{exited} while waiting for the sidecar to judge 3 runs$"):
        stack.wait_judged(0, 3, timeout_s=2.0)  # not 'timed out'


def _in_session(session: int) -> list[str]:
    """Processes of a session still running (``/proc/PID/stat``: pid (comm) state ppid pgrp session ...)."""
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            left.append(stat.parent.name)
    return left


def _demo(tmp_path: Path, *command: str) -> subprocess.Popen[str]:
    """A demo process in a session of its own, its temporary directories under ``tmp_path``."""
    return subprocess.Popen([sys.executable, *command], cwd=REPO_ROOT, env={**os.environ, "TMPDIR": str(tmp_path)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _ended(demo_process: subprocess.Popen[str]) -> tuple[str, str, list[str]]:
    """stdout, stderr and the processes it left running (killed then)."""
    try:
        out, err = demo_process.communicate(timeout=120)
        return out, err, _in_session(demo_process.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of it (its process group)
            os.killpg(demo_process.pid, signal.SIGKILL)
        demo_process.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize(("name", "to", "starting"), [
    ("SIGINT", "group", "sidecar.yaml"),  # Ctrl-C in the terminal while the sidecar starts
    ("SIGINT", "demo", "sidecar.yaml"),
    ("SIGTERM", "demo", "backend.log"),  # a kill while the backend starts
])
def test_a_signal_while_the_processes_start_leaves_no_temporary_state(tmp_path: Path, name: str, to: str,
                                                                      starting: str) -> None:
    """/tmp/pathwatch-demo-* stayed: the directory was removed only once both processes were up."""
    demo_process = _demo(tmp_path, "-m", "examples.demo", "--scenarios", "S0")
    try:
        wait_until(lambda: list(tmp_path.glob(f"pathwatch-demo-*/{starting}")), timeout=60, message=starting)
        (os.killpg if to == "group" else os.kill)(demo_process.pid, getattr(signal, name))
    finally:
        out, err, left = _ended(demo_process)
    assert "sidecar API" not in out, "the signal came after the start"
    assert (demo_process.returncode, err.strip()) == (
        128 + getattr(signal, name), f"interrupted ({name}): the sidecar and the backend are stopped")
    assert list(tmp_path.glob("pathwatch-demo-*")) == []
    assert left == []


# The signal comes inside subprocess.Popen, as soon as the process it launches exists: the window the
# signal tests above hit now and then (by the time a log file appears, Popen is under way).
_SIGNAL_IN_POPEN = """
import signal, subprocess, sys
import examples.demo as demo

launched = subprocess.Popen

def popen(command, *args, **kwargs):
    process = launched(command, *args, **kwargs)
    if sys.argv[1] in command:
        signal.raise_signal(signal.SIGTERM)  # runs the demo's handler at once
    return process

subprocess.Popen = popen
sys.exit(demo.main(["--scenarios", "S0"]))
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("launched", ["sidecar", "-m"])  # `pathwatch sidecar`, `... python -m uvicorn`
def test_a_signal_while_a_process_is_launched_leaves_it_stopped(tmp_path: Path, launched: str) -> None:
    """The process went on running: the exception left subprocess.Popen before it returned the process."""
    out, err, left = _ended(_demo(tmp_path, "-c", _SIGNAL_IN_POPEN, launched))
    assert err.strip() == "interrupted (SIGTERM): the sidecar and the backend are stopped"
    assert left == [] and list(tmp_path.glob("pathwatch-demo-*")) == []
