"""The path map: which classes play which role, and where users, runs and events are found.

Loading validates the structure (pydantic), the syntax of every pattern and extractor path, and the
cross-references (one canonical at most; canonical and retired among the implementations). Whether a
module imports, a class exists and a method is defined is checked when the module is imported (the
wrapping hook calls ``matches`` and ``choose``) or eagerly by ``PathMap.check_imports()``, which also
refuses one class object named by two roles through two names. Every error is a
``PathMapError`` naming the file, the line and the key path (``roles.engine.methods[1]``).
"""

from __future__ import annotations

import fnmatch
import functools
import importlib
import inspect
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field,
                      ValidationError, model_validator)

from instrumentation.errors import PathMapError, record_error
from instrumentation.extractors import (ExtractorSpec, binds_instance, check_key_chain, dotted_names,
                                        parse_extractor)
from instrumentation.yaml_loader import DuplicateKeyError, UniqueKeyLoader

_ROLE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_ROLE_NAME_RULE = "a role name is letters, digits, '_' and '-', starting with a letter or '_'"
_GLOB_CHARS = frozenset("*?[")
_GLOB_SYNTAX = str.maketrans("", "", "*?[]!")
#: an HTTP header name (RFC 9110 token)
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")

KeyPath = tuple[str | int, ...]
#: method descriptors that are not callable themselves but make methods
METHOD_DESCRIPTORS = (classmethod, staticmethod, functools.singledispatchmethod,
                      functools.partialmethod)


def is_glob(text: str) -> bool:
    return any(ch in _GLOB_CHARS for ch in text)


def _is_name_pattern(text: str) -> bool:
    """A name or a glob of names: characters of Python identifiers (the non-ASCII ones Python accepts
    included) and ``* ? [ ] !``."""
    return bool(text) and f"_{text.translate(_GLOB_SYNTAX)}".isidentifier()


# --- field validators (each raises ValueError with a message that stands on its own) -----------
def _check_implementation(text: str) -> str:
    module, _, cls = text.rpartition(".")
    if not module or not dotted_names(module):
        raise ValueError(f"bad implementation {text!r}: expected module.Class (a '*' may appear in "
                         "the class part only)")
    if not _is_name_pattern(cls):
        raise ValueError(f"bad class pattern {cls!r} in {text!r}")
    if is_glob(cls):
        try:
            re.compile(fnmatch.translate(cls))
        except re.error as exc:
            raise ValueError(f"bad glob {cls!r} in {text!r}: {exc}") from None
        if cls.count("[") != cls.count("]"):
            raise ValueError(f"bad glob {cls!r} in {text!r}: unbalanced brackets")
    return text


#: never wrapped as methods (``wrapping._method_names``): ``__init__`` is wrapped only to read a
#: user-scoped role's owner when it returns
CONSTRUCTORS = ("__init__", "__init_subclass__", "__new__")


def _check_method(text: str) -> str:
    if not _is_name_pattern(text) or text.count("[") != text.count("]"):
        raise ValueError(f"bad method name or glob {text!r}")
    if text in CONSTRUCTORS:  # loaded, checked and never traced: the spans asked for never came
        raise ValueError(f"method {text!r} is not traced: pathwatch traces no constructor (a "
                         "user-scoped role's owner is read as __init__ returns); name the methods "
                         "the objects do their work in")
    return text


def _check_extractor(text: str) -> str:
    parse_extractor(text)
    return text


def _check_self_path(text: str) -> str:
    if parse_extractor(text).source != "self":
        raise ValueError(f"owner path {text!r} must start with 'self.': the owner is read from the "
                         "instance right after __init__ returns")
    return text


def _check_connections_path(text: str) -> str:
    if parse_extractor(text).source != "self":
        raise ValueError(f"connections path {text!r} must start with 'self.': it names the "
                         "dispatcher's own registry of sockets by user")
    return text


def _check_header_name(text: str) -> str:
    if not _HEADER_NAME_RE.match(text):
        raise ValueError(f"bad header name {text!r}: letters, digits and !#$%&'*+-.^_`|~ only")
    return text


