"""The sidecar with one more detector, first in line, that fails on command: for tests of what a
stuck or dead pipeline thread does to a real sidecar process (``SidecarProcess(module=MODULE)``).

A span named ``STALL`` blocks the pipeline thread inside that detector until the process gets
SIGUSR1 (a stuck detector or sink: a deadlock, a call that never returns); a span named ``DIE``
raises ``FaultKilled``, a ``BaseException`` the pipeline does not catch, which ends the thread (as
``SystemExit`` from a library, or an error in the pipeline's own loop, would). Each prints a line
to the log first. Everything else is the sidecar as ``python -m sidecar`` runs it.
"""

from __future__ import annotations

import signal
import sys
import threading

import sidecar.detectors

MODULE = "tests.sidecar.faulty_sidecar"
STALL, DIE = "pathwatch-test.stall", "pathwatch-test.die"


class FaultKilled(BaseException):
    """Not an ``Exception``: nothing in the pipeline catches it."""


class FaultDetector:
    name = "fault"

    def __init__(self, release: threading.Event) -> None:
        self._release = release

    def consume(self, spans, now_ns):  # noqa: ANN001 - the Detector protocol
        for span in spans:
            if span.name == STALL:
                print("fault: stalling the pipeline thread until SIGUSR1", flush=True)
                self._release.wait()
                print("fault: released", flush=True)
            elif span.name == DIE:
                print("fault: ending the pipeline thread", flush=True)
                raise FaultKilled(DIE)
        return []

    def tick(self, now_ns):  # noqa: ANN001
        return []


def main() -> int:
    release = threading.Event()
    signal.signal(signal.SIGUSR1, lambda _signum, _frame: release.set())
    build = sidecar.detectors.build_detectors

    def with_fault(*args, **kwargs):
        return [FaultDetector(release), *build(*args, **kwargs)]

    sidecar.detectors.build_detectors = with_fault  # the sidecar imports it from there when built
    from sidecar.cli import main as sidecar_main

    return sidecar_main(["sidecar", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
