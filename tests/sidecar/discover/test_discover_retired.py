"""Retired guesses: only a class (or module) that is itself deprecated is proposed retired; code that
merely mentions deprecation (a warnings filter, a deprecated keyword argument, a docstring naming the
class it replaces) must not make the canonical engine look retired."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sidecar.discover import discover

OTHER = """
class RequestScopedExecutionEngine:
    def execute_agent(self, ctx):
        return ctx
"""


def engines_role(tmp_path: Path, source: str):
    app = tmp_path / "app"
    app.mkdir()
    (app / "__init__.py").write_text("")
    (app / "engines.py").write_text(textwrap.dedent(source) + OTHER)
    return next(r for r in discover(app).roles if r.name == "execution_engine")


MENTIONS = {
    "module silences third-party deprecation warnings": """
        import warnings
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="pydantic")

        class UserExecutionEngine:
            def execute_agent(self, ctx):
                return ctx
        """,
    "a method warns about one deprecated keyword argument": """
        import warnings

        class UserExecutionEngine:
            def execute_agent(self, ctx, legacy_mode=None):
                if legacy_mode is not None:
                    warnings.warn("legacy_mode is ignored", DeprecationWarning, stacklevel=2)
                return ctx
        """,
    "__init__ warns only when a deprecated argument is passed": """
        import warnings

        class UserExecutionEngine:
            def __init__(self, registry=None, legacy_registry=None):
                if legacy_registry is not None:
                    warnings.warn("legacy_registry: pass registry", DeprecationWarning, stacklevel=2)
                self.registry = registry or legacy_registry

            def execute_agent(self, ctx):
                return ctx
        """,
    "the docstring names the deprecated class it replaces": '''
        class UserExecutionEngine:
            """The one engine. Replaces the deprecated IsolatedExecutionEngine."""
            def execute_agent(self, ctx):
                return ctx
        ''',
    "a deprecated directive indented under one :param": '''
        class UserExecutionEngine:
            """The per-user execution engine.

            :param context: the user's execution context
            :param legacy_mode: run the old scheduler

                .. deprecated:: 2.3
                   ``legacy_mode`` is ignored.
            """
            def execute_agent(self, ctx, legacy_mode=False):
                return ctx
        ''',
    "a deprecation note under one entry of a Google-style Args section": '''
        class UserExecutionEngine:
            """The per-user execution engine.

            Args:
                timeout: seconds to wait.

                    Deprecated: passing ``timeout`` positionally.

                    .. deprecated:: 2.3
            """
            def execute_agent(self, ctx, timeout=None):
                return ctx
        ''',
    "this argument is deprecated": '''
        class UserExecutionEngine:
            """Per-user engine. Passing ``timeout`` positionally: this argument is deprecated."""
            def execute_agent(self, ctx, timeout=None):
                return ctx
        ''',
    "the class name as a lowercase word": '''
        class UserExecutionEngine:
            """Runs a user's request; a userexecutionengine is deprecated when shared."""
            def execute_agent(self, ctx):
                return ctx
        ''',
    "a conditional module-level warning about a dependency": """
        import warnings
        try:
            import fastjson
        except ImportError:
            warnings.warn("fastjson missing, using json", DeprecationWarning)

        class UserExecutionEngine:
            def execute_agent(self, ctx):
                return ctx
        """,
}


@pytest.mark.parametrize("source", MENTIONS.values(), ids=MENTIONS.keys())
def test_a_mention_of_deprecation_does_not_retire_the_class(tmp_path: Path, source: str):
    engines = engines_role(tmp_path, source)
    assert engines.retired == []
    assert engines.canonical == "app.engines.UserExecutionEngine"


DEPRECATED = {
    "__init__ warns DeprecationWarning": ("""
        import warnings

        class SecondExecutionEngine:
            def __init__(self):
                warnings.warn("use UserExecutionEngine", DeprecationWarning, stacklevel=2)

            def execute_agent(self, ctx):
                return ctx
        """, "warns DeprecationWarning in __init__"),
    "__init__ warns a DeprecationWarning instance": ("""
        from warnings import warn

        class SecondExecutionEngine:
            def __init__(self):
                warn(PendingDeprecationWarning("use UserExecutionEngine"))

            def execute_agent(self, ctx):
                return ctx
        """, "warns DeprecationWarning in __init__"),
    "@deprecated decorator": ("""
        from typing_extensions import deprecated

        @deprecated("use UserExecutionEngine")
        class SecondExecutionEngine:
            def execute_agent(self, ctx):
                return ctx
        """, "decorated @deprecated"),
    "docstring starts with Deprecated": ('''
        class SecondExecutionEngine:
            """DEPRECATED: use UserExecutionEngine."""
            def execute_agent(self, ctx):
                return ctx
        ''', "docstring says it is deprecated"),
    "docstring says this class is deprecated": ('''
        class SecondExecutionEngine:
            """Runs agents one at a time.

            This class is deprecated and will be removed in 3.0.
            """
            def execute_agent(self, ctx):
                return ctx
        ''', "docstring says it is deprecated"),
    "docstring has a deprecated directive": ('''
        class SecondExecutionEngine:
            """Runs agents one at a time.

            .. deprecated:: 2.1
               Use UserExecutionEngine.
            """
            def execute_agent(self, ctx):
                return ctx
        ''', "docstring says it is deprecated"),
    "a later paragraph opens with Deprecated:": ('''
        class SecondExecutionEngine:
            """Per-run execution engine.

            Deprecated: use UserExecutionEngine instead.
            """
            def execute_agent(self, ctx):
                return ctx
        ''', "docstring says it is deprecated"),
    "a later paragraph: Deprecated, use X (abc.abstractproperty)": ('''
        class SecondExecutionEngine:
            """Per-run execution engine.

            Deprecated, use UserExecutionEngine instead.
            """
            def execute_agent(self, ctx):
                return ctx
        ''', "docstring says it is deprecated"),
    "a later paragraph: Deprecated - use X": ('''
        class SecondExecutionEngine:
            """Per-run execution engine.

            Deprecated - use UserExecutionEngine.
            """
            def execute_agent(self, ctx):
                return ctx
        ''', "docstring says it is deprecated"),
    "this execution engine has been deprecated": ('''
        class SecondExecutionEngine:
            """Runs agents one at a time. This execution engine has been deprecated."""
            def execute_agent(self, ctx):
                return ctx
        ''', "docstring says it is deprecated"),
    "the class name as written": ('''
        class SecondExecutionEngine:
            """Runs agents one at a time; SecondExecutionEngine is deprecated since 2.0."""
            def execute_agent(self, ctx):
                return ctx
        ''', "docstring says it is deprecated"),
    "an unindented directive after the :param list (click's _OptionParser)": ('''
        class SecondExecutionEngine:
            """Runs agents one at a time.

            :param ctx: optionally the context where this engine should go with.

            .. deprecated:: 8.2
                Will be removed in 9.0.
            """
            def execute_agent(self, ctx):
                return ctx
        ''', "docstring says it is deprecated"),
    "an unindented directive after an Attributes section (jsonschema's _RefResolver)": ('''
        class SecondExecutionEngine:
            """Runs agents one at a time.

            Attributes:

                cache_remote (bool):

                    Whether remote refs should be cached

            .. deprecated:: v4.18.0

                ``SecondExecutionEngine`` has been deprecated in favor of `referencing`.
            """
            def execute_agent(self, ctx):
                return ctx
        ''', "docstring says it is deprecated"),
    "module warns DeprecationWarning on import": ("""
        import warnings
        warnings.warn("app.engines is deprecated", DeprecationWarning, stacklevel=2)

        class SecondExecutionEngine:
            def execute_agent(self, ctx):
                return ctx
        """, "its module warns DeprecationWarning on import"),
}


@pytest.mark.parametrize(("source", "reason"), DEPRECATED.values(), ids=DEPRECATED.keys())
def test_a_class_that_is_itself_deprecated_is_proposed_retired(tmp_path: Path, source: str, reason: str):
    engines = engines_role(tmp_path, source)
    retired = {m.key: m.retired_reason for m in engines.members if m.retired_reason}
    if reason.startswith("its module"):   # every class of that module
        assert retired == {"app.engines.SecondExecutionEngine": reason,
                           "app.engines.RequestScopedExecutionEngine": reason}
    else:
        assert retired == {"app.engines.SecondExecutionEngine": reason}


def test_the_class_name_counts_as_written_and_this_only_with_a_noun_for_the_class():
    """click's Command: "the command is deprecated" is about a command the user runs, not the class."""
    from sidecar.discover.index import says_deprecated

    assert not says_deprecated("Runs a command. The command is deprecated when hidden=True.", "Command")
    assert says_deprecated("Command is deprecated: use Group.", "Command")
    assert says_deprecated("Runs a command.\n\nThis command is deprecated.", "Command")   # the class's own noun
    assert not says_deprecated("Runs a command. This option is deprecated.", "Command")
    assert says_deprecated("Runs a command. This is deprecated.", "Command")
