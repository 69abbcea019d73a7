"""``os.fork()``: gunicorn's workers (and ``--preload``) are forks of a master that may have started
pathwatch. Each module that keeps per-process state — ids, locks, counters, threads — registers
here what a forked child must renew."""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["in_forked_child"]


def in_forked_child(handler: Callable[[], None]) -> Callable[[], None]:
    """Run ``handler`` in every forked child, in its only thread, before it does anything else
    (also in ``subprocess``'s ``preexec_fn`` children and fork-started multiprocessing workers: keep
    it cheap). A handler that raises is ignored: the child must start whatever happens. Returns
    ``handler``, so it serves as a decorator."""

    def guarded() -> None:
        try:
            handler()
        except Exception:  # pragma: no cover - the child must start whatever happens here
            pass

    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=guarded)
    return handler
