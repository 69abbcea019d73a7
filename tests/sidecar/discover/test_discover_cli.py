"""The command: YAML and JSON output, files, exit codes, and an import-light package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sidecar.discover import discover, pathmap_dict, run
from sidecar.discover.render import render_json, render_yaml

ROOT = Path(__file__).resolve().parents[3]


def test_yaml_parses_to_the_draft_and_marks_every_guess(agent_app: Path, capsys):
    (agent_app / "broken.py").write_text("def (:\n")
    assert run([str(agent_app)]) == 0
    text = capsys.readouterr().out
    assert yaml.safe_load(text) == pathmap_dict(discover(agent_app))
    lines = text.splitlines()
    for key in ("canonical:", "retired:", "methods:", "user_scoped:", "owner:", "subject:", "target:"):
        for i, line in enumerate(lines):
            if line.strip().startswith(key):
                assert "TODO confirm" in line or "TODO confirm" in lines[i - 1], line
    implementation_lines = [line for line in lines if line.strip().startswith("- agent_app.")]
    assert implementation_lines and all("# TODO confirm:" in line for line in implementation_lines)
    assert "# skipped: 1 file(s) (syntax error: 1)" in text
    assert "#   broken.py:1: syntax error" in text


def test_the_draft_passes_the_instrumentation_path_map_loader(agent_app: Path):
    from instrumentation.pathmap import PathMap

    path_map = PathMap.from_yaml(render_yaml(discover(agent_app)), source="draft.yaml")
    assert set(path_map.roles) == {"execution_engine", "supervisor", "event_emitter", "socket_manager"}
    assert path_map.roles["execution_engine"].canonical == "agent_app.engines.user.UserExecutionEngine"


def test_a_role_without_a_method_to_wrap_is_left_as_a_comment_and_the_draft_loads(tmp_path: Path):
    from instrumentation.pathmap import PathMap

    app = tmp_path / "app"
    app.mkdir()
    (app / "__init__.py").write_text("")
    (app / "engines.py").write_text(   # the work methods come from a base outside the tree
        "from langchain.chains import Chain\n\n"
        "class FastEngine(Chain):\n    pass\n\n"
        "class SlowEngine(Chain):\n    def _call(self, inputs): ...\n")
    found = discover(app)
    text = render_yaml(found)
    assert PathMap.from_yaml(text, source="draft.yaml").roles == {}
    assert yaml.safe_load(text) == pathmap_dict(found)
    assert "  # execution_engine: no public method found" in text
    assert "  #     - app.engines.FastEngine" in text


def test_skipped_list_is_capped(agent_app: Path, capsys):
    for i in range(5):
        (agent_app / f"bad{i}.py").write_text("class (:\n")
    assert run([str(agent_app), "--show-skipped", "2"]) == 0
    out = capsys.readouterr().out
    assert "# skipped: 5 file(s) (syntax error: 5)" in out
    assert "#   ... and 3 more (see --json)" in out


def test_json_report_to_a_file(agent_app: Path, tmp_path: Path, capsys):
    (agent_app / "broken.py").write_text("def (:\n")
    target = tmp_path / "report.json"
    assert run([str(agent_app), "--json", "--output", str(target)]) == 0
    assert capsys.readouterr().out == ""
    report = json.loads(target.read_text())
    assert report["files"]["skipped"] == 1 and report["skipped"][0]["path"] == "broken.py"
    assert {role["name"] for role in report["roles"]} == {"execution_engine", "supervisor", "event_emitter",
                                                          "socket_manager"}
    assert report["draft_pathmap"]["version"] == 1
    assert "agent_app.engines.user.UserExecutionEngine" in report["classes"]
    assert report["aliases"]


def test_missing_directory_is_a_clear_error(tmp_path: Path, capsys):
    assert run([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    afile = tmp_path / "file.py"
    afile.write_text("")
    assert run([str(afile)]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_a_package_dir_that_cannot_be_listed_is_exit_2_not_an_empty_draft(agent_app: Path, monkeypatch, capsys):
    """chmod 000 (simulated: the tests may run as root, whom permissions do not stop)."""
    import os
    real_scandir = os.scandir

    def scandir(path="."):
        if os.path.realpath(path) == os.path.realpath(agent_app):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert run([str(agent_app)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"pathwatch discover: cannot read package directory {str(agent_app)!r}: Permission denied\n"


def test_an_empty_package_dir_or_output_is_an_error_not_the_current_directory_or_stdout(
        agent_app: Path, tmp_path: Path, monkeypatch, capsys):
    # `discover "$DIR"` with DIR unset read the current directory; `-o ""` wrote to stdout
    (tmp_path / "engines.py").write_text("class A:\n    def run(self): ...\n")
    monkeypatch.chdir(tmp_path)
    assert run([""]) == 2
    captured = capsys.readouterr()
    assert "PACKAGE_DIR is empty" in captured.err and captured.out == ""
    assert run([str(agent_app), "-o", ""]) == 2
    captured = capsys.readouterr()
    assert "cannot write ''" in captured.err and captured.out == ""


def test_bad_usage_exits_2(capsys):
    assert run([]) == 2
    assert run(["x", "--max-file-bytes", "0"]) == 2


def test_unwritable_output_is_a_clear_error(agent_app: Path, tmp_path: Path, capsys):
    assert run([str(agent_app), "--output", str(tmp_path / "missing" / "out.yaml")]) == 2
    assert "cannot write" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["-m", "sidecar.discover"], ["-m", "sidecar", "discover"]],
                         ids=["python -m sidecar.discover", "pathwatch discover"])
@pytest.mark.parametrize(("output", "why"), [("/dev/full", "No space left on device"),
                                             (None, "it is closed")], ids=["full", "closed"])
def test_a_stdout_that_cannot_be_written_is_one_line_and_exit_2_not_a_traceback(agent_app: Path,
                                                                                command, output, why):
    # `pathwatch discover src/ > /data/draft.yaml` on a full disk, or with stdout closed (`>&-`):
    # OSError's (or AttributeError's) traceback before, as the draft was written unchecked
    with open(output or os.devnull, "w") as stdout:
        done = subprocess.run([sys.executable, *command, str(agent_app)], stdout=stdout,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(ROOT)},
                              preexec_fn=None if output else lambda: os.close(1))
    assert done.stderr == f"pathwatch discover: cannot write the draft to its output ({why})\n"
    assert done.returncode == 2


def test_python_dash_m_runs_without_importing_the_backend_or_heavy_modules(agent_app: Path):
    # the fixture's modules would print if imported; the heavy libraries must stay unloaded too
    (agent_app / "side_effect.py").write_text("print('IMPORTED')\nraise SystemExit(9)\n")
    probe = ("import runpy, sys\nsys.argv = ['discover', sys.argv[1]]\n"
             "try:\n    runpy.run_module('sidecar.discover', run_name='__main__')\n"
             "except SystemExit as exc:\n    code = exc.code\n"
             "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
             "('yaml', 'pydantic', 'opentelemetry', 'grpc', 'prometheus_client', 'agent_app', 'instrumentation'))\n"
             "print('EXIT', code, 'HEAVY', heavy)\n")
    done = subprocess.run([sys.executable, "-c", probe, str(agent_app)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert "IMPORTED" not in done.stdout
    assert done.stdout.rstrip().endswith("EXIT 0 HEAVY []"), done.stdout[-500:] + done.stderr
    assert "execution_engine:" in done.stdout


def test_pathwatch_discover_subcommand(agent_app: Path, capsys):
    from sidecar.cli import main

    assert main(["discover", str(agent_app), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["files"]["read"] > 0
    assert main(["discover", str(agent_app / "missing")]) == 2


ENGINE_PAIR = ("class {0}UserExecutionEngine:\n    def exécuter(self, données_context):\n        return données_context\n\n"
               "class {0}ÜberExecutionEngine:\n    def exécuter(self, données_context):\n        return données_context\n")


def test_non_ascii_names_are_kept_and_names_python_cannot_import_are_reported(tmp_path: Path, monkeypatch):
    app = tmp_path / "pw_discover_app"
    (app / "class").mkdir(parents=True)
    (app / "__init__.py").write_text("")
    (app / "moteur_é.py").write_text(ENGINE_PAIR.format(""))
    (app / "async.py").write_text(ENGINE_PAIR.format("Keyword"))           # import pw_discover_app.async: a SyntaxError
    (app / "setup-old.py").write_text(ENGINE_PAIR.format("Dash"))
    (app / "0001_initial.py").write_text(ENGINE_PAIR.format("Digit"))
    (app / "vieux_e\u0301.py").write_text(ENGINE_PAIR.format("Nfd"))       # an import statement looks for the NFC name
    (app / "class" / "__init__.py").write_text("")
    (app / "class" / "engines.py").write_text(ENGINE_PAIR.format("InKeywordPackage"))
    found = discover(app)
    assert reasons_of(found) == {
        "0001_initial.py": "not importable: '0001_initial' is not a Python identifier",
        "async.py": "not importable: 'async' is a Python keyword",
        "class": "not importable: 'class' is a Python keyword",
        "setup-old.py": "not importable: 'setup-old' is not a Python identifier",
        "vieux_e\u0301.py": "not importable: 'vieux_e\u0301' is not in NFKC form, which an import statement looks for",
    }
    engines = next(r for r in found.roles if r.name == "execution_engine")
    assert set(engines.implementations) == {"pw_discover_app.moteur_é.UserExecutionEngine",
                                            "pw_discover_app.moteur_é.ÜberExecutionEngine"}
    assert engines.methods == ["exécuter"] and engines.extractors["subject"] == ["arg.données_context.user_id"]
    text = render_yaml(found)
    assert "# skipped: 5 file(s) (not importable: 5)" in text
    assert classes_the_draft_imports(text, tmp_path, "pw_discover_app", monkeypatch) == {
        "UserExecutionEngine", "ÜberExecutionEngine"}


def test_a_package_folder_python_cannot_import_by_its_name_is_read_as_a_source_root(tmp_path: Path):
    from instrumentation.pathmap import PathMap

    app = tmp_path / "my-app"
    app.mkdir()
    (app / "__init__.py").write_text("")
    (app / "engines.py").write_text(ENGINE_PAIR.format(""))
    found = discover(app)
    assert found.module_prefix == ""
    assert reasons_of(found) == {"__init__.py": "not importable: 'my-app' is not a Python identifier; the modules "
                                                "inside are named as if the folder were on sys.path"}
    path_map = PathMap.from_yaml(render_yaml(found), source="draft.yaml")
    assert path_map.roles["execution_engine"].canonical == "engines.UserExecutionEngine"


def classes_the_draft_imports(text: str, root: Path, package: str, monkeypatch) -> set[str]:
    """The names of the classes the draft resolves when its modules are imported from ``root``
    (``PathMap.check_imports``); the package's modules are forgotten afterwards."""
    from instrumentation.pathmap import PathMap

    monkeypatch.syspath_prepend(str(root))
    try:
        resolved = PathMap.from_yaml(text, source="draft.yaml").check_imports()
    finally:
        for name in [name for name in sys.modules if name.startswith(package)]:
            del sys.modules[name]
    return {r.cls.__name__ for r in resolved}


