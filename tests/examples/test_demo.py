"""``make demo``'s own logic, without the processes: the S11 line, the command line, stopping."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from examples import demo
from examples.agent_backend.server import BackendError
from examples.demo import format_shares, merge
from examples.demo_stack import DemoError, DemoStack
from examples.observations import REQUIRED_EVENTS, Observation, RunRecord

REPO_ROOT = Path(__file__).resolve().parents[2]


def _wave(engines: list[str]) -> Observation:
    runs = [RunRecord(user=f"user-{i:02d}", thread_id=f"t{i}", via="websocket", order=i, run_id=f"r{i}",
                      status="completed", engine=engine + "ExecutionEngine",
                      received=Counter({kind: 1 for kind in REQUIRED_EVENTS}))
            for i, engine in enumerate(engines)]
    return Observation("S11", runs, leaks=[])


def test_s11_line_gives_clients_and_pathwatch_one_share_per_wave() -> None:
    waves = [_wave(["Isolated", "Isolated"]), _wave(["Isolated", "User"]), _wave(["User", "User"]),
             _wave(["User", "User"]), _wave(["User", "User"])]
    line = format_shares(merge(waves), [0.0, 0.5, 1.0, 1.0, 1.0], waves=5)
    assert "clients 0% -> 50% -> 100% -> 100% -> 100%;" in line  # not thirds of the runs
    assert "pathwatch inventory 0% -> 50% -> 100% -> 100% -> 100% (retired" in line
    assert "gone by the end" in line

    one = format_shares(merge([_wave(["Isolated", "User"])]), [0.5], waves=1)
    assert "clients 50%; pathwatch inventory 50% (retired IsolatedExecutionEngine still called" in one


# A demo whose stack and traffic are stand-ins: the signal comes as a Ctrl-C or a `kill` would, while the
# clients' event loop runs (traffic) or between two calls of the sidecar (judging). In a subprocess:
# without a handler, SIGTERM would end the test run.
_SIGNALLED_DEMO = """
import asyncio, contextlib, os, signal, sys
import examples.demo as demo

SIGNAL, WHEN = getattr(signal, sys.argv[1]), sys.argv[2]

class Stack:
    api_url = "http://127.0.0.1:9"
    backend = type("Backend", (), {"url": "http://127.0.0.1:9"})
    @contextlib.contextmanager
    def following_findings(self):
        yield []
    def runs_judged(self):
        if WHEN == "judging":
            os.kill(os.getpid(), SIGNAL)
        return 0
    def stop(self):
        print("stack stopped", flush=True)

class Start:
    @staticmethod
    def start(state_dir, **_):
        return Stack()

async def client(number):
    if number == 0:
        os.kill(os.getpid(), SIGNAL)
    await asyncio.Event().wait()

async def drive(url, scenarios, users, runs):
    try:
        await asyncio.gather(*(client(number) for number in range(users)))
    finally:
        print("clients closed", flush=True)

