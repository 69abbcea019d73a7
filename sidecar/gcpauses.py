"""The sidecar's own garbage-collector pauses, as ``pathwatch_gc_pause_seconds{generation}``.

The detectors hold hundreds of thousands of live objects; Python's cyclic collector stops every
thread of the process while it walks them (a young collection a few ms, an older one hundreds of
ms with a large state), and such a pause delays every finding behind it. Operators should see it
beside ``pathwatch_pipeline_latency_seconds``.

A ``gc.callbacks`` hook runs inside the collector, on whichever thread triggered it, possibly while
that thread holds a metric's lock: it must not take any lock. It adds the pause to its generation's
bucket count and sum in place, a few integer and float additions, so no pause is ever forgotten
however long nobody scrapes, in fixed memory. No lock is needed: only the hook writes, and CPython
runs one collection at a time, its callbacks included (``gcstate->collecting``); a scrape only reads
(it may run while a hook is between its bucket and its sum: that pause is then in the scrape's
``_count`` and not yet in its ``_sum``, which the next scrape has).
"""

from __future__ import annotations

import bisect
import gc
import time

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))
GENERATIONS = ("0", "1", "2")


class GcPauseCollector(Collector):
    def __init__(self) -> None:
        self._started = 0.0
        # per generation (0, 1, 2 and above): pauses per bucket (not cumulative), seconds in all
        self._buckets = [[0] * len(BUCKETS) for _ in GENERATIONS]
        self._sums = [0.0] * len(GENERATIONS)

    def callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            seconds = time.perf_counter() - self._started
            generation = min(info["generation"], 2)
            self._buckets[generation][bisect.bisect_left(BUCKETS, seconds)] += 1
            self._sums[generation] += seconds

    def install(self, registry: CollectorRegistry) -> GcPauseCollector:
        registry.register(self)
        gc.callbacks.append(self.callback)
        return self

    def uninstall(self, registry: CollectorRegistry) -> None:
        """Remove the hook and the collector; a second call does nothing."""
        if self.callback in gc.callbacks:
            gc.callbacks.remove(self.callback)
        try:
            registry.unregister(self)
        except KeyError:
            pass  # already unregistered

    def collect(self):
        family = HistogramMetricFamily(
            "pathwatch_gc_pause_seconds",
            "Pauses of the sidecar process for Python's cyclic garbage collector, by generation",
            labels=["generation"])
        for label, buckets, total in zip(GENERATIONS, self._buckets, self._sums):
            cumulative, running = [], 0
            for bound, count in zip(BUCKETS, buckets):
                running += count
                cumulative.append((_bound(bound), running))
            family.add_metric([label], cumulative, total)
        yield family


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
