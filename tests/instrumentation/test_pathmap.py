"""The path map loads when valid and names file, key path and line when not."""

from __future__ import annotations

import importlib
import re
import sys
import textwrap
from pathlib import Path

import pytest

from instrumentation import PathMap, PathMapError
from instrumentation.errors import errors

from tests.instrumentation.helpers import SAMPLE_PATHMAP

ROOT = Path(__file__).resolve().parents[2]
ENGINES = "tests.instrumentation.sample.engines"


def doc_example() -> str:
    text = (ROOT / "docs" / "pathmap.md").read_text()
    return re.search(r"```yaml\n(.*?)```", text, re.S).group(1)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pathmap.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def load_error(tmp_path: Path, text: str) -> PathMapError:
    path = write(tmp_path, text)
    with pytest.raises(PathMapError) as caught:
        PathMap.load(path).check_imports()
    error = caught.value
    assert error.file == str(path)
    assert str(path) in str(error) and f":{error.line}" in str(error)
    return error


def role(body: str) -> str:
    return "version: 1\nroles:\n  engine:\n" + textwrap.indent(textwrap.dedent(body).strip("\n"), "    ") + "\n"


def test_the_documented_example_loads():
    pathmap = PathMap.from_yaml(doc_example(), source="pathmap.yaml")
    assert set(pathmap.roles) == {"execution_engine", "event_emitter", "socket_manager"}
    engine = pathmap.roles["execution_engine"]
    assert engine.canonical == "demo_backend.engines.UserExecutionEngine"
    assert engine.user_scoped and engine.kind == "execute"
    assert [s.text for s in engine.extractors["subject"]] == ["arg.user_context.user_id", "arg.context.user_id"]


KINDS = ("execute", "emit", "dispatch", "deliver")
ROLE_FIELDS = ("owner", "subject", "target", "run_id", "thread_id", "event_type", "event_id")


def documented_kinds(field: str) -> set[str]:
    """The kinds of role docs/pathmap.md's "Keys, exactly" table says take ``field``."""
    text = (ROOT / "docs" / "pathmap.md").read_text()
    table = text.split("## Keys, exactly\n", 1)[1].split("\n## ", 1)[0]
    [row] = [line for line in table.splitlines()
             if re.match(rf"^\| (`\w+`, )*`{field}`(, `\w+`)* \| role \|", line)]
    meaning = row.rsplit(" | ", 1)[1]
    return set(KINDS) if "every role" in meaning else {kind for kind in KINDS
                                                        if re.search(rf"\b{kind}\b", meaning)}


@pytest.mark.parametrize("field", ROLE_FIELDS)
def test_the_keys_table_names_the_kinds_each_role_field_applies_to(field):
    """A user writes a role's fields from that table: it said ``subject`` was an extractor path of
    any role, and the loader refuses it on a deliver role."""
    path = "self.user_id" if field == "owner" else "arg.user_id"
    accepted = set()
    for kind in KINDS:
        text = role(f"""
            kind: {kind}
            implementations: [{ENGINES}.UserExecutionEngine]
            methods: [execute_agent]
            user_scoped: true
            {field}: [{path}]
        """)
        try:
            PathMap.from_yaml(text, source="pathmap.yaml")
        except PathMapError as exc:
            assert f"'{field}' does not apply to a role of kind '{kind}'" in str(exc)
        else:
            accepted.add(kind)
    assert documented_kinds(field) == accepted


def test_the_sample_pathmap_checks_its_imports():
    resolved = PathMap.load(SAMPLE_PATHMAP).check_imports()
    names = {r.cls.__name__ for r in resolved}
    assert {"UserExecutionEngine", "RequestScopedExecutionEngine", "IsolatedExecutionEngine",
            "ExecutionEngine", "SlotEngine", "ConnectionManager", "QueuedEmitter"} <= names
    assert "BaseEngine" not in names  # the glob needs the suffix


def test_unknown_key_names_key_and_line(tmp_path):
    error = load_error(tmp_path, role(f"""
        kind: execute
        implementations: [{ENGINES}.UserExecutionEngine]
        methods: [execute_agent]
        user_scopd: true
    """))
    assert error.key_path == "roles.engine.user_scopd"
    assert error.line == 7
    assert "unknown key 'user_scopd'" in str(error)


def test_bad_kind(tmp_path):
    error = load_error(tmp_path, role(f"""
        kind: executes
        implementations: [{ENGINES}.UserExecutionEngine]
        methods: [execute_agent]
    """))
    assert (error.key_path, error.line) == ("roles.engine.kind", 4)


