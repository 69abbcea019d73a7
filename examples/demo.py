"""``make demo``: the sidecar and the instrumented demo backend, every scenario driven by simulated users,
and a table of what the clients saw against what pathwatch found.

    python -m examples.demo [--users 20] [--runs 3] [--scenarios S0,S3] [--keep-running] [--state-dir DIR]

One sidecar (``pathwatch sidecar``, incidents in SQLite) and one backend (uvicorn under
``opentelemetry-instrument``) serve all scenarios in turn. After each scenario the demo waits until the
sidecar has judged every run of it (``pathwatch_runs_completed_total``), then reads the scenario's
findings from ``/api/v1/findings``. Exit code 0 when pathwatch agrees with the clients on every scenario,
1 when not, 2 when the demo could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from examples.agent_backend.scenarios import ALL_SCENARIOS
from examples.demo_judge import (RETIRED_ENGINE, Verdict, describe_agreement, describe_found,
                                 judge)
from examples.demo_stack import DELIVERY_DEADLINE_S, RUN_IDLE_S, DemoError, DemoStack
from examples.observations import CANONICAL_ENGINE, Observation
from examples.traffic import DriveError, drive

CANONICAL = "examples.agent_backend.engines." + CANONICAL_ENGINE
ENGINE_ROLE = "execution_engine"


class Progress:
    def __init__(self, out=sys.stdout) -> None:
        self._start = time.monotonic()
        self._out = out

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._start

    def __call__(self, message: str) -> None:
        print(f"[{self.elapsed_s:5.1f}s] {message}", file=self._out, flush=True)


class ShareSampler:
    """Samples the inventory's top-level engine calls while S11 runs: the canonical share per window."""

    def __init__(self, stack: DemoStack, interval_s: float = 0.05) -> None:
        self._stack = stack
        self._interval_s = interval_s
        self._samples: list[tuple[int, int]] = []  # (canonical top-level calls, all top-level calls)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="share-sampler", daemon=True)

    def __enter__(self) -> ShareSampler:
        self._samples.append(self._sample())
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self._samples.append(self._sample())

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._samples.append(self._sample())

    def _sample(self) -> tuple[int, int]:
        try:
            role = self._stack.inventory()["roles"].get(ENGINE_ROLE, {})
        except Exception:
            return self._samples[-1] if self._samples else (0, 0)
        implementations = role.get("implementations", {})
        canonical = sum(i.get("top_level_calls", 0) for name, i in implementations.items() if i.get("canonical"))
        return canonical, int(role.get("top_level_calls", 0))

    def shares_by_third(self) -> list[float]:
        """Canonical share of the engine calls in each third of the calls made while sampling."""
        base_canonical, base_total = self._samples[0]
        deltas = [(c - base_canonical, t - base_total) for c, t in self._samples]
        total = deltas[-1][1]
        shares = []
        for part in range(3):
            low, high = total * part // 3, total * (part + 1) // 3
            # the first samples at or past each boundary: a window never reaches back into the previous
            # third (spans arrive in batches, so the window may start a little late, never early)
            start = min((d for d in deltas if d[1] >= low), key=lambda d: d[1])
            end = min((d for d in deltas if d[1] >= high), key=lambda d: d[1])
            if end[1] > start[1]:
                shares.append((end[0] - start[0]) / (end[1] - start[1]))
        return shares


def run_scenario(stack: DemoStack, scenario: str, users: int, runs_per_user: int,
                 progress: Progress) -> tuple[Observation, list[dict[str, Any]], list[float] | None]:
    cursor, judged_before = stack.findings_cursor(), stack.runs_judged()
    progress(f"{scenario}: {users} users x {runs_per_user} runs over real WebSockets ...")
    sampler = ShareSampler(stack) if scenario == "S11" else None
    if sampler is not None:
        sampler.__enter__()
    try:
        observation = asyncio.run(drive(stack.backend.url, [scenario], users, runs_per_user))[scenario]
        # the sidecar keys runs by run id: S10's clients share some, so count distinct ones
        runs = len({run.run_id for run in observation.runs if run.run_id})
        stack.wait_judged(judged_before, runs)
    finally:
        if sampler is not None:
            sampler.__exit__(None, None, None)
    findings = stack.findings(after=cursor)
    progress(f"{scenario}: {observation.runs_started} runs judged, {len(findings)} findings")
    return observation, findings, sampler.shares_by_third() if sampler is not None else None


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