def reasons_of(found) -> dict[str, str]:
    return {item.path: item.reason for item in found.skipped}


def test_a_relative_import_above_the_top_level_package_makes_the_module_unimportable(tmp_path: Path):
    """my-app/ is read as a source root, so service.py is a top-level module: its 'from .engines import'
    raises ImportError on import and no path map can name its classes."""
    from instrumentation.pathmap import PathMap

    app = tmp_path / "my-app"
    (app / "engines").mkdir(parents=True)
    (app / "__init__.py").write_text("")
    (app / "engines" / "__init__.py").write_text("from ..config import SETTINGS\n")   # above engines
    (app / "engines" / "core.py").write_text(ENGINE_PAIR.format("Core"))
    (app / "engines" / "Zed.py").write_text(ENGINE_PAIR.format("Zed"))              # sorts before __init__
    (app / "base.py").write_text(ENGINE_PAIR.format(""))
    (app / "service.py").write_text("from .base import UserExecutionEngine as E\n\n"
                                    "class RequestExecutionEngine(E):\n    pass\n")
    (app / "lazy.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .base import X\n\n"
                                 "def f():\n    from .base import Y\n\n"
                                 "class LazyExecutionEngine:\n    def exécuter(self, données_context):\n        pass\n")
    found = discover(app)
    assert reasons_of(found) == {
        "__init__.py": "not importable: 'my-app' is not a Python identifier; the modules inside are named as if "
                       "the folder were on sys.path",
        "service.py": "not importable: 'from .base import ...' is a relative import in a top-level module "
                      "(no parent package)",
        "engines/__init__.py": "not importable: 'from ..config import ...' climbs above the top-level package engines",
        "engines/Zed.py": "not importable: its package engines (engines/__init__.py) cannot be imported",
        "engines/core.py": "not importable: its package engines (engines/__init__.py) cannot be imported",
    }
    assert next(item for item in found.skipped if item.path == "service.py").line == 1
    engines = next(r for r in found.roles if r.name == "execution_engine")
    assert set(engines.implementations) == {"base.UserExecutionEngine", "base.ÜberExecutionEngine",
                                            "lazy.LazyExecutionEngine"}
    PathMap.from_yaml(render_yaml(found), source="draft.yaml")