demo.DemoStack, demo.drive = Start, drive
sys.exit(demo.main(sys.argv[3:]))
"""


@pytest.mark.parametrize("when", ["traffic", "judging"])
@pytest.mark.parametrize(("name", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_mid_run_stops_the_processes_and_says_so_in_one_line(tmp_path: Path, name: str, code: int,
                                                                       when: str) -> None:
    done = subprocess.run([sys.executable, "-c", _SIGNALLED_DEMO, name, when, "--scenarios", "S0",
                           "--state-dir", str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == code, done.stderr
    assert "stack stopped" in done.stdout
    assert ("clients closed" in done.stdout) == (when == "traffic")
    assert done.stderr.strip() == f"interrupted ({name}): the sidecar and the backend are stopped"


def test_a_sidecar_that_died_is_named_instead_of_a_connection_error(tmp_path: Path) -> None:
    from tests.support import free_port

    log = tmp_path / "sidecar.log"
    sidecar = SimpleNamespace(api_url=f"http://127.0.0.1:{free_port()}", log_path=log,
                              process=SimpleNamespace(poll=lambda: -2))
    stack = DemoStack(sidecar, SimpleNamespace(), tmp_path)  # type: ignore[arg-type]
    exited = rf"^the sidecar exited with code -2 \(log: {re.escape(str(log))}\)$"
    try:
        with pytest.raises(DemoError, match=exited):
            stack.wait_judged(0, 3)
        with pytest.raises(DemoError, match=exited):
            stack.findings()
    finally:
        stack._http.close()


def test_a_backend_that_does_not_start_is_an_error_not_a_traceback(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    class Refused:
        @staticmethod
        def start(state_dir: Path, **_: object) -> None:
            raise BackendError("backend exited with code 1:\n[Errno 98] address already in use")

    monkeypatch.setattr(demo, "DemoStack", Refused)
    assert demo.main(["--scenarios", "S0", "--state-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: the demo could not start: backend exited with code 1")


class _FinishedStack:
    """A stack whose scenarios the stand-in ``run_scenario`` below has already run.

    A stand-in for the real backend and sidecar (which do run here: test_demo_failures.py and
    e2e/test_demo_scenarios.py start them): these tests are of what ``demo.main`` prints and keeps
    once the scenarios are judged, from chosen outcomes the real stack does not give on demand
    (e.g. S11's inventory share staying at 0% while the clients' rises)."""

    api_url = "http://127.0.0.1:9"
    backend = SimpleNamespace(url="http://127.0.0.1:8", log_path=Path("backend.log"))
    sidecar = SimpleNamespace(grpc_endpoint="127.0.0.1:7")
    started: list[_FinishedStack] = []

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.stopped = False

    @classmethod
    def start(cls, state_dir: Path, **_: object) -> _FinishedStack:
        state_dir.mkdir(parents=True, exist_ok=True)
        cls.started.append(cls(state_dir))
        return cls.started[-1]

    def stop(self) -> None:
        self.stopped = True


@pytest.fixture
def finished_demo(monkeypatch: pytest.MonkeyPatch) -> type[_FinishedStack]:
    _FinishedStack.started.clear()
    monkeypatch.setattr(demo, "DemoStack", _FinishedStack)
    clean = RunRecord(user="user-01", thread_id="t0", via="http", order=0, run_id="r0", status="completed",
                      engine="UserExecutionEngine", received=Counter({kind: 1 for kind in REQUIRED_EVENTS}))
    monkeypatch.setattr(demo, "run_scenario", lambda *_: (Observation("S0", [clean], []), [], None))
    monkeypatch.setattr(demo, "report", lambda stack: "pathwatch report: (stand-in)")
    return _FinishedStack


def test_after_the_table_the_stopped_processes_urls_are_not_offered_and_temporary_state_goes(
        finished_demo: type[_FinishedStack], capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--scenarios", "S0"]) == 0
    stack = finished_demo.started[0]
    out = capsys.readouterr().out
    assert stack.stopped and not stack.state_dir.exists()
    assert stack.api_url not in out.split("pathwatch report")[-1] and "--api" not in out
    assert "The sidecar and the backend stop now with their temporary state" in out


def test_a_state_dir_of_the_users_stays(finished_demo: type[_FinishedStack], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--scenarios", "S0", "--state-dir", str(tmp_path / "state")]) == 0
    assert (tmp_path / "state").is_dir()
    assert f"the incidents stay in {tmp_path / 'state' / 'incidents.sqlite'}" in capsys.readouterr().out


def test_a_reused_state_dir_is_announced(finished_demo: type[_FinishedStack], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "incidents.sqlite").write_bytes(b"")
    assert demo.main(["--scenarios", "S0", "--state-dir", str(tmp_path)]) == 0
    assert "the report lists earlier runs' incidents too" in capsys.readouterr().out


def test_s11_is_judged_on_the_inventorys_canonical_share(finished_demo: type[_FinishedStack],
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The reviewer's reproducer: the inventory reports 0% canonical in every wave, the clients 0% -> 100%."""
    waves = merge([_wave(["Isolated", "Isolated"]), _wave(["User", "User"])])
    retired = {"rule": "duplicate.retired_invoked", "run_id": "r0", "trace_id": "t0", "entry_point": "/ws",
               "implementation": "examples.agent_backend.engines.IsolatedExecutionEngine", "incident_id": "i1"}
    monkeypatch.setattr(demo, "run_scenario", lambda *_: (waves, [retired], [0.0, 0.0]))
    assert demo.main(["--scenarios", "S11", "--runs", "2"]) == 1
    out = capsys.readouterr().out
    assert "NO: pathwatch's canonical share 0% -> 0% does not rise to 100%" in out
    assert "agreed with the clients on 0/1 scenarios" in out

    monkeypatch.setattr(demo, "run_scenario", lambda *_: (waves, [retired], [0.0, 1.0]))
    assert demo.main(["--scenarios", "S11", "--runs", "2"]) == 0


@pytest.mark.parametrize(("argv", "unshowable"), [
    (["--scenarios", "S1,S10", "--users", "1"],
     "S1 needs --users 2 or more (its bug sends a run's events to another user's socket); "
     "S10 needs --users 2 or more (its bug needs two users' runs sharing a run id)."),
    (["--users", "1", "--runs", "1"], "S11 needs --runs 2 or more"),
    (["--scenarios", "S11", "--runs", "1"], "S11 needs --runs 2 or more"),
])
def test_traffic_that_cannot_show_a_selected_bug_is_refused_not_judged(
        finished_demo: type[_FinishedStack], capsys: pytest.CaptureFixture[str], argv: list[str],
        unshowable: str) -> None:
    with pytest.raises(SystemExit) as exited:
        demo.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "cannot show every scenario's bug: " in err and unshowable in err
    assert "leave those scenarios out of --scenarios" in err
    assert not finished_demo.started  # nothing was started


def test_one_user_may_run_the_scenarios_it_can_show(finished_demo: type[_FinishedStack]) -> None:
    assert demo.main(["--scenarios", "S0", "--users", "1", "--runs", "1"]) == 0