def format_shares(client: Observation, pathwatch: list[float] | None) -> str:
    clients = " -> ".join(f"{share:.0%}" for share in
                          (client.canonical_share(i) for i in range(3)) if share is not None)
    seen = " -> ".join(f"{share:.0%}" for share in pathwatch or []) or "-"
    return (f"S11 canonical share of engine runs, by third of the traffic: clients {clients}; "
            f"pathwatch inventory {seen} (retired {RETIRED_ENGINE.rsplit('.', 1)[-1]} "
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


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        scenarios = _scenarios(args.scenarios)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    progress = Progress()
    state_dir = Path(args.state_dir) if args.state_dir else Path(tempfile.mkdtemp(prefix="pathwatch-demo-"))
    progress(f"starting the pathwatch sidecar and the instrumented backend (state in {state_dir}) ...")
    try:
        # the S11 rollout reaches 100% half way through its runs: the last third is all canonical
        stack = DemoStack.start(state_dir, s11_ramp_runs=max(1, args.users * args.runs // 2))
    except (DemoError, OSError) as exc:
        print(f"error: the demo could not start: {exc}", file=sys.stderr)
        return 2
    try:
        progress(f"sidecar API {stack.api_url}, backend {stack.backend.url} "
                 f"(delivery deadline {DELIVERY_DEADLINE_S:g}s, run idle {RUN_IDLE_S:g}s)")
        verdicts, shares = [], ""
        for scenario in scenarios:
            observation, findings, sampled = run_scenario(stack, scenario, args.users, args.runs, progress)
            verdicts.append(judge(observation, findings))
            if scenario == "S11":
                shares = format_shares(observation, sampled)
        elapsed = progress.elapsed_s
        print("\n" + format_results(verdicts))
        if shares:
            print("\n" + shares)
        print("\n" + report(stack).rstrip())
        print("\n" + where(stack))
        agreed = sum(v.agrees for v in verdicts)
        print(f"\npathwatch agreed with the clients on {agreed}/{len(verdicts)} scenarios "
              f"({args.users} concurrent users, {args.runs} runs each); all scenarios took {elapsed:.1f}s")
        if args.keep_running:
            _wait_for_interrupt(progress)
        return 0 if agreed == len(verdicts) else 1
    except (DemoError, DriveError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        stack.stop()


def _wait_for_interrupt(progress: Progress) -> None:
    """Keep everything up (point Prometheus/Grafana at /metrics) until Ctrl-C or SIGTERM."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    progress("still running: scrape /metrics, query the API, drive more traffic "
             "(python -m examples.traffic --url BACKEND); Ctrl-C to stop")
    try:
        while not stop.wait(0.5):  # a timed wait keeps the main thread responsive to signals
            pass
    except KeyboardInterrupt:
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
    parser.add_argument("--users", type=_positive, default=20, help="concurrent users per scenario (20)")
    parser.add_argument("--runs", type=_positive, default=3, help="runs per user and scenario (3)")
    parser.add_argument("--scenarios", default="", help="comma-separated, e.g. S0,S3 (default: all)")
    parser.add_argument("--keep-running", action="store_true",
                        help="keep the sidecar and the backend up after the table, until Ctrl-C/SIGTERM")
    parser.add_argument("--state-dir", help="where the sidecar config, incident SQLite and logs go "
                        "(default: a new temporary directory)")
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