def test_a_package_given_through_a_symlink_is_named_after_the_link(tmp_path: Path, monkeypatch):
    """proj/pw_discover_linked -> releases/app-2.3 (a current-release link) is imported as
    pw_discover_linked with proj on sys.path; the target's folder name is not a module name."""
    release = tmp_path / "proj" / "releases" / "app-2.3"
    release.mkdir(parents=True)
    (release / "__init__.py").write_text("")
    (release / "engines.py").write_text(ENGINE_PAIR.format(""))
    (tmp_path / "proj" / "pw_discover_linked").symlink_to("releases/app-2.3")
    monkeypatch.chdir(tmp_path)
    found = discover("proj/pw_discover_linked")   # relative, as typed on a command line
    assert found.module_prefix == "pw_discover_linked"
    assert reasons_of(found) == {}
    engines = next(r for r in found.roles if r.name == "execution_engine")
    assert engines.canonical == "pw_discover_linked.engines.UserExecutionEngine"
    assert classes_the_draft_imports(render_yaml(found), tmp_path / "proj", "pw_discover_linked",
                                     monkeypatch) == {"UserExecutionEngine", "ÜberExecutionEngine"}


def test_names_from_the_tree_cannot_break_out_of_the_draft_comments(tmp_path: Path):
    """File names, link targets and the folder's own path are written into comments: a line break in one
    (also U+0085/U+2028, which YAML reads as line breaks) would make the rest path-map YAML, a control
    character makes the YAML reader reject the file, a name that is not UTF-8 cannot be written."""
    from instrumentation.pathmap import PathMap

    app = tmp_path / "proj\nroles: {injected: 1}\n#" / "app"
    app.mkdir(parents=True)
    (app / "__init__.py").write_text("")
    (app / "engines.py").write_text(ENGINE_PAIR.format(""))
    for evil in ("x\n  event_id: injected.key\n#.py", "y\u2028  thread_id: injected\u2028#.py",
                 "z\x85  run_id: injected\x85#.py", "bell\x07.py"):
        (app / evil).write_text("pass\n")
    (app / os.fsdecode(b"latin\xe9.py")).write_text("pass\n")                  # not UTF-8: a lone surrogate
    os.symlink("gone\nmessages: {event_type: injected}\n#", app / "dangling.py")
    found = discover(app)
    assert len(found.skipped) == 6
    text = render_yaml(found, skipped_limit=100)
    text.encode("utf-8")   # writable
    assert yaml.safe_load(text) == pathmap_dict(found)
    assert "injected" not in json.dumps(yaml.safe_load(text))
    path_map = PathMap.from_yaml(text, source="draft.yaml")
    assert path_map.model.messages.event_id is None
    assert path_map.roles["execution_engine"].canonical == "app.engines.UserExecutionEngine"
    comments = [line for line in text.splitlines() if "injected" in line or "bell" in line or "latin" in line]
    assert len(comments) == 7 and all(line.startswith("#") for line in comments)
    assert "#   x\\x0a  event_id: injected.key\\x0a#.py: not importable:" in text
    assert "#   dangling.py: broken or looping symlink -> gone\\x0amessages: {event_type: injected}\\x0a#" in text
    assert "#   latin\\udce9.py: not importable:" in text


