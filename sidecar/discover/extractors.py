"""Guess the path map's extractor paths (owner, subject, target, run id, thread id, event type) from
``__init__`` assignments and the parameters of the wrapped methods.

When a parameter is annotated with a class of the tree (``context: UserExecutionContext``), that
class's known attributes decide which paths exist (``arg.context.run_id`` only if it has ``run_id``);
otherwise the conventional names of the reference case are assumed. Paths are ordered by how many
implementations and methods offer them, most first.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Callable

from sidecar.discover.model import ClassInfo, Method, Param
from sidecar.discover.resolve import all_methods

CONTEXT_NAMES = ("user_context", "context", "ctx", "execution_context", "request_context")
USER_ATTRS = ("user_id",)
MESSAGE_NAMES = ("message", "msg", "event", "payload")
_WORD = re.compile(r"[A-Za-z_][\w.]*")
_TYPING_WORDS = frozenset({"Optional", "Union", "None", "Any", "list", "dict", "str", "int", "typing"})

# (module, annotation) -> attributes of the in-tree class it names, or None when unknown
AttrsOf = Callable[[str, str], "set[str] | None"]


def is_context_name(name: str) -> bool:
    """A parameter or attribute holding a context object (``user_context``, ``ctx``, ``*_context``)."""
    bare = name.lstrip("_")
    return bare in CONTEXT_NAMES or bare.endswith("_context")


def _path_rank(path: str) -> int:
    """The first path that resolves wins at run time, so the most specific source goes first: a
    parameter carrying the very id (``arg.run_id``), then an explicit user context, then any context."""
    if path.count(".") == 1 and path.startswith("arg.") and not path.endswith("user_id"):
        return 0
    if ".user_context." in path:
        return 1
    return 2 if path.count(".") >= 2 else 3


class _Votes:
    """Counts proposals; ranked by specificity, then by how often they were offered."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.order: dict[str, int] = {}

    def add(self, path: str) -> None:
        self.order.setdefault(path, len(self.order))
        self.counts[path] += 1

    def ranked(self) -> list[str]:
        return sorted(self.counts, key=lambda path: (_path_rank(path), -self.counts[path], self.order[path]))


def _context_paths(prefix: str, field: str, attrs: set[str] | None) -> list[str]:
    """Paths to ``field`` through a context object at ``prefix`` (e.g. ``arg.context``)."""
    if attrs is None:
        return [f"{prefix}.{field}"]
    if field in attrs:
        return [f"{prefix}.{field}"]
    if "user_context" in attrs:   # a request context that wraps a user context
        return [f"{prefix}.user_context.{field}"]
    return []


class ExtractorGuesser:
    def __init__(self, classes: dict[str, ClassInfo], attrs_of: AttrsOf) -> None:
        self.classes = classes
        self.attrs_of = attrs_of

    def owner(self, members: list[str]) -> list[str]:
        votes = _Votes()
        for key in members:
            cls, init = self._init_of(key)
            if cls is None:
                continue
            annotations = {param.name: param.annotation for param in (init.params if init else [])}
            for attr, value in sorted(cls.self_attrs.items(), key=lambda item: _owner_rank(item[0])):
                self._owner_paths(votes, cls, attr, annotations.get(value, ""))
            for attr, annotation in cls.field_types.items():
                self._owner_paths(votes, cls, attr, annotation)
        return votes.ranked()

    def _owner_paths(self, votes: _Votes, cls: ClassInfo, attr: str, annotation: str) -> None:
        if attr.lstrip("_") in USER_ATTRS:
            votes.add(f"self.{attr}")
        elif is_context_name(attr):
            attrs = self.attrs_of(cls.module, annotation) if annotation else None
            for path in _context_paths(f"self.{attr}", "user_id", attrs):
                votes.add(path)

    def _init_of(self, key: str) -> tuple[ClassInfo | None, Method | None]:
        owner = all_methods(key, self.classes).get("__init__")
        if owner is None:   # a dataclass-style class: fields only
            return self.classes[key], None
        cls = self.classes[owner]
        return cls, cls.methods["__init__"]

    def wrapped(self, members: list[str], patterns: list[str]) -> list[tuple[ClassInfo, Method]]:
        """Every (defining class, method) the role's method patterns match on its implementations."""
        found = []
        for key in members:
            for name, owner in all_methods(key, self.classes).items():
                if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
                    found.append((self.classes[owner], self.classes[owner].methods[name]))
        return found

    def from_args(self, calls: list[tuple[ClassInfo, Method]], field: str) -> list[str]:
        """Paths to a user id / run id / thread id in the wrapped methods' parameters."""
        votes = _Votes()
        for cls, method in calls:
            for param in _by_preference(method.params):
                if param.name == field:
                    votes.add(f"arg.{param.name}")
                elif is_context_name(param.name):
                    attrs = self.attrs_of(cls.module, param.annotation) if param.annotation else None
                    for path in _context_paths(f"arg.{param.name}", field, attrs):
                        votes.add(path)
        return votes.ranked()

    def from_message(self, calls: list[tuple[ClassInfo, Method]], key: str) -> list[str]:
        votes = _Votes()
        for _, method in calls:
            for param in method.params:
                if param.name in MESSAGE_NAMES:
                    votes.add(f"arg.{param.name}.{key}")
        return votes.ranked()

    def from_self(self, members: list[str], field: str) -> list[str]:
        """``self.run_id`` or ``self.user_context.run_id``: what the instance was built with."""
        votes = _Votes()
        for key in members:
            cls, init = self._init_of(key)
            if cls is None:
                continue
            annotations = {param.name: param.annotation for param in (init.params if init else [])}
            for attr in sorted(cls.attributes, key=_owner_rank):
                if attr.lstrip("_") == field:
                    votes.add(f"self.{attr}")
                elif is_context_name(attr):
                    annotation = annotations.get(cls.self_attrs.get(attr, ""), "") or cls.field_types.get(attr, "")
                    attrs = self.attrs_of(cls.module, annotation) if annotation else None
                    for path in _context_paths(f"self.{attr}", field, attrs):
                        votes.add(path)
        return votes.ranked()

    def event_type_arg(self, calls: list[tuple[ClassInfo, Method]]) -> list[str]:
        names = {param.name for _, method in calls for param in method.params}
        return ["arg.event_type"] if "event_type" in names else []


def _owner_rank(attr: str) -> int:
    bare = attr.lstrip("_")
    return 0 if bare == "user_context" else 1 if bare in USER_ATTRS else 2


def _by_preference(params: list[Param]) -> list[Param]:
    """``user_context`` before other contexts before plain ids: the richer object is the better source."""
    def rank(param: Param) -> int:
        bare = param.name.lstrip("_")
        return 0 if bare == "user_context" else 1 if is_context_name(param.name) else 2
    return sorted(params, key=rank)


def annotation_names(annotation: str) -> list[str]:
    """``Optional["ctx.UserExecutionContext"]`` -> ``["ctx.UserExecutionContext"]``."""
    return [word for word in _WORD.findall(annotation) if word not in _TYPING_WORDS]
