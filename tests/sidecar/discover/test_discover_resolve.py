"""Name resolution across a tree: relative imports, renames, re-exports, star imports, aliases."""

from __future__ import annotations

from pathlib import Path

from sidecar.discover import discover


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_relative_imports_at_several_levels(tmp_path: Path):
    root = write(tmp_path / "pkg", {
        "__init__.py": "",
        "base.py": "class Root:\n    pass\n",
        "a/__init__.py": "from ..base import Root as R\n",
        "a/b/__init__.py": "",
        "a/b/c.py": "from ... import base\nfrom .. import R\nfrom ...a import R as R2\n"
                    "class One(base.Root):\n    pass\nclass Two(R):\n    pass\nclass Three(R2):\n    pass\n",
    })
    classes = discover(root).classes
    for name in ("One", "Two", "Three"):
        assert classes[f"pkg.a.b.c.{name}"].resolved_bases == ["pkg.base.Root"]


def test_star_import_and_absolute_import_through_a_reexport(tmp_path: Path):
    root = write(tmp_path / "pkg", {
        "__init__.py": "from .impl import *\n",
        "impl.py": "class Thing:\n    pass\nclass _Hidden:\n    pass\n",
        "use.py": "import pkg\nimport pkg.impl as impl_mod\nfrom pkg import _Hidden\n"
                  "class A(pkg.Thing):\n    pass\nclass B(impl_mod.Thing):\n    pass\nclass C(_Hidden):\n    pass\n",
    })
    classes = discover(root).classes
    assert classes["pkg.use.A"].resolved_bases == ["pkg.impl.Thing"]
    assert classes["pkg.use.B"].resolved_bases == ["pkg.impl.Thing"]
    assert classes["pkg.use.C"].resolved_bases == ["_Hidden"]   # star imports never carry private names


def test_external_bases_keep_their_import_path(tmp_path: Path):
    root = write(tmp_path / "pkg", {
        "__init__.py": "",
        "m.py": "import abc\nfrom typing import Generic, TypeVar\nT = TypeVar('T')\n"
                "class A(abc.ABC, Generic[T], Exception):\n    pass\n",
    })
    assert discover(root).classes["pkg.m.A"].resolved_bases == ["abc.ABC", "typing.Generic", "Exception"]


def test_alias_chain_and_rebinding(tmp_path: Path):
    root = write(tmp_path / "pkg", {
        "__init__.py": "",
        "engines.py": "class UserExecutionEngine:\n    def execute_agent(self):\n        pass\n"
                      "ExecutionEngine = UserExecutionEngine\nLegacyEngine = ExecutionEngine\n"
                      "Gone = UserExecutionEngine\nGone = make()\n",
    })
    found = discover(root)
    assert {(a.name, a.target) for a in found.aliases} == {
        ("pkg.engines.ExecutionEngine", "pkg.engines.UserExecutionEngine"),
        ("pkg.engines.LegacyEngine", "pkg.engines.UserExecutionEngine"),
    }
    engines = next(r for r in found.roles if r.name == "execution_engine")
    assert engines.implementations == ["pkg.engines.UserExecutionEngine"]


def test_a_tree_that_imports_itself_without_its_parent_package(tmp_path: Path):
    # examples/agent_backend imported as "agent_backend.x" (examples/ on sys.path in some setups)
    root = write(tmp_path / "examples", {
        "__init__.py": "",
        "agent_backend/__init__.py": "",
        "agent_backend/base.py": "class Root:\n    pass\n",
        "agent_backend/use.py": "from agent_backend.base import Root\nclass Leaf(Root):\n    pass\n",
    })
    found = discover(root / "agent_backend")
    assert found.module_prefix == "examples.agent_backend"
    assert found.classes["examples.agent_backend.use.Leaf"].resolved_bases == ["examples.agent_backend.base.Root"]


def test_identity_from_fastapi_signatures(tmp_path: Path):
    root = write(tmp_path / "svc", {
        "app.py": "from fastapi import Header, WebSocket\n"
                  "async def run(x_user_id: str = Header(None), other: str = Header(None)):\n    pass\n"
                  "async def proxied(user: str = Header(None, alias='x-forwarded-user')):\n    pass\n"
                  "async def ws(websocket: WebSocket, user_id: str = None):\n    pass\n",
    })
    found = discover(root)
    assert not found.identity_guessed
    assert found.identity["http"] == [{"header": "x-user-id"}, {"header": "x-forwarded-user"}]
    assert found.identity["websocket"][0] == {"query_param": "user_id"}


