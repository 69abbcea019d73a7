"""On a failed test of the alert path, the report carries every process's log (the tail of each)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    running = getattr(item, "funcargs", {}).get("running")
    if report.failed and running is not None:
        for process in running.processes:
            report.sections.append((f"{process.name} log ({process.log})", process.output()))
