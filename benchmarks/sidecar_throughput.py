"""Sidecar throughput: decode ceiling, end-to-end spans/s over gRPC with every detector, their
ratio, p99 receipt-to-finding latency and peak RSS with many runs in flight; and what the same
requests cost as OTLP/JSON (converted to the decoder's input, then decoded).

    .venv/bin/python benchmarks/sidecar_throughput.py [--runs 50000] [--clients 2] [--in-flight 4]

The sidecar runs as a real process (``python -m sidecar``) built by ``sidecar.app`` with whatever
detectors it wires in, pinned to CPU 0 ("one core"); the load comes from client processes on the
other CPU, sending pre-encoded realistic requests (request / execute / emit / deliver spans of
distinct runs, users, run ids and event ids, as the instrumentation would produce them; one run
in 100 seeded with a bleed) with several calls in flight through gRPC futures, retrying when the
memory limiter refuses. Goals: >= 100,000 spans/s on one core, ratio >= 0.5, p99 <= 100 ms,
RSS <= 300 MiB. Figures vary by up to 1.7x between runs on a shared machine: compare in one run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceRequest)
from opentelemetry.proto.trace.v1.trace_pb2 import Span  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from instrumentation import attributes as A  # noqa: E402
from sidecar.receiver.decode import SpanDecoder  # noqa: E402
from sidecar.receiver.otlp_json import json_to_protobuf  # noqa: E402
from sidecar.testing import SidecarError, SidecarProcess  # noqa: E402
from tests.sidecar.receiver.otlp_payloads import (  # noqa: E402
    export_order,
    make_request,
    otlp_json,
    run_spans,
)

METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
RUNS_PER_REQUEST = 40  # 480 spans: close to the SDK BatchSpanProcessor's 512
BLEED_EVERY = 100
# as pathwatch sends them: the key that made the user ids on the scope, and on request spans
KEY_ID = "3d828fc7"
SCOPE = {A.PSEUDONYM_KEY_ID: KEY_ID}
USERS = 5000
DRIVE_TIMEOUT_S = 600.0  # one load phase, start to processed (normally seconds)


# --- realistic requests, fast: stamp a template run with fresh ids --------------------------
class RunStamper:
    """``run_spans`` makes a realistic run but costs ~50 µs a span; stamping copies of one
    template run with new ids, users, run and event ids gives the same shape ~10x faster."""

    _PER_RUN = {A.RUN_ID: "run-{run}", A.CONVERSATION_THREAD_ID: "thread-{run}",
                A.INSTANCE_ID: "inst-{run}", A.CONNECTION_ID: "conn-{user}",
                A.ENDUSER_PSEUDO_ID: "{user_id}", A.USER_SUBJECT: "{user_id}",
                A.USER_TARGET: "{user_id}", A.CONNECTION_USER: "{user_id}",
                A.USER_OWNER: "{owner_id}"}

    def __init__(self) -> None:
        self._template = export_order(run_spans(0, random.Random(0), key_id=KEY_ID))
        self._plans = []
        for span in self._template:
            plan = [(i, self._PER_RUN[kv.key]) for i, kv in enumerate(span.attributes)
                    if kv.key in self._PER_RUN]
            event = [(i, kv.value.string_value.rsplit("-", 1)[1])  # evt-{run}-{number}
                     for i, kv in enumerate(span.attributes) if kv.key == A.MESSAGING_MESSAGE_ID]
            self._plans.append((plan, event[0] if event else None))
        self._parents = [self._template.index(next(p for p in self._template
                                                   if p.span_id == s.parent_span_id))
                         if s.parent_span_id else None for s in self._template]
        # an emit's execution (pathwatch.execution.span_id): the index of the span it names
        self._executions = [
            [(i, next(n for n, p in enumerate(self._template) if p.span_id.hex() == kv.value.string_value))
             for i, kv in enumerate(span.attributes) if kv.key == A.EXECUTION_SPAN_ID]
            for span in self._template]

    def spans(self, run: int) -> list[Span]:
        user, owner = run % USERS, (run + 1) % USERS if run % BLEED_EVERY == BLEED_EVERY - 1 else run % USERS
        values = {"run": run, "user": user, "user_id": f"{user:032x}", "owner_id": f"{owner:032x}"}
        trace_id = struct.pack(">QQ", run + 1, 0xABCDEF)
        span_ids = [struct.pack(">II", run + 1, index + 1) for index in range(len(self._template))]
        spans = []
        for index, (template, (plan, event_at)) in enumerate(zip(self._template, self._plans)):
            span = Span()
            span.CopyFrom(template)
            span.trace_id, span.span_id = trace_id, span_ids[index]
            parent = self._parents[index]
            if parent is not None:
                span.parent_span_id = span_ids[parent]
            for at, pattern in plan:
                span.attributes[at].value.string_value = pattern.format(**values)
            for at, named in self._executions[index]:
                span.attributes[at].value.string_value = span_ids[named].hex()
            if event_at is not None:
                at, number = event_at
                span.attributes[at].value.string_value = f"evt-{run}-{number}"
            spans.append(span)
        return spans


def build_requests(first_run: int, runs: int) -> list[bytes]:
    stamper = RunStamper()
    bodies = []
    for start in range(first_run, first_run + runs, RUNS_PER_REQUEST):
        spans = [s for run in range(start, min(start + RUNS_PER_REQUEST, first_run + runs))
                 for s in stamper.spans(run)]
        bodies.append(make_request(spans, scope=SCOPE).SerializeToString())
    return bodies


def spans_in(body: bytes) -> int:
    return sum(len(scope.spans) for rs in ExportTraceServiceRequest.FromString(body).resource_spans
               for scope in rs.scope_spans)


# --- the load: client processes with several calls in flight -------------------------------
def client(endpoint: str, first_run: int, runs: int, in_flight: int, pace_spans_s: float,
           ready, go, results) -> None:
    import grpc

    _pin(1)
    bodies = [(body, spans_in(body)) for body in build_requests(first_run, runs)]
    channel = grpc.insecure_channel(endpoint)
    export = channel.unary_unary(METHOD)
    ready.put(sum(count for _, count in bodies))
    go.wait()
    pending, flying, refused, started = list(reversed(bodies)), [], 0, time.monotonic()
    sent_spans = 0
    while pending or flying:
        while pending and len(flying) < in_flight:
            if pace_spans_s and sent_spans / pace_spans_s > time.monotonic() - started:
                break  # paced (the latency phase): not yet
            body, count = pending.pop()
            flying.append((export.future(body, timeout=120), (body, count)))
            sent_spans += count
        if not flying:
            time.sleep(0.001)
            continue
        future, item = flying.pop(0)
        try:
            future.result()
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                raise
            refused += 1
            pending.append(item)
            time.sleep(0.02)  # the memory limiter said "later"
    channel.close()
    results.put(refused)


def _pin(cpu: int, pid: int = 0) -> None:
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(pid, {cpu})


# --- the sidecar process ---------------------------------------------------------------------
class Sidecar(SidecarProcess):
    """The sidecar under test, pinned to CPU 0, with its log in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        super().__init__({"receiver": {"http_endpoint": ""}, "logging": {"level": "warning"}},
                         state_dir=workdir)
        self.start()
        _pin(0, self.process.pid)  # before its gRPC threads start: they inherit the CPU
        try:
            self.wait_ready(30)
        except SidecarError as exc:
            self.stop()
            raise SystemExit(f"the sidecar did not become ready: {exc}") from None

    def samples(self) -> dict[tuple[str, tuple], float]:
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(self.metrics()) for s in family.samples}

    def processed(self) -> float:
        samples = self.samples()
        accepted = samples.get(("pathwatch_receiver_spans_total",
                                (("outcome", "accepted"), ("protocol", "grpc"))), 0.0)
        return accepted - samples.get(("pathwatch_receiver_pending_spans", ()), 0.0)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the sidecar process so far (all its threads)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def cpu_by_part(self) -> dict[str, float]:
        """CPU seconds so far per part of the sidecar, from its named OS threads (sidecar/threads.py):
        ``decode`` (the gRPC workers: decode and submit), ``detectors`` (the pipeline thread),
        ``other`` (gRPC's own threads, API, alerts, start-up)."""
        parts = {"decode": 0.0, "detectors": 0.0, "other": 0.0}
        tick = os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            try:
                name = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue  # the thread ended meanwhile
            part = ("decode" if name.startswith("pw-grpc") else
                    "detectors" if name == "pw-pipeline" else "other")
            parts[part] += (int(fields[11]) + int(fields[12])) / tick
        return parts

    def memory_mib(self) -> tuple[float, float]:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)



