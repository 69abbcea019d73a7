"""Shared test helpers: free ports (``sidecar.testing.free_port``: for a server that must be given
its number; one we start ourselves binds port 0) and waiting on a condition with a deadline (never a
bare sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from sidecar.testing import free_port

__all__ = ["free_port", "wait_until"]

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.02,
               message: str = "condition") -> T:
    """Poll ``condition`` until it returns a truthy value; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception as exc:  # the thing we wait for may not be up yet
            last_error = exc
        else:
            if value:
                return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}; last error: {last_error!r}")
