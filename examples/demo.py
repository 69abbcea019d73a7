"""``make demo``: the sidecar and the instrumented demo backend, every scenario driven by simulated users,
and a table of what the clients saw against what pathwatch found.

    python -m examples.demo [--users 20] [--runs 3] [--scenarios S0,S3] [--keep-running] [--state-dir DIR]

One sidecar (``pathwatch sidecar``, incidents in SQLite) and one backend (uvicorn under
``opentelemetry-instrument``) serve all scenarios in turn. After each scenario the demo waits until the
sidecar has judged every run of it (``pathwatch_runs_completed_total``); the scenario's findings are
read from ``/api/v1/findings`` as they come. Exit code 0 when pathwatch agrees with the clients on every scenario,
1 when not, 2 when the demo could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO, TypeVar

import httpx

from examples.agent_backend.scenarios import ALL_SCENARIOS
from examples.agent_backend.server import BackendError
from examples.demo_judge import (RETIRED_ENGINE, Verdict, client_shares, describe_agreement,
                                 describe_found, judge, share_series, too_little_traffic)
from examples.demo_stack import DELIVERY_DEADLINE_S, RUN_IDLE_S, DemoError, DemoStack
from examples.observations import CANONICAL_ENGINE, Observation
from examples.traffic import DriveError, drive

CANONICAL = "examples.agent_backend.engines." + CANONICAL_ENGINE
ENGINE_ROLE = "execution_engine"
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
T = TypeVar("T")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: stop the processes and exit 128 + the signal's number. A KeyboardInterrupt, so
    no ``except Exception`` on the way stops it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Signals:
    """While the demo runs, the first SIGINT or SIGTERM raises ``Interrupted``; once the processes are
    being stopped, later ones only wait for that (a second Ctrl-C must not leave them running)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._raising = True
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for signum in _SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.received is None:
            self.received = signum
            if self._raising:
                raise Interrupted(signum)

    def check(self) -> None:
        """Raise ``Interrupted`` if a signal came (a Ctrl-C also stops the sidecar and the backend: what
        failed after it failed because of it)."""
        if self.received is not None:
            raise Interrupted(self.received)

    def hold(self) -> None:
        self._raising = False

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A signal meanwhile raises ``Interrupted`` at the end instead, once what it would have
        interrupted is done (a process being launched: raised inside ``subprocess.Popen``, it left the
        process running with nothing to stop it by)."""
        self._raising = False
        try:
            yield
        finally:
            self._raising = True
        self.check()


class Progress:
    def __init__(self, out: TextIO | None = None) -> None:  # None: sys.stdout when printing
        self._start = time.monotonic()
        self._out = out

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._start

    def __call__(self, message: str) -> None:
        print(f"[{self.elapsed_s:5.1f}s] {message}", file=self._out or sys.stdout, flush=True)


def engine_calls(stack: DemoStack) -> tuple[int, int]:
    """(canonical, all) top-level engine calls in the sidecar's inventory."""
    role = stack.inventory()["roles"].get(ENGINE_ROLE, {})
    implementations = role.get("implementations", {})
    canonical = sum(i.get("top_level_calls", 0) for i in implementations.values() if i.get("canonical"))
    return canonical, int(role.get("top_level_calls", 0))


def merge(observations: list[Observation]) -> Observation:
    """One observation of consecutive drives; request order continues from one drive to the next."""
    runs, offset = [], 0
    for observation in observations:
        for run in observation.runs:
            run.order += offset
        runs += observation.runs
        offset = max((run.order for run in runs), default=-1) + 1
    return Observation(scenario=observations[0].scenario, runs=runs,
                       leaks=[leak for o in observations for leak in o.leaks],
                       errors=[error for o in observations for error in o.errors])


def drive_judged(stack: DemoStack, scenario: str, users: int, runs_per_user: int) -> Observation:
    """Drive one scenario and wait until the sidecar has judged every run of it."""
    judged_before = stack.runs_judged()
    traffic = drive(stack.backend.url, [scenario], users, runs_per_user)
    observation = asyncio.run(_interruptible(traffic))[scenario]
    # the sidecar keys runs by run id: S10's clients share some, so count distinct ones
    stack.wait_judged(judged_before, len({run.run_id for run in observation.runs if run.run_id}))
    return observation


async def _interruptible(traffic: Coroutine[Any, Any, T]) -> T:
    """``traffic``, cancelled by SIGINT or SIGTERM (its clients close their sockets), then ``Interrupted``.
    A signal handler raising inside the event loop would end a task of it instead, and asyncio would log
    that task's exception as never retrieved."""
    if threading.current_thread() is not threading.main_thread():
        return await traffic  # signals are the main thread's
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    received: list[int] = []

    def cancel(signum: int) -> None:
        received.append(signum)
        if task is not None:
            task.cancel()

    previous = {signum: signal.getsignal(signum) for signum in _SIGNALS}
    for signum in _SIGNALS:
        loop.add_signal_handler(signum, cancel, signum)
    try:
        result = await traffic
    except BaseException:
        if not received:
            raise
    finally:
        for signum, handler in previous.items():
            loop.remove_signal_handler(signum)
            signal.signal(signum, handler)
    if received:
        raise Interrupted(received[0])
    return result