def latency_quantile(samples: dict, before: dict, quantile: float) -> tuple[float, int]:
    """histogram_quantile over the increase of pathwatch_pipeline_latency_seconds."""
    buckets = sorted(
        (float(dict(labels)["le"]), value - before.get((name, labels), 0.0))
        for (name, labels), value in samples.items()
        if name == "pathwatch_pipeline_latency_seconds_bucket")
    total = buckets[-1][1] if buckets else 0
    if not total:
        return float("nan"), 0
    rank, lower, below = quantile * total, 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower, int(total)
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-9), int(total)
        lower, below = bound, count
    return lower, int(total)


def gc_pauses(samples: dict) -> dict[str, tuple[float, float]]:
    """generation -> (collections, seconds paused) so far, from pathwatch_gc_pause_seconds."""
    pauses: dict[str, list[float]] = {}
    for (name, labels), value in samples.items():
        if name in ("pathwatch_gc_pause_seconds_count", "pathwatch_gc_pause_seconds_sum"):
            entry = pauses.setdefault(dict(labels)["generation"], [0.0, 0.0])
            entry[name.endswith("_sum")] = value
    return {generation: (count, seconds) for generation, (count, seconds) in pauses.items()}


# --- the phases ------------------------------------------------------------------------------
def decode_ceiling(bodies: list[bytes], repeat: int = 3) -> float:
    decoder, spans = SpanDecoder(), sum(spans_in(b) for b in bodies)
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for body in bodies:
            decoder.decode(body, 0)
        best = min(best, time.process_time() - started)
    return spans / best


