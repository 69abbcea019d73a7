"""Pieces of the backend on their own: contexts, settings, scenarios, rollout, registry, path map."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from examples.agent_backend.context import UserExecutionContext
from examples.agent_backend.registry import RunRegistry
from examples.agent_backend.scenarios import Scenario, ScenarioError, parse_scenario
from examples.agent_backend.settings import Settings
from examples.agent_backend.wiring import EngineRollout

BACKEND = Path(__file__).resolve().parents[2] / "examples" / "agent_backend"


def _context(**overrides: str) -> UserExecutionContext:
    fields = {"user_id": "u1", "thread_id": "t1", "run_id": "r1", "request_id": "q1", **overrides}
    return UserExecutionContext(**fields)


def test_child_context_keeps_user_thread_and_run() -> None:
    parent = _context(websocket_connection_id="conn-1")
    child = parent.child("tool")
    assert (child.user_id, child.thread_id, child.run_id) == ("u1", "t1", "r1")
    assert child.websocket_connection_id == "conn-1"
    assert child.request_id == "q1/tool" and child.parent_request_id == "q1"


def test_context_refuses_an_empty_user_naming_the_field() -> None:
    with pytest.raises(ValueError, match="UserExecutionContext.user_id"):
        _context(user_id="")


def test_settings_name_the_bad_variable() -> None:
    assert Settings.from_env({}).s11_ramp_runs == 40
    assert Settings.from_env({"DEMO_STEP_DELAY_S": "0.01", "DEMO_SCENARIO": "s3"}).step_delay_s == 0.01
    assert Settings.from_env({"DEMO_SCENARIO": "s3"}).default_scenario == "S3"
    with pytest.raises(ValueError, match="DEMO_STEP_DELAY_S='fast'"):
        Settings.from_env({"DEMO_STEP_DELAY_S": "fast"})
    with pytest.raises(ValueError, match="DEMO_S11_RAMP_RUNS='0' must be >= 1"):
        Settings.from_env({"DEMO_S11_RAMP_RUNS": "0"})


def test_scenarios_parse_case_insensitively_and_refuse_unknown_ones() -> None:
    assert parse_scenario("s10") is Scenario.S10
    assert parse_scenario(None) is Scenario.S0  # the default of this test process
    with pytest.raises(ScenarioError, match="unknown scenario 'S12'"):
        parse_scenario("S12")


def test_rollout_rises_deterministically_to_full() -> None:
    rollout = EngineRollout(ramp_runs=10)
    choices = [rollout._next_run_is_fixed() for _ in range(30)]
    assert choices[0] is False  # before the fix: the retired fallback
    assert all(choices[10:])  # at 100%: always the canonical engine
    assert 0 < sum(choices[:10]) < 10
    assert rollout.percent == 100
    rollout.reset()
    assert rollout.percent == 0


def test_rollout_falls_back_to_the_retired_engine_before_the_fix() -> None:
    rollout = EngineRollout(ramp_runs=1000)
    engine = rollout.create_engine(_context(), emitter=object())  # type: ignore[arg-type]
    assert type(engine).__name__ == "IsolatedExecutionEngine"


def test_registry_keeps_the_last_writer_and_stays_bounded() -> None:
    registry = RunRegistry(max_entries=3)
    registry.register("run_req-1", "thread-a", "alice")
    registry.register("run_req-1", "thread-b", "bob")
    assert registry.user_for_thread(registry.thread_for_run("run_req-1")) == "bob"
    for number in range(10):
        registry.register(f"run-{number}", f"thread-{number}", "carol")
    assert registry.thread_for_run("run_req-1") is None and registry.thread_for_run("run-9") == "thread-9"


def test_backend_imports_nothing_of_pathwatch() -> None:
    imported: set[str] = set()
    telemetry: set[tuple[str, str]] = set()  # (module, what it imports of opentelemetry)
    sources = sorted(BACKEND.glob("*.py"))
    assert sources
    for source in sources:
        tree = ast.parse(source.read_text())
        attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        assert not attributes & {"start_span", "start_as_current_span", "set_attribute", "add_event"}, source
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
                telemetry.update((source.name, alias.name) for alias in node.names
                                 if alias.name.startswith("opentelemetry"))
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
                if node.module.startswith("opentelemetry"):
                    telemetry.update((source.name, f"{node.module}.{alias.name}") for alias in node.names)
    assert "examples" in imported and "fastapi" in imported
    assert not imported & {"instrumentation", "sidecar"}
    # OpenTelemetry's API only to read the trace a run's spans go into, which the run is answered with
    # (runs._trace_id): the backend starts no span and sets no attribute, its instrumentation is zero-code
    assert telemetry == {("runs.py", "opentelemetry.trace")}


def test_a_run_is_answered_with_the_trace_its_spans_go_into() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import format_trace_id

    from examples.agent_backend import runs

    assert runs._trace_id() is None  # not traced
    with TracerProvider().get_tracer("test").start_as_current_span("POST /api/runs") as span:
        assert runs._trace_id() == format_trace_id(span.get_span_context().trace_id)


def test_path_map_loads_and_names_every_class_and_method() -> None:
    from instrumentation.pathmap import PathMap

    path_map = PathMap.load(BACKEND / "pathmap.yaml")
    resolved = {(r.role.name, r.cls.__name__) for r in path_map.check_imports()}
    assert resolved == {
        ("execution_engine", "UserExecutionEngine"), ("execution_engine", "RequestScopedExecutionEngine"),
        ("execution_engine", "ExecutionEngine"), ("execution_engine", "SupervisorExecutionEngineAdapter"),
        ("execution_engine", "IsolatedExecutionEngine"),
        ("supervisor", "SupervisorAgent"), ("supervisor", "ChatOrchestrator"),
        ("event_emitter", "AgentWebSocketBridge"), ("event_emitter", "UnifiedEventEmitter"),
        ("event_emitter", "WebSocketNotifier"),
        ("socket_manager", "WebSocketManager"),
    }
    engines = path_map.roles["execution_engine"]
    assert engines.canonical == "examples.agent_backend.engines.UserExecutionEngine"
    assert engines.retired == {"examples.agent_backend.engines.IsolatedExecutionEngine"}


def test_s1_config_load_lets_a_cancelled_run_end_when_the_factory_is_reconfigured_meanwhile() -> None:
    """A socket run is cancelled when its socket closes (app.events_socket). S1's config load ends when
    another request reconfigures the shared factory; a cancellation arriving in that same step must
    still end the run (Python 3.11's asyncio.wait_for returned the inner result instead: the run went
    on with the other user's emitter, writing in the closed socket's trace -- bleed.leaked_context,
    found by a soak with two tabs per user closing mid-run)."""
    import asyncio

    from examples.agent_backend import agents
    from examples.agent_backend.scenarios import activate

    async def cancelled_as_reconfigured() -> None:
        activate(Scenario.S1)
        mine = UserExecutionContext("user-a", "thread-a", "run-a", "req-a")
        other = UserExecutionContext("user-b", "thread-b", "run-b", "req-b")
        run = asyncio.create_task(agents._tool_emitter(mine, agents.UnifiedEventEmitter(None, "x", "y")))
        await asyncio.sleep(0)  # the run is loading its configuration
        agents.agent_factory.configure(other)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run

    asyncio.run(cancelled_as_reconfigured())
