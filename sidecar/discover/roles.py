"""Group classes into roles: by name first, then by inheritance, shared methods and shared bases.

Order matters and is deliberate: a name is the strongest signal a team leaves (``*ExecutionEngine``),
a subclass of an engine is an engine, a class whose public methods mostly match an engine's is one too
(Jaccard similarity of method-name sets, leaving out what both inherit from a common base), and a
class sharing a base mostly subclassed by engines joins them. What is
left but still looks alike is reported as candidate groups, never proposed as roles.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

from sidecar.discover import naming
from sidecar.discover.model import CandidateGroup, ClassInfo, Member
from sidecar.discover.resolve import all_methods, ancestors

JACCARD_JOIN = 0.5
JACCARD_CANDIDATE = 0.6
MIN_SHARED = 2
# methods every other class has: they say nothing about the job a class does
GENERIC_METHODS = frozenset({
    "close", "aclose", "start", "stop", "shutdown", "cleanup", "get", "set", "update", "reset", "clear",
    "to_dict", "from_dict", "dict", "json", "copy", "validate", "setup", "teardown", "initialize",
    "get_stats", "get_status", "health_check", "is_healthy",
})
_EXCLUDED_BASES = frozenset({
    "Exception", "BaseException", "Enum", "IntEnum", "StrEnum", "Flag", "IntFlag", "TypedDict", "NamedTuple",
    "Warning",
})
_PROTOCOL_BASES = frozenset({"Protocol"})
_MAX_METHOD_FANOUT = 50   # a method name on more classes than this is too common to pair classes by


@dataclass(slots=True)
class Grouping:
    members: dict[str, list[Member]] = field(default_factory=dict)     # role -> implementations
    interfaces: dict[str, list[str]] = field(default_factory=dict)     # role -> abstract bases
    candidates: list[CandidateGroup] = field(default_factory=list)


def profile(key: str, classes: dict[str, ClassInfo]) -> set[str]:
    """Public, non-generic method names of a class, inherited in-tree methods included."""
    return {name for name in all_methods(key, classes)
            if not name.startswith("_") and name not in GENERIC_METHODS}


def jaccard(left: set[str], right: set[str]) -> float:
    union = left | right
    return len(left & right) / len(union) if union else 0.0


def _external_base_names(cls: ClassInfo, classes: dict[str, ClassInfo]) -> set[str]:
    names = set()
    for key in [cls.key, *ancestors(cls.key, classes)]:
        for base in classes[key].resolved_bases:
            if base not in classes:
                names.add(base.rsplit(".", 1)[-1])
    return names


def is_excluded(cls: ClassInfo, classes: dict[str, ClassInfo]) -> bool:
    """Exceptions, enums, typed dicts: never implementations of a job."""
    return bool(_external_base_names(cls, classes) & _EXCLUDED_BASES)


def is_interface(cls: ClassInfo, classes: dict[str, ClassInfo]) -> bool:
    if naming.is_interface_name(cls.name) or _PROTOCOL_BASES & {b.rsplit(".", 1)[-1] for b in cls.resolved_bases}:
        return True
    public = [method for method in cls.methods.values() if method.is_public]
    return bool(public) and all(method.is_abstract for method in public)


class _Grouper:
    def __init__(self, classes: dict[str, ClassInfo], deprecated_modules: set[str]) -> None:
        self.classes = classes
        self.deprecated_modules = deprecated_modules
        self.assigned: dict[str, tuple[str, str]] = {}
        self.eligible = [key for key, cls in sorted(classes.items()) if not is_excluded(cls, classes)]
        self._profiles: dict[str, set[str]] = {}
        self._ancestor_sets: dict[str, set[str]] = {}

    def profile(self, key: str) -> set[str]:
        if key not in self._profiles:
            self._profiles[key] = profile(key, self.classes)
        return self._profiles[key]

    def run(self) -> Grouping:
        self._by_name()
        self._by_inheritance()
        self._by_methods()
        self._by_shared_base()
        return self._result()

    def _by_name(self) -> None:
        for key in self.eligible:
            cls = self.classes[key]
            role, reason = naming.role_from_name(cls.name, set(all_methods(key, self.classes)))
            if role:
                self.assigned[key] = (role, reason)

    def _by_inheritance(self) -> None:
        named = dict(self.assigned)
        for key in self._unassigned():
            for ancestor in ancestors(key, self.classes):
                if ancestor in named:
                    self.assigned[key] = (named[ancestor][0], f"subclass of {ancestor}")
                    break

    def _by_methods(self) -> None:
        # Compare against each distinct method set once, found through an inverted index: on large
        # trees hundreds of role members share a handful of method sets.
        holders: dict[frozenset[str], list[tuple[str, str]]] = defaultdict(list)
        for key, (role, _) in sorted(self.assigned.items()):
            holders[frozenset(self.profile(key))].append((role, key))
        by_method: dict[str, list[frozenset[str]]] = defaultdict(list)
        for methods in holders:
            for method in methods:
                by_method[method].append(methods)
        joins: dict[str, tuple[str, str]] = {}
        for key in self._unassigned():
            mine = self.profile(key)
            if len(mine) < MIN_SHARED:
                continue
            shared: Counter[frozenset[str]] = Counter()
            for method in mine:
                shared.update(by_method.get(method, ()))
            ranked = sorted(((n / (len(mine) + len(other) - n), n, *holders[other][0], other)
                             for other, n in shared.items() if n >= MIN_SHARED), reverse=True)
            for score, n, role, member, other in ranked:
                if score < JACCARD_JOIN:
                    break
                found = self._alike(key, mine, other, holders[other]) if self._ancestors(key) else \
                    (score, n, role, member)
                if found:
                    score, n, role, member = found
                    joins[key] = (role, f"shares {n} public methods with {member} (Jaccard {score:.2f})")
                    break
        self.assigned.update(joins)   # one pass: a joined class does not pull in its own look-alikes

    def _alike(self, key: str, mine: set[str], other: frozenset[str],
               members: list[tuple[str, str]]) -> tuple[float, int, str, str] | None:
        """The first of ``members`` (all with the method set ``other``) still alike to ``key`` once the
        methods both have from a common in-tree ancestor are left out: siblings under a generic base
        (sub-agents and a ``SupervisorAgent`` under ``BaseAgent``) share its methods by construction,
        which says nothing of the job each does."""
        for role, member in members:
            common = self._ancestors(key) & self._ancestors(member)
            inherited = {name for ancestor in common for name in self.classes[ancestor].methods}
            left, right = mine - inherited, other - inherited
            n = len(left & right)
            if n >= MIN_SHARED and jaccard(left, right) >= JACCARD_JOIN:
                return jaccard(left, right), n, role, member
        return None

    def _ancestors(self, key: str) -> set[str]:
        if key not in self._ancestor_sets:
            self._ancestor_sets[key] = set(ancestors(key, self.classes))
        return self._ancestor_sets[key]

    def _by_shared_base(self) -> None:
        subclasses: dict[str, list[str]] = defaultdict(list)
        for key in self.eligible:
            for base in self.classes[key].resolved_bases:
                if base in self.classes:
                    subclasses[base].append(key)
        for key in self._unassigned():
            for base in self.classes[key].resolved_bases:
                others = [s for s in subclasses.get(base, ()) if s != key]
                siblings = [s for s in others if s in self.assigned]
                roles = {self.assigned[s][0] for s in siblings}
                # most of the base's other subclasses, not one among many: a SupervisorAgent among
                # sub-agents under BaseAgent does not make every agent a supervisor
                if len(roles) == 1 and base not in self.assigned and len(siblings) * 2 > len(others):
                    self.assigned[key] = (roles.pop(), f"shares base {base} with {siblings[0]}")
                    break

    def _unassigned(self) -> list[str]:
        return [key for key in self.eligible if key not in self.assigned]

    def _result(self) -> Grouping:
        grouping = Grouping()
        for key in self.eligible:
            if key not in self.assigned:
                continue
            role, reason = self.assigned[key]
            cls = self.classes[key]
            if is_interface(cls, self.classes):
                grouping.interfaces.setdefault(role, []).append(key)
                continue
            grouping.members.setdefault(role, []).append(self._member(cls, reason))
        grouping.candidates = candidate_groups(self._unassigned(), self.profile)
        return grouping

    def _member(self, cls: ClassInfo, reason: str) -> Member:
        retired = naming.retired_reason(cls.name) or cls.deprecation
        if not retired and cls.module in self.deprecated_modules:
            retired = "its module warns DeprecationWarning on import"
        own_public = [m for m in cls.methods.values() if m.is_public]
        delegating = [m for m in own_public if m.delegates_to]
        thin = bool(own_public) and len(delegating) * 2 >= len(own_public)
        reasons = [reason, *([cls.rebound] if cls.rebound else [])]
        if thin:
            reasons.append(f"thin adapter (forwards to {delegating[0].delegates_to.rsplit('.', 1)[0]})")
        return Member(cls.key, reasons, retired, thin)


def candidate_groups(keys: Iterable[str], profile_of) -> list[CandidateGroup]:
    """Union-find over pairs of alike classes; pairs are found through an inverted method index so
    a tree with tens of thousands of classes is not compared pair by pair."""
    keys = [key for key in keys if len(profile_of(key)) >= MIN_SHARED]
    by_method: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        for method in profile_of(key):
            by_method[method].append(key)
    parent = {key: key for key in keys}

    def find(key: str) -> str:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    checked: set[tuple[str, str]] = set()
    for holders in by_method.values():
        if len(holders) > _MAX_METHOD_FANOUT:
            continue
        for i, left in enumerate(holders):
            for right in holders[i + 1:]:
                if (left, right) in checked:
                    continue
                checked.add((left, right))
                a, b = profile_of(left), profile_of(right)
                if len(a & b) >= MIN_SHARED and jaccard(a, b) >= JACCARD_CANDIDATE:
                    parent[find(left)] = find(right)
    groups: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        groups[find(key)].append(key)
    found = []
    for members in groups.values():
        if len(members) >= 2:
            shared = set.intersection(*(profile_of(key) for key in members))
            found.append(CandidateGroup(sorted(members), sorted(shared)))
    found.sort(key=lambda group: (-len(group.classes), group.classes[0]))
    return found


def group_classes(classes: dict[str, ClassInfo], deprecated_modules: set[str]) -> Grouping:
    return _Grouper(classes, deprecated_modules).run()