def drive_in_waves(stack: DemoStack, scenario: str, users: int,
                   runs_per_user: int) -> tuple[Observation, list[float | None]]:
    """S11: one run per user per wave, the sidecar's inventory read after each wave has been judged,
    so the canonical share per wave is exact (no sampling race with span batches); None: a wave with no
    engine call."""
    observations, shares = [], []
    before = engine_calls(stack)
    for _ in range(runs_per_user):
        observations.append(drive_judged(stack, scenario, users, 1))
        after = engine_calls(stack)
        calls = after[1] - before[1]
        shares.append((after[0] - before[0]) / calls if calls > 0 else None)
        before = after
    return merge(observations), shares


def run_scenario(stack: DemoStack, scenario: str, users: int, runs_per_user: int,
                 progress: Progress) -> tuple[Observation, list[dict[str, Any]], list[float | None] | None]:
    progress(f"{scenario}: {users} users x {runs_per_user} runs over real WebSockets ...")
    # read while the traffic runs: the sidecar keeps only its most recent findings
    with stack.following_findings() as findings:
        if scenario == "S11":
            observation, shares = drive_in_waves(stack, scenario, users, runs_per_user)
        else:
            observation, shares = drive_judged(stack, scenario, users, runs_per_user), None
    progress(f"{scenario}: {observation.runs_started} runs judged, {len(findings)} findings")
    return observation, findings, shares


def format_results(verdicts: list[Verdict]) -> str:
    headers = ("SCENARIO", "CLIENTS SAW", "PATHWATCH FOUND", "AGREES")
    rows: list[tuple[str, str, str, str]] = []
    for verdict in verdicts:
        found = describe_found(verdict)
        rows.append((verdict.scenario, verdict.clients, found[0], describe_agreement(verdict)))
        rows += [("", "", line, "") for line in found[1:]]
    widths = [max(len(row[i]) for row in (headers, *rows)) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3]
             for row in (headers, *rows)]
    return "\n".join(line.rstrip() for line in lines)


def format_shares(client: Observation, pathwatch: list[float | None] | None, waves: int) -> str:
    """Both series per wave: the clients' runs of wave i are the i-th ``len(runs) / waves`` in request
    order (``merge`` keeps the waves' order), as the judge compares them."""
    clients = client_shares(client, waves)
    return (f"S11 canonical share of engine runs, by wave of the traffic (one run per user each): "
            f"clients {share_series(clients)}; "
            f"pathwatch inventory {share_series(pathwatch or [])} (retired {RETIRED_ENGINE.rsplit('.', 1)[-1]} "
            f"{'gone' if pathwatch and pathwatch[-1] == 1.0 else 'still called'} by the end)")


def report(stack: DemoStack) -> str:
    from sidecar.report import ReportError, render_report

    try:
        return render_report(stack.api_url)
    except ReportError as exc:
        return f"pathwatch report failed: {exc}"


def where(stack: DemoStack) -> str:
    api = stack.api_url
    return "\n".join([
        f"Backend:   {stack.backend.url}   (POST /api/runs, WS /ws; logs {stack.backend.log_path})",
        f"Sidecar:   OTLP/gRPC {stack.sidecar.grpc_endpoint}; incidents {stack.state_dir / 'incidents.sqlite'}",
        f"Metrics:   {api}/metrics",
        f"API:       {api}/api/v1/incidents  {api}/api/v1/findings  {api}/api/v1/inventory",
        f"Report:    .venv/bin/pathwatch report --api {api}",
    ])


def stopped(stack: DemoStack, state_kept: bool) -> str:
    kept = (f"; the incidents stay in {stack.state_dir / 'incidents.sqlite'}" if state_kept
            else " with their temporary state (--state-dir DIR keeps the incidents and logs)")
    return f"The sidecar and the backend stop now{kept}. --keep-running keeps them up to query."


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        scenarios = _scenarios(args.scenarios)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    unshowable = too_little_traffic(scenarios, args.users, args.runs)
    if unshowable:  # not a run whose verdicts would blame pathwatch for bugs the traffic cannot show
        parser.error(f"--users {args.users} --runs {args.runs} cannot show every scenario's bug: "
                     + "; ".join(unshowable) + ". Raise them, or leave those scenarios out of --scenarios")
    try:
        with _Signals() as signals:
            return _run(args, scenarios, signals)
    except KeyboardInterrupt as exc:  # Interrupted, or a Ctrl-C before the handlers were in place
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        print(f"interrupted ({signal.Signals(signum).name}): the sidecar and the backend are stopped",
              file=sys.stderr)
        return 128 + signum