def test_a_header_read_with_its_underscores_kept_is_proposed_as_read(tmp_path: Path):
    # FastAPI's Header(convert_underscores=False) reads the header x_user_id; the draft said
    # x-user-id, a header the requests do not carry: no request had an ambient user
    root = write(tmp_path / "svc", {
        "app.py": "from fastapi import Header\n"
                  "async def run(x_user_id: str = Header(None, convert_underscores=False)):\n    pass\n"
                  "async def other(x_tenant_user: str = Header(None, convert_underscores=True)):\n    pass\n",
    })
    found = discover(root)
    assert found.identity["http"] == [{"header": "x_user_id"}, {"header": "x-tenant-user"}]


def test_without_hints_identity_and_messages_are_marked_as_defaults(tmp_path: Path):
    found = discover(write(tmp_path / "svc", {"m.py": "X = 1\n"}))
    assert found.identity_guessed and found.messages_guessed


def test_a_fallback_in_an_except_handler_does_not_replace_the_import_it_stands_in_for(tmp_path: Path):
    """`try: from .base import X except ImportError: X = None`: the import is what normally runs, so a
    subclass of X is a subclass of the engine (it was an unresolved base and left out of the role)."""
    root = write(tmp_path / "pkg", {
        "__init__.py": "",
        "base.py": "class UserExecutionEngine:\n    async def execute_agent(self, context):\n        return 1\n",
        "compat.py": "try:\n    from .base import UserExecutionEngine as EngineImpl\nexcept ImportError:\n"
                     "    EngineImpl = None\n"
                     "try:\n    from typing import Protocol\nexcept ImportError:\n    Protocol = object\n"
                     "try:\n    import ujson as json\nexcept ImportError:\n    import json\n",
        "tools.py": "from .compat import EngineImpl, Protocol, json\n"
                    "class ToolAwareRunner(EngineImpl):\n    async def run_with_tools(self, context):\n        return 1\n"
                    "class Runs(Protocol):\n    pass\nclass Coded(json.JSONDecoder):\n    pass\n",
    })
    found = discover(root)
    assert found.classes["pkg.tools.ToolAwareRunner"].resolved_bases == ["pkg.base.UserExecutionEngine"]
    assert found.classes["pkg.tools.Runs"].resolved_bases == ["typing.Protocol"]
    assert found.classes["pkg.tools.Coded"].resolved_bases == ["ujson.JSONDecoder"]
    engines = next(r for r in found.roles if r.name == "execution_engine")
    assert engines.implementations == ["pkg.base.UserExecutionEngine", "pkg.tools.ToolAwareRunner"]


def test_classes_and_imports_in_a_try_with_except_star_are_read_like_any_try(tmp_path: Path):
    root = write(tmp_path / "pkg", {
        "__init__.py": "",
        "base.py": "class UserExecutionEngine:\n    async def execute_agent(self, context):\n        return 1\n",
        "group.py": "try:\n    from .base import UserExecutionEngine as Base\n"
                    "    class GroupedExecutionEngine(Base):\n        pass\n"
                    "except* ImportError:\n    Base = None\n",
    })
    found = discover(root)
    assert found.classes["pkg.group.GroupedExecutionEngine"].resolved_bases == ["pkg.base.UserExecutionEngine"]


def test_a_class_under_if_name_main_is_not_indexed(tmp_path: Path):
    """That block runs when the file is a script, never on import: a path map naming its class has an
    entry check_imports cannot find."""
    root = write(tmp_path / "pkg", {
        "__init__.py": "",
        "engines.py": "class UserExecutionEngine:\n    async def execute_agent(self, context):\n        return 1\n\n"
                      "if __name__ == '__main__':\n    class DemoExecutionEngine(UserExecutionEngine):\n        pass\n"
                      "else:\n    class ImportedExecutionEngine(UserExecutionEngine):\n        pass\n"
                      "if '__main__' == __name__:\n    from .other import Thing as UserExecutionEngine\n",
    })
    found = discover(root)
    assert "pkg.engines.DemoExecutionEngine" not in found.classes
    assert found.classes["pkg.engines.ImportedExecutionEngine"].resolved_bases == ["pkg.engines.UserExecutionEngine"]
    engines = next(r for r in found.roles if r.name == "execution_engine")
    assert engines.implementations == ["pkg.engines.UserExecutionEngine", "pkg.engines.ImportedExecutionEngine"]
