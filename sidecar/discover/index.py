"""Turn one parsed module into a ``ModuleInfo``: its names (imports, classes, aliases) and its classes.

Only what is visible at module level counts, including inside module-level ``if``/``try``/``with``
blocks (``try: from x import Y except ImportError: ...`` is common) -- but not the body of
``if TYPE_CHECKING:``, which never runs: its classes are reported as type-checking only, its imports
kept only to read annotations. Classes nested in functions cannot
be named in a path map, so they are not indexed. The AST is dropped after this step; only the small
summary survives, which keeps memory flat on large trees.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass

from sidecar.discover.model import Binding, ClassInfo, Method, ModuleInfo, Param, SourceFile

# a warning category naming deprecation: DeprecationWarning, PendingDeprecationWarning, a project's own
_DEPRECATION_SUFFIX = "DeprecationWarning"
# methods that run whenever an instance is made: a warning there says the class itself is deprecated
_CONSTRUCTORS = ("__init__", "__new__", "__post_init__")
_ABSTRACT_DECORATORS = frozenset({"abstractmethod", "abstractproperty"})
_IDENTITY_SOURCES = {"headers": "header", "query_params": "query_param"}
# only sends are read for the shape of a fan-out (a loop over a per-user send): one more walk of
# their bodies, not of every method of a large tree
_SEND_NAMES = re.compile(r"(send|broadcast|multicast)(_|$)")
_LOOPS = (ast.For, ast.AsyncFor, ast.While, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


@dataclass(slots=True, frozen=True)
class _TextFlags:
    yield_lines: tuple[str, ...] | None = None   # the source lines, kept only when "yield" occurs at all
    deprecation: bool = True

    def may_yield(self, func: ast.AST) -> bool:
        if self.yield_lines is None:
            return False
        end = getattr(func, "end_lineno", None) or len(self.yield_lines)
        return any("yield" in line for line in self.yield_lines[func.lineno - 1:end])


def dotted(node: ast.AST) -> str:
    """``a.b.C`` for Name/Attribute chains (``Generic[T]`` -> ``Generic``); "" for anything else."""
    if isinstance(node, ast.Subscript):
        return dotted(node.value)
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def type_checking_test(test: ast.expr) -> bool | None:
    """True for ``TYPE_CHECKING`` (``typing.TYPE_CHECKING``, ``t.TYPE_CHECKING``, ...), False for
    ``not TYPE_CHECKING``, None for any other test."""
    negated = isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not)
    name = dotted(test.operand if isinstance(test, ast.UnaryOp) and negated else test)
    if name == "TYPE_CHECKING" or name.endswith(".TYPE_CHECKING"):
        return not negated
    return None


def _is_main_test(test: ast.expr) -> bool:
    """``__name__ == "__main__"`` (either way round)."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    return any(isinstance(side, ast.Name) and side.id == "__name__" for side in sides) and \
        any(isinstance(side, ast.Constant) and side.value == "__main__" for side in sides)


def _module_statements(body: list[ast.stmt], type_only: bool = False,
                       fallback: bool = False) -> Iterator[tuple[ast.stmt, bool, bool]]:
    """Every module-level statement, with whether it runs for type checkers only (the body of
    ``if TYPE_CHECKING:``, the ``else`` of ``if not TYPE_CHECKING:``: False at run time) and whether it
    is a fallback (in an ``except`` handler: runs only when the ``try`` body failed)."""
    for stmt in body:
        yield stmt, type_only, fallback
        if isinstance(stmt, ast.If) and _is_main_test(stmt.test):
            # the body runs when the file is executed as a script, never on import: nothing there can be
            # named in a path map (its else runs on import)
            yield from _module_statements(stmt.orelse, type_only, fallback)
        elif isinstance(stmt, ast.If):
            checking = type_checking_test(stmt.test)
            yield from _module_statements(stmt.body, type_only or checking is True, fallback)
            yield from _module_statements(stmt.orelse, type_only or checking is False, fallback)
        elif isinstance(stmt, (ast.Try, ast.TryStar)):
            for block in (stmt.body, stmt.orelse, stmt.finalbody):
                yield from _module_statements(block, type_only, fallback)
            for handler in stmt.handlers:
                yield from _module_statements(handler.body, type_only, True)
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            yield from _module_statements(stmt.body, type_only, fallback)


