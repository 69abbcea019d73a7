"""Liveness: whether the sidecar can still do its job, as ``/healthz`` answers it (the kubelet's
liveness probe restarts a container whose ``/healthz`` keeps failing; the OpenTelemetry
Collector's health_check extension answers the same way).

The vital parts watched (``component``):

- ``pipeline``, the pipeline thread: failing once it has ended (an exception no step catches; every
  span accepted after it waits for ever, and the receivers refuse all of them once
  ``receiver.max_pending_spans`` is reached), or while it has been inside one step (a batch, a
  tick) for ``api.liveness_grace_s`` (60 s). The thread comes round its loop at least once a tick
  (0.1 s) without traffic, so that long inside one step is work in hand and no progress: a
  detector or sink that does not return. ``/readyz`` says so after 10 s (a gateway replica leaves
  its Service); liveness waits longer, so that a slow moment (an old-generation collection, tenths
  of a second; an incident commit waiting up to 5 s for the database's lock; a large merged batch)
  never restarts a sidecar, while one stuck for good is. It is ok again when the step ends.
- ``otlp_http`` and ``api``, the uvicorn server threads; ``otlp_grpc``, the
  thread that cancels calls whose body has not come (grpc's own server threads live in its core
  and end only with the process); ``alerts.<sink>``, each alert sink's worker: failing once
  ended. (A dead API cannot answer ``/healthz`` at all, so that probe fails by itself.)

Each failure is logged once, as an error naming the part, its thread and since when (a thread
ended by an exception had its traceback logged by ``threading.excepthook``), and counted once in
``pathwatch_liveness_failures_total{part,reason}``; a stall that ends is logged too. The check
runs whenever ``/healthz`` is asked and every 0.5 s on the main thread (``sidecar.app.run``), so
a failure is logged and counted even while nobody probes.

Once the shutdown begins (``stop``), threads end by design: the check looks no more, and the
answer stays what it was (a thread that had died before stays a failure).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from sidecar.incidents.serialize import rfc3339
from sidecar.telemetry import Telemetry
from sidecar.threads import WatchedThread

log = logging.getLogger("pathwatch.sidecar")

ENDED, STALLED = "ended", "stalled"  # the reason label of pathwatch_liveness_failures_total
PIPELINE = "pipeline"


class WatchedPipeline(Protocol):
    @property
    def thread(self) -> WatchedThread | None: ...

    @property
    def pending_spans(self) -> int: ...

    def stalled_s(self, after_s: float | None = None) -> float | None: ...


@dataclass(frozen=True)
class Failure:
    component: str
    thread: str
    reason: str  # ENDED or STALLED
    since_ns: int  # wall clock
    error: str | None = None  # ENDED: the exception's type name, None after a return
    pending_spans: int | None = None  # the pipeline's: spans accepted and not processed

    def to_dict(self, now_ns: int) -> dict[str, Any]:
        """The JSON of ``/healthz``'s 503: never an exception's message (``/healthz`` needs no
        token, and a message may hold span data)."""
        shown: dict[str, Any] = {"component": self.component, "thread": self.thread,
                                 "reason": self.reason, "since": rfc3339(self.since_ns),
                                 "for_s": round(max(0, now_ns - self.since_ns) / 1e9, 1)}
        if self.reason == ENDED:
            shown["error"] = self.error
        if self.pending_spans is not None:
            shown["pending_spans"] = self.pending_spans
        return shown


class Liveness:
    def __init__(self, telemetry: Telemetry, grace_s: float, *,
                 wall_clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._counter = telemetry.liveness_failures
        self.grace_s = grace_s
        self._wall_clock_ns = wall_clock_ns
        self._threads: list[tuple[str, WatchedThread]] = []
        self._pipeline: WatchedPipeline | None = None
        self._lock = threading.Lock()
        self._failing: dict[tuple[str, str], Failure] = {}  # (component, reason) -> since when
        self._stopped = False

    def watch_thread(self, component: str, thread: WatchedThread) -> None:
        """A vital thread: failing once it has ended (before ``stop``)."""
        self._threads.append((component, thread))
        self._counter.labels(part=component, reason=ENDED)  # its series from the start, at 0

    def watch_pipeline(self, pipeline: WatchedPipeline) -> None:
        """The pipeline (started): its thread, and how long it has been inside one step."""
        self._pipeline = pipeline
        if pipeline.thread is not None:
            self.watch_thread(PIPELINE, pipeline.thread)
        self._counter.labels(part=PIPELINE, reason=STALLED)

    def stop(self) -> None:
        """The shutdown begins: from now on threads end by design. The answer stays as it is."""
        with self._lock:
            self._stopped = True

    def check(self) -> list[Failure]:
        """The failures now (none: alive). Logs and counts each new one, and the end of a stall."""
        with self._lock:
            if self._stopped:
                return list(self._failing.values())
            now_ns = self._wall_clock_ns()
            current = {(failure.component, failure.reason): failure
                       for failure in self._failures(now_ns)}
            for key, failure in current.items():
                earlier = self._failing.get(key)
                if earlier is not None:  # the same failure: since its start
                    current[key] = replace(failure, since_ns=earlier.since_ns)
            new = [failure for key, failure in current.items() if key not in self._failing]
            # a stall that ended, not by the end of its thread (the step it was in ended it)
            ended = [failure for key, failure in self._failing.items() if key not in current
                     and (failure.component, ENDED) not in current]
            self._failing = current
        for failure in new:  # outside the lock: a log write may block (a full pipe)
            self._counter.labels(part=failure.component, reason=failure.reason).inc()
            self._log_failure(failure, now_ns)
        for failure in ended:
            log.info("pathwatch sidecar: liveness: %s (%s) goes on again after %.0f s inside one "
                     "step; /healthz answers ok", failure.component, failure.thread,
                     (now_ns - failure.since_ns) / 1e9)
        return list(current.values())

    def _failures(self, now_ns: int) -> list[Failure]:
        failures = []
        pipeline = self._pipeline
        for component, thread in self._threads:
            if thread.ident is not None and not thread.is_alive():
                pending = pipeline.pending_spans if component == PIPELINE and pipeline else None
                failures.append(Failure(component, thread.name, ENDED, thread.ended_ns or now_ns,
                                        error=thread.error, pending_spans=pending))
        if pipeline is not None and not any(f.component == PIPELINE for f in failures):
            stalled_s = pipeline.stalled_s(self.grace_s)
            if stalled_s is not None and not math.isinf(stalled_s):
                thread = pipeline.thread
                failures.append(Failure(PIPELINE, thread.name if thread else "", STALLED,
                                        now_ns - int(stalled_s * 1e9),
                                        pending_spans=pipeline.pending_spans))
        return failures

    def _log_failure(self, failure: Failure, now_ns: int) -> None:
        waiting = "" if failure.pending_spans is None else f"; {failure.pending_spans} span(s) wait"
        if failure.reason == ENDED:
            what = (f"ended at {rfc3339(failure.since_ns)}"
                    + (f" ({failure.error}, logged above)" if failure.error else ""))
        else:
            what = (f"has been inside one step since {rfc3339(failure.since_ns)}, "
                    f"{(now_ns - failure.since_ns) / 1e9:.0f} s (api.liveness_grace_s {self.grace_s:g} s)")
        log.error("pathwatch sidecar: liveness: %s (thread %s) %s%s: /healthz answers 503 %s, and the "
                  "kubelet's liveness probe restarts the sidecar; counted in "
                  "pathwatch_liveness_failures_total", failure.component, failure.thread, what, waiting,
                  "from now on" if failure.reason == ENDED else "until it goes on")