def _run(args: argparse.Namespace, scenarios: list[str], signals: _Signals) -> int:
    keep_state = bool(args.state_dir) or args.keep_running
    state_dir, code = Path(args.state_dir) if args.state_dir else None, None
    try:
        state_dir = state_dir or Path(tempfile.mkdtemp(prefix="pathwatch-demo-"))
        code = _run_in(state_dir, keep_state, args, scenarios, signals)
        return code
    finally:
        # a temporary state directory goes with the processes on every exit (a signal while they start
        # too), unless they stay up or it explains an error: exit 2's message names the logs in it
        if state_dir is not None and not keep_state and code != 2:
            shutil.rmtree(state_dir, ignore_errors=True)


def _run_in(state_dir: Path, keep_state: bool, args: argparse.Namespace, scenarios: list[str],
            signals: _Signals) -> int:
    progress = Progress()
    progress(f"starting the pathwatch sidecar and the instrumented backend (state in {state_dir}) ...")
    if (state_dir / "incidents.sqlite").exists():
        progress(f"reusing {state_dir / 'incidents.sqlite'}: the report lists earlier runs' incidents too")
    try:
        # the S11 rollout reaches 100% half way through its runs: the last third is all canonical
        stack = DemoStack.start(state_dir, s11_ramp_runs=max(1, args.users * args.runs // 2),
                                launching=signals.deferred)
    except (DemoError, BackendError, OSError) as exc:
        signals.check()
        print(f"error: the demo could not start: {exc}", file=sys.stderr)
        return 2
    try:
        progress(f"sidecar API {stack.api_url}, backend {stack.backend.url} "
                 f"(delivery deadline {DELIVERY_DEADLINE_S:g}s, run idle {RUN_IDLE_S:g}s)")
        verdicts, shares = [], ""
        for scenario in scenarios:
            observation, findings, sampled = run_scenario(stack, scenario, args.users, args.runs, progress)
            signals.check()
            verdicts.append(judge(observation, findings, sampled))
            if scenario == "S11":
                shares = format_shares(observation, sampled, args.runs)
        elapsed = progress.elapsed_s
        print("\n" + format_results(verdicts))
        if shares:
            print("\n" + shares)
        print("\n" + report(stack).rstrip())
        print("\n" + (where(stack) if args.keep_running else stopped(stack, keep_state)))
        agreed = sum(v.agrees for v in verdicts)
        print(f"\npathwatch agreed with the clients on {agreed}/{len(verdicts)} scenarios "
              f"({args.users} concurrent users, {args.runs} runs each); all scenarios took {elapsed:.1f}s")
        if args.keep_running:
            _wait_for_interrupt(progress, signals, stack.backend.url)
        return 0 if agreed == len(verdicts) else 1
    except (DemoError, DriveError, OSError, httpx.HTTPError) as exc:
        signals.check()
        message = _describe(exc)
        exited = [gone for gone in (stack.sidecar_exited(), stack.backend_exited()) if gone and gone not in message]
        print(f"error: {message}" + "".join(f" ({gone})" for gone in exited), file=sys.stderr)
        return 2
    finally:
        signals.hold()
        stack.stop()


def _describe(exc: Exception) -> str:
    """The demo's own errors say what failed; others (the clients' connections to the backend) are
    named by their type too: an httpx.ReadError's message is ''."""
    if isinstance(exc, (DemoError, DriveError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _wait_for_interrupt(progress: Progress, signals: _Signals, backend_url: str) -> None:
    """Keep everything up (point Prometheus/Grafana at /metrics) until Ctrl-C or SIGTERM."""
    progress("still running: scrape /metrics, query the API, drive more traffic "
             f"(.venv/bin/python -m examples.traffic --url {backend_url}); Ctrl-C to stop")
    try:
        while True:
            signals.check()
            time.sleep(0.5)  # a timed wait keeps the main thread responsive to signals
    except Interrupted:
        pass
    progress("stopping")


def _scenarios(text: str) -> list[str]:
    known = [s.value for s in ALL_SCENARIOS]
    names = [name.strip().upper() for name in text.split(",") if name.strip()] if text else known
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ValueError(f"--scenarios: unknown {unknown or text!r}; expected a list of {', '.join(known)}")
    return names


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=_positive, default=20,
                        help="concurrent users per scenario (20; S1 and S10 need 2 or more)")
    parser.add_argument("--runs", type=_positive, default=3, help="runs per user and scenario (3; S11 needs 2 or more)")
    parser.add_argument("--scenarios", default="", help="comma-separated, e.g. S0,S3 (default: all)")
    parser.add_argument("--keep-running", action="store_true",
                        help="keep the sidecar and the backend up after the table, until Ctrl-C/SIGTERM")
    parser.add_argument("--state-dir", help="where the sidecar config, incident SQLite and logs go "
                        "(default: a new temporary directory, removed at the end unless --keep-running); "
                        "an incident SQLite already there is reused, so the report also lists earlier "
                        "runs' incidents (the verdicts read only this run's findings)")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
