"""What pathwatch's export queue holds of the backend's memory while the sidecar is down.

Each figure is one fresh process: pathwatch instruments a generated backend with an OTLP endpoint on
which nothing listens, makes ``--calls`` wrapped calls (one span each), and prints how much its RSS
grew, how many spans stayed queued and how many were dropped (counted). Run with pathwatch's default
queue (65,536 spans) and with ``OTEL_BSP_MAX_QUEUE_SIZE`` set to each ``--queue`` size given.

    .venv/bin/python benchmarks/export_queue_memory.py [--calls 70000] [--queue 8192 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.instrumentation_overhead import BACKEND, PATHMAP  # noqa: E402
from sidecar.testing import free_port  # noqa: E402

CHILD = '''
import json, os, sys
sys.path[:0] = [{workdir!r}, {root!r}]
import instrumentation
from instrumentation.identity import RequestInfo, current_request

def rss_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

setup = instrumentation.instrument({pathmap!r}, endpoint={endpoint!r}, heartbeat_interval_s=0)
import pw_bench_backend as backend
current_request.set(RequestInfo("/api/runs", "a" * 32))
context = backend.Context("alice", "run-1", "thread-1")
engine = backend.Engine(context)
engine.execute_agent(context)
before = rss_mib()
for _ in range({calls}):
    engine.execute_agent(context)
grown = rss_mib() - before
queue = setup._export.processor._batch_processor._queue
print(json.dumps({{"grown_mib": grown, "queued": len(queue),
                  "dropped": instrumentation.exporting.drops.dropped}}))
os._exit(0)  # not the shutdown's flush to a closed port (5 s); the figures are printed
'''


def measure(workdir: Path, calls: int, queue_size: int | None) -> dict:
    script = CHILD.format(workdir=str(workdir), root=str(ROOT), pathmap=str(workdir / "pathmap.yaml"),
                          endpoint=f"127.0.0.1:{free_port()}", calls=calls)  # nothing listens there
    env = {**os.environ, "PATHWATCH_HMAC_KEY": "benchmark-key-not-secret"}
    env.pop("OTEL_BSP_MAX_QUEUE_SIZE", None)
    if queue_size is not None:
        env["OTEL_BSP_MAX_QUEUE_SIZE"] = str(queue_size)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=70_000)
    parser.add_argument("--queue", type=int, nargs="*", default=[8192, 2048])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pw-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "pw_bench_backend.py").write_text(textwrap.dedent(BACKEND))
        (workdir / "pathmap.yaml").write_text(textwrap.dedent(PATHMAP))
        for size in (None, *args.queue):
            figures = measure(workdir, args.calls, size)
            label = "default queue (65,536)" if size is None else f"OTEL_BSP_MAX_QUEUE_SIZE={size:,}"
            print(f"{label}: {args.calls:,} calls with the sidecar down -> {figures['queued']:,} "
                  f"spans queued, {figures['dropped']:,} dropped (counted); RSS +"
                  f"{figures['grown_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
