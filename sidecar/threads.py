"""The sidecar's own threads: ``WatchedThread`` says when and how one ended (the liveness check,
``sidecar/liveness.py``, reads it), and ``name_os_thread`` names the OS thread after the Python
thread, so ``top -H``, ``ps -L`` and /proc show which part of the sidecar spends the CPU (Python
3.11 leaves every thread named ``python``; Linux only; elsewhere, or if /proc is read-only, it does
nothing)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

#: the kernel keeps 15 bytes of a thread name
MAX_NAME_BYTES = 15


def name_os_thread(name: str | None = None) -> None:
    """Give the calling thread's OS thread ``name`` (default: the Python thread's name, shortened
    from ``pathwatch-`` to ``pw-`` to fit the kernel's 15 bytes)."""
    name = name or threading.current_thread().name
    name = name.replace("pathwatch-", "pw-", 1).encode()[:MAX_NAME_BYTES].decode(errors="ignore")
    try:
        Path(f"/proc/self/task/{threading.get_native_id()}/comm").write_text(name)
    except OSError:
        pass  # not Linux, or no /proc: names are a convenience


class WatchedThread(threading.Thread):
    """A thread that records when it ended, ``ended_ns`` (wall-clock ns), and what ended it,
    ``error``: the name of the exception's type (never its message, which may hold span data), or
    None after its target returned. The exception still goes to ``threading.excepthook``, which
    logs it with its traceback. A target that catches its own end may set ``error`` itself."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - threading.Thread's
        super().__init__(*args, **kwargs)
        self.ended_ns: int | None = None
        self.error: str | None = None

    def run(self) -> None:
        try:
            super().run()
        except BaseException as exc:
            self.error = type(exc).__name__
            raise
        finally:
            self.ended_ns = time.time_ns()
