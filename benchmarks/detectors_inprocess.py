"""Each detector's cost per span, in-process: the detectors a running sidecar builds (``Sidecar``,
not started), fed the requests of ``sidecar_throughput.py`` decoded beforehand and merged into
detector calls of up to 8,192 spans as the pipeline merges them. Prints µs a span per detector and
their total; the collector is off while a detector runs (its pauses land on whichever detector
allocates at the wrong moment: ``sidecar_throughput.py`` prints them on their own).

    .venv/bin/python benchmarks/detectors_inprocess.py [--runs N] [--repeat 3] [--inline]

``--inline`` prints instead what one thread costs decoding each request and running every detector
on it at once, the collector on with the sidecar's settings (run it pinned: ``taskset -c 0``): the
bound of any change to the sidecar's threads (no receiver threads, no queue, no gRPC), beside the
same with up to 8,192 spans merged before the detectors, and the decode ceiling.

For a change to the per-span path, compare the printed figures of two trees in one sitting
(alternately, twice each); then confirm end to end with ``sidecar_throughput.py``. Each repeat
builds a fresh sidecar (empty state), so the best of the repeats is read.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidecar_throughput import build_requests  # noqa: E402

from sidecar.app import (GC_GEN0_THRESHOLD, GC_GEN1_THRESHOLD, GC_GEN2_THRESHOLD,  # noqa: E402
                         Sidecar)
from sidecar.config import SidecarConfig  # noqa: E402
from sidecar.pipeline import _MAX_MERGED_SPANS as MERGED_SPANS  # noqa: E402
from sidecar.receiver.decode import SpanDecoder  # noqa: E402


def merged_batches(runs: int) -> list[list]:
    decoder = SpanDecoder()
    batches, current = [], []
    for body in build_requests(0, runs):
        spans = decoder.decode(body, time.monotonic_ns()).spans
        if len(current) + len(spans) > MERGED_SPANS:
            batches.append(current)
            current = []
        current.extend(spans)
    batches.append(current)
    return batches


def measure(batches: list[list], state_dir: str) -> dict[str, float]:
    """Seconds per detector over every batch, on a fresh sidecar's detectors."""
    config = SidecarConfig.model_validate({"incidents": {"path": f"{state_dir}/incidents.sqlite"}})
    sidecar = Sidecar(config)
    try:
        seconds = {getattr(d, "name", type(d).__name__): 0.0 for d in sidecar.detectors}
        now_ns = time.time_ns()
        gc.collect()
        gc.disable()
        try:
            for batch in batches:
                for detector in sidecar.detectors:
                    started = time.perf_counter()
                    detector.consume(batch, now_ns)
                    seconds[getattr(detector, "name", type(detector).__name__)] += (
                        time.perf_counter() - started)
        finally:
            gc.enable()
        return seconds
    finally:
        sidecar.shutdown(quiet=True)  # never started: closes the store and the ledger, frees the lock


def inline(bodies: list[bytes], merged: int, state_dir: str) -> tuple[float, float, int]:
    """CPU seconds decoding and in the detectors, and spans, for one thread that decodes each
    request and hands every ``merged`` spans (or more: whole requests) to every detector at once."""
    config = SidecarConfig.model_validate({"incidents": {"path": f"{state_dir}/incidents.sqlite"}})
    sidecar = Sidecar(config)
    decoder = SpanDecoder()
    decoding = detecting = 0.0
    spans, pending = 0, []
    thresholds = gc.get_threshold()
    gc.collect()
    gc.freeze()  # as the sidecar does after start-up
    gc.set_threshold(GC_GEN0_THRESHOLD, GC_GEN1_THRESHOLD, GC_GEN2_THRESHOLD)
    try:
        for body in bodies:
            started = time.process_time()
            pending.extend(decoder.decode(body, time.monotonic_ns()).spans)
            decoded = time.process_time()
            decoding += decoded - started
            if len(pending) >= merged:
                now_ns = time.time_ns()
                for detector in sidecar.detectors:
                    detector.consume(pending, now_ns)
                spans += len(pending)
                pending = []
                detecting += time.process_time() - decoded
        return decoding, detecting, spans
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
        sidecar.shutdown(quiet=True)


def ceiling(bodies: list[bytes]) -> float:
    """µs a span decoding alone (the benchmark's decode ceiling: a tight loop)."""
    decoder = SpanDecoder()
    spans, started = 0, time.process_time()
    for body in bodies:
        spans += len(decoder.decode(body, time.monotonic_ns()).spans)
    return (time.process_time() - started) / spans * 1e6


def main_inline(runs: int) -> None:
    bodies = list(build_requests(0, runs))
    print(f"one thread, decode then every detector ({runs:,} runs; decode ceiling "
          f"{ceiling(bodies[:100]):.2f} µs a span):")
    for merged in (1, MERGED_SPANS):
        with tempfile.TemporaryDirectory(prefix="pw-inline-") as state_dir:
            decoding, detecting, spans = inline(bodies, merged, state_dir)
        total = decoding + detecting
        label = "each request" if merged == 1 else f"{merged:,} spans merged"
        print(f"  {label:<20} {total / spans * 1e6:5.2f} µs a span (decode "
              f"{decoding / spans * 1e6:.2f}, detectors {detecting / spans * 1e6:.2f}) = "
              f"{spans / total:,.0f} spans/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, help="runs of spans (20,000; --inline: 50,000)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--inline", action="store_true",
                        help="one thread decoding then detecting, per request and merged")
    args = parser.parse_args()
    if args.inline:
        main_inline(args.runs or 50000)
        return
    args.runs = args.runs or 20000
    batches = merged_batches(args.runs)
    spans = sum(map(len, batches))
    best: dict[str, float] = {}
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="pw-detectors-") as state_dir:
            for name, seconds in measure(batches, state_dir).items():
                best[name] = min(best.get(name, seconds), seconds)
    print(f"detectors in-process ({spans:,} spans of {args.runs:,} runs, calls of up to "
          f"{MERGED_SPANS:,} spans, best of {args.repeat}):")
    for name, seconds in best.items():
        print(f"  {name:<12} {seconds / spans * 1e6:6.3f} µs a span")
    print(f"  {'total':<12} {sum(best.values()) / spans * 1e6:6.3f} µs a span "
          f"({spans / sum(best.values()):,.0f} spans/s)")


if __name__ == "__main__":
    main()
