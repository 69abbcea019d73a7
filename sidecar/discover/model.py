"""The vocabulary of discovery: what a static read of a source tree yields.

Plain slotted dataclasses, no behaviour beyond small conveniences, so every stage (walk, index,
resolve, group, render) speaks the same types and the JSON report is a direct dump of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, frozen=True)
class SkippedFile:
    """A file discovery could not use (or used only partly); ``line`` is 0 when not applicable."""

    path: str
    reason: str
    line: int = 0


@dataclass(slots=True, frozen=True)
class SourceFile:
    path: str           # absolute path as found (may go through a symlinked directory)
    relpath: str        # relative to the package dir, with '/' separators
    module: str         # dotted module name
    is_package: bool    # an __init__.py


@dataclass(slots=True, frozen=True)
class Param:
    name: str
    annotation: str = ""   # source text of the annotation, "" when absent


@dataclass(slots=True)
class Method:
    name: str
    kind: str                       # sync | async | generator | async_generator
    params: list[Param]             # without self/cls
    lineno: int
    delegates_to: str = ""          # "self.x.name" when the body only forwards the call (a thin adapter)
    is_abstract: bool = False
    #: names of the instance's own methods a send calls inside a loop or comprehension
    #: (``for user_id in room: await self.send_to_user(...)``): the shape of a fan-out
    looped_self_calls: tuple[str, ...] = ()

    @property
    def is_public(self) -> bool:
        return not self.name.startswith("_")


@dataclass(slots=True)
class ClassInfo:
    module: str
    name: str
    lineno: int
    lines: int
    bases: list[str]                                  # base expressions as written (dotted)
    methods: dict[str, Method] = field(default_factory=dict)
    init_params: list[Param] = field(default_factory=list)
    self_attrs: dict[str, str] = field(default_factory=dict)    # attr -> source of the value assigned in __init__
    field_types: dict[str, str] = field(default_factory=dict)   # class-level annotations: name -> annotation
    properties: list[str] = field(default_factory=list)
    deprecation: str = ""                             # why the class looks deprecated ("" = it does not)
    rebound: str = ""                                 # its name is bound again later, maybe not to it
    resolved_bases: list[str] = field(default_factory=list)    # filled by the resolver

    @property
    def key(self) -> str:
        return f"{self.module}.{self.name}"

    @property
    def public_methods(self) -> set[str]:
        return {name for name, method in self.methods.items() if method.is_public}

    @property
    def attributes(self) -> set[str]:
        """Every attribute name an instance is known to carry (fields, __init__ assignments, properties)."""
        return set(self.field_types) | set(self.self_attrs) | set(self.properties)


@dataclass(slots=True)
class Binding:
    """What a module-level name refers to, before resolution.

    kind: ``class`` (defined here; target = class name), ``module`` (``import a.b``; target = module),
    ``from`` (``from m import x``; target = module, attr = x), ``alias`` (``X = expr``; target = dotted expr).
    """

    kind: str
    target: str
    attr: str = ""
    lineno: int = 0
    type_only: bool = False   # imported under ``if TYPE_CHECKING:``: names annotations, absent at run time


@dataclass(slots=True)
class ModuleInfo:
    name: str
    relpath: str
    is_package: bool
    bindings: dict[str, Binding] = field(default_factory=dict)
    star_imports: list[str] = field(default_factory=list)   # modules imported with *
    classes: dict[str, ClassInfo] = field(default_factory=dict)
    deprecated_on_import: bool = False                         # warns DeprecationWarning at module level
    message_keys: list[tuple[str, ...]] = field(default_factory=list)  # key sets of dict literals with "type"
    identity_hints: list[tuple[str, str]] = field(default_factory=list)  # ("header"|"query_param", key)
    #: (name, line) of classes defined only under ``if TYPE_CHECKING:``: absent at run time
    type_only_classes: list[tuple[str, int]] = field(default_factory=list)
    #: (name, line of the class, why) of classes whose name the module body binds to something else
    #: afterwards (``X = Y``, ``X = None``, ``del X``): ``module.X`` is not that class at run time
    rebound_classes: list[tuple[str, int, str]] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class Alias:
    """A second name for a class that already exists: reported, never a separate implementation."""

    name: str        # module.Name of the alias
    target: str      # module.Class it stands for
    how: str         # "assignment" | "import-as"


@dataclass(slots=True, frozen=True)
class TypeOnlyClass:
    """A class defined only under ``if TYPE_CHECKING:``: it never exists at run time, so a path map
    naming it has an entry that is left out ("class not found"). Reported, never proposed."""

    key: str         # module.Class
    path: str        # file, relative to the package dir
    line: int


@dataclass(slots=True, frozen=True)
class ReboundClass:
    """A class whose name its module binds to something else afterwards (``ExecutionEngine =
    UserExecutionEngine`` after ``class ExecutionEngine``, ``X = None``, ``del X``): ``module.X`` names
    another object at run time, so the class is reported, never proposed."""

    key: str         # module.Class
    path: str
    line: int        # of the class statement
    reason: str      # the statement that rebinds it


@dataclass(slots=True)
class Member:
    """One implementation proposed for a role, with the reasons it was put there."""

    key: str
    reasons: list[str]
    retired_reason: str = ""
    thin_adapter: bool = False


@dataclass(slots=True)
class RoleProposal:
    name: str
    kind: str
    members: list[Member]
    methods: list[str]
    method_note: str
    canonical: str
    canonical_reason: str
    extractors: dict[str, list[str]]        # owner/subject/target/run_id/thread_id/event_type -> paths
    user_scoped: bool
    interfaces: list[str] = field(default_factory=list)   # abstract bases seen, not implementations
    canonical_candidates: list[str] = field(default_factory=list)   # best first; [0] is ``canonical``
    fan_out: list[str] = field(default_factory=list)      # dispatch: methods sending to several users
    fan_out_note: str = ""                                  # why, and look-alikes not proposed

    @property
    def implementations(self) -> list[str]:
        return [member.key for member in self.members]

    @property
    def retired(self) -> list[str]:
        return [member.key for member in self.members if member.retired_reason]


@dataclass(slots=True)
class CandidateGroup:
    """Classes with alike public methods that match no known role name: shown, not proposed."""

    classes: list[str]
    shared_methods: list[str]


@dataclass(slots=True)
class Discovery:
    package_dir: str
    module_prefix: str
    files_read: int
    skipped: list[SkippedFile]
    notes: list[SkippedFile]                 # files read with a caveat (e.g. decoded with replacements)
    classes: dict[str, ClassInfo]
    aliases: list[Alias]
    roles: list[RoleProposal]
    candidate_groups: list[CandidateGroup]
    messages: dict[str, str]
    messages_guessed: bool
    identity: dict[str, list[dict[str, str]]]
    identity_guessed: bool
    type_only: list[TypeOnlyClass] = field(default_factory=list)
    rebound: list[ReboundClass] = field(default_factory=list)