def test_the_draft_written_to_a_file_survives_a_name_that_is_not_utf8(tmp_path: Path, capsys):
    app = tmp_path / "app"
    app.mkdir()
    (app / "__init__.py").write_text("")
    (app / os.fsdecode(b"latin\xe9.py")).write_text("pass\n")
    out = tmp_path / "draft.yaml"
    assert run([str(app), "-o", str(out)]) == 0
    assert "latin\\udce9.py" in out.read_text(encoding="utf-8")


def test_non_ascii_names_are_written_readable_in_the_draft(tmp_path: Path):
    """Not ``moteur_\\u00e9``: the draft is for a person to read and confirm."""
    app = tmp_path / "pw_discover_readable"
    app.mkdir()
    (app / "__init__.py").write_text("")
    (app / "moteur_é.py").write_text(ENGINE_PAIR.format(""))
    done = subprocess.run([sys.executable, "-m", "sidecar.discover", str(app)], cwd=ROOT,
                          capture_output=True, text=True, encoding="utf-8", timeout=60,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8"})
    assert done.returncode == 0, done.stderr
    assert '"pw_discover_readable.moteur_é.UserExecutionEngine"' in done.stdout
    assert "\\u00e9" not in done.stdout


def test_a_draft_printed_to_a_stdout_that_is_not_utf8_still_loads(tmp_path: Path):
    """``> draft.yaml`` from a latin-1 terminal: the loader reads UTF-8, so non-ASCII names are
    escaped (``\\xe9`` inside the double-quoted strings) rather than written as latin-1 bytes."""
    from instrumentation.pathmap import PathMap

    app = tmp_path / "pw_discover_latin1"
    app.mkdir()
    (app / "__init__.py").write_text("")
    (app / "moteur_é.py").write_text(ENGINE_PAIR.format(""))
    done = subprocess.run([sys.executable, "-m", "sidecar.discover", str(app)], cwd=ROOT,
                          capture_output=True, timeout=60, env={**os.environ, "PYTHONIOENCODING": "latin-1"})
    assert done.returncode == 0, done.stderr
    done.stdout.decode("ascii")  # every non-ASCII character escaped
    draft = tmp_path / "draft.yaml"
    draft.write_bytes(done.stdout)
    loaded = PathMap.load(draft)
    engines = loaded.model.roles["execution_engine"]
    assert "pw_discover_latin1.moteur_é.UserExecutionEngine" in engines.implementations


TYPE_CHECKING_TREE = {
    "__init__.py": "",
    "ctx.py": "class RunContext:\n    def __init__(self, user_id):\n        self.user_id = user_id\n",
    "engines.py": (
        "import typing\nimport typing as t\nfrom typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from .ctx import RunContext\n"
        "    from .stubs import StubExecutionEngine as AliasedEngine\n"
        "    class TypedOnlyExecutionEngine:\n"
        "        def execute_agent(self, ctx: 'RunContext'):\n            pass\n"
        "if typing.TYPE_CHECKING:\n"
        "    class TypingExecutionEngine:\n        def execute_agent(self, ctx: 'RunContext'):\n            pass\n"
        "if t.TYPE_CHECKING:\n"
        "    class AliasedTypingExecutionEngine:\n        def execute_agent(self, ctx):\n            pass\n"
        "    class UserExecutionEngine:   # a stub of the run-time class below: that one is read\n"
        "        def execute_agent(self, ctx): ...\n"
        "else:\n"
        "    class UserExecutionEngine:\n        def execute_agent(self, ctx: 'RunContext'):\n            pass\n"
        "if not TYPE_CHECKING:\n"
        "    class RuntimeExecutionEngine:\n        def execute_agent(self, ctx: 'RunContext'):\n            pass\n"
        "else:\n"
        "    class StubOnlyExecutionEngine:\n        def execute_agent(self, ctx):\n            pass\n"),
    "stubs.py": ("import typing\nif typing.TYPE_CHECKING:\n    from .ctx import RunContext\n"
                 "class StubExecutionEngine:\n    def execute_agent(self, ctx: 'RunContext'):\n        pass\n"),
}


def test_classes_under_type_checking_are_reported_not_proposed(tmp_path: Path, monkeypatch):
    """A class defined only for type checkers does not exist at run time: a draft naming it left the
    whole module unwrapped ("class not found"); the imports there still type the annotations."""
    app = tmp_path / "pw_discover_typing"
    for name, text in TYPE_CHECKING_TREE.items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(text)
    found = discover(app)
    prefix = "pw_discover_typing.engines."
    engines = next(r for r in found.roles if r.name == "execution_engine")
    assert set(engines.implementations) == {f"{prefix}UserExecutionEngine", f"{prefix}RuntimeExecutionEngine",
                                            "pw_discover_typing.stubs.StubExecutionEngine"}
    assert engines.canonical == f"{prefix}UserExecutionEngine"
    assert found.aliases == []   # AliasedEngine is imported for type checkers only
    # RunContext (imported for type checkers) has a user_id and no run_id: read from its fields
    assert engines.extractors["subject"] == ["arg.ctx.user_id"]
    assert engines.extractors["run_id"] == []
    assert [(item.key, item.path, item.line) for item in found.type_only] == [
        (f"{prefix}TypedOnlyExecutionEngine", "engines.py", 7),
        (f"{prefix}TypingExecutionEngine", "engines.py", 11),
        (f"{prefix}AliasedTypingExecutionEngine", "engines.py", 15),
        (f"{prefix}StubOnlyExecutionEngine", "engines.py", 29)]
    text = render_yaml(found)
    assert ("# type-checking only: 4 class(es) defined under `if TYPE_CHECKING:`, absent at run time, so "
            "not proposed (naming one in a path map is an error: class not found)") in text
    assert f"#   {prefix}TypedOnlyExecutionEngine (engines.py:7)" in text
    assert json.loads(render_json(found))["type_checking_only"][0] == {
        "class": f"{prefix}TypedOnlyExecutionEngine", "path": "engines.py", "line": 7}
    assert classes_the_draft_imports(text, tmp_path, "pw_discover_typing", monkeypatch) == {
        "UserExecutionEngine", "RuntimeExecutionEngine", "StubExecutionEngine"}


def test_a_repo_with_a_src_layout_is_named_from_src_as_the_app_imports_it(tmp_path: Path, monkeypatch):
    """repo/src/pw_discover_srcapp/engines.py is imported as pw_discover_srcapp.engines (src/ is what is on
    sys.path), not src.pw_discover_srcapp.engines: a path map naming that is never matched."""
    repo = tmp_path / "repo"
    package = repo / "src" / "pw_discover_srcapp"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "engines.py").write_text(ENGINE_PAIR.format(""))
    (repo / "setup.py").write_text("from setuptools import setup\nsetup()\n")
    (repo / "pw_discover_srcapp").mkdir()   # a stale copy beside src/: the src layout's is imported
    (repo / "pw_discover_srcapp" / "__init__.py").write_text("")
    found = discover(repo)
    engines = next(r for r in found.roles if r.name == "execution_engine")
    assert engines.canonical == "pw_discover_srcapp.engines.UserExecutionEngine"
    assert reasons_of(found) == {"pw_discover_srcapp/__init__.py": "module pw_discover_srcapp is also "
                                 "src/pw_discover_srcapp/__init__.py (src layout), read there"}
    assert classes_the_draft_imports(render_yaml(found), repo / "src", "pw_discover_srcapp",
                                     monkeypatch) == {"UserExecutionEngine", "ÜberExecutionEngine"}


