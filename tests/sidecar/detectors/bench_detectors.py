"""Micro benchmark: spans per second through the standard detector set (prints, asserts nothing).

    .venv/bin/python -m tests.sidecar.detectors.bench_detectors [runs]

Realistic traffic: concurrent clean runs (request, engine execute, 5 emits each written once to the
user's socket: 12 spans per run), interleaved, in batches of 512, with a tick every 100 ms of
simulated time. Spans are built before the clock starts. Best of three, per garbage-collector
setting: Python's default (gen0 threshold 700) and a raised gen0 threshold, because the cyclic GC
walking the young SpanRecords the detectors keep is a large share of the cost at default settings.
"""

from __future__ import annotations

import gc
import sys
import time

from prometheus_client import CollectorRegistry

from sidecar.detectors import build_detectors
from sidecar.telemetry import Telemetry
from tests.sidecar.detectors.factory import MS, NOW, T0, clean_run, rules, state

BATCH = 512


def build_traffic(runs: int) -> list:
    spans = []
    group = []
    for i in range(runs):
        group.append(clean_run(f"user-{i % 500}", start_ns=T0 + i * MS // 10))
        if len(group) == 20:  # twenty concurrent runs interleave
            spans += [span for run in zip(*group) for span in run]
            group = []
    for run in group:
        spans += run
    return spans


def measure(runs: int) -> tuple[int, float, int]:
    spans = build_traffic(runs)
    detectors = build_detectors(rules(), state(), Telemetry(CollectorRegistry()))
    findings = 0
    now = NOW
    next_tick = now + 100 * MS
    started = time.perf_counter()
    for offset in range(0, len(spans), BATCH):
        batch = spans[offset:offset + BATCH]
        now += len(batch) * 10_000  # ~100 k spans per simulated second
        for detector in detectors:
            findings += len(detector.consume(batch, now))
        if now >= next_tick:
            next_tick = now + 100 * MS
            for detector in detectors:
                findings += len(detector.tick(now))
    for detector in detectors:
        findings += len(detector.tick(now + 60 * 10**9))
    return len(spans), time.perf_counter() - started, findings


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    default = gc.get_threshold()
    for label, threshold in (("default GC", default), ("GC gen0 threshold 10000", (10_000, 10, 10))):
        gc.set_threshold(*threshold)
        best = 0.0
        for _ in range(3):
            count, seconds, findings = measure(runs)
            best = max(best, count / seconds)
        print(f"{label:24s}: {best:,.0f} spans/s through bleed+duplicates+delivery+inventory "
              f"({count} spans, {findings} findings on clean traffic)")
    gc.set_threshold(*default)


if __name__ == "__main__":
    main()
