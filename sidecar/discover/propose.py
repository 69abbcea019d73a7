"""From grouped classes to role proposals: kind, wrapped methods, canonical guess, extractor paths."""

from __future__ import annotations

import os
from collections import Counter

from sidecar.discover import naming
from sidecar.discover.extractors import ExtractorGuesser
from sidecar.discover.model import ClassInfo, Member, RoleProposal
from sidecar.discover.resolve import all_methods
from sidecar.discover.roles import GENERIC_METHODS, Grouping

EMIT_PREFIXES = ("notify_", "emit_", "send_", "publish_", "on_")
DISPATCH_PREFIXES = ("send_to_", "broadcast")
_NOT_WORK_PREFIXES = ("get_", "is_", "has_", "set_", "to_", "from_", "register_", "unregister_",
                      "add_", "remove_")


def _kind_for(role: str, methods: set[str]) -> str:
    if role in naming.ROLE_KINDS:
        return naming.ROLE_KINDS[role]
    if any(m.startswith(DISPATCH_PREFIXES) for m in methods):
        return "dispatch"
    return "emit" if any(m.startswith(("notify_", "emit_")) for m in methods) else "execute"


class Proposer:
    def __init__(self, classes: dict[str, ClassInfo], guesser: ExtractorGuesser,
                 message_keys: dict[str, str]) -> None:
        self.classes = classes
        self.guesser = guesser
        self.message_keys = message_keys

    def propose(self, grouping: Grouping) -> list[RoleProposal]:
        proposals = [self._role(role, members, grouping.interfaces.get(role, []))
                     for role, members in grouping.members.items()]
        order = list(naming.ROLE_KINDS)
        proposals.sort(key=lambda p: (order.index(p.name) if p.name in order else len(order), p.name))
        return proposals

    def _methods_of(self, key: str) -> set[str]:
        return {name for name in all_methods(key, self.classes) if not name.startswith("_")}

    def _role(self, role: str, members: list[Member], interfaces: list[str]) -> RoleProposal:
        counts: Counter[str] = Counter()
        for member in members:
            counts.update(self._methods_of(member.key))
        kind = _kind_for(role, set(counts))
        methods, note = self._wrapped_methods(kind, counts, len(members))
        canonical, why = self._canonical(members)
        members = sorted(members, key=lambda m: (m.key != canonical, bool(m.retired_reason), m.key))
        keys = [member.key for member in members]
        extractors = self._extractors(kind, keys, methods)
        return RoleProposal(role, kind, members, methods, note, canonical, why, extractors,
                            user_scoped=bool(extractors.get("owner")), interfaces=interfaces)

    # -- methods ------------------------------------------------------------------------------------

    def _wrapped_methods(self, kind: str, counts: Counter[str], members: int) -> tuple[list[str], str]:
        need = 2 if members >= 2 else 1
        shared = [m for m, n in counts.items() if n >= need and m not in GENERIC_METHODS]
        if kind == "emit":
            glob = _common_prefix_glob(counts, EMIT_PREFIXES)
            if glob:
                return [glob], f"a common prefix: {glob} matches {_count_glob(counts, glob)} method names"
        if kind == "dispatch":
            sends = [m for m in counts if m.startswith(DISPATCH_PREFIXES)]
            if sends:
                return sorted(sends), "user-addressed sends (send_to_*/broadcast*)"
        work = [m for m in shared if not m.startswith(_NOT_WORK_PREFIXES)] or shared
        if not work:   # nothing shared: the biggest class's own methods are the best we know
            work = [m for m, _ in counts.most_common(5)]
        work.sort(key=lambda m: (-counts[m], m))
        detail = ", ".join(f"{m} {counts[m]}/{members}" for m in work)
        return work, f"public methods shared by implementations ({detail})"

    # -- canonical ----------------------------------------------------------------------------------

    def _canonical(self, members: list[Member]) -> tuple[str, str]:
        live = [m for m in members if not m.retired_reason and not m.thin_adapter] or members

        def weight(member: Member) -> tuple[int, int, int]:
            cls = self.classes[member.key]
            return (naming.canonical_by_name(cls.name), len(self._methods_of(member.key)), cls.lines)

        best = max(live, key=lambda m: (weight(m), m.key))
        cls = self.classes[best.key]
        why = [f"{len(self._methods_of(best.key))} public methods, {cls.lines} lines"]
        if naming.canonical_by_name(cls.name):
            why.insert(0, f"named {naming.tokens(cls.name)[0]}*")
        return best.key, "; ".join(why)

    # -- extractors ---------------------------------------------------------------------------------

    def _extractors(self, kind: str, keys: list[str], methods: list[str]) -> dict[str, list[str]]:
        guess = self.guesser
        calls = guess.wrapped(keys, methods)
        owner = guess.owner(keys)
        paths: dict[str, list[str]] = {"owner": owner}
        run_id = guess.from_args(calls, "run_id") + guess.from_self(keys, "run_id")
        thread_id = guess.from_args(calls, "thread_id") + guess.from_self(keys, "thread_id")
        users = guess.from_args(calls, "user_id")
        if kind == "execute":
            paths.update(subject=users, run_id=run_id, thread_id=thread_id)
            return paths
        message_type = self.message_keys.get("event_type", "type")
        message_run = self.message_keys.get("run_id", "run_id")
        event_type = guess.event_type_arg(calls) + guess.from_message(calls, message_type)
        if kind == "emit":
            glob = next((m for m in methods if m.endswith("*")), "")
            if glob:
                event_type.insert(0, f"method.strip_prefix({glob[:-1]})")
            paths.update(target=users + [p for p in owner if p not in users], run_id=run_id,
                         event_type=event_type)
        else:
            paths.update(target=users, event_type=event_type,
                         run_id=run_id + guess.from_message(calls, message_run))
        return paths


def _common_prefix_glob(counts: Counter[str], prefixes: tuple[str, ...]) -> str:
    best = ""
    best_count = 1
    for prefix in prefixes:
        names = [m for m in counts if m.startswith(prefix)]
        if len(names) > best_count:
            best, best_count = f"{prefix}*", len(names)
    if not best:
        common = os.path.commonprefix([m for m in counts if "_" in m])
        if common.endswith("_") and len(common) > 2:
            best = f"{common}*"
    return best


def _count_glob(counts: Counter[str], glob: str) -> int:
    return sum(1 for m in counts if m.startswith(glob[:-1]))