def _as_list(value: Any) -> Any:
    """One name for a list of one; a key left empty (``retired:`` with every entry commented out,
    YAML's null) for none."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


def _as_identifier(value: Any) -> Any:
    """Names as Python keeps them: it normalizes identifiers to NFKC, so a name typed decomposed (an
    accent as a combining character, as some macOS tools write it) is the same name as the class's."""
    return unicodedata.normalize("NFKC", value) if isinstance(value, str) else value


Implementation = Annotated[str, BeforeValidator(_as_identifier), AfterValidator(_check_implementation)]
MethodPattern = Annotated[str, BeforeValidator(_as_identifier), AfterValidator(_check_method)]
Extractor = Annotated[str, AfterValidator(_check_extractor)]
OwnerPath = Annotated[str, AfterValidator(_check_self_path)]
ConnectionsPath = Annotated[str, AfterValidator(_check_connections_path)]
ExtractorList = Annotated[list[Extractor], BeforeValidator(_as_list)]
KeyChain = Annotated[str, AfterValidator(check_key_chain)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IdentitySource(_Strict):
    """One place the ambient user may come from; exactly one key."""

    header: Annotated[str, AfterValidator(_check_header_name)] | None = None
    query_param: str | None = None
    jwt_claim: str | None = None
    scope: KeyChain | None = None
    #: a path parameter of the route the request matches (``/users/{user_id}/ws``: ``user_id``)
    path_param: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> IdentitySource:
        given = [k for k in ("header", "query_param", "jwt_claim", "scope", "path_param")
                 if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("an identity source needs exactly one of header, query_param, "
                             f"jwt_claim, scope, path_param (got {', '.join(given) or 'none'})")
        return self


class Identity(_Strict):
    http: list[IdentitySource] = Field(default_factory=list)
    websocket: list[IdentitySource] = Field(default_factory=list)


class Role(_Strict):
    kind: Literal["execute", "emit", "dispatch", "deliver"]
    implementations: Annotated[list[Implementation], BeforeValidator(_as_list)] = Field(min_length=1)
    canonical: Annotated[list[Implementation], BeforeValidator(_as_list)] = Field(default_factory=list)
    retired: Annotated[list[Implementation], BeforeValidator(_as_list)] = Field(default_factory=list)
    methods: Annotated[list[MethodPattern], BeforeValidator(_as_list)] = Field(min_length=1)
    user_scoped: bool = False
    owner: Annotated[list[OwnerPath], BeforeValidator(_as_list)] = Field(default_factory=list)
    subject: ExtractorList = Field(default_factory=list)
    target: ExtractorList = Field(default_factory=list)
    run_id: ExtractorList = Field(default_factory=list)
    thread_id: ExtractorList = Field(default_factory=list)
    event_type: ExtractorList = Field(default_factory=list)
    event_id: ExtractorList = Field(default_factory=list)
    fan_out: Annotated[list[MethodPattern], BeforeValidator(_as_list)] = Field(default_factory=list)
    connections: Annotated[list[ConnectionsPath], BeforeValidator(_as_list)] = Field(
        default_factory=list)


class Messages(_Strict):
    event_type: KeyChain | None = "type"
    run_id: KeyChain | None = "run_id"
    event_id: KeyChain | None = None


class PathMapModel(_Strict):
    version: Literal[1]
    identity: Identity = Field(default_factory=Identity)
    roles: dict[str, Role] = Field(default_factory=dict)
    messages: Messages = Field(default_factory=Messages)


_EXTRACTOR_FIELDS = ("owner", "subject", "target", "run_id", "thread_id", "event_type", "event_id")
#: which extractor paths each role kind takes (docs/conventions.md: which spans carry what)
_FIELDS_BY_KIND = {
    "execute": frozenset({"owner", "subject", "run_id", "thread_id"}),
    "emit": frozenset(_EXTRACTOR_FIELDS),
    "dispatch": frozenset({"owner", "subject", "target", "run_id", "thread_id", "event_type"}),
    "deliver": frozenset({"owner", "run_id", "event_type"}),
}


# --- line numbers ----------------------------------------------------------------------------------
#: key paths of the line table past which an aliased node is not walked again: each alias repeats
#: the paths under its anchor, and aliases of aliases multiply them (a 400-byte file of 7 levels of
#: ten aliases made 10 million paths and took 18 s; 8 levels, minutes and gigabytes)
_MAX_ALIASED_LINES = 100_000

def _line_table(node: yaml.Node | None, source: str) -> dict[KeyPath, int]:
    """Map every key path of the YAML document to its 1-based line; refuse an alias that contains
    itself (``&a [*a]``: an endless document)."""
    table: dict[KeyPath, int] = {}
    inside: set[int] = set()  # ids of the nodes on the current path
    visited: set[int] = set()  # ids of the collections visited once

    def visit(current: yaml.Node, path: KeyPath) -> None:
        if id(current) in inside:
            raise PathMapError("an alias refers to a node that contains it (an endless document)",
                               file=source, key_path=format_key_path(path),
                               line=table.get(path, current.start_mark.line + 1))
        table.setdefault(path, current.start_mark.line + 1)
        if not isinstance(current, (yaml.MappingNode, yaml.SequenceNode)):
            return
        if id(current) in visited and len(table) >= _MAX_ALIASED_LINES:
            return  # aliases of aliases: the paths under this one are known by its own line
        visited.add(id(current))
        inside.add(id(current))
        if isinstance(current, yaml.MappingNode):
            for key_node, value_node in current.value:
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
                table[path + (key,)] = key_node.start_mark.line + 1
                visit(value_node, path + (key,))
        else:
            for index, item in enumerate(current.value):
                table[path + (index,)] = item.start_mark.line + 1
                visit(item, path + (index,))
        inside.discard(id(current))

    if node is not None:
        visit(node, ())
    return table


_YAML_TEXT_TAG = "tag:yaml.org,2002:str"


def _check_role_names(node: yaml.Node | None, source: str) -> None:
    """A role name YAML reads as something else than text (``5:``, ``null:``, ``on:``, a date) is
    named with its line: validation reported only the mapping, 'roles: Input should be a valid
    string', as if ``roles`` itself had to be a string."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:
        if not (isinstance(key_node, yaml.ScalarNode) and key_node.value == "roles"
                and isinstance(value_node, yaml.MappingNode)):
            continue
        for name_node, _ in value_node.value:
            if isinstance(name_node, yaml.ScalarNode) and name_node.tag != _YAML_TEXT_TAG:
                written = name_node.value
                read = name_node.tag.rpartition(":")[2]  # int, float, bool, null, timestamp
                remedy = (f"quote it ('{written}')" if _ROLE_NAME_RE.match(written)
                          else _ROLE_NAME_RULE)
                raise PathMapError(f"a role name must be text: YAML reads {written!r} as {read}; "
                                   f"{remedy}", file=source, key_path=f"roles.{written}",
                                   line=name_node.start_mark.line + 1)


def format_key_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# --- the compiled, validated path map -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ImplementationRef:
    """One entry of ``implementations``: module plus class name or glob."""

    text: str
    module: str
    class_pattern: str
    key_path: KeyPath

    @property
    def is_glob(self) -> bool:
        return is_glob(self.class_pattern)

    def matches(self, module: str, class_name: str) -> bool:
        return module == self.module and fnmatch.fnmatchcase(class_name, self.class_pattern)


@dataclass(frozen=True, slots=True)
class RoleSpec:
    name: str
    kind: str
    implementations: tuple[ImplementationRef, ...]
    canonical: str | None
    retired: frozenset[str]
    methods: tuple[str, ...]
    user_scoped: bool
    extractors: dict[str, tuple[ExtractorSpec, ...]]  # field -> alternatives, first that resolves wins
    #: dispatch roles: names or globs of the methods that send one message to several users
    fan_out: tuple[str, ...] = ()
    #: dispatch roles: attribute chains (``self.`` paths) of the dispatcher's registry of sockets by
    #: user, the first that resolves: a KeyError of the recipient is no connection only when it has
    #: no entry for them
    connections: tuple[tuple[str, ...], ...] = ()

    @property
    def modules(self) -> frozenset[str]:
        return frozenset(ref.module for ref in self.implementations)

    def is_fan_out(self, name: str) -> bool:
        """Whether the wrapped method ``name`` is declared a fan-out (``fan_out``)."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.fan_out)

    def method_matches(self, name: str) -> bool:
        """Whether the role's ``methods`` cover ``name``: an exact name, or a glob -- which never
        matches a name starting with ``_`` unless it starts with ``_`` itself, and never a special
        name (``__x__``: ``_*`` meant for private methods matched ``__getattribute__``,
        ``__setattr__``, ``__eq__``, ``__hash__``, ``__repr__`` ... that every class has from
        ``object``, and traced every attribute access, comparison and copy). Those are named
        exactly (``__call__``)."""
        for pattern in self.methods:
            if not is_glob(pattern):
                if name == pattern:
                    return True
            elif (not name.startswith("_") or (pattern.startswith("_") and not _is_special(name))) \
                    and fnmatch.fnmatchcase(name, pattern):
                return True
        return False


#: ``Py_TPFLAGS_IMMUTABLETYPE`` (CPython 3.10+): a type whose attributes cannot be set, every
#: built-in and C extension type (``sqlite3.Connection``): its methods cannot be wrapped
_IMMUTABLE_TYPE_FLAG = 1 << 8


def _is_immutable(cls: type) -> bool:
    return bool(getattr(cls, "__flags__", 0) & _IMMUTABLE_TYPE_FLAG)


def _is_special(name: str) -> bool:
    """A special ("dunder") name, ``__x__``, which Python reserves for its protocols."""
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


@dataclass(frozen=True, slots=True)
class ResolvedClass:
    cls: type
    role: RoleSpec
    ref: ImplementationRef
    #: the module attribute the class was found under: the class part of an exact entry, the name a
    #: glob matched (an alias ``E = UserEngine`` is found as ``E``)
    name: str = ""

    @property
    def text(self) -> str:
        """``module.Name`` as the path map names this class (what ``canonical``/``retired`` give)."""
        return f"{self.ref.module}.{self.name or self.ref.class_pattern}"


class PathMap:
    """A validated path map. Build it with ``PathMap.load(path)`` or ``PathMap.from_yaml(text)``."""

    def __init__(self, model: PathMapModel, source: str, lines: dict[KeyPath, int]) -> None:
        self.model = model
        self.source = source
        self._lines = lines
        self.roles: dict[str, RoleSpec] = {name: self._compile_role(name, role)
                                           for name, role in model.roles.items()}
        self._check_cross_references()

    # --- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> PathMap:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise PathMapError(f"cannot read the path map: {exc.strerror or exc}", file=str(path)) from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PathMapError(f"not UTF-8: byte {data[exc.start]:#04x} cannot be decoded",
                               file=str(path), line=data.count(b"\n", 0, exc.start) + 1) from None
        return cls.from_yaml(text, source=str(path))

    @classmethod
    def from_yaml(cls, text: str, source: str = "<pathmap>") -> PathMap:
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            lines = _line_table(node, source)  # first: it refuses an endless (recursive) document
            data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader
        except DuplicateKeyError as exc:
            raise PathMapError(f"key {exc.key!r} is given twice (first on line {exc.first_mark.line + 1})",
                               file=source, key_path=format_key_path(exc.key_path),
                               line=exc.problem_mark.line + 1) from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = mark.line + 1 if mark is not None else None
            problem = getattr(exc, "problem", None) or str(exc)
            raise PathMapError(f"not valid YAML: {problem}", file=source, line=line) from None
        if not isinstance(data, dict):
            raise PathMapError("the path map must be a YAML mapping with 'version' and 'roles'",
                               file=source, line=1)
        _check_role_names(node, source)
        try:
            model = PathMapModel.model_validate(data)
        except ValidationError as exc:
            raise _first_error(exc, source, lines) from None
        return cls(model, source, lines)

    @classmethod
    def empty(cls) -> PathMap:
        return cls(PathMapModel(version=1), "<empty>", {})

    # --- errors with lines -----------------------------------------------------------------------
    def line_of(self, path: KeyPath) -> int | None:
        while path:
            if path in self._lines:
                return self._lines[path]
            path = path[:-1]
        return self._lines.get(())

    def error(self, path: KeyPath, message: str) -> PathMapError:
        return PathMapError(message, file=self.source, key_path=format_key_path(path),
                            line=self.line_of(path))

    # --- compiling -------------------------------------------------------------------------------
    def _compile_role(self, name: str, role: Role) -> RoleSpec:
        base: KeyPath = ("roles", name)
        if not _ROLE_NAME_RE.match(name):
            raise self.error(base, f"bad role name {name!r}: {_ROLE_NAME_RULE}")
        refs = tuple(ImplementationRef(text, *text.rsplit(".", 1), key_path=base + ("implementations", i))
                     for i, text in enumerate(role.implementations))
        extractors = {field: tuple(parse_extractor(t) for t in getattr(role, field))
                      for field in _EXTRACTOR_FIELDS}
        for field in _EXTRACTOR_FIELDS:
            if getattr(role, field) and field not in _FIELDS_BY_KIND[role.kind]:
                raise self.error(base + (field,), f"'{field}' does not apply to a role of kind "
                                                  f"{role.kind!r} (it takes: "
                                                  f"{', '.join(sorted(_FIELDS_BY_KIND[role.kind]))})")
        if role.owner and not role.user_scoped:
            raise self.error(base + ("owner",), "owner paths need 'user_scoped: true'")
        if role.fan_out and role.kind != "dispatch":
            raise self.error(base + ("fan_out",), f"'fan_out' does not apply to a role of kind "
                                                  f"{role.kind!r} (only to dispatch roles)")
        if role.connections and role.kind != "dispatch":
            raise self.error(base + ("connections",), f"'connections' does not apply to a role of "
                                                      f"kind {role.kind!r} (only to dispatch roles)")
        for i, pattern in enumerate(role.fan_out):
            if not is_glob(pattern) and not any(
                    fnmatch.fnmatchcase(pattern, method) for method in role.methods):
                raise self.error(base + ("fan_out", i),
                                 f"fan_out method {pattern!r} is not among the role's methods")
        if len(role.canonical) > 1:
            raise self.error(base + ("canonical",),
                             f"at most one canonical implementation, got {len(role.canonical)}")
        canonical = role.canonical[0] if role.canonical else None
        for field, entries in (("canonical", role.canonical), ("retired", role.retired)):
            for i, text in enumerate(entries):
                if is_glob(text.rpartition(".")[2]):
                    raise self.error(base + (field, i) if field == "retired" else base + (field,),
                                     f"{field} must name one class, not a glob: {text!r}")
                module, cls_name = text.rsplit(".", 1)
                if not any(ref.matches(module, cls_name) for ref in refs):
                    raise self.error(base + (field, i) if field == "retired" else base + (field,),
                                     f"{field} {text!r} is not among the role's implementations")
        if canonical is not None and canonical in role.retired:
            raise self.error(base + ("retired",), f"{canonical!r} cannot be canonical and retired")
        return RoleSpec(name=name, kind=role.kind, implementations=refs, canonical=canonical,
                        retired=frozenset(role.retired), methods=tuple(role.methods),
                        user_scoped=role.user_scoped, extractors=extractors,
                        fan_out=tuple(role.fan_out),
                        connections=tuple(parse_extractor(path).attrs for path in role.connections))

    def _check_cross_references(self) -> None:
        seen: dict[str, str] = {}
        for role in self.roles.values():
            for ref in role.implementations:
                if not ref.is_glob and ref.text in seen and seen[ref.text] != role.name:
                    raise self.error(ref.key_path, f"{ref.text} is already an implementation of "
                                                   f"role {seen[ref.text]!r}; a class plays one role")
                seen.setdefault(ref.text, role.name)

    # --- import-time resolution --------------------------------------------------------------------
    def modules(self) -> frozenset[str]:
        return frozenset(m for role in self.roles.values() for m in role.modules)

    def matches(self, module: Any, skipped: list[PathMapError] | None = None) -> list[ResolvedClass]:
        """Every (class, entry) of an imported module the path map names, before one role is chosen
        per class (see ``choose``). An entry that names no class raises its PathMapError; given
        ``skipped``, the error is added there instead and the module's other entries are resolved
        all the same (the import hook: a misspelled entry leaves out itself only)."""
        found: list[ResolvedClass] = []
        for role in self.roles.values():
            for ref in role.implementations:
                if ref.module != module.__name__:
                    continue
                try:
                    classes = self._classes_for(ref, module)
                except PathMapError as error:
                    if skipped is None:
                        raise
                    skipped.append(error)
                    continue
                found.extend(ResolvedClass(cls, role, ref, name) for name, cls in classes)
        return found

    def choose(self, entries: list[ResolvedClass]) -> tuple[list[ResolvedClass], PathMapError | None]:
        """The entries of one class object (from any module: an alias or a re-export names the class
        another module defines) that it plays, or the error that leaves it untraced.

        A class plays one role. Entries naming it exactly decide (an exact entry wins over another
        role's glob); two roles naming it exactly (through two names: ``engines.UserEngine`` and
        ``aliases.E``) are an error (``check_imports`` raises it); without an exact entry, the globs
        of two roles leave it untraced too (logged and counted)."""
        exact = [entry for entry in entries if not entry.ref.is_glob]
        deciding = exact or entries
        first = deciding[0]
        other = next((entry for entry in deciding if entry.role is not first.role), None)
        if other is None:
            return [entry for entry in entries if entry.role is first.role], None
        cls = first.cls
        name = f"{cls.__module__}.{cls.__qualname__}"
        if exact:
            message = (f"{name} is named {other.text} in role {other.role.name!r} and {first.text} in "
                       f"role {first.role.name!r} (one class under two names); a class plays one role "
                       "(name it in one role only): it is not traced")
        else:
            message = (f"{name} is matched by {other.ref.text} and by {first.ref.text} of role "
                       f"{first.role.name!r}; a class plays one role (name it exactly in one of them, "
                       "or narrow a glob): it is not traced")
        return [], self.error(other.ref.key_path, message)

    def _classes_for(self, ref: ImplementationRef, module: Any) -> list[tuple[str, type]]:
        """(attribute name, class) of each class of ``module`` the entry names."""
        if not ref.is_glob:
            try:
                cls = getattr(module, ref.class_pattern, None)
            except Exception as exc:  # a module __getattr__ (PEP 562) importing it lazily failed
                raise self.error(ref.key_path, f"reading {ref.class_pattern} from module {ref.module} "
                                               f"raised {type(exc).__name__}: {exc}") from None
            if cls is None:
                raise self.error(ref.key_path, f"class {ref.class_pattern!r} not found in module "
                                               f"{ref.module}{_still_importing(module)}")
            if not inspect.isclass(cls):
                raise self.error(ref.key_path, f"{ref.text} is not a class")
            if _is_immutable(cls):
                raise self.error(ref.key_path, f"{ref.text} is a built-in type (implemented in C), "
                                               "whose methods cannot be replaced: it is not traced "
                                               "(trace the class of the app that calls it)")
            return [(ref.class_pattern, cls)]
        classes = [(name, value) for name, value in sorted(vars(module).items())
                   if inspect.isclass(value) and fnmatch.fnmatchcase(name, ref.class_pattern)
                   and getattr(value, "__module__", None) == module.__name__
                   and not _is_immutable(value)]
        if not classes:
            raise self.error(ref.key_path, f"glob {ref.class_pattern!r} matches no class defined in "
                                           f"module {ref.module}{_still_importing(module)}")
        return classes

    def check_methods(self, resolved: ResolvedClass) -> None:
        """A class named exactly must define every exact method name (typos are caught here); classes
        matched by a glob take the methods they have. Raises the first ``missing_methods``."""
        for error in self.missing_methods(resolved):
            raise error

    def missing_methods(self, resolved: ResolvedClass) -> list[PathMapError]:
        """The error of each exact method name of the role that a class named exactly lacks, or has
        as something else than a method (none for a class matched by a glob). The import hook wraps
        such a class all the same, with the methods it has (as a glob's), and reports these."""
        role, ref, cls = resolved.role, resolved.ref, resolved.cls
        if ref.is_glob:
            return []
        problems = []
        for i, pattern in enumerate(role.methods):
            if is_glob(pattern):
                continue
            attr = inspect.getattr_static(cls, pattern, None)
            if attr is None or not (callable(attr) or isinstance(attr, METHOD_DESCRIPTORS)):
                problems.append(self.error(("roles", role.name, "methods", i),
                                           _not_a_method(pattern, ref.text, attr)))
        return problems

    def _settle(self, matches: list[ResolvedClass]) -> list[ResolvedClass]:
        """The entries each class plays (``choose``), methods checked; raise the error of a class
        named exactly by two roles. One matched only by the globs of two roles is logged and counted."""
        by_class: dict[type, list[ResolvedClass]] = {}
        for entry in matches:
            by_class.setdefault(entry.cls, []).append(entry)
        playing: set[int] = set()
        for entries in by_class.values():
            chosen, error = self.choose(entries)
            if error is not None:
                if any(not entry.ref.is_glob for entry in entries):
                    raise error  # named exactly by two roles: the path map is wrong
                cls = entries[0].cls
                record_error(f"pathmap:ambiguous:{cls.__module__}.{cls.__qualname__}",
                             message=str(error))
            for entry in chosen:
                self.check_methods(entry)
            playing.update(id(entry) for entry in chosen)
        return [entry for entry in matches if id(entry) in playing]  # the path map's order

    def check_imports(self) -> list[ResolvedClass]:
        """Import every module of the path map now and check every class and method (strict start),
        and that no class is named exactly by two roles (through two names)."""
        matches: list[ResolvedClass] = []
        done: set[str] = set()
        for role in self.roles.values():
            for ref in role.implementations:
                try:
                    module = importlib.import_module(ref.module)
                except Exception as exc:
                    raise self.error(ref.key_path, f"cannot import module {ref.module}: "
                                                   f"{type(exc).__name__}: {exc}") from None
                if ref.module not in done:
                    done.add(ref.module)
                    matches.extend(self.matches(module))
        order = {ref: i for i, ref in enumerate(r for role in self.roles.values()
                                                for r in role.implementations)}
        matches.sort(key=lambda entry: order[entry.ref])  # stable: a glob's classes keep their order
        resolved = self._settle(matches)
        self._check_method_globs(resolved)
        self._check_parameters(resolved)
        return resolved

    def _check_method_globs(self, resolved: list[ResolvedClass]) -> None:
        for role in self.roles.values():
            classes = [r.cls for r in resolved if r.role is role]
            for i, pattern in enumerate(role.methods):
                if not is_glob(pattern) or not classes:
                    continue
                if not any(role.method_matches(name) and fnmatch.fnmatchcase(name, pattern)
                           for cls in classes for name in attribute_names(cls)):
                    raise self.error(("roles", role.name, "methods", i),
                                     f"method glob {pattern!r} matches no method of the role's classes")


    def _check_parameters(self, resolved: list[ResolvedClass]) -> None:
        """Every ``arg.NAME`` path names a parameter of some method the role wraps: a misspelled
        one (``arg.contxt``) resolves on no call, and the user or run it reads is silently never
        found."""
        for problem in self.parameter_problems(
                {name: [r.cls for r in resolved if r.role is role] for name, role in self.roles.items()}):
            raise problem

    def parameter_problems(self, classes: Mapping[str, list[type]]) -> list[PathMapError]:
        """The ``arg.NAME`` paths of each role no method of its ``classes`` (role name -> the
        classes playing it) has a parameter for (``_check_parameters``)."""
        problems = []
        for role in self.roles.values():
            specs = [(field, i, spec) for field in _EXTRACTOR_FIELDS
                     for i, spec in enumerate(role.extractors[field]) if spec.source == "arg"]
            role_classes = classes.get(role.name, [])
            if not specs or not role_classes:
                continue
            taken = _parameters_taken(role_classes, role)
            if taken is None:
                continue  # a method takes **kwargs, or has no signature: any name may come
            for field, i, spec in specs:
                if spec.name not in taken:
                    problems.append(self.error(
                        ("roles", role.name, field, i),
                        f"{spec.text!r}: no method the role wraps has a parameter {spec.name!r} "
                        f"(they take: {', '.join(sorted(taken)) or 'none'})"))
        return problems


def attribute_names(cls: type) -> list[str]:
    """The names of the attributes ``cls`` has, its own and inherited: what ``dir()`` lists, and
    the names in the ``__dict__`` of each class of its MRO, since a metaclass's ``__dir__`` may
    leave methods out (``enum.Enum``'s lists its members, not its methods) -- but not the machinery
    ``dir()`` leaves out on purpose: an enum's ``_sunder_`` names (``_missing_``, ``_new_member_``,
    set on each enum class) and what the ``enum`` module's own classes define."""
    try:
        names = {name for name in dir(cls) if type(name) is str}
    except Exception:  # a metaclass's __dir__ that raises: the __dict__s tell
        names = set()
    for klass in cls.__mro__:
        if getattr(klass, "__module__", None) == "enum":
            continue
        names.update(name for name in vars(klass) if type(name) is str and not _is_sunder(name))
    return sorted(names)


def _is_sunder(name: str) -> bool:
    """``_name_``: a name the ``enum`` module reserves (not a ``__dunder__``)."""
    return len(name) > 2 and name[0] == name[-1] == "_" and name[1] != "_" and name[-2] != "_"


def _parameters_taken(classes: list[type], role: RoleSpec) -> set[str] | None:
    """The parameter names of the methods of ``classes`` the role wraps (the instance's or class's
    own first one left out), or None when one of them may take any name."""
    taken: set[str] = set()
    for cls in classes:
        for name in attribute_names(cls):
            if name in CONSTRUCTORS or not role.method_matches(name):
                continue
            attribute = inspect.getattr_static(cls, name, None)
            if isinstance(attribute, (functools.singledispatchmethod, functools.partialmethod)):
                return None  # its registered implementations may name their parameters otherwise
            function = attribute.__func__ if isinstance(attribute, (classmethod, staticmethod)) \
                else attribute
            if not callable(function) or isinstance(function, type):
                continue  # not a method (a property, a value, a nested class): nothing is wrapped
            try:
                parameters = list(inspect.signature(function).parameters.values())
            except (TypeError, ValueError):
                return None
            if any(p.kind is p.VAR_KEYWORD for p in parameters):
                return None
            # the instance (or class) comes first where the attribute binds (as the wrapper binds)
            binds = isinstance(attribute, classmethod) or (
                not isinstance(attribute, staticmethod) and binds_instance(attribute))
            if binds and parameters:
                parameters = parameters[1:]
            taken.update(p.name for p in parameters if p.kind is not p.VAR_POSITIONAL)
    return taken


def _first_error(exc: ValidationError, source: str, lines: dict[KeyPath, int]) -> PathMapError:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        known: KeyPath = ()
        for part in loc:  # keep the part of loc that exists in the file (drops pydantic union tags)
            if known + (part,) in lines:
                known = known + (part,)
            else:
                break
        rest = loc[len(known):]
        if err["type"] == "missing" and rest and isinstance(rest[0], str):
            message = f"missing required key {rest[0]!r}"
        elif err["type"] == "extra_forbidden":
            message = f"unknown key {loc[-1]!r}"
        elif err["type"] == "string_type" and isinstance(err.get("input"), bool):
            message = (f"a name is expected, YAML read a boolean ({err['input']}): unquoted on, off, "
                       "yes, no, true and false are booleans in YAML; quote the name ('on')")
        else:
            message = str(err["msg"]).removeprefix("Value error, ")
        line = lines.get(known) if known else lines.get((), 1)
        problems.append((known, line, message))
    known, line, message = problems[0]
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem(s))"
    return PathMapError(message, file=source, key_path=format_key_path(known), line=line)


def _not_a_method(name: str, class_text: str, attr: object) -> str:
    """The error of a method name the class lacks, or has as something pathwatch cannot wrap."""
    if attr is None:
        return f"method {name!r} not found on {class_text}"
    if isinstance(attr, property):
        return (f"{name!r} on {class_text} is a property, not a method: list the method that does the "
                f"work (a property's getter runs on every read)")
    return f"{name!r} on {class_text} is a {type(attr).__name__} attribute, not a method"


def _still_importing(module: Any) -> str:
    """Why a class may be missing from a module (``check_imports`` called while it is imported: the
    post-import hooks wait for the end of its import instead)."""
    if not getattr(getattr(module, "__spec__", None), "_initializing", False):
        return ""
    return (f" (module {module.__name__} is still being imported: pathwatch was started during its "
            "import, before its classes are defined — start it before importing the module, from "
            "the app's entry point)")