def test_a_repo_whose_code_imports_through_src_keeps_src_in_the_names(tmp_path: Path):
    """`from src.app.base import X`: the repo itself is on sys.path and src is a namespace package."""
    app = tmp_path / "repo" / "src" / "app"
    app.mkdir(parents=True)
    (app / "__init__.py").write_text("")
    (app / "engines.py").write_text(ENGINE_PAIR.format(""))
    (tmp_path / "repo" / "main.py").write_text("from src.app.engines import UserExecutionEngine\n")
    found = discover(tmp_path / "repo")
    engines = next(r for r in found.roles if r.name == "execution_engine")
    assert engines.canonical == "src.app.engines.UserExecutionEngine"


REBOUND_ENGINES = '''\
class UserExecutionEngine:
    def execute_agent(self, context):
        return context

class ExecutionEngine:
    def execute_agent(self, context):
        return None

ExecutionEngine = UserExecutionEngine   # the old class redirected to the SSOT

class GoneExecutionEngine:
    def execute_agent(self, context):
        return None

del GoneExecutionEngine

try:
    import pw_discover_sdk_not_installed
    class MCPEnhancedExecutionEngine(UserExecutionEngine):
        def execute_agent(self, context):
            return context
except ImportError:
    MCPEnhancedExecutionEngine = None
'''