def test_bad_glob_in_implementation(tmp_path):
    error = load_error(tmp_path, role(f"""
        kind: execute
        implementations:
          - {ENGINES}.UserExecutionEngine
          - {ENGINES}.[Engine
        methods: [execute_agent]
    """))
    assert (error.key_path, error.line) == ("roles.engine.implementations[1]", 7)
    assert "glob" in error.reason or "class pattern" in error.reason


def test_glob_in_module_part_is_rejected(tmp_path):
    error = load_error(tmp_path, role("""
        kind: execute
        implementations: [tests.*.engines.Engine]
        methods: [execute_agent]
    """))
    assert error.key_path == "roles.engine.implementations[0]"


def test_bad_method_glob(tmp_path):
    error = load_error(tmp_path, role(f"""
        kind: execute
        implementations: [{ENGINES}.UserExecutionEngine]
        methods: [execute_agent, "run_[*"]
    """))
    assert (error.key_path, error.line) == ("roles.engine.methods[1]", 6)


def test_bad_extractor_path(tmp_path):
    error = load_error(tmp_path, role(f"""
        kind: execute
        implementations: [{ENGINES}.UserExecutionEngine]
        methods: [execute_agent]
        subject:
          - arg.user_context.user_id
          - args.context.user_id
    """))
    assert (error.key_path, error.line) == ("roles.engine.subject[1]", 9)
    assert "args.context.user_id" in error.reason


@pytest.mark.parametrize("path", ["return.user_id", "self", "arg.", "self.a..b", "method.strip_prefix(x y)",
                                  "arg.x²", "self.2a", "method.strip_prefix(a.b)"])
def test_extractor_syntax_errors(tmp_path, path):
    error = load_error(tmp_path, role(f"""
        kind: execute
        implementations: [{ENGINES}.UserExecutionEngine]
        methods: [execute_agent]
        run_id: ["{path}"]
    """))
    assert error.key_path == "roles.engine.run_id[0]"


def test_owner_must_read_self(tmp_path):
    error = load_error(tmp_path, role(f"""
        kind: execute
        implementations: [{ENGINES}.UserExecutionEngine]
        methods: [execute_agent]
        user_scoped: true
        owner: [arg.context.user_id]
    """))
    assert error.key_path == "roles.engine.owner[0]"


def test_more_than_one_canonical(tmp_path):
    error = load_error(tmp_path, role(f"""
        kind: execute
        implementations: [{ENGINES}.UserExecutionEngine, {ENGINES}.IsolatedExecutionEngine]
        canonical: [{ENGINES}.UserExecutionEngine, {ENGINES}.IsolatedExecutionEngine]
        methods: [execute_agent]
    """))
    assert (error.key_path, error.line) == ("roles.engine.canonical", 6)
    assert "at most one canonical" in error.reason


def test_canonical_not_among_implementations(tmp_path):
    error = load_error(tmp_path, role(f"""
        kind: execute
        implementations: [{ENGINES}.UserExecutionEngine]
        canonical: {ENGINES}.SlotEngine
        methods: [execute_agent]
    """))
    assert (error.key_path, error.line) == ("roles.engine.canonical", 6)
    assert "not among" in error.reason


def test_retired_not_among_implementations(tmp_path):
    error = load_error(tmp_path, role(f"""
        kind: execute
        implementations: [{ENGINES}.*ExecutionEngine]
        retired:
          - {ENGINES}.IsolatedExecutionEngine
          - {ENGINES}.SlotEngine
        methods: [execute_agent]
    """))
    assert (error.key_path, error.line) == ("roles.engine.retired[1]", 8)


def test_canonical_matched_by_a_glob_is_accepted():
    pathmap = PathMap.from_yaml(role(f"""
        kind: execute
        implementations: [{ENGINES}.*ExecutionEngine]
        canonical: {ENGINES}.UserExecutionEngine
        methods: [execute_agent]
    """))
    assert pathmap.roles["engine"].canonical == f"{ENGINES}.UserExecutionEngine"


def test_unimportable_module(tmp_path):
    error = load_error(tmp_path, role("""
        kind: execute
        implementations:
          - tests.instrumentation.sample.engines.UserExecutionEngine
          - tests.instrumentation.sample.no_such_module.Engine
        methods: [execute_agent]
    """))
    assert (error.key_path, error.line) == ("roles.engine.implementations[1]", 7)
    assert "cannot import module tests.instrumentation.sample.no_such_module" in error.reason


def test_missing_class(tmp_path):
    error = load_error(tmp_path, role(f"""
        kind: execute
        implementations: [{ENGINES}.UserExecutionEngin]
        methods: [execute_agent]
    """))
    assert (error.key_path, error.line) == ("roles.engine.implementations[0]", 5)
    assert "UserExecutionEngin" in error.reason