def json_ceiling(bodies: list[bytes], repeat: int = 3) -> float:
    """The same requests as OTLP/JSON: converted (``otlp_json.py``) and decoded, one thread."""
    json_bodies = [otlp_json(ExportTraceServiceRequest.FromString(body)) for body in bodies]
    decoder, spans = SpanDecoder(), sum(spans_in(b) for b in bodies)
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        for body in json_bodies:
            decoder.decode(json_to_protobuf(body).body, 0)
        best = min(best, time.process_time() - started)
    return spans / best


def drive(sidecar: Sidecar, runs: int, clients: int, in_flight: int, first_run: int = 0,
          pace_spans_s: float = 0.0) -> tuple[int, float, float, int, dict[str, float]]:
    """Send ``runs`` runs; returns (spans, seconds until all were processed, the sidecar's CPU
    seconds meanwhile, refusals, those CPU seconds per part of the sidecar)."""
    context = multiprocessing.get_context("spawn")
    ready, results, go = context.Queue(), context.Queue(), context.Event()
    share = -(-runs // clients)
    workers = [context.Process(target=client, args=(
        sidecar.grpc_endpoint, first_run + i * share, min(share, runs - i * share), in_flight,
        pace_spans_s / clients, ready, go, results)) for i in range(clients)]
    for worker in workers:
        worker.start()
    completed = False
    try:
        total = sum(ready.get(timeout=600) for _ in workers)
        baseline = sidecar.processed()
        cpu_before, parts_before = sidecar.cpu_seconds(), sidecar.cpu_by_part()
        started = time.monotonic()
        go.set()
        # No scrape while the load runs (a scrape of /metrics costs the sidecar CPU, and
        # Prometheus scrapes every 15 s or more, not 10 times a second): wait for the clients'
        # last answers, then poll until the pipeline has processed every span. A dead sidecar or
        # client ends the run.
        deadline = started + DRIVE_TIMEOUT_S
        refusals = 0
        for _ in workers:
            while True:
                try:
                    refusals += results.get(timeout=0.05)
                    break
                except queue.Empty:
                    _check_alive(sidecar, workers, deadline)
        while sidecar.processed() - baseline < total:
            _check_alive(sidecar, workers, deadline)
            time.sleep(0.05)  # the drain after the last answer is short: a few polls
        elapsed = time.monotonic() - started
        cpu = sidecar.cpu_seconds() - cpu_before
        parts = {part: seconds - parts_before[part]
                 for part, seconds in sidecar.cpu_by_part().items()}
        completed = True
    finally:  # a failed run must not leave clients waiting (they would keep this process alive)
        for worker in workers:
            worker.join(30 if completed else 0)
            if worker.is_alive():
                worker.terminate()
                worker.join(5)
    return total, elapsed, cpu, refusals, parts


def _check_alive(sidecar: Sidecar, workers: list, deadline: float) -> None:
    if sidecar.process.poll() is not None:
        raise SystemExit(f"the sidecar exited (code {sidecar.process.returncode}) during the load")
    if any(w.exitcode not in (None, 0) for w in workers):
        raise SystemExit("a load client failed")
    if time.monotonic() > deadline:
        raise SystemExit(f"the load did not complete within {DRIVE_TIMEOUT_S:.0f} s")


def interpreter() -> str:
    """What runs the sidecar and the decode ceiling: the interpreter's build moves every figure
    (docs/sidecar.md, Throughput). The configure options that matter, and whether the running
    executable calls the interpreter through a shared libpython (position-independent code) or
    holds it. The sidecar image's ``python:3.11-slim`` has --enable-optimizations (PGO) and
    --with-lto, and a shared libpython."""
    import platform
    import sysconfig
    options = sysconfig.get_config_var("CONFIG_ARGS") or ""
    try:
        with open("/proc/self/maps") as maps:
            shared = any("libpython" in line for line in maps)
        linked = "shared libpython" if shared else "libpython in the executable"
    except OSError:
        linked = "libpython: unknown"
    flags = ", ".join(f"{flag} {'yes' if flag in options else 'no'}"
                      for flag in ("--enable-optimizations", "--with-lto"))
    return (f"interpreter: {platform.python_implementation()} {platform.python_version()} "
            f"({os.path.realpath(sys.executable)}): {flags}, {linked}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50_000, help="runs for the end-to-end phase")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--in-flight", type=int, default=4, help="calls in flight per client")
    args = parser.parse_args()
    _pin(1)
    print(interpreter())

    sample = build_requests(0, 4000)
    before = decode_ceiling(sample)
    print(f"decode ceiling (one thread, {sum(map(spans_in, sample)):,} spans, CPU time): "
          f"{before:,.0f} spans/s")
    as_json = json_ceiling(sample[:10])
    print(f"the same as OTLP/JSON, converted and decoded ({sum(map(spans_in, sample[:10])):,} spans): "
          f"{as_json:,.0f} spans/s ({1e6 / as_json:.1f} µs a span)")

    with tempfile.TemporaryDirectory() as workdir:
        sidecar = Sidecar(Path(workdir))
        try:
            gc_before = gc_pauses(sidecar.samples())
            spans, elapsed, cpu, refusals, parts = drive(sidecar, args.runs, args.clients,
                                                         args.in_flight)
            gc_after = gc_pauses(sidecar.samples())
            rate = spans / elapsed
            rss, peak = sidecar.memory_mib()
            # the machine's speed drifts (a shared host): the ceiling again right after the load,
            # and the ratio against the mean of both, with the drift printed
            after = decode_ceiling(sample)
            ceiling = (before + after) / 2
            print(f"end-to-end over gRPC, all detectors: {spans:,} spans ({args.runs:,} runs) in "
                  f"{elapsed:.1f} s = {rate:,.0f} spans/s wall; sidecar CPU {cpu:.1f} s = "
                  f"{spans / cpu:,.0f} spans per CPU-second ({refusals} refused calls retried)")
            print("sidecar CPU per span: " + ", ".join(
                f"{part} {seconds / spans * 1e6:.2f} µs" for part, seconds in parts.items())
                + f" (decode alone, ceiling: {1e6 / ceiling:.2f} µs)")
            print("of which garbage-collector pauses (pathwatch_gc_pause_seconds): " + ", ".join(
                f"generation {g} {gc_after[g][0] - gc_before[g][0]:.0f}x "
                f"{(gc_after[g][1] - gc_before[g][1]) / spans * 1e6:.2f} µs"
                for g in sorted(gc_after)) + " per span")
            print(f"decode ceiling again after the load: {after:,.0f} spans/s "
                  f"(drift {abs(after - before) / ceiling:.0%})")
            print(f"ratio end-to-end / decode ceiling (mean of both): {rate / ceiling:.2f}")
            print(f"RSS after {args.runs:,} runs: {rss:.0f} MiB (peak {peak:.0f} MiB)")

            before = sidecar.samples()
            pace = rate * 0.5
            lat_spans, lat_elapsed, _, _, _ = drive(sidecar, 10_000, args.clients, args.in_flight,
                                              first_run=args.runs, pace_spans_s=pace)
            p99, findings = latency_quantile(sidecar.samples(), before, 0.99)
            p50, _ = latency_quantile(sidecar.samples(), before, 0.50)
            print(f"receipt-to-finding at ~{pace:,.0f} spans/s offered ({lat_spans / lat_elapsed:,.0f}"
                  f" achieved, {findings} findings): p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
        finally:
            code = sidecar.stop(timeout=120)
        print(f"sidecar exit code after SIGTERM: {code}")
    print("goals: >= 100,000 spans/s on one core, ratio >= 0.5, p99 <= 100 ms, RSS <= 300 MiB")


if __name__ == "__main__":
    main()