def warns_deprecation(stmt: ast.stmt) -> bool:
    """``warnings.warn("...", DeprecationWarning)`` or ``warn(DeprecationWarning("..."))`` as a statement.

    Only the statement itself counts, never one nested in an ``if``/``try``: a warning about one
    deprecated argument or a missing dependency does not deprecate the class or module around it, nor
    does a ``filterwarnings(..., category=DeprecationWarning)`` that silences someone else's warnings.
    """
    if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)):
        return False
    call = stmt.value
    if dotted(call.func).rsplit(".", 1)[-1] != "warn":
        return False
    category = call.args[1] if len(call.args) > 1 else \
        next((keyword.value for keyword in call.keywords if keyword.arg == "category"), None)
    if category is None and call.args and isinstance(call.args[0], ast.Call):
        category = call.args[0].func   # warn(DeprecationWarning("..."))
    return category is not None and dotted(category).endswith(_DEPRECATION_SUFFIX)


# the parts of a docstring that describe one parameter, field or result: a deprecation note in their
# bodies is about that one (":param legacy: ...  .. deprecated::"), not about the class
_FIELD_LINE = re.compile(r":(?:param|parameter|arg|argument|key|keyword|kwarg|type|ivar|cvar|var|raises?"
                         r"|except|exception|returns?|rtype|yields?|ytype)\b[^:]*:")
_SECTION_LINE = re.compile(r"(?:Args|Arguments|Parameters|Params|Keyword\s+Args|Keyword\s+Arguments|Kwargs"
                           r"|Other\s+Parameters|Attributes|Returns|Raises|Yields)[ \t]*:[ \t]*")
_NUMPY_SECTIONS = frozenset({"parameters", "other parameters", "attributes", "returns", "yields", "receives",
                             "raises", "warns"})
_LEFT_OUT = "\x00"   # stands for a line left out: neither blank (no new paragraph) nor text


def _class_level_text(doc: str) -> str:
    """``doc`` with the bodies of parameter fields and sections left out, line by line.

    reST fields (``:param x: ...`` and the lines indented under it), Google sections (``Args:`` and the
    lines indented under it) and numpydoc sections (``Parameters`` over dashes, up to the next header).
    An unindented line after a field list or a Google section is the docstring's own text again.
    """
    lines = doc.splitlines()
    out: list[str] = []
    state = ""   # "" | "field" | "section" | "numpy"
    index = 0
    while index < len(lines):
        line = lines[index]
        following = lines[index + 1].strip() if index + 1 < len(lines) else ""
        if not line.strip():
            out.append(line)
        elif line[0] not in " \t" and re.fullmatch(r"-{3,}", following):   # a numpydoc header
            state = "numpy" if line.strip().lower() in _NUMPY_SECTIONS else ""
            out += [_LEFT_OUT, _LEFT_OUT]
            index += 1
        elif line[0] not in " \t" and state != "numpy":
            if _FIELD_LINE.match(line):
                state = "field"
            elif _SECTION_LINE.fullmatch(line):
                state = "section"
            else:
                state = ""
            out.append(_LEFT_OUT if state else line)
        else:
            out.append(_LEFT_OUT if state else line)
        index += 1
    return "\n".join(out)


# "this <noun> is deprecated" names the class only with a noun that can stand for a class
_SELF_NOUNS = ("class", "type", "engine", "executor", "supervisor", "orchestrator", "emitter", "notifier",
               "bridge", "manager", "implementation", "adapter", "wrapper", "proxy", "facade", "shim",
               "backend", "component", "service", "object", "interface", "api", "module", "variant", "version")