def test_glob_matching_no_class(tmp_path):
    error = load_error(tmp_path, role(f"""
        kind: execute
        implementations: [{ENGINES}.*Supervisor]
        methods: [execute_agent]
    """))
    assert "matches no class" in error.reason


def test_missing_method_names_class_and_line(tmp_path):
    error = load_error(tmp_path, role(f"""
        kind: execute
        implementations: [{ENGINES}.UserExecutionEngine]
        methods:
          - execute_agent
          - execute_agnet
    """))
    assert (error.key_path, error.line) == ("roles.engine.methods[1]", 8)
    assert error.reason == f"method 'execute_agnet' not found on {ENGINES}.UserExecutionEngine"


@pytest.mark.parametrize("name, what", [("user_id", "a property"), ("run_id", "a str attribute")])
def test_a_name_the_class_has_but_not_as_a_method_is_said_to_be_what_it_is(tmp_path, name, what):
    # it was "method 'user_id' not found on ...BrokenContext", though the class plainly has it
    error = load_error(tmp_path, role(f"""
        kind: execute
        implementations: [{ENGINES}.BrokenContext]
        methods: [{name}]
    """))
    assert error.key_path == "roles.engine.methods[0]"
    assert error.reason.startswith(f"'{name}' on {ENGINES}.BrokenContext is {what}, not a method")


def test_method_glob_matching_nothing(tmp_path):
    error = load_error(tmp_path, role(f"""
        kind: execute
        implementations: [{ENGINES}.UserExecutionEngine]
        methods: [execute_agent, "zz_*"]
    """))
    assert error.key_path == "roles.engine.methods[1]"


def test_an_argument_path_naming_no_parameter_of_the_roles_methods_is_an_error(tmp_path):
    """Reproducer /tmp/s23_transport/q3_arg_typo.py: `arg.contxt.user_id` passed the strict start
    and the subject was never read (no span carried it: bleed's subject rules saw nothing)."""
    error = load_error(tmp_path, role(f"""
        kind: execute
        implementations: [{ENGINES}.UserExecutionEngine]
        methods: [execute_agent, execute_pipeline, build, validate]
        subject:
          - arg.user_context.user_id
          - arg.contxt.user_id
        run_id: arg.steps
    """))
    assert (error.key_path, error.line) == ("roles.engine.subject[1]", 9)
    assert error.reason == ("'arg.contxt.user_id': no method the role wraps has a parameter 'contxt' "
                            "(they take: context, steps, user_context)")


ANY_KEYWORD = """\
class Engine:
    def run(self, **options):
        return options

    @staticmethod
    def check(request):
        return request
"""


def test_an_argument_path_is_not_refused_for_a_method_taking_any_keyword(tmp_path, monkeypatch):
    (tmp_path / "pw_any_keyword.py").write_text(ANY_KEYWORD)
    monkeypatch.syspath_prepend(str(tmp_path))
    pathmap = PathMap.from_yaml(role("""
        kind: execute
        implementations: [pw_any_keyword.Engine]
        methods: [run, check]
        subject: [arg.request.user_id, arg.user.id]
    """))
    assert len(pathmap.check_imports()) == 1
    pathmap = PathMap.from_yaml(role("""
        kind: execute
        implementations: [pw_any_keyword.Engine]
        methods: [check]
        subject: [arg.request.user_id, arg.self.id]
    """))
    with pytest.raises(PathMapError, match=r"parameter 'self' \(they take: request\)"):
        pathmap.check_imports()


NOT_METHODS = """\
class Emitter:
    notify_limit = 3

    class notify_Error(Exception):
        pass

    @property
    def notify_count(self):
        return 0

    def notify_done(self, user_id, run_id):
        return None
"""


def test_an_argument_path_is_checked_past_what_is_no_method(tmp_path, monkeypatch):
    """Reproducer /tmp/s28_pmgrain/repro_prop.py: a property the role's glob matches (notify_count)
    had no signature, taken for a method that may take any name: a misspelled arg.userid passed
    check_imports (and the warning at the app's start) silently. Nothing of it is wrapped."""
    (tmp_path / "pw_not_methods.py").write_text(NOT_METHODS)
    monkeypatch.syspath_prepend(str(tmp_path))
    pathmap = PathMap.from_yaml(role("""
        kind: emit
        implementations: [pw_not_methods.Emitter]
        methods: ["notify_*"]
        target: [arg.userid]
    """))
    try:
        with pytest.raises(PathMapError, match=r"parameter 'userid' \(they take: run_id, user_id\)"):
            pathmap.check_imports()
    finally:
        sys.modules.pop("pw_not_methods", None)


def test_yaml_syntax_error_names_line(tmp_path):
    error = load_error(tmp_path, "version: 1\nroles:\n  engine: [\n")
    assert error.line is not None and "not valid YAML" in error.reason


