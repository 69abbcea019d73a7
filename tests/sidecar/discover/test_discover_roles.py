"""Discovery on a small backend shaped like the reference case: roles, implementations, guesses."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.discover import discover

APP = "agent_app"


@pytest.fixture(scope="module")
def found():
    return discover(Path(__file__).parent / "fixtures" / "agent_app")


def role(found, name):
    return next(r for r in found.roles if r.name == name)


def short(keys):
    return sorted(key.removeprefix(APP + ".") for key in keys)


def test_proposes_the_four_roles_with_their_kinds(found):
    assert [(r.name, r.kind) for r in found.roles] == [
        ("execution_engine", "execute"), ("supervisor", "execute"),
        ("event_emitter", "emit"), ("socket_manager", "dispatch")]


def test_execution_engines_are_found_by_name_inheritance_and_shared_methods(found):
    assert short(role(found, "execution_engine").implementations) == [
        "core.AgentExecutionCore",                      # subclass of an alias of the canonical engine
        "core.PipelineRunner",                          # no role word, same public methods
        "engines.adapters.ConsolidatedExecutionEngineWrapper",
        "engines.adapters.SupervisorExecutionEngineAdapter",
        "engines.isolated.IsolatedExecutionEngine",     # base reached through "from . import base"
        "engines.mcp.MCPEnhancedExecutionEngine",       # base imported via a re-export in engines/__init__
        "engines.request_scoped.RequestScopedExecutionEngine",
        "engines.user.UserExecutionEngine",
    ]


def test_supervisors_in_two_modules_with_the_same_name_are_both_listed(found):
    assert short(role(found, "supervisor").implementations) == [
        "supervisors.chat.ChatOrchestrator", "supervisors.http.SupervisorAgent", "supervisors.ws.SupervisorAgent"]
    # the comments tell the two apart: "next candidates: SupervisorAgent" named neither
    assert role(found, "supervisor").canonical == f"{APP}.supervisors.http.SupervisorAgent"
    assert role(found, "supervisor").canonical_reason.endswith("next candidates: ws.SupervisorAgent, ChatOrchestrator")


def test_short_names_in_comments_are_unique_within_a_role():
    from sidecar.discover.naming import short_names
    assert short_names(["a.x.Engine", "a.y.Engine", "a.y.Other", "b.x.Engine"]) == {
        "a.x.Engine": "a.x.Engine", "a.y.Engine": "y.Engine", "a.y.Other": "Other", "b.x.Engine": "b.x.Engine"}


def test_emitters_and_socket_manager(found):
    assert short(role(found, "event_emitter").implementations) == [
        "events.bridge.AgentWebSocketBridge", "events.legacy.WebSocketNotifier", "events.unified.UnifiedWebSocketEmitter"]
    assert short(role(found, "socket_manager").implementations) == ["sockets.WebSocketManager"]


def test_aliases_are_reported_as_aliases_not_implementations(found):
    aliases = {(a.name.removeprefix(APP + "."), a.target.removeprefix(APP + "."), a.how) for a in found.aliases}
    assert aliases == {
        ("DefaultEngine", "engines.user.UserExecutionEngine", "import-as"),
        ("core.EngineBase", "engines.user.UserExecutionEngine", "assignment"),
        ("engines.alias.ExecutionEngine", "engines.user.UserExecutionEngine", "assignment"),
        ("events.WebSocketBridge", "events.bridge.AgentWebSocketBridge", "import-as"),
    }
    every_implementation = {key for r in found.roles for key in r.implementations}
    assert not {a.name for a in found.aliases} & every_implementation


def test_interfaces_exceptions_factories_and_plain_managers_are_not_implementations(found):
    every_implementation = {key for r in found.roles for key in r.implementations}
    for key in ("engines.base.BaseExecutionEngine", "errors.EngineError", "errors.ExecutionEngineFactory",
                "sockets.SessionManager", "context.UserExecutionContext"):
        assert f"{APP}.{key}" in found.classes
        assert f"{APP}.{key}" not in every_implementation
    assert role(found, "execution_engine").interfaces == [f"{APP}.engines.base.BaseExecutionEngine"]


def test_canonical_and_retired_guesses(found):
    engines = role(found, "execution_engine")
    assert engines.canonical == f"{APP}.engines.user.UserExecutionEngine"
    assert engines.retired == [f"{APP}.engines.isolated.IsolatedExecutionEngine"]
    emitters = role(found, "event_emitter")
    assert emitters.retired == [f"{APP}.events.legacy.WebSocketNotifier"]   # DeprecationWarning in __init__
    assert emitters.canonical == f"{APP}.events.unified.UnifiedWebSocketEmitter"
    assert f"{APP}.events.bridge.AgentWebSocketBridge" in emitters.canonical_candidates
    # retired classes and thin adapters are never the canonical guess
    assert not {m.key for m in engines.members if m.retired_reason or m.thin_adapter} & set(engines.canonical_candidates)


def test_thin_adapters_are_recognised(found):
    thin = {m.key.rsplit(".", 1)[-1] for m in role(found, "execution_engine").members if m.thin_adapter}
    assert thin == {"SupervisorExecutionEngineAdapter", "ConsolidatedExecutionEngineWrapper"}


def test_methods_are_exact_only_when_every_implementation_has_them(found):
    assert role(found, "execution_engine").methods == ["execute_*"]   # the adapter lacks execute_pipeline
    assert role(found, "supervisor").methods == ["handle_message", "run"]
    assert role(found, "event_emitter").methods == ["notify_*"]
    assert role(found, "socket_manager").methods == ["send_to_thread", "send_to_user"]


def test_extractor_paths(found):
    engines = role(found, "execution_engine").extractors
    assert engines["owner"][0] == "self.user_context.user_id"
    assert engines["subject"] == ["arg.user_context.user_id", "arg.context.user_id"]
    assert "arg.context.run_id" in engines["run_id"] and "arg.context.thread_id" in engines["thread_id"]
    emitters = role(found, "event_emitter")
    assert emitters.user_scoped and emitters.extractors["owner"] == ["self.user_id"]
    assert emitters.extractors["event_type"][0] == "method.strip_prefix(notify_)"
    assert emitters.extractors["run_id"][0] == "arg.run_id"
    assert emitters.extractors["target"] == ["arg.user_context.user_id", "self.user_id"]
    sockets = role(found, "socket_manager")
    assert not sockets.user_scoped
    assert sockets.extractors["target"] == ["arg.user_id"]
    assert sockets.extractors["event_type"] == ["arg.message.type"]


def test_a_context_annotation_decides_which_paths_exist(found):
    # UserExecutionContext has user_id, run_id, thread_id: paths through it are proposed; a field it
    # lacks is not (there is no request_id path among run ids)
    paths = role(found, "execution_engine").extractors["run_id"]
    assert "arg.context.run_id" in paths  # through the annotated parameter
    assert all(path.endswith(".run_id") for path in paths), paths


def test_messages_and_identity_come_from_the_code(found):
    assert found.messages == {"event_type": "type", "run_id": "run_id", "event_id": "event_id"}
    assert not found.messages_guessed
    assert found.identity == {"http": [{"header": "x-user-id"}],
                              "websocket": [{"query_param": "user_id"}, {"header": "x-user-id"}]}
    assert not found.identity_guessed


def test_look_alike_classes_without_a_role_name_are_only_candidates(found):
    assert [g.classes for g in found.candidate_groups] == [
        [f"{APP}.core.CsvReportFormatter", f"{APP}.core.ReportFormatter"]]
    assert found.candidate_groups[0].shared_methods == ["render_summary", "render_table"]


def test_class_index_records_methods_kinds_init_and_self_assignments(found):
    engine = found.classes[f"{APP}.engines.user.UserExecutionEngine"]
    assert engine.methods["execute_agent"].kind == "async"
    assert engine.methods["stream_events"].kind == "async_generator"
    assert engine.methods["get_metrics"].kind == "sync"
    assert [p.name for p in engine.init_params] == ["user_context", "registry"]
    assert engine.init_params[0].annotation == "UserExecutionContext"
    assert set(engine.self_attrs) == {"user_context", "_registry", "stats"}
    assert engine.resolved_bases == [f"{APP}.engines.base.BaseExecutionEngine"]
    assert engine.methods["iter_history"].kind == "generator"
    # the fixture folder is a package whose parent is not: modules are named from it
    assert found.module_prefix == "agent_app"


def test_a_role_added_to_the_naming_tables_is_proposed_with_its_kind_not_a_guess(tmp_path, monkeypatch):
    # README "Adding a role": ROLE_KINDS and _ROLE_TOKENS in sidecar/discover/naming.py are the place
    from sidecar.discover import naming, render_yaml

    monkeypatch.setitem(naming.ROLE_KINDS, "retriever", "dispatch")
    monkeypatch.setitem(naming._ROLE_TOKENS, "Retriever", "retriever")  # noqa: SLF001
    package = tmp_path / "rapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "stores.py").write_text(
        "class VectorRetriever:\n    def retrieve(self, query):\n        return [query]\n\n\n"
        "class KeywordRetriever:\n    def retrieve(self, query):\n        return [query]\n")
    found = discover(package)
    assert [(r.name, r.kind) for r in found.roles] == [("retriever", "dispatch")]
    kind_lines = [line.strip() for line in render_yaml(found).splitlines() if line.strip().startswith("kind:")]
    assert kind_lines == ["kind: dispatch"]  # its kind came from the table: no "guessed" note


def test_every_emitter_gets_a_method_glob_a_notifier_with_send_methods_too(tmp_path, monkeypatch):
    """The reference case's notifier emits through send_agent_started/send_agent_thinking, the bridge and
    the emitter through notify_*: notify_* alone named the notifier in the draft with nothing to trace."""
    from instrumentation.pathmap import PathMap
    from sidecar.discover.render import render_yaml

    package = tmp_path / "pw_discover_emitapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "emitters.py").write_text(
        "class UnifiedWebSocketEmitter:\n"
        "    def __init__(self, user_id):\n        self.user_id = user_id\n"
        "    async def notify_agent_started(self, run_id, agent_name):\n        return run_id\n"
        "    async def notify_agent_thinking(self, run_id, reasoning):\n        return run_id\n\n"
        "class WebSocketNotifier:\n"
        "    def __init__(self, emitter):\n        self.emitter = emitter\n"
        "    async def send_agent_started(self, context):\n        return await self.emitter.notify(context)\n"
        "    async def send_agent_thinking(self, context, text):\n        return await self.emitter.notify(context)\n\n"
        "class LoneNotifier:\n"
        "    def relay(self, event):\n        return event\n")
    found = discover(package)
    emitters = role(found, "event_emitter")
    assert emitters.methods == ["notify_*", "send_*"]
    assert emitters.extractors["event_type"][:2] == ["method.strip_prefix(notify_)", "method.strip_prefix(send_)"]
    assert "WARNING: no method of LoneNotifier (relay) matches, so it is never traced" in emitters.method_note
    monkeypatch.syspath_prepend(str(tmp_path))
    resolved = PathMap.from_yaml(render_yaml(found), source="draft.yaml").check_imports()
    traced = {r.cls.__name__: sorted(name for name in vars(r.cls) if r.role.method_matches(name))
              for r in resolved}
    assert traced["WebSocketNotifier"] == ["send_agent_started", "send_agent_thinking"]


def test_an_implementation_no_wrapped_method_matches_is_named_with_its_methods(tmp_path):
    """execute_* covers two engines; the third's run_agent/run_tools match nothing: named, never silent.
    With no method on every implementation the ones listed are not also said to be left out."""
    package = tmp_path / "covapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "parts.py").write_text(
        "class UserExecutionEngine:\n    def execute_agent(self, c): return c\n    def execute_pipeline(self, s, c): return c\n"
        "class RequestScopedExecutionEngine:\n    def execute_agent(self, c): return c\n"
        "    def execute_pipeline(self, s, c): return c\n"
        "class MCPEnhancedExecutionEngine:\n    def run_agent(self, c): return c\n    def run_tools(self, c): return c\n"
        "class WebSocketManager:\n    def send_to_user(self, user_id, message): return message\n"
        "class ConnectionManager:\n    def push(self, user_id, message): return message\n")
    found = discover(package)
    engines = role(found, "execution_engine")
    assert engines.methods == ["execute_*"]
    assert engines.method_note.endswith("; WARNING: no method of MCPEnhancedExecutionEngine (run_agent, run_tools) "
                                        "matches, so it is never traced: add the methods it does the job in")
    sockets = role(found, "socket_manager")
    assert sockets.methods == ["send_to_user"]
    assert "not listed: send_to_user" not in sockets.method_note
    assert "WARNING: no method of ConnectionManager (push) matches" in sockets.method_note


def test_sub_agents_under_the_supervisors_base_are_not_supervisors(tmp_path):
    """The reference case: SupervisorAgent and many sub-agents subclass BaseAgent. Their public methods
    are BaseAgent's, so every sub-agent 'shared 3 methods with SupervisorAgent' and was proposed as a
    supervisor: each of its executes would have been a second execution of the run."""
    package = tmp_path / "aapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "base_agent.py").write_text(
        "class BaseAgent:\n    async def execute(self, state, run_id):\n        raise NotImplementedError\n"
        "    async def emit_thinking(self, context, thought):\n        pass\n"
        "    async def emit_tool_executing(self, context, tool):\n        pass\n")
    (package / "supervisor.py").write_text(
        "from .base_agent import BaseAgent\nclass SupervisorAgent(BaseAgent):\n"
        "    async def execute(self, state, run_id):\n        return await self.route(state)\n"
        "    async def route(self, state):\n        return state\n")
    (package / "sub_agents.py").write_text("from .base_agent import BaseAgent\n" + "".join(
        f"class {name}SubAgent(BaseAgent):\n    async def execute(self, state, run_id):\n        return 1\n"
        for name in ("Triage", "Data", "Reporting")))
    (package / "chat.py").write_text(   # alike without a common base: still joins
        "class ChatFlow:\n    async def execute(self, state, run_id):\n        return 1\n"
        "    async def route(self, state):\n        return state\n"
        "    async def emit_thinking(self, context, thought):\n        pass\n")
    found = discover(package)
    assert role(found, "supervisor").implementations == ["aapp.supervisor.SupervisorAgent", "aapp.chat.ChatFlow"]
    assert found.candidate_groups[0].classes == ["aapp.sub_agents.DataSubAgent", "aapp.sub_agents.ReportingSubAgent",
                                                 "aapp.sub_agents.TriageSubAgent"]


def test_a_shared_base_joins_a_role_only_when_most_of_its_subclasses_are_in_it(tmp_path):
    package = tmp_path / "bapp"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "runners.py").write_text(
        "class Runner:\n    pass\n"
        "class UserExecutionEngine(Runner):\n    def execute_agent(self, c): return c\n"
        "class RequestScopedExecutionEngine(Runner):\n    def execute_agent(self, c): return c\n"
        "class FastRunner(Runner):\n    def go(self, c): return c\n"
        "class Agent:\n    pass\n"
        "class SupervisorAgent(Agent):\n    def run(self, c): return c\n"
        + "".join(f"class {name}Agent(Agent):\n    def think(self, c): return c\n" for name in ("Triage", "Data")))
    found = discover(package)
    assert "bapp.runners.FastRunner" in role(found, "execution_engine").implementations   # 2 of its 2 siblings
    assert role(found, "supervisor").implementations == ["bapp.runners.SupervisorAgent"]  # 1 of 2