def says_deprecated(doc: str, class_name: str) -> bool:
    """The docstring says the class itself is deprecated, not merely that something it names is.

    Counted: "Deprecated: use X" / "DEPRECATED." / "Deprecated since 2.0" opening the docstring or
    one of its paragraphs, "This class is deprecated" (``this`` alone or with a noun that can stand
    for the class: class, engine, implementation, ...), "<ClassName> is deprecated" (the name as
    written, case-sensitive), and an unindented ``.. deprecated::`` directive. The bodies of parameter
    fields and sections (``:param x:``, ``Args:``, numpydoc ``Parameters``) are not read: a note there
    is about one argument. Not counted: "Replaces the deprecated X", "this argument is deprecated", a
    ``.. deprecated::`` under a ``:param``, "the command is deprecated" for class ``Command``.
    """
    text = _class_level_text(doc)
    last_word = re.findall(r"[A-Z]?[a-z]+|[A-Z]+", class_name)
    nouns = {*_SELF_NOUNS, *([last_word[-1].lower()] if last_word else [])}
    this = rf"(?i:this(?:\s+\w+)?\s+(?:{'|'.join(sorted(map(re.escape, nouns)))})|this)"
    name = rf"(?<!\w){re.escape(class_name)}"   # case-sensitive: "the command" is not Command
    said = r"(?i:\s+(?:is|has\s+been|was)\s+(?:now\s+)?deprecated)\b"
    # a later paragraph only when it opens with the word as a label: "Deprecated: use X", "Deprecated.",
    # "Deprecated, use X", "Deprecated - use X"
    paragraph = r"(?i:[^\w\s]{0,3}deprecated[^\w\s]{0,3}(?:[:.!,;]|\s+[-\u2013\u2014]|\s+since\b|$))"
    return bool(re.search(rf"\A[^\w\s]{{0,3}}(?i:deprecated)\b|\n[ \t]*\n{paragraph}|^\.\.[ \t]+deprecated::"
                          rf"|\b{this}{said}|{name}{said}", text, re.MULTILINE))


def relative_import_above_top(tree: ast.Module, module: str, is_package: bool) -> tuple[int, str] | None:
    """(line, why) of a relative import run on import that climbs above the top-level package, else None.

    ``from .engines import X`` in a top-level module raises ImportError ("no known parent package"),
    so does ``from ...x import y`` two levels under the top. Only statements straight in the module body
    count: one under ``if TYPE_CHECKING:``, in a ``try``, or in a function may never run.
    """
    depth = len(module.split(".")) if module else 0
    if not is_package:
        depth -= 1
    for stmt in tree.body:
        if isinstance(stmt, ast.ImportFrom) and stmt.level > depth:
            text = f"from {'.' * stmt.level}{stmt.module or ''} import ..."
            if depth <= 0:
                return stmt.lineno, f"'{text}' is a relative import in a top-level module (no parent package)"
            return stmt.lineno, f"'{text}' climbs above the top-level package {module.split('.')[0]}"
    return None


def resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    """``from ..x import y`` inside ``a.b.c`` -> ``a.x``. Too many dots yield the best effort."""
    parts = module.split(".") if module else []
    if not is_package:
        parts = parts[:-1]
    if level > 1:
        parts = parts[: max(0, len(parts) - (level - 1))]
    if target:
        parts.append(target)
    return ".".join(parts)