def test_a_class_whose_name_the_module_binds_again_is_not_proposed(tmp_path: Path, monkeypatch):
    """`ExecutionEngine = UserExecutionEngine` after `class ExecutionEngine`: at run time the name is the
    alias, and the draft listed it both as an alias and as an implementation (check_imports: named twice);
    `del X` left a class the import check cannot find. A rebinding that may not run is only said."""
    app = tmp_path / "pw_discover_rebound"
    app.mkdir()
    (app / "__init__.py").write_text("")
    (app / "engines.py").write_text(REBOUND_ENGINES)
    found = discover(app)
    prefix = "pw_discover_rebound.engines."
    engines = next(r for r in found.roles if r.name == "execution_engine")
    assert engines.implementations == [f"{prefix}UserExecutionEngine", f"{prefix}MCPEnhancedExecutionEngine"]
    assert [(a.name, a.target) for a in found.aliases] == [(f"{prefix}ExecutionEngine", f"{prefix}UserExecutionEngine")]
    assert [(c.key, c.line, c.reason) for c in found.rebound] == [
        (f"{prefix}ExecutionEngine", 5, "line 9: ExecutionEngine = UserExecutionEngine"),
        (f"{prefix}GoneExecutionEngine", 11, "line 15: del GoneExecutionEngine")]
    mcp = next(m for m in engines.members if m.key.endswith("MCPEnhancedExecutionEngine"))
    assert mcp.reasons[-1] == (f"its name is bound again on line 23 (MCPEnhancedExecutionEngine = None): check "
                               f"{prefix}MCPEnhancedExecutionEngine is this class where the app runs")
    text = render_yaml(found)
    assert f"#   {prefix}GoneExecutionEngine (engines.py:11): line 15: del GoneExecutionEngine" in text
    # with the SDK importable, the draft imports and resolves every class it names
    (tmp_path / "pw_discover_sdk_not_installed.py").write_text("")
    assert classes_the_draft_imports(text, tmp_path, "pw_discover_", monkeypatch) == {
        "UserExecutionEngine", "MCPEnhancedExecutionEngine"}


