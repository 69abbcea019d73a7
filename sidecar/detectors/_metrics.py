"""Metric updates batched on the pipeline thread and flushed on tick.

A labelled ``prometheus_client`` child costs a lock per update; the hot path adds to a plain dict
(``counts``, keyed by the label value or a tuple of label values) and ``flush`` hands the sums over,
once per tick.
"""

from __future__ import annotations

from prometheus_client import Counter


class BatchedCounter:
    __slots__ = ("_counter", "_fixed", "counts")

    def __init__(self, counter: Counter | None, fixed: tuple[str, ...] = ()) -> None:
        self._counter = counter
        self._fixed = fixed  # label values appended to every key (e.g. outcome="written")
        self.counts: dict[object, int] = {}

    def add(self, labels: object, amount: int = 1) -> None:
        counts = self.counts
        counts[labels] = counts.get(labels, 0) + amount

    def flush(self) -> None:
        if not self.counts:
            return
        counts, self.counts = self.counts, {}
        if self._counter is None:
            return
        for labels, amount in counts.items():
            values = labels if isinstance(labels, tuple) else (labels,)
            self._counter.labels(*values, *self._fixed).inc(amount)