def test_missing_file():
    with pytest.raises(PathMapError) as caught:
        PathMap.load("/nonexistent/pathmap.yaml")
    assert "/nonexistent/pathmap.yaml" in str(caught.value)


def test_missing_required_key(tmp_path):
    error = load_error(tmp_path, role(f"""
        implementations: [{ENGINES}.UserExecutionEngine]
        methods: [execute_agent]
    """))
    assert error.key_path == "roles.engine" and "'kind'" in error.reason


def test_identity_source_needs_exactly_one_key(tmp_path):
    error = load_error(tmp_path, """
        version: 1
        identity:
          http: [{header: x-user-id, jwt_claim: sub}]
    """)
    assert (error.key_path, error.line) == ("identity.http[0]", 3)


def test_a_bad_entry_found_at_import_time_is_logged_and_counted_not_raised(instrument, tmp_path, caplog):
    module_dir = tmp_path / "late_pkg"
    module_dir.mkdir()
    (module_dir / "__init__.py").write_text("")
    (module_dir / "engines.py").write_text("class Engine:\n    def run(self):\n        return 1\n")
    path = write(tmp_path, role("""
        kind: execute
        implementations: [late_pkg.engines.Engine]
        methods: [run, runn]
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        instrument(path)
        before = errors.count
        import late_pkg.engines  # the hook fires during this import: it must not raise
        assert late_pkg.engines.Engine().run() == 1
        assert errors.count == before + 1
        assert "method 'runn' not found on late_pkg.engines.Engine" in caplog.text
        assert f"{path}:6 roles.engine.methods[1]" in caplog.text
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("late_pkg.engines", "late_pkg"):
            sys.modules.pop(name, None)


GRAIN = """
class GoodEngine:
    def run(self):
        return "good"

    def stop(self):
        return "stopped"


class PartialEngine:
    def run(self):
        return "partial"


class SlowEngine:
    def run(self):
        return "slow"


NOT_A_CLASS = 1
"""


@pytest.mark.parametrize("name, bad, reason", [
    ("pw_grain_class", "SlowEngin", "class 'SlowEngin' not found in module pw_grain_class"),
    ("pw_grain_glob", "*Supervisor", "glob '*Supervisor' matches no class defined in module pw_grain_glob"),
    ("pw_grain_value", "NOT_A_CLASS", "pw_grain_value.NOT_A_CLASS is not a class"),
])
def test_a_bad_entry_leaves_out_only_what_it_names(instrument, exporter, tmp_path, monkeypatch,
                                                   caplog, name, bad, reason):
    """Reproducer /tmp/s28_pmgrain/repro.py: one misspelled entry left every class of its module
    unwrapped, the ones named right too ("module ... left unwrapped"): GoodEngine made no span. Now
    the entry is left out, and a class lacking one listed method is wrapped with the others. (A
    module name per case: wrapt runs a module's import hooks at its first import only.)"""
    (tmp_path / f"{name}.py").write_text(GRAIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write(tmp_path, role(f"""
        kind: execute
        implementations:
          - {name}.GoodEngine
          - {name}.{bad}
          - {name}.PartialEngine
        methods: [run, stop]
    """))
    try:
        instrument(path)
        before = errors.count
        module = importlib.import_module(name)  # the hook fires during this import: it must not raise
        assert (module.GoodEngine().run(), module.GoodEngine().stop()) == ("good", "stopped")
        assert module.PartialEngine().run() == "partial"
        assert module.SlowEngine().run() == "slow"
        spans = [(span.name, span.attributes["pathwatch.implementation"])
                 for span in exporter.get_finished_spans()]
        assert spans == [("engine.run", f"{name}.GoodEngine"), ("engine.stop", f"{name}.GoodEngine"),
                         ("engine.run", f"{name}.PartialEngine")]
        assert errors.count == before + 2
        logged = [record.getMessage() for record in caplog.records if record.name == "instrumentation"]
        assert logged == [
            f"pathwatch: {path}:7 roles.engine.implementations[1]: {reason} (that entry is left out; "
            "the module's other entries are wrapped)",
            f"pathwatch: {path}:9 roles.engine.methods[1]: method 'stop' not found on "
            f"{name}.PartialEngine (its other methods are wrapped)"]
        with pytest.raises(PathMapError) as caught:  # the strict start still refuses the first
            PathMap.load(path).check_imports()
        assert (caught.value.key_path, caught.value.reason) == ("roles.engine.implementations[1]", reason)
    finally:
        sys.modules.pop(name, None)


def test_a_field_the_kind_does_not_take_is_rejected(tmp_path):
    error = load_error(tmp_path, role(f"""
        kind: execute
        implementations: [{ENGINES}.UserExecutionEngine]
        methods: [execute_agent]
        target: [arg.context.user_id]
    """))
    assert (error.key_path, error.line) == ("roles.engine.target", 7)
    assert "does not apply to a role of kind 'execute'" in error.reason


def test_fan_out_names_methods_of_a_dispatch_role():
    spec = PathMap.from_yaml(role(f"""
        kind: dispatch
        implementations: [{ENGINES}.UserExecutionEngine]
        methods: [execute_agent, "run_*"]
        fan_out: [execute_agent, "run_all*"]
    """)).roles["engine"]
    assert spec.fan_out == ("execute_agent", "run_all*")
    assert [spec.is_fan_out(name) for name in ("execute_agent", "run_all_users", "run_one")] == [
        True, True, False]


@pytest.mark.parametrize("kind", ["execute", "emit", "deliver"])
def test_fan_out_on_a_role_that_does_not_dispatch_is_rejected(tmp_path, kind):
    error = load_error(tmp_path, role(f"""
        kind: {kind}
        implementations: [{ENGINES}.UserExecutionEngine]
        methods: [execute_agent]
        fan_out: [execute_agent]
    """))
    assert (error.key_path, error.line) == ("roles.engine.fan_out", 7)
    assert f"'fan_out' does not apply to a role of kind '{kind}'" in error.reason


def test_a_fan_out_method_the_role_does_not_wrap_is_rejected(tmp_path):
    error = load_error(tmp_path, role(f"""
        kind: dispatch
        implementations: [{ENGINES}.UserExecutionEngine]
        methods: [execute_agent]
        fan_out: [execute_agent, broadcast]
    """))
    assert (error.key_path, error.line) == ("roles.engine.fan_out[1]", 7)
    assert "fan_out method 'broadcast' is not among the role's methods" in error.reason


def test_connections_names_the_registry_of_a_dispatch_role():
    spec = PathMap.from_yaml(role(f"""
        kind: dispatch
        implementations: [{ENGINES}.UserExecutionEngine]
        methods: [execute_agent]
        connections: [self.sockets, self.hub.by_user]
    """)).roles["engine"]
    assert spec.connections == (("sockets",), ("hub", "by_user"))


@pytest.mark.parametrize(("kind", "path", "reason"), [
    ("execute", "self.sockets", "'connections' does not apply to a role of kind 'execute'"),
    ("dispatch", "arg.sockets", "connections path 'arg.sockets' must start with 'self.'"),
])
def test_connections_of_another_kind_or_not_on_the_instance_is_rejected(tmp_path, kind, path, reason):
    error = load_error(tmp_path, role(f"""
        kind: {kind}
        implementations: [{ENGINES}.UserExecutionEngine]
        methods: [execute_agent]
        connections: [{path}]
    """))
    assert error.key_path.startswith("roles.engine.connections")
    assert reason in error.reason


def test_one_class_in_two_roles_is_rejected(tmp_path):
    error = load_error(tmp_path, f"""
        version: 1
        roles:
          a: {{kind: execute, implementations: [{ENGINES}.SlotEngine], methods: [execute_agent]}}
          b: {{kind: execute, implementations: [{ENGINES}.SlotEngine], methods: [execute_agent]}}
    """)
    assert error.key_path == "roles.b.implementations[0]" and error.line == 4


def test_a_file_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "pathmap.yaml"
    path.write_bytes(b"version: 1\nroles:\n  caf\xe9:\n    kind: execute\n")
    with pytest.raises(PathMapError) as caught:
        PathMap.load(path)
    assert (caught.value.file, caught.value.line) == (str(path), 3)
    assert "not UTF-8" in caught.value.reason


def test_a_header_name_that_is_not_a_token_is_rejected(tmp_path):
    error = load_error(tmp_path, """
        version: 1
        identity:
          http: [{header: "x-user-\u0101d"}]
    """)
    assert (error.key_path, error.line) == ("identity.http[0].header", 3)
    assert "bad header name" in error.reason


def test_a_key_given_twice_is_rejected(tmp_path):
    error = load_error(tmp_path, f"""
        version: 1
        roles:
          engine: {{kind: execute, implementations: [{ENGINES}.SlotEngine], methods: [execute_agent]}}
          engine: {{kind: emit, implementations: [{ENGINES}.ExecutionEngine], methods: [execute_agent]}}
    """)
    assert error.line == 4 and "key 'engine' is given twice (first on line 3)" in error.reason
    assert error.key_path == "roles.engine"


def test_a_key_given_twice_deep_in_the_file_names_its_key_path():
    """Reproducer /tmp/s23_transport/q_pathmap.py ("dup key nested"): the error named neither the
    key path nor the first occurrence: `pm.yaml:7: not valid YAML: duplicate key 'kind'` (which of
    the roles?)."""
    with pytest.raises(PathMapError) as caught:
        PathMap.from_yaml(textwrap.dedent("""\
            version: 1
            roles:
              engine:
                kind: execute
                implementations: [app.engines.UserEngine]
                methods: [run]
              emitter:
                kind: emit
                implementations: [app.emitters.Emitter]
                methods: [notify]
                kind: dispatch
        """), source="pm.yaml")
    assert str(caught.value) == ("pm.yaml:11 roles.emitter.kind: key 'kind' is given twice "
                                 "(first on line 8)")


def test_keys_merged_from_an_anchor_may_be_given_again():
    pathmap = PathMap.from_yaml(textwrap.dedent(f"""
        version: 1
        roles:
          engine: &engine
            kind: execute
            implementations: [{ENGINES}.SlotEngine]
            methods: [execute_agent]
          other:
            <<: *engine
            implementations: [{ENGINES}.ExecutionEngine]
    """))
    assert [ref.text for ref in pathmap.roles["other"].implementations] == [f"{ENGINES}.ExecutionEngine"]
    assert pathmap.roles["other"].methods == ("execute_agent",)


def test_an_alias_that_contains_itself_is_rejected(tmp_path):
    error = load_error(tmp_path, """
        version: 1
        roles: &roles
          engine: *roles
    """)
    assert (error.key_path, error.line) == ("roles.engine", 3)
    assert "alias" in error.reason


OVERLAP = """\
class EngineBridge:
    def execute(self):
        return 1

    def notify_x(self):
        return 2
"""


def test_a_class_named_by_one_role_and_matched_by_anothers_glob_plays_the_named_role(
        tmp_path, monkeypatch):
    (tmp_path / "pw_overlap_exact.py").write_text(OVERLAP)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write(tmp_path, """
        version: 1
        roles:
          emitter: {kind: emit, implementations: ['pw_overlap_exact.*Bridge'], methods: ['notify_*']}
          engine: {kind: execute, implementations: [pw_overlap_exact.EngineBridge], methods: [execute]}
    """)
    try:
        resolved = PathMap.load(path).check_imports()
        assert [(r.cls.__name__, r.role.name) for r in resolved] == [("EngineBridge", "engine")]
    finally:
        sys.modules.pop("pw_overlap_exact", None)


def test_a_class_matched_by_globs_of_two_roles_alone_is_left_out_and_said_so(tmp_path, monkeypatch,
                                                                           caplog):
    """The module's other classes are still wrapped (the whole module was left unwrapped)."""
    from instrumentation.errors import errors

    (tmp_path / "pw_overlap_globs.py").write_text(OVERLAP + "\n\nclass EngineOnly:\n"
                                                  "    def execute(self):\n        return 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write(tmp_path, """
        version: 1
        roles:
          emitter: {kind: emit, implementations: ['pw_overlap_globs.*Bridge'], methods: ['notify_*']}
          engine: {kind: execute, implementations: ['pw_overlap_globs.Engine*'], methods: [execute]}
    """)
    before = errors.count
    try:
        resolved = PathMap.load(path).check_imports()
    finally:
        sys.modules.pop("pw_overlap_globs", None)
    assert [(r.cls.__name__, r.role.name) for r in resolved] == [("EngineOnly", "engine")]
    assert errors.count > before
    assert "EngineBridge is matched by pw_overlap_globs.Engine* and by" in caplog.text
    assert "a class plays one role" in caplog.text


def test_non_ascii_identifiers_python_accepts_are_valid_names(tmp_path, monkeypatch):
    (tmp_path / "pw_moteur_é.py").write_text(
        "class ÜberEngine:\n    def exécuter(self, contexte_é):\n        return contexte_é\n\n"
        "    def चलाओ(self):\n        pass\n")   # Devanagari vowel signs: not \w, yet identifier characters
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write(tmp_path, """
        version: 1
        roles:
          engine:
            kind: execute
            implementations: ["pw_moteur_é.Ü*"]
            canonical: pw_moteur_é.ÜberEngine
            methods: [exécuter, "ex*", चलाओ]
            subject: [arg.contexte_é.utilisateur, self.données.id]
            run_id: [method.strip_prefix(exé)]
    """)
    try:
        resolved = PathMap.load(path).check_imports()
    finally:
        sys.modules.pop("pw_moteur_é", None)
    assert [(r.cls.__name__, r.role.name) for r in resolved] == [("ÜberEngine", "engine")]


@pytest.mark.parametrize("bad", ["pw-moteur.Engine", "pw.2x.Engine", "pw.mo teur.Engine", "pw.Eng ine"])
def test_names_python_does_not_accept_are_still_rejected(tmp_path, bad):
    error = load_error(tmp_path, role(f"""
        kind: execute
        implementations: ["{bad}"]
        methods: [execute_agent]
    """))
    assert error.key_path == "roles.engine.implementations[0]"


def test_nested_aliases_do_not_make_the_load_exponential(monkeypatch):
    """Reproducer /tmp/s23_transport/q2_alias_blowup.py: a 400-byte file of seven levels of ten
    aliases took 18 s to load (the line table walked every path through every alias: 10 million
    of them), eight levels minutes and gigabytes (ten times more a level). The work is asserted,
    not the time it takes: the line table the load builds stays at its bound."""
    from instrumentation import pathmap as pathmap_module

    tables = []
    line_table = pathmap_module._line_table

    def recorded(node, source):
        tables.append(line_table(node, source))
        return tables[-1]

    monkeypatch.setattr(pathmap_module, "_line_table", recorded)
    lines = ["version: 1", "x0: &a0 [m, m, m, m, m, m, m, m, m, m]"]
    lines += [f"x{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 7)]
    with pytest.raises(PathMapError) as caught:
        PathMap.from_yaml("\n".join(lines) + "\n", source="pm.yaml")
    assert str(caught.value).startswith("pm.yaml:2 x0: unknown key 'x0'")
    [table] = tables
    assert pathmap_module._MAX_ALIASED_LINES <= len(table) < pathmap_module._MAX_ALIASED_LINES + 100


def _engine_pathmap(tmp_path, monkeypatch, methods_line: str, extra: str = "") -> PathMap:
    """A path map of one role over a class ``exécuter`` of a module made for the test."""
    module = f"pw_nfkc_{abs(hash(methods_line + extra)) % 10**8}"
    (tmp_path / f"{module}.py").write_text("class Moteur:\n    def ex\u00e9cuter(self, contexte):\n"
                                          "        return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return PathMap.from_yaml(f"version: 1\nroles:\n  engine:\n    kind: execute\n"
                             f"    implementations: [{module}.Moteur]\n{methods_line}{extra}",
                             source="pm.yaml")


def test_a_method_name_typed_decomposed_is_the_name_python_keeps(tmp_path, monkeypatch):
    """Reproducer /tmp/s23_transport/q4_nfd_and_bool.py (a): 'exe\\u0301cuter' (e + a combining
    accent, as some macOS tools write it) looks like the method but was refused as not found: Python
    keeps identifiers NFKC-normalized."""
    pathmap = _engine_pathmap(tmp_path, monkeypatch, "    methods: [exe\u0301cuter]\n")
    pathmap.check_imports()
    assert pathmap.model.roles["engine"].methods == ["ex\u00e9cuter"]


def test_a_method_yaml_reads_as_a_boolean_is_named_so(tmp_path, monkeypatch):
    """(b): an emitter's ``on`` method, unquoted, is YAML's true; the error said only 'Input should
    be a valid string'."""
    with pytest.raises(PathMapError) as caught:
        _engine_pathmap(tmp_path, monkeypatch, "    methods: [on]\n")
    assert str(caught.value).startswith("pm.yaml:6 roles.engine.methods[0]: a name is expected, "
                                        "YAML read a boolean (True)")
    assert "quote the name" in str(caught.value)


@pytest.mark.parametrize("written,read,remedy", [
    ("yes", "bool", "quote it ('yes')"), ("null", "null", "quote it ('null')"),
    ("5", "int", "starting with a letter or '_'"), ("2024-01-01", "timestamp", "starting with a letter"),
])
def test_a_role_name_yaml_reads_as_no_text_is_named_with_its_line(tmp_path, written, read, remedy):
    # the error named only the mapping, as if ``roles`` had to be a string: "pm.yaml:2 roles:
    # Input should be a valid string"
    error = load_error(tmp_path, "version: 1\nroles:\n  engine:\n    kind: execute\n"
                                 "    implementations: [m.E]\n    methods: [run]\n"
                                 f"  {written}:\n    kind: emit\n")
    assert error.line == 7 and error.key_path == f"roles.{written}"
    assert f"a role name must be text: YAML reads {written!r} as {read}" in error.reason
    assert remedy in error.reason


def test_a_list_whose_entries_are_all_commented_out_is_empty(tmp_path, monkeypatch):
    """(c): ``retired:`` with every entry commented out (YAML's null) was refused as 'Input should
    be a valid list'."""
    pathmap = _engine_pathmap(tmp_path, monkeypatch, "    methods: [ex\u00e9cuter]\n",
                              "    retired:\n      # - old.Engine\n")
    assert pathmap.model.roles["engine"].retired == []


LAZY = '''
class GoodEngine:
    def run(self):
        return "good"


def __getattr__(name):  # PEP 562: the package imports this class when it is first read
    if name == "LazyEngine":
        import pw_no_such_optional_dependency  # noqa: F401 - its optional dependency is missing
    raise AttributeError(name)
'''


def test_a_class_whose_lazy_import_fails_is_an_error_of_its_entry_alone(instrument, exporter, tmp_path,
                                                                         monkeypatch, caplog):
    """/tmp/s34_configreview/pm/probe.py lazy: a module that imports a class when it is first read
    (a module ``__getattr__``, PEP 562), whose import failed, raised out of the path map's lookup: the
    import hook left every class of the module unwrapped (GoodEngine too) and logged only "internal
    error at hook:pw_lazy (ModuleNotFoundError)", naming no entry; ``check_imports()`` raised the
    ModuleNotFoundError itself, not a PathMapError (under PATHWATCH_CHECK_IMPORTS=1: "an internal
    error, please report it"). It is the entry's error now, as a misspelled class is."""
    (tmp_path / "pw_lazy.py").write_text(LAZY)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = write(tmp_path, role("""
        kind: execute
        implementations: [pw_lazy.GoodEngine, pw_lazy.LazyEngine]
        methods: [run]
    """))
    reason = ("reading LazyEngine from module pw_lazy raised ModuleNotFoundError: No module named "
              "'pw_no_such_optional_dependency'")
    try:
        with pytest.raises(PathMapError) as caught:
            PathMap.load(path).check_imports()
        assert (caught.value.key_path, caught.value.line, caught.value.reason) == (
            "roles.engine.implementations[1]", 5, reason)
        sys.modules.pop("pw_lazy", None)
        instrument(path)
        before = errors.count
        module = importlib.import_module("pw_lazy")  # the hook fires during this import: it must not raise
        assert module.GoodEngine().run() == "good"
        assert [span.name for span in exporter.get_finished_spans()] == ["engine.run"]
        assert errors.count == before + 1
        logged = [record.getMessage() for record in caplog.records if record.name == "instrumentation"]
        assert logged == [f"pathwatch: {path}:5 roles.engine.implementations[1]: {reason} (that entry "
                          "is left out; the module's other entries are wrapped)"]
    finally:
        sys.modules.pop("pw_lazy", None)


@pytest.mark.parametrize("name", ["__init__", "__new__", "__init_subclass__"])
def test_a_constructor_named_among_the_methods_is_refused_not_silently_left_untraced(tmp_path, name):
    """/tmp/s34_configreview/pm/probe.py init: the docs say a special name is traced when named
    exactly (`__call__`), but `methods: [__init__, run]` loaded, passed check_imports(), and traced
    `run` alone: the constructors are never wrapped as methods (``__init__`` only reads a
    user-scoped role's owner), so the construction spans it asked for never came, unsaid."""
    error = load_error(tmp_path, role(f"""
        kind: execute
        implementations: [{ENGINES}.UserExecutionEngine]
        methods: [execute_agent, {name}]
    """))
    assert (error.key_path, error.line) == ("roles.engine.methods[1]", 6)
    assert f"method {name!r} is not traced: pathwatch traces no constructor" in error.reason


def test_a_built_in_type_is_an_error_of_its_entry_not_an_internal_error(instrument, exporter, tmp_path,
                                                                        caplog):
    """/tmp/s34_configreview/pm/probe.py builtin: a class implemented in C (`sqlite3.Connection` for a
    repository role) cannot have its methods replaced. Its entry passed check_imports() (the deploy
    gate), and the import hook logged "internal error at wrap:sqlite3.Connection (TypeError)", naming
    no entry, after recording the class as wrapped for its role."""
    path = write(tmp_path, """
        version: 1
        roles:
          repository:
            kind: execute
            implementations: [sqlite3.Connection]
            methods: [execute]
    """)
    reason = ("sqlite3.Connection is a built-in type (implemented in C), whose methods cannot be "
              "replaced: it is not traced (trace the class of the app that calls it)")
    with pytest.raises(PathMapError) as caught:
        PathMap.load(path).check_imports()
    assert (caught.value.key_path, caught.value.line, caught.value.reason) == (
        "roles.repository.implementations[0]", 5, reason)
    instrumentation = instrument(path).wrapping
    logged = [record.getMessage() for record in caplog.records if record.name == "instrumentation"]
    assert f"pathwatch: {path}:5 roles.repository.implementations[0]: {reason} (that entry is left " \
           "out; the module's other entries are wrapped)" in logged
    assert not [message for message in logged if "internal error" in message]
    import sqlite3

    assert sqlite3.Connection not in [cls for classes in instrumentation.classes_by_role().values()
                                      for cls in classes]
    connection = sqlite3.connect(":memory:")
    assert connection.execute("select 1").fetchone() == (1,)
    connection.close()
