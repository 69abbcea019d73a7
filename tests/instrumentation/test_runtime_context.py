"""A traced call reads and sets OpenTelemetry's current context through the ContextVar of its default
runtime context (the API's functions come down to it, two or three Python calls further); a runtime
context of the app's own (``OTEL_PYTHON_CONTEXT``) is used through the API, never bypassed."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

from instrumentation import sites
from tests.instrumentation.sample.engines import UserContext, UserExecutionEngine


class RecordingRuntimeContext(ContextVarsRuntimeContext):
    """An app's own runtime context: a ContextVar too, with work of its own on each operation."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def attach(self, context: Any) -> Any:
        self.calls.append("attach")
        return super().attach(context)

    def get_current(self) -> Any:
        self.calls.append("get_current")
        return super().get_current()

    def detach(self, token: Any) -> None:
        self.calls.append("detach")
        super().detach(token)


def test_the_default_runtime_context_is_its_context_var() -> None:
    var = otel_context._RUNTIME_CONTEXT._current_context
    get_current, attach, reset = sites._context_functions()
    assert (get_current, attach, reset) == (var.get, var.set, var.reset)


def test_an_apps_own_runtime_context_goes_through_the_api(monkeypatch: pytest.MonkeyPatch) -> None:
    runtime = RecordingRuntimeContext()
    monkeypatch.setattr(otel_context, "_RUNTIME_CONTEXT", runtime)
    get_current, attach, reset = sites._context_functions()
    assert (get_current, attach, reset) == (otel_context.get_current, otel_context.attach,
                                            otel_context.detach)
    token = attach(otel_context.set_value("app-key", "app-value", get_current()))
    assert get_current().get("app-key") == "app-value"
    reset(token)
    assert runtime.calls == ["get_current", "attach", "get_current", "detach"]


def test_a_call_under_an_apps_span_is_its_child_and_puts_its_context_back(instrumented, exporter,
                                                                           provider) -> None:
    seen: list[Any] = []

    class Engine(UserExecutionEngine):  # a subclass of a listed class: wrapped as it is made
        def execute_agent(self, context: UserContext, user_context: UserContext | None = None) -> str:
            seen.append(trace.get_current_span())  # through the API
            return super().execute_agent(context, user_context)

    with provider.get_tracer("app").start_as_current_span("app") as app_span:
        before = otel_context.get_current()
        assert Engine().execute_agent(UserContext("alice")) == "done:run-1"
        assert otel_context.get_current() is before
    spans = [s for s in exporter.get_finished_spans() if s.name == "execution_engine.execute_agent"]
    outer = next(s for s in spans if s.parent.span_id == app_span.get_span_context().span_id)
    assert seen and seen[0].get_span_context().span_id == outer.context.span_id
