"""What a wrapped call costs, compared in one run (figures vary between runs and machines).

Prints per-call times of:
  1. a plain method call,
  2. the same call inside a bare SDK span carrying the same attributes pathwatch would set
     (``start_as_current_span``; same provider and processor: BatchSpanProcessor -> no-op exporter),
     and the leanest hand-written equivalent (``start_span`` + ``attach``/``detach``),
  3. the wrapped call (pathwatch instrumented from a path map),
  4. the wrapped call with pathwatch disabled (``set_enabled(False)``).
Goals: 3 <= 1.15 x 2, and 4 - 1 <= 1 us.

    .venv/bin/python benchmarks/instrumentation_overhead.py [--calls 20000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opentelemetry import context as otel_context  # noqa: E402
from opentelemetry import trace  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import (BatchSpanProcessor, SimpleSpanProcessor,  # noqa: E402
                                            SpanExporter, SpanExportResult)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

import instrumentation  # noqa: E402
from instrumentation.identity import RequestInfo, current_request  # noqa: E402

BACKEND = '''
class Context:
    def __init__(self, user_id, run_id, thread_id):
        self.user_id = user_id
        self.run_id = run_id
        self.thread_id = thread_id


class Engine:
    def __init__(self, user_context):
        self.user_context = user_context

    def execute_agent(self, context, user_context=None):
        return context.run_id
'''

PATHMAP = '''
version: 1
roles:
  execution_engine:
    kind: execute
    implementations: [pw_bench_backend.Engine]
    canonical: pw_bench_backend.Engine
    methods: [execute_agent]
    user_scoped: true
    owner: [self.user_context.user_id]
    subject: [arg.user_context.user_id, arg.context.user_id]
    run_id: [arg.context.run_id]
    thread_id: [arg.context.thread_id]
'''


class NoOpExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def per_call_us(call: Callable[[], object], calls: int, repeat: int) -> float:
    """Best of ``repeat`` runs of ``calls`` calls, in microseconds per call."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, time.perf_counter() - start)
    return best / calls * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="pw-bench-"))
    try:
        run(args, workdir)
    finally:  # the generated backend and path map go, on an error too
        if str(workdir) in sys.path:
            sys.path.remove(str(workdir))
        shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, workdir: Path) -> None:
    (workdir / "pw_bench_backend.py").write_text(textwrap.dedent(BACKEND))
    (workdir / "pathmap.yaml").write_text(textwrap.dedent(PATHMAP))
    sys.path.insert(0, str(workdir))
    key_given = "PATHWATCH_HMAC_KEY" in os.environ
    os.environ.setdefault("PATHWATCH_HMAC_KEY", "benchmark-key-not-secret")
    # the request context every wrapped call reads (as under the middleware), for this run only: a
    # caller running main() in its own process (a test) must not find a request of ours afterwards
    token = current_request.set(RequestInfo("/api/runs", "a" * 32))
    try:
        measure(args, workdir, importlib.import_module("pw_bench_backend"))
    finally:
        current_request.reset(token)
        if not key_given:
            del os.environ["PATHWATCH_HMAC_KEY"]


def measure(args: argparse.Namespace, workdir: Path, backend: Any) -> None:
    context = backend.Context("alice", "run-1", "thread-1")
    engine = backend.Engine(context)
    call = lambda: engine.execute_agent(context, user_context=context)  # noqa: E731

    plain = per_call_us(call, args.calls, args.repeat)

    # the attributes pathwatch sets, learnt from one recorded wrapped call
    probe = InMemorySpanExporter()
    probe_provider = TracerProvider()
    probe_provider.add_span_processor(SimpleSpanProcessor(probe))
    instrumentation.instrument(workdir / "pathmap.yaml", tracer_provider=probe_provider,
                               heartbeat_interval_s=0)
    backend.Engine(context).execute_agent(context, user_context=context)
    recorded = [s for s in probe.get_finished_spans() if s.name == "execution_engine.execute_agent"][0]
    attributes = dict(recorded.attributes)
    instrumentation.uninstrument()

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(NoOpExporter(), max_queue_size=65536,
                                                   schedule_delay_millis=200, max_export_batch_size=2048))
    tracer = provider.get_tracer("benchmark")

    def bare() -> object:
        with tracer.start_as_current_span("execution_engine.execute_agent", attributes=attributes):
            return engine.execute_agent(context, user_context=context)

    def lean() -> object:  # the cheapest way to make a span current around the call
        span = tracer.start_span("execution_engine.execute_agent", attributes=attributes)
        token = otel_context.attach(trace.set_span_in_context(span))
        try:
            return engine.execute_agent(context, user_context=context)
        finally:
            otel_context.detach(token)
            span.end()

    # bare spans around the unwrapped call; pathwatch is not instrumented while they run
    bare_us = per_call_us(bare, args.calls, args.repeat)
    lean_us = per_call_us(lean, args.calls, args.repeat)
    instrumentation.instrument(workdir / "pathmap.yaml", tracer_provider=provider, heartbeat_interval_s=0)
    engine = backend.Engine(context)  # built after instrument: the owner is captured
    wrapped = per_call_us(call, args.calls, args.repeat)
    instrumentation.set_enabled(False)
    disabled = per_call_us(call, args.calls, args.repeat)
    instrumentation.set_enabled(True)
    wrapped = min(wrapped, per_call_us(call, args.calls, args.repeat))
    instrumentation.uninstrument()
    engine = backend.Engine(context)
    # once more after the wrapped runs: the machine is shared, each figure takes its best run
    bare_us = min(bare_us, per_call_us(bare, args.calls, args.repeat))
    lean_us = min(lean_us, per_call_us(lean, args.calls, args.repeat))
    provider.shutdown()

    print(f"attributes per span: {len(attributes)}; calls per run: {args.calls}; best of {args.repeat}")
    print(f"plain call                 {plain:8.3f} us")
    print(f"bare SDK span + call       {bare_us:8.3f} us")
    print(f"lean SDK span + call       {lean_us:8.3f} us   (start_span + attach/detach, no context manager)")
    print(f"wrapped call (pathwatch)   {wrapped:8.3f} us   ratio to bare span: {wrapped / bare_us:.3f} "
          f"(goal <= 1.15); to lean span: {wrapped / lean_us:.3f}")
    print(f"wrapped call, disabled     {disabled:8.3f} us   added to plain: {disabled - plain:+.3f} us "
          f"(goal <= 1 us)")


if __name__ == "__main__":
    main()
