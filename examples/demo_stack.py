"""The demo's two processes: a pathwatch sidecar and the instrumented demo backend, wired together.

    with DemoStack.start(state_dir) as stack:
        stack.backend.url, stack.api_url
        with stack.following_findings() as findings:  # read as they come, from here on
            judged = stack.runs_judged()
            ... drive traffic ...
            stack.wait_judged(judged, 60)     # until the sidecar has judged every run of the traffic
        findings                              # complete here: every finding made meanwhile

The sidecar runs as ``pathwatch sidecar --config FILE`` (the config is generated: free loopback ports,
the incident SQLite under the state directory, short delivery deadline and run idle time so the demo is
quick). The backend runs under ``opentelemetry-instrument`` with pathwatch's path map, exporting over
OTLP/gRPC to the sidecar: the zero-code setup a real deployment uses.
"""

from __future__ import annotations

import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from examples.agent_backend.server import REPO_ROOT, BackendProcess, launch_backend
from examples.traffic import KEEPALIVE_EXPIRY_S
from sidecar.testing import SidecarError, SidecarProcess

PATHMAP = REPO_ROOT / "examples" / "agent_backend" / "pathmap.yaml"
BIN = Path(sys.executable).parent
#: short so the demo is quick (it waits this long after the last span), long enough that a batch
#: exported a little late under load still joins its emit (the default is 2 s)
DELIVERY_DEADLINE_S = 1.0
RUN_IDLE_S = 1.0
SERVICE_NAME = "demo-agent-backend"
#: how often ``following_findings`` reads the new findings: the sidecar keeps only the last 10,000
#: (its ring of recent findings, sidecar/incidents/recent.py), fewer than a scenario of 1,000 runs makes
FINDINGS_POLL_S = 0.2
_FINDINGS_PAGE = 10_000  # the API's largest limit


class DemoError(RuntimeError):
    """A demo process did not start, or the sidecar did not judge the traffic in time."""


def _executable(name: str) -> str:
    """The venv's console script next to this interpreter, else whatever PATH has."""
    local = BIN / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise DemoError(f"{name!r} not found next to {sys.executable} nor on PATH; run scripts/setup.sh")
    return found


def sidecar_config(state_dir: Path) -> dict[str, Any]:
    """The demo sidecar's config; ``127.0.0.1:0`` gets a free port when it starts."""
    return {
        "receiver": {"grpc_endpoint": "127.0.0.1:0", "http_endpoint": ""},
        "api": {"endpoint": "127.0.0.1:0"},
        # no export allowance: the demo exports through pathwatch's own 200 ms processor, and its
        # waits need every delivery judgement done within run_idle_s (wait_judged)
        "rules": {"delivery_deadline_s": DELIVERY_DEADLINE_S, "delivery_export_allowance_s": 0.0,
                  "run_idle_s": RUN_IDLE_S},
        "incidents": {"path": str(state_dir / "incidents.sqlite")},
        "logging": {"level": "warning"},
    }


def backend_env(grpc_port: int, s11_ramp_runs: int = 30) -> dict[str, str]:
    """The instrumentation's settings (docs/conventions.md, instrumentation/__init__.py)."""
    return {
        "PATHWATCH_PATHMAP": str(PATHMAP),
        "PATHWATCH_HMAC_KEY": secrets.token_hex(32),  # pseudonyms only: no raw user id leaves the backend
        "PATHWATCH_HEARTBEAT_INTERVAL_S": "5",
        "OTEL_SERVICE_NAME": SERVICE_NAME,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_LOGS_EXPORTER": "none",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{grpc_port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        # a burst of 20 users must never overflow the batch queue (the default queue holds 2048)
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_BSP_MAX_QUEUE_SIZE": "65536",
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2048",
        "DEMO_SCENARIO": "S0",
        "DEMO_S11_RAMP_RUNS": str(s11_ramp_runs),
    }


