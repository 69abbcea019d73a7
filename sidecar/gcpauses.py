"""The sidecar's own garbage-collector pauses, as ``pathwatch_gc_pause_seconds{generation}``.

The detectors hold hundreds of thousands of live objects; Python's cyclic collector stops every
thread of the process while it walks them (a young collection a few ms, an older one hundreds of
ms with a large state), and such a pause delays every finding behind it. Operators should see it
beside ``pathwatch_pipeline_latency_seconds``.

A ``gc.callbacks`` hook runs inside the collector, on whichever thread triggered it, possibly while
that thread holds a metric's lock: it must not take any lock. It only appends (generation, seconds)
to a bounded deque (atomic); the histogram is built from it at scrape time, in the scraping thread.
"""

from __future__ import annotations

import bisect
import gc
import threading
import time
from collections import deque

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))
#: pauses remembered between two scrapes (the collector runs a few times a second at most)
MAX_UNSCRAPED = 10_000
GENERATIONS = ("0", "1", "2")


class GcPauseCollector(Collector):
    def __init__(self) -> None:
        self._unscraped: deque[tuple[int, float]] = deque(maxlen=MAX_UNSCRAPED)
        self._started = 0.0
        self._lock = threading.Lock()  # scrapes only; never taken inside the gc callback
        self._buckets = {generation: [0] * len(BUCKETS) for generation in GENERATIONS}
        self._sums = dict.fromkeys(GENERATIONS, 0.0)

    def callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._unscraped.append((info["generation"], time.perf_counter() - self._started))

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
        with self._lock:
            while self._unscraped:
                generation, seconds = self._unscraped.popleft()
                label = GENERATIONS[min(generation, 2)]
                self._buckets[label][bisect.bisect_left(BUCKETS, seconds)] += 1
                self._sums[label] += seconds
            family = HistogramMetricFamily(
                "pathwatch_gc_pause_seconds",
                "Pauses of the sidecar process for Python's cyclic garbage collector, by generation",
                labels=["generation"])
            for label in GENERATIONS:
                cumulative, running = [], 0
                for bound, count in zip(BUCKETS, self._buckets[label]):
                    running += count
                    cumulative.append((_bound(bound), running))
                family.add_metric([label], cumulative, self._sums[label])
        yield family


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