class _ModuleIndexer:
    def __init__(self, source: SourceFile) -> None:
        self.source = source
        self.info = ModuleInfo(source.module, source.relpath, source.is_package)
        self._type_only = False
        # in an ``except`` handler (``except ImportError: X = None``): runs only when the ``try`` body
        # failed, so it never replaces what the ``try`` body bound (the import that normally runs)
        self._fallback = False

    def index(self, tree: ast.Module, text: str) -> ModuleInfo:
        # cheap substring checks spare whole-subtree walks on the (many) files that cannot match
        self.flags = _TextFlags(yield_lines=tuple(text.splitlines()) if "yield" in text else None,
                                deprecation="eprecat" in text or "EPRECAT" in text)
        type_only: dict[str, int] = {}
        self._top_level = {id(stmt) for stmt in tree.body}
        for stmt, for_type_checkers, fallback in _module_statements(tree.body):
            self._fallback = fallback
            if not for_type_checkers:
                self._statement(stmt)
            elif isinstance(stmt, ast.ClassDef):
                # never defined at run time: no path map can name it (reported, not indexed)
                type_only.setdefault(stmt.name, stmt.lineno)
            elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
                # the names annotations use (``ctx: "UserContext"``): kept to read their fields, never
                # over a name bound at run time, never reported as an alias
                self._statement(stmt, type_only=True)
        self.info.type_only_classes = [(name, line) for name, line in type_only.items()
                                       if name not in self.info.classes]
        self.info.rebound_classes = [item for item in self.info.rebound_classes if item[0] not in self.info.classes]
        if _DEPRECATION_SUFFIX in text:
            self.info.deprecated_on_import = any(warns_deprecation(stmt) for stmt in tree.body)
        if any(word in text for word in ('"type"', "'type'", "headers", "query_params", "Header(", "WebSocket")):
            self._scan_hints(tree)
        return self.info

    def _statement(self, stmt: ast.stmt, type_only: bool = False) -> None:
        self._type_only = type_only
        if isinstance(stmt, ast.ClassDef):
            self.info.bindings[stmt.name] = Binding("class", stmt.name, lineno=stmt.lineno)
            self.info.classes[stmt.name] = index_class(stmt, self.source.module, self.flags)
        elif isinstance(stmt, ast.Import):
            for alias in stmt.names:
                if alias.asname:
                    self._bind(alias.asname, Binding("module", alias.name, lineno=stmt.lineno))
                else:   # "import a.b" binds "a"
                    head = alias.name.split(".")[0]
                    self._bind(head, Binding("module", head, lineno=stmt.lineno))
        elif isinstance(stmt, ast.ImportFrom):
            self._import_from(stmt)
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            for target in targets:
                if isinstance(target, ast.Name) and stmt.value is not None:
                    self._rebind_class(target.id, stmt, stmt.value)
            self._assignment(stmt)
        elif isinstance(stmt, ast.Delete):
            for target in stmt.targets:
                if isinstance(target, ast.Name):
                    self._rebind_class(target.id, stmt, None)
                    self.info.bindings.pop(target.id, None)

    def _rebind_class(self, name: str, stmt: ast.stmt, value: ast.expr | None) -> None:
        """``name`` is bound again after ``class name``: not the class any more, unless it is wrapped
        (``X = register(X)``) or the statement may not run (in an ``if``/``try``): then only said."""
        cls = self.info.classes.get(name)
        if cls is None or (isinstance(value, ast.Name) and value.id == name):
            return
        text = f"del {name}" if value is None else f"{name} = {_short_source(value, 40)}"
        wraps_it = isinstance(value, ast.Call) and any(
            isinstance(node, ast.Name) and node.id == name for node in ast.walk(value))
        if id(stmt) in self._top_level and not wraps_it:
            del self.info.classes[name]
            self.info.rebound_classes.append((name, cls.lineno, f"line {stmt.lineno}: {text}"))
        elif not cls.rebound:
            cls.rebound = (f"its name is bound again on line {stmt.lineno} ({text}): check {cls.key} "
                           "is this class where the app runs")

    def _import_from(self, stmt: ast.ImportFrom) -> None:
        if stmt.level:
            base = resolve_relative(self.source.module, self.source.is_package, stmt.level, stmt.module)
        else:
            base = stmt.module or ""
        for alias in stmt.names:
            if alias.name == "*":
                self.info.star_imports.append(base)
                continue
            self._bind(alias.asname or alias.name, Binding("from", base, alias.name, stmt.lineno))

    def _bind(self, name: str, binding: Binding) -> None:
        if self._fallback and name in self.info.bindings:
            return
        if self._type_only:
            if name in self.info.bindings:
                return   # bound at run time: that is what the name is
            binding.type_only = True
        self.info.bindings[name] = binding

    def _assignment(self, stmt: ast.Assign | ast.AnnAssign) -> None:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        if stmt.value is None or len(targets) != 1 or not isinstance(targets[0], ast.Name):
            return
        if self._fallback and targets[0].id in self.info.bindings:
            return
        expr = dotted(stmt.value) if isinstance(stmt.value, (ast.Name, ast.Attribute)) else ""
        if expr:
            self.info.bindings[targets[0].id] = Binding("alias", expr, lineno=stmt.lineno)
        elif targets[0].id in self.info.bindings:
            # rebinding a name to something else (a call, a literal) hides the earlier meaning
            del self.info.bindings[targets[0].id]

    def _scan_hints(self, tree: ast.Module) -> None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                keys = tuple(k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str))
                if "type" in keys and len(keys) >= 2:
                    self.info.message_keys.append(keys)
            elif isinstance(node, (ast.Call, ast.Subscript)):
                hint = _identity_hint(node)
                if hint:
                    self.info.identity_hints.append(hint)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.info.identity_hints.extend(_route_parameter_hints(node))


