"""Name the OS thread after the Python thread, so ``top -H``, ``ps -L`` and /proc show which part of
the sidecar spends the CPU (Python 3.11 leaves every thread named ``python``). Linux only; elsewhere,
or if /proc is read-only, it does nothing."""

from __future__ import annotations

import threading
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
