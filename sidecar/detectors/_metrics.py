"""Metric updates batched on the pipeline thread and flushed on tick.

A labelled ``prometheus_client`` child costs a lock per update; the hot path adds to a plain dict
instead and ``flush`` hands the sums over, once per tick.
"""

from __future__ import annotations

from prometheus_client import Counter


class BatchedCounter:
    __slots__ = ("_counter", "_pending")

    def __init__(self, counter: Counter | None) -> None:
        self._counter = counter
        self._pending: dict[tuple[str, ...], int] = {}

    def add(self, labels: tuple[str, ...], amount: int = 1) -> None:
        pending = self._pending
        pending[labels] = pending.get(labels, 0) + amount

    def flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        if self._counter is None:
            return
        for labels, amount in pending.items():
            self._counter.labels(*labels).inc(amount)