def test_a_namespace_package_its_code_imports_by_name_is_named_as_a_package(tmp_path: Path, monkeypatch):
    """src/pw_discover_corp/acme/ without __init__.py (PEP 420) whose modules import
    pw_discover_corp.acme.engines: read as a source root, its classes were named engines.user.X,
    a module the app never imports."""
    acme = tmp_path / "src" / "pw_discover_corp" / "acme"
    (acme / "engines").mkdir(parents=True)
    (acme / "api").mkdir()
    (acme / "engines" / "__init__.py").write_text("")
    (acme / "engines" / "user.py").write_text(ENGINE_PAIR.format(""))
    (acme / "api" / "__init__.py").write_text("")
    (acme / "api" / "routes.py").write_text("from pw_discover_corp.acme.engines.user import UserExecutionEngine\n\n"
                                            "class RoutedEngine(UserExecutionEngine):\n    pass\n")
    found = discover(acme)
    assert found.module_prefix == "pw_discover_corp.acme"
    engines = next(r for r in found.roles if r.name == "execution_engine")
    assert set(engines.implementations) == {"pw_discover_corp.acme.engines.user.UserExecutionEngine",
                                            "pw_discover_corp.acme.engines.user.ÜberExecutionEngine",
                                            "pw_discover_corp.acme.api.routes.RoutedEngine"}
    assert classes_the_draft_imports(render_yaml(found), tmp_path / "src", "pw_discover_corp", monkeypatch) == {
        "UserExecutionEngine", "ÜberExecutionEngine", "RoutedEngine"}
    # the outer namespace package is one too; the source root above it stays a source root
    assert discover(acme.parent).module_prefix == "pw_discover_corp"
    source_root = discover(tmp_path / "src")
    assert source_root.module_prefix == ""
    assert "pw_discover_corp.acme.engines.user.UserExecutionEngine" in source_root.classes