def _identity_hint(node: ast.Call | ast.Subscript) -> tuple[str, str] | None:
    """``request.headers.get("x-user-id")`` / ``websocket.query_params["user_id"]`` -> (source, key)."""
    if isinstance(node, ast.Call):
        func = node.func
        if not (isinstance(func, ast.Attribute) and func.attr == "get" and node.args):
            return None
        holder, key = func.value, node.args[0]
    else:
        holder, key = node.value, node.slice
    if not (isinstance(holder, ast.Attribute) and holder.attr in _IDENTITY_SOURCES):
        return None
    if not (isinstance(key, ast.Constant) and isinstance(key.value, str)) or "user" not in key.value.lower():
        return None
    return _IDENTITY_SOURCES[holder.attr], key.value


def _route_parameter_hints(func: ast.FunctionDef | ast.AsyncFunctionDef) -> list[tuple[str, str]]:
    """FastAPI signatures: ``x_user_id: str = Header(None)`` reads header ``x-user-id``; a plain
    ``user_id: str`` next to a ``WebSocket`` parameter is a query parameter of the socket URL."""
    args = [*func.args.posonlyargs, *func.args.args, *func.args.kwonlyargs]
    defaults = dict(zip([a.arg for a in reversed(func.args.posonlyargs + func.args.args)],
                        reversed(func.args.defaults)))
    defaults.update({a.arg: d for a, d in zip(func.args.kwonlyargs, func.args.kw_defaults) if d is not None})
    is_socket = any(arg.annotation is not None and dotted(arg.annotation).endswith("WebSocket") for arg in args)
    hints = []
    for arg in args:
        if "user" not in arg.arg.lower():
            continue
        default = defaults.get(arg.arg)
        if isinstance(default, ast.Call) and dotted(default.func).rsplit(".", 1)[-1] == "Header":
            alias = next((kw.value.value for kw in default.keywords if kw.arg == "alias"
                          and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str)), None)
            # Header(convert_underscores=False) reads the header named as the parameter, underscores kept
            keeps = any(kw.arg == "convert_underscores" and isinstance(kw.value, ast.Constant)
                        and kw.value.value is False for kw in default.keywords)
            hints.append(("header", alias or (arg.arg if keeps else arg.arg.replace("_", "-"))))
        elif is_socket and (default is None or isinstance(default, ast.Constant)):
            hints.append(("query_param", arg.arg))
    return hints


def _params(args: ast.arguments, drop_first: bool) -> list[Param]:
    positional = [*args.posonlyargs, *args.args]
    if drop_first and positional:
        positional = positional[1:]
    every = [*positional, *([args.vararg] if args.vararg else []), *args.kwonlyargs,
             *([args.kwarg] if args.kwarg else [])]
    return [Param(arg.arg, ast.unparse(arg.annotation) if arg.annotation else "") for arg in every]


def _decorator_names(func: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    names = set()
    for decorator in func.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        name = dotted(target)
        names.add(name.rsplit(".", 1)[-1])
    return names


def _own_nodes(func: ast.AST) -> Iterator[ast.AST]:
    """Nodes of a function body without descending into nested functions, lambdas or classes."""
    stack = list(ast.iter_child_nodes(func))
    while stack:
        node = stack.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            stack.extend(ast.iter_child_nodes(node))


def _method_kind(func: ast.FunctionDef | ast.AsyncFunctionDef, may_yield: bool = True) -> str:
    is_generator = may_yield and any(isinstance(node, (ast.Yield, ast.YieldFrom)) for node in _own_nodes(func))
    if isinstance(func, ast.AsyncFunctionDef):
        return "async_generator" if is_generator else "async"
    return "generator" if is_generator else "sync"


def _delegation(func: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """``return await self.inner.run(...)`` as the only statement -> "self.inner.run"."""
    body = [stmt for stmt in func.body
            if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant))]   # docstring
    if len(body) != 1 or not isinstance(body[0], (ast.Return, ast.Expr)) or body[0].value is None:
        return ""
    value = body[0].value
    if isinstance(value, ast.Await):
        value = value.value
    if not isinstance(value, ast.Call):
        return ""
    target = dotted(value.func)
    return target if target.startswith("self.") and target.count(".") >= 2 else ""