def _poll(condition: Callable[[], bool], timeout_s: float, what: str, *,
          gone: Callable[[], str | None] = lambda: None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        exited = gone()
        if exited:
            raise DemoError(f"{exited} while waiting for {what}")
        time.sleep(0.05)  # poll interval of a deadline loop, not synchronization
    raise DemoError(f"timed out after {timeout_s:g}s waiting for {what}" + (f" (log: {log})" if log else ""))


def _client(api_url: str) -> httpx.Client:
    # the sidecar's API is uvicorn too: idle connections go before it closes them (see the constant)
    return httpx.Client(base_url=api_url, timeout=5.0, limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S))


class DemoStack:
    def __init__(self, sidecar: SidecarProcess, backend: BackendProcess, state_dir: Path) -> None:
        self.sidecar = sidecar
        self.backend = backend
        self.state_dir = state_dir
        self._http = _client(sidecar.api_url)

    @classmethod
    def start(cls, state_dir: Path, *, s11_ramp_runs: int = 30,
              launching: Callable[[], AbstractContextManager[object]] = nullcontext) -> DemoStack:
        """``pathwatch sidecar`` on free loopback ports, then the backend exporting to it, both ready
        (stopped again if either does not get there). Each process is launched inside ``launching()``:
        the demo defers its signals there, as an exception raised inside ``subprocess.Popen`` would leave
        the new process running with nothing to stop it by."""
        # absolute: the sidecar runs in it, and would read a relative incidents.path from there
        state_dir = state_dir.absolute()
        state_dir.mkdir(parents=True, exist_ok=True)
        sidecar: SidecarProcess | None = None
        backend: BackendProcess | None = None
        try:
            sidecar = SidecarProcess(sidecar_config(state_dir), state_dir=state_dir, console_script=True)
            with launching():
                sidecar.start()
            sidecar.wait_ready(30.0)
            grpc_port = int(sidecar.grpc_endpoint.rpartition(":")[2])
            launcher = [_executable("opentelemetry-instrument")]
            with launching():
                backend = launch_backend(env=backend_env(grpc_port, s11_ramp_runs), launcher=launcher,
                                         log_path=state_dir / "backend.log")
            backend.wait_ready(60.0)
        except BaseException as exc:
            if backend is not None:
                backend.stop()
            if sidecar is not None:
                sidecar.stop()
            if isinstance(exc, SidecarError):
                raise DemoError(str(exc)) from None
            raise
        return cls(sidecar, backend, state_dir)

    @property
    def api_url(self) -> str:
        return self.sidecar.api_url

    # --- reading the sidecar ---------------------------------------------------------------
    def sidecar_exited(self) -> str | None:
        """What happened to the sidecar if its process has exited (a Ctrl-C in the terminal reaches it
        too), else None."""
        code = self.sidecar.process.poll() if self.sidecar.process is not None else None
        return None if code is None else f"the sidecar exited with code {code} (log: {self.sidecar.log_path})"

    def backend_exited(self) -> str | None:
        """What happened to the backend if its process has exited, else None."""
        code = self.backend.process.poll()
        return None if code is None else f"the backend exited with code {code} (log: {self.backend.log_path})"

    def exited(self) -> str | None:
        return self.sidecar_exited() or self.backend_exited()

    def _get(self, path: str, params: dict[str, str] | None = None, *,
             http: httpx.Client | None = None) -> httpx.Response:
        try:
            return (http or self._http).get(path, params=params)
        except httpx.HTTPError as exc:
            raise DemoError(self.sidecar_exited() or f"the sidecar did not answer {path}: {exc!r}") from None

    def metrics(self) -> dict[str, float]:
        """``name{label="v",...}`` -> value, from /metrics."""
        text = self._get("/metrics").text
        values: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return values

    def runs_judged(self) -> int:
        """Runs the delivery detector has judged complete or incomplete (after ``run_idle_s``)."""
        metrics = self.metrics()
        return int(sum(value for key, value in metrics.items()
                       if key.startswith("pathwatch_runs_completed_total{")
                       and 'outcome="evicted"' not in key))

    def findings_cursor(self) -> int:
        return int(self._get("/api/v1/findings", params={"limit": "1"}).json()["last_seq"])

    def findings(self, after: int = 0) -> list[dict[str, Any]]:
        """Every finding after seq ``after``; ``DemoError`` if the sidecar has dropped some of them."""
        return self._findings_after(after, self._http)[0]

    def _findings_after(self, after: int, http: httpx.Client) -> tuple[list[dict[str, Any]], int]:
        """The findings after seq ``after`` and the seq read up to. A verdict on a partial list would
        blame pathwatch for the runs whose findings the sidecar's ring has evicted: that is an error."""
        found: list[dict[str, Any]] = []
        while True:
            page = self._get("/api/v1/findings", params={"after": str(after), "limit": str(_FINDINGS_PAGE)},
                             http=http).json()
            # from after=0, the oldest held: a sidecar's seqs count from its start time, not 1
            dropped = page["first_seq"] - after - 1 if after else page["evicted"]
            if dropped > 0:
                raise DemoError(
                    f"the sidecar's ring of recent findings (the last {page['capacity']:,}) dropped "
                    f"{dropped:,} findings before the demo read them, so the "
                    "verdicts would blame pathwatch for runs it did find; run fewer --users x --runs")
            found.extend(page["findings"])
            after = page["next_after"]  # everything up to it was examined
            if len(page["findings"]) < _FINDINGS_PAGE:
                return found, after

    @contextmanager
    def following_findings(self) -> Iterator[list[dict[str, Any]]]:
        """The findings made while the body runs, complete when it returns: a thread of its own reads
        them every ``FINDINGS_POLL_S`` (on a connection of its own), then the body's end once more, so
        a scenario may make more findings than the sidecar keeps. ``DemoError`` if some were dropped
        before they were read all the same."""
        after = self.findings_cursor()
        found: list[dict[str, Any]] = []
        failed: list[Exception] = []
        stop = threading.Event()
        http = _client(self.api_url)

        def follow() -> None:
            nonlocal after
            while not stop.wait(FINDINGS_POLL_S):
                try:
                    page, after = self._findings_after(after, http)
                except Exception as exc:  # told by the body's end; the sidecar may be gone
                    failed.append(exc)
                    return
                found.extend(page)

        thread = threading.Thread(target=follow, name="demo-findings", daemon=True)
        thread.start()
        try:
            yield found
        finally:
            stop.set()
            thread.join()
            http.close()
        if failed:
            raise failed[0]
        found.extend(self._findings_after(after, self._http)[0])

    def inventory(self) -> dict[str, Any]:
        return self._get("/api/v1/inventory").json()

    def wait_judged(self, runs_before: int, runs: int, timeout_s: float = 30.0) -> None:
        """Wait until the sidecar has judged ``runs`` more runs than ``runs_before``, then until the findings
        count is stable for a few pipeline ticks (findings are recorded right after the tick that counts).

        Judging a run needs ``run_idle_s`` without a span of it; every emit was received before its run's
        last span, and ``delivery_deadline_s + delivery_export_allowance_s <= run_idle_s``, so by then every delivery deadline of the
        traffic has passed too.
        """
        _poll(lambda: self.runs_judged() >= runs_before + runs, timeout_s,
              f"the sidecar to judge {runs} runs", gone=self.exited, log=self.sidecar.log_path)
        last = self.findings_cursor()
        stable_since = time.monotonic()
        deadline = stable_since + timeout_s
        while time.monotonic() - stable_since < 0.3 and time.monotonic() < deadline:  # 3 ticks unchanged
            time.sleep(0.05)  # poll interval
            now = self.findings_cursor()
            if now != last:
                last, stable_since = now, time.monotonic()

    # --- lifecycle -------------------------------------------------------------------------
    def stop(self) -> None:
        self._http.close()
        self.backend.stop()
        self.sidecar.stop()

    def __enter__(self) -> DemoStack:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
