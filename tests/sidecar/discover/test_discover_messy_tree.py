"""Discovery reads what it can and reports the rest: bad syntax, bad encodings, loops, huge files."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from sidecar.discover import discover


def reasons(found) -> dict[str, str]:
    return {item.path: item.reason for item in found.skipped}


def test_unparsable_file_is_skipped_with_its_line_and_the_rest_is_read(agent_app: Path):
    (agent_app / "broken.py").write_text("class Fine:\n    pass\n\ndef oops(:\n    pass\n")
    found = discover(agent_app)
    skipped = {item.path: item for item in found.skipped}
    assert skipped["broken.py"].reason.startswith("syntax error")
    assert skipped["broken.py"].line == 4
    assert "agent_app.broken.Fine" not in found.classes
    assert any(r.name == "execution_engine" for r in found.roles)


def test_null_bytes_and_python2_syntax_are_skipped(agent_app: Path):
    (agent_app / "nulls.py").write_bytes(b"x = 1\x00\n")
    (agent_app / "py2.py").write_text('print "hello"\n')
    found = discover(agent_app)
    assert reasons(found)["nulls.py"].startswith(("cannot parse", "syntax error"))
    assert reasons(found)["py2.py"].startswith("syntax error")


def test_non_utf8_bytes_python_imports_are_read_with_replacements_and_noted(agent_app: Path):
    """CPython does not decode-check comments: such a file imports, and its classes can be named."""
    (agent_app / "latin.py").write_bytes('# h\xe9llo\n\nclass LatinExecutionEngine:\n'
                                         '    async def execute_agent(self, context):\n        pass\n'.encode("latin-1"))
    found = discover(agent_app)
    notes = {item.path: item.reason for item in found.notes}
    assert "not valid utf-8" in notes["latin.py"]
    assert "agent_app.latin.LatinExecutionEngine" in found.classes
    engines = next(r for r in found.roles if r.name == "execution_engine")
    assert "agent_app.latin.LatinExecutionEngine" in engines.implementations


def test_a_file_python_cannot_decode_on_import_is_skipped_not_proposed(agent_app: Path, tmp_path: Path):
    """A byte not valid in the file's encoding in a string, or an unknown codec on the coding line, makes
    the import raise SyntaxError: a class of it in the draft failed check_imports and is never wrapped."""
    (agent_app / "latin.py").write_bytes('GREETING = "h\xe9llo"\n\nclass LatinExecutionEngine:\n'
                                         '    async def execute_agent(self, context):\n        pass\n'.encode("latin-1"))
    (agent_app / "codec.py").write_bytes(b"# -*- coding: no-such-codec -*-\nclass CodecExecutionEngine:\n"
                                         b"    async def execute_agent(self, context):\n        pass\n")
    found = discover(agent_app)
    skipped = {item.path: item for item in found.skipped}
    assert skipped["latin.py"].reason.startswith("not importable: Python's import cannot decode it ((unicode error) "
                                                 "'utf-8' codec can't decode byte 0xe9")
    assert skipped["latin.py"].line == 1
    assert skipped["codec.py"].reason == ("not importable: Python's import cannot decode it "
                                          "(unknown encoding: no-such-codec)")
    assert not {"agent_app.latin.LatinExecutionEngine", "agent_app.codec.CodecExecutionEngine"} & set(found.classes)
    assert not found.notes


def test_declared_encoding_is_honoured(agent_app: Path):
    (agent_app / "declared.py").write_bytes('# -*- coding: latin-1 -*-\nNAME = "\xe9"\n\nclass DeclaredEmitter:\n'
                                            '    def notify_x(self):\n        pass\n'.encode("latin-1"))
    found = discover(agent_app)
    assert "agent_app.declared.DeclaredEmitter" in found.classes
    assert not found.notes


def test_symlink_loop_is_reported_and_not_followed(agent_app: Path):
    os.symlink("..", agent_app / "engines" / "loop")        # engines/loop -> agent_app
    os.symlink("self_loop", agent_app / "self_loop")        # a link to itself
    os.symlink(agent_app / "engines", agent_app / "engines_again")
    found = discover(agent_app)
    skipped = reasons(found)
    assert skipped["engines/loop"].startswith("symlink loop")
    assert skipped["engines_again"].startswith("symlink to a directory read under its real path")
    assert "broken or looping symlink" in skipped["self_loop"]
    engines = next(r for r in found.roles if r.name == "execution_engine")
    assert len(engines.implementations) == len(set(engines.implementations)) == 8


def test_huge_file_is_skipped_and_reported(agent_app: Path):
    (agent_app / "huge.py").write_text("X = 1\n" * 50_000)
    found = discover(agent_app, max_file_bytes=100_000)
    assert reasons(found)["huge.py"].startswith("too large (300000 bytes")


def test_virtualenvs_caches_hidden_and_vendored_folders_are_not_read(agent_app: Path):
    engine = "class VendoredExecutionEngine:\n    def execute_agent(self, context):\n        pass\n"
    for folder in (".venv/lib", "myenv", "__pycache__", ".hidden", "node_modules/pkg", "lib/site-packages/x"):
        (agent_app / folder).mkdir(parents=True)
        (agent_app / folder / "vendored.py").write_text(engine)
    (agent_app / "myenv" / "pyvenv.cfg").write_text("home = /usr\n")
    found = discover(agent_app)
    assert not [key for key in found.classes if "Vendored" in key]


def test_tests_are_skipped_unless_asked(agent_app: Path):
    (agent_app / "tests").mkdir()
    (agent_app / "tests" / "helpers.py").write_text("class FakeExecutionEngine:\n    def execute_agent(self):\n        pass\n")
    (agent_app / "test_things.py").write_text("class OtherFakeEngine:\n    def execute_agent(self):\n        pass\n")
    assert not [key for key in discover(agent_app).classes if "Fake" in key]
    included = discover(agent_app, include_tests=True)
    assert {"agent_app.tests.helpers.FakeExecutionEngine", "agent_app.test_things.OtherFakeEngine"} <= set(included.classes)


def test_import_cycles_and_alias_cycles_end(agent_app: Path):
    (agent_app / "cycle_a.py").write_text("from .cycle_b import B as A\n\nclass LoopEngine(A):\n    pass\n")
    (agent_app / "cycle_b.py").write_text("from .cycle_a import A as B\nX = Y\nY = X\n\nclass OtherEngine(X):\n    pass\n")
    found = discover(agent_app)
    assert "agent_app.cycle_a.LoopEngine" in found.classes
    assert found.classes["agent_app.cycle_b.OtherEngine"].resolved_bases == ["X"]   # unresolvable, kept as written


def test_nothing_to_find_is_an_empty_result_not_an_error(tmp_path: Path):
    (tmp_path / "util.py").write_text("def helper():\n    return 1\n")
    found = discover(tmp_path)
    assert found.files_read == 1 and found.roles == [] and found.skipped == []


def test_an_unexpected_shape_costs_one_file_not_the_run(agent_app: Path, monkeypatch):
    import sidecar.discover.discovery as discovery

    real = discovery.index_module

    def fragile(source, tree, text):
        if source.relpath == "sockets.py":
            raise AttributeError("simulated reader bug")
        return real(source, tree, text)

    monkeypatch.setattr(discovery, "index_module", fragile)
    found = discover(agent_app)
    assert reasons(found)["sockets.py"] == "cannot index: AttributeError: simulated reader bug"
    assert {r.name for r in found.roles} == {"execution_engine", "supervisor", "event_emitter"}


def test_a_fifo_named_like_a_module_is_skipped_not_read(agent_app: Path):
    fifo = agent_app / "pipe.py"
    os.mkfifo(fifo)
    results = []
    reader = threading.Thread(target=lambda: results.append(discover(agent_app)), daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():   # blocked opening the FIFO: a writer that closes at once ends the read
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join()
    assert results and reasons(results[0])["pipe.py"] == "not a regular file"


def test_build_and_dist_copies_are_not_read_but_a_package_so_named_is(agent_app: Path):
    engine = "class CopiedExecutionEngine:\n    def execute_agent(self, context):\n        pass\n"
    for folder in ("build/lib/agent_app", "dist/agent_app"):
        (agent_app / folder).mkdir(parents=True)
        (agent_app / folder / "__init__.py").write_text("")
        (agent_app / folder / "engines.py").write_text(engine)
    found = discover(agent_app)
    assert not [key for key in found.classes if "Copied" in key]
    (agent_app / "build" / "__init__.py").write_text("")   # a package of the backend named build
    assert "agent_app.build.lib.agent_app.engines.CopiedExecutionEngine" in discover(agent_app).classes


def test_a_package_wins_over_a_module_of_the_same_name_as_in_python(tmp_path: Path):
    app = tmp_path / "app"
    (app / "engines").mkdir(parents=True)
    (app / "__init__.py").write_text("")
    # engines.py sorts before engines/__init__.py ('.' < '/'), but Python imports the package
    (app / "engines.py").write_text("class StaleExecutionEngine:\n    def execute_agent(self, ctx):\n        pass\n")
    (app / "engines" / "__init__.py").write_text(
        "class UserExecutionEngine:\n    def execute_agent(self, ctx):\n        pass\n")
    found = discover(app)
    assert "app.engines.UserExecutionEngine" in found.classes
    assert "app.engines.StaleExecutionEngine" not in found.classes
    assert reasons(found) == {"engines.py": "module app.engines is shadowed by package engines/__init__.py"}


def test_the_real_path_wins_over_a_symlink_that_sorts_first(tmp_path: Path):
    app = tmp_path / "app"
    (app / "engines").mkdir(parents=True)
    (app / "__init__.py").write_text("")
    (app / "engines" / "__init__.py").write_text("")
    (app / "engines" / "core.py").write_text(
        "class UserExecutionEngine:\n    def execute_agent(self, ctx):\n        pass\n")
    (app / "engines" / "util.py").write_text("class Helper:\n    pass\n")
    os.symlink("engines", app / "compat")                 # a folder link that sorts before its target
    os.symlink("engines/util.py", app / "a_util.py")     # a file link that sorts before its target
    found = discover(app)
    assert set(found.classes) == {"app.engines.core.UserExecutionEngine", "app.engines.util.Helper"}
    assert reasons(found) == {
        "compat": f"symlink to a directory read under its real path -> {(app / 'engines').resolve()}",
        "a_util.py": f"same file already read via another path -> {(app / 'engines' / 'util.py').resolve()}"}


def test_a_module_wins_over_a_folder_of_the_same_name_without_init_as_in_python(tmp_path: Path):
    app = tmp_path / "app"
    (app / "engines" / "deep").mkdir(parents=True)
    (app / "__init__.py").write_text("")
    (app / "engines.py").write_text("class UserExecutionEngine:\n    def execute_agent(self, ctx):\n        pass\n")
    # engines/ is only a namespace portion: import app.engines finds engines.py, app.engines.impl fails
    (app / "engines" / "impl.py").write_text(
        "class LegacyExecutionEngine:\n    def execute_agent(self, ctx):\n        pass\n")
    (app / "engines" / "deep" / "__init__.py").write_text("class DeepExecutionEngine:\n    pass\n")
    found = discover(app)
    assert set(found.classes) == {"app.engines.UserExecutionEngine"}
    assert reasons(found) == {
        "engines/deep/__init__.py": "not importable: app.engines is the module engines.py (its folder has no "
                                    "__init__.py), so app.engines.deep cannot be imported",
        "engines/impl.py": "not importable: app.engines is the module engines.py (its folder has no "
                           "__init__.py), so app.engines.impl cannot be imported"}


def test_a_symlink_to_a_folder_above_the_package_or_outside_the_tree_is_reported_not_followed(tmp_path: Path):
    proj = tmp_path / "proj"
    app = proj / "app"
    (app / "sub").mkdir(parents=True)
    (app / "__init__.py").write_text("")
    (app / "sub" / "__init__.py").write_text("")
    (app / "core.py").write_text("class UserExecutionEngine:\n    def execute_agent(self, ctx):\n        pass\n")
    (proj / "sibling").mkdir()
    (proj / "sibling" / "junk.py").write_text("class SiblingExecutionEngine:\n    pass\n")
    outside = tmp_path / "outside" / "ext"
    outside.mkdir(parents=True)
    (outside / "__init__.py").write_text("")
    (outside / "x.py").write_text("class OutsideExecutionEngine:\n    pass\n")
    (outside.parent / "lone.py").write_text("class LoneEngine:\n    pass\n")
    os.symlink("../..", app / "sub" / "up")          # -> proj: holds the link, and all of the project
    os.symlink("/", app / "rootfs")                   # the whole filesystem
    os.symlink(outside, app / "ext")                  # a folder outside the tree
    os.symlink(outside.parent / "lone.py", app / "lone.py")   # one file outside the tree is still read
    found = discover(app)
    assert set(found.classes) == {"app.core.UserExecutionEngine", "app.lone.LoneEngine"}
    assert reasons(found) == {
        "sub/up": f"symlink loop (to a folder above the package) -> {proj.resolve()}",
        "rootfs": "symlink loop (to a folder above the package) -> /",
        "ext": f"symlink to a folder outside the tree, not followed -> {outside.resolve()}"}


def test_python_3_12_syntax_is_read_or_said_to_need_a_newer_python(agent_app: Path):
    """A 3.12 backend read by a 3.11 interpreter: `type` statements, `class C[T]` and nested f-string
    quotes are fine code, so the reason says which Python they need instead of a bare syntax error."""
    import sys
    (agent_app / "aliases312.py").write_text("type Callback = object\n\nclass AliasExecutionEngine:\n"
                                             "    async def execute_agent(self, context):\n        pass\n")
    (agent_app / "generic312.py").write_text("class GenericExecutionEngine[T]:\n"
                                             "    async def execute_agent(self, context: T):\n        pass\n")
    (agent_app / "fstring312.py").write_text('class QuotedExecutionEngine:\n    def execute_agent(self, context):\n'
                                             '        return f"{context["id"]}"\n')
    (agent_app / "plain_error.py").write_text("class Broken(:\n    pass\n")
    found = discover(agent_app)
    skipped = reasons(found)
    assert skipped["plain_error.py"].startswith("syntax error") and "Python 3.12" not in skipped["plain_error.py"]
    if sys.version_info >= (3, 12):
        assert {"aliases312.py", "generic312.py", "fstring312.py"}.isdisjoint(skipped)
        assert "agent_app.generic312.GenericExecutionEngine" in found.classes
        return
    hint = "which this Python 3.11 cannot parse: run discover with the backend's Python)"
    assert skipped["aliases312.py"] == f"syntax error: invalid syntax (Python 3.12 syntax? a `type` statement, {hint}"
    assert skipped["generic312.py"] == ("syntax error: invalid syntax (Python 3.12 syntax? type parameters "
                                        f"(`class C[T]`, `def f[T]`), {hint}")
    assert skipped["fstring312.py"].endswith(f"(Python 3.12 syntax? quotes or backslashes inside an f-string's "
                                             f"braces, {hint}")


def test_modules_under_a_package_whose_init_does_not_parse_are_not_importable(agent_app: Path):
    """Importing broken.user imports broken first: a syntax error in broken/__init__.py (or bytes Python
    cannot decode) fails both, and the draft named broken.user's classes (check_imports: cannot import)."""
    for package, init in (("broken", b"x = (\n"), ("undecodable", b'GREETING = "h\xe9llo"\n'),
                          ("modern", b"type Callback = object\n")):
        (agent_app / package).mkdir()
        (agent_app / package / "__init__.py").write_bytes(init)
        (agent_app / package / "user.py").write_text(f"class {package.title()}ExecutionEngine:\n"
                                                     "    async def execute_agent(self, context):\n        pass\n")
    found = discover(agent_app)
    skipped = reasons(found)
    for package in ("broken", "undecodable"):
        assert skipped[f"{package}/user.py"] == (f"not importable: its package agent_app.{package} "
                                                 f"({package}/__init__.py) cannot be imported")
        assert f"agent_app.{package}.user.{package.title()}ExecutionEngine" not in found.classes
    # 3.12 syntax read by 3.11 is fine where the app runs: what is under it is still read
    assert "modern/user.py" not in skipped
    assert "agent_app.modern.user.ModernExecutionEngine" in found.classes
