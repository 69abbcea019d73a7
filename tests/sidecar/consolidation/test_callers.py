"""The caller index: who still calls each implementation, bounded whatever the backend sends."""

from __future__ import annotations

from sidecar.consolidation import CallerIndex


def test_roles_are_bounded_too():
    index = CallerIndex(max_implementations=4)
    for n in range(100):
        index.observe_calls(f"role-{n}", "demo.X", f"app.caller{n}", False, "/ws", 1, 0.0)
    assert len(index.callers) == 4 and index.overflow == 96


def test_a_known_implementation_keeps_counting_after_the_limit():
    index = CallerIndex(max_implementations=1)
    index.observe_calls("execution_engine", "demo.X", "app.a", False, "/ws", 2, 0.0)
    index.observe_calls("execution_engine", "demo.Y", "app.a", False, "/ws", 1, 0.0)
    index.observe_calls("execution_engine", "demo.X", "app.a", False, "/ws", 3, 1.0)
    assert index.of("execution_engine", "demo.X")[0]["calls"] == 5 and index.overflow == 1