def _looped_self_calls(func: ast.FunctionDef | ast.AsyncFunctionDef) -> tuple[str, ...]:
    """``self.NAME(...)`` calls made once per item of a loop or comprehension (its body or element,
    not what it iterates over), in order, once each."""
    found: dict[str, None] = {}
    for loop in _own_nodes(func):
        if not isinstance(loop, _LOOPS):
            continue
        if isinstance(loop, (ast.For, ast.AsyncFor, ast.While)):
            per_item: list[ast.AST] = [*loop.body]
        else:
            per_item = [loop.key, loop.value] if isinstance(loop, ast.DictComp) else [loop.elt]
        for top in per_item:
            for node in (top, *_own_nodes(top)):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and isinstance(node.func.value, ast.Name) and node.func.value.id == "self":
                    found.setdefault(node.func.attr, None)
    return tuple(found)


def _is_abstract(func: ast.FunctionDef | ast.AsyncFunctionDef, decorators: set[str]) -> bool:
    if decorators & _ABSTRACT_DECORATORS:
        return True
    body = [s for s in func.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]
    if not body:
        return True   # only a docstring
    only = body[0]
    if len(body) == 1 and isinstance(only, ast.Raise) and only.exc is not None:
        return dotted(only.exc.func if isinstance(only.exc, ast.Call) else only.exc) == "NotImplementedError"
    return len(body) == 1 and isinstance(only, ast.Expr) and isinstance(only.value, ast.Constant) \
        and only.value.value is Ellipsis


def _self_assignments(func: ast.FunctionDef | ast.AsyncFunctionDef) -> dict[str, str]:
    found: dict[str, str] = {}
    for node in _own_nodes(func):
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        for target in targets:
            for leaf in (target.elts if isinstance(target, ast.Tuple) else [target]):
                if isinstance(leaf, ast.Attribute) and isinstance(leaf.value, ast.Name) and leaf.value.id == "self":
                    found.setdefault(leaf.attr, _short_source(value))
    return found


def _short_source(node: ast.AST, limit: int = 80) -> str:
    text = ast.unparse(node)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def index_class(node: ast.ClassDef, module: str, flags: _TextFlags) -> ClassInfo:
    info = ClassInfo(module=module, name=node.name, lineno=node.lineno,
                     lines=(node.end_lineno or node.lineno) - node.lineno + 1,
                     bases=[name for name in (dotted(base) for base in node.bases) if name])
    for stmt in node.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            _add_method(info, stmt, flags.may_yield(stmt))
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            info.field_types[stmt.target.id] = ast.unparse(stmt.annotation)
    if flags.deprecation:
        info.deprecation = _deprecation(node)
    return info


def _deprecation(node: ast.ClassDef) -> str:
    """Why the class itself looks deprecated, "" when it does not."""
    if "deprecated" in _decorator_names_of_class(node):   # typing_extensions / warnings.deprecated
        return "decorated @deprecated"
    for stmt in node.body:
        if warns_deprecation(stmt):
            return "warns DeprecationWarning in the class body"
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name in _CONSTRUCTORS \
                and any(warns_deprecation(inner) for inner in stmt.body):
            return f"warns DeprecationWarning in {stmt.name}"
    if says_deprecated(ast.get_docstring(node) or "", node.name):
        return "docstring says it is deprecated"
    return ""


def _decorator_names_of_class(node: ast.ClassDef) -> set[str]:
    return {dotted(d.func if isinstance(d, ast.Call) else d).rsplit(".", 1)[-1] for d in node.decorator_list}


def _add_method(info: ClassInfo, func: ast.FunctionDef | ast.AsyncFunctionDef, may_yield: bool = True) -> None:
    decorators = _decorator_names(func)
    if "property" in decorators or "cached_property" in decorators:
        info.properties.append(func.name)
        return
    if decorators & {"setter", "deleter"}:
        return
    drop_first = "staticmethod" not in decorators
    method = Method(name=func.name, kind=_method_kind(func, may_yield), params=_params(func.args, drop_first),
                    lineno=func.lineno, delegates_to=_delegation(func),
                    is_abstract=_is_abstract(func, decorators),
                    looped_self_calls=_looped_self_calls(func) if _SEND_NAMES.match(func.name) else ())
    info.methods[func.name] = method
    if func.name == "__init__":
        info.init_params = method.params
        info.self_attrs = _self_assignments(func)


def index_module(source: SourceFile, tree: ast.Module, text: str) -> ModuleInfo:
    return _ModuleIndexer(source).index(tree, text)
