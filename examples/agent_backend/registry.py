"""Run bookkeeping: run ids, and the run -> thread -> user maps the bridge can route by.

The maps are bounded (oldest entries evicted): a demo that runs for hours must not grow without end.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict

from examples.agent_backend.scenarios import Scenario, is_active


def new_run_id(request_id: str | None) -> str:
    if is_active(Scenario.S10) and request_id:
        # S10, reference bug: the run id was derived from the client's request id, which every client
        # numbers from 1, so concurrent users' runs share a run id.
        return f"run_{request_id}"
    return f"run_{uuid.uuid4().hex}"


class _BoundedMap(OrderedDict):
    def __init__(self, max_entries: int) -> None:
        super().__init__()
        self.max_entries = max_entries

    def put(self, key: str, value: str) -> None:
        self[key] = value  # last writer wins: exactly what S10 needs to go wrong
        self.move_to_end(key)
        while len(self) > self.max_entries:
            self.popitem(last=False)


class RunRegistry:
    """Which thread a run belongs to and which user a thread belongs to."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._run_threads = _BoundedMap(max_entries)
        self._thread_users = _BoundedMap(max_entries)

    def register(self, run_id: str, thread_id: str, user_id: str) -> None:
        self._run_threads.put(run_id, thread_id)
        self._thread_users.put(thread_id, user_id)

    def thread_for_run(self, run_id: str) -> str | None:
        return self._run_threads.get(run_id)

    def user_for_thread(self, thread_id: str | None) -> str | None:
        return self._thread_users.get(thread_id) if thread_id else None

    def clear(self) -> None:
        self._run_threads.clear()
        self._thread_users.clear()


run_registry = RunRegistry()
