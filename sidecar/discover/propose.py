"""From grouped classes to role proposals: kind, wrapped methods, canonical guess, extractor paths."""

from __future__ import annotations

import fnmatch
import os
from collections import Counter

from sidecar.discover import naming
from sidecar.discover.extractors import ExtractorGuesser
from sidecar.discover.fanout import guess_fan_out
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
        method_sets = {member.key: self._methods_of(member.key) for member in members}
        methods, note = self._wrapped_methods(kind, counts, method_sets)
        note += _uncovered_note(methods, method_sets)
        candidates, why = self._canonical(members)
        canonical = candidates[0] if candidates else ""
        members = sorted(members, key=lambda m: (m.key != canonical, bool(m.retired_reason), m.key))
        keys = [member.key for member in members]
        extractors = self._extractors(kind, keys, methods)
        fan_out, fan_out_note = guess_fan_out(keys, methods, self.classes) if kind == "dispatch" else ([], "")
        return RoleProposal(role, kind, members, methods, note, canonical, why, extractors,
                            user_scoped=bool(extractors.get("owner")), interfaces=interfaces,
                            canonical_candidates=candidates, fan_out=fan_out, fan_out_note=fan_out_note)

    # -- methods ------------------------------------------------------------------------------------

    def _wrapped_methods(self, kind: str, counts: Counter[str],
                         method_sets: dict[str, set[str]]) -> tuple[list[str], str]:
        """Exact names only for methods every implementation has (the path map check insists on that
        for classes named exactly); methods only some have are reached through a prefix glob."""
        members = len(method_sets)
        if kind == "emit":
            globs = _emit_globs(method_sets)
            if globs:
                return globs, "a common prefix: " + "; ".join(
                    f"{glob} matches {_count_glob(counts, glob)} method names" for glob in globs)
        if kind == "dispatch":
            sends = [m for m in counts if m.startswith(DISPATCH_PREFIXES)]
            if sends:
                return _exact_or_glob(sends, counts, members, "sends")
        need = 2 if members >= 2 else 1
        shared = [m for m, n in counts.items() if n >= need and m not in GENERIC_METHODS]
        work = [m for m in shared if not m.startswith(_NOT_WORK_PREFIXES)] or shared
        if not work:   # nothing shared: the most common names are the best we know
            work = [m for m, _ in counts.most_common(3)]
        return _exact_or_glob(work, counts, members, "public methods shared by implementations")

    # -- canonical ----------------------------------------------------------------------------------

    def _canonical(self, members: list[Member]) -> tuple[list[str], str]:
        """Candidates best first: named User*/Unified*, then most public methods, then most lines.
        Retired classes and thin adapters are never candidates; with only those, there is no guess."""
        live = [m for m in members if not m.retired_reason and not m.thin_adapter] or \
            [m for m in members if not m.retired_reason]
        if not live:
            return [], "every implementation looks retired"

        def weight(member: Member) -> tuple[bool, int, int, str]:
            cls = self.classes[member.key]
            return (naming.canonical_by_name(cls.name), len(self._methods_of(member.key)), cls.lines, member.key)

        ranked = sorted(live, key=weight, reverse=True)
        best = self.classes[ranked[0].key]
        why = [f"{len(self._methods_of(best.key))} public methods, {best.lines} lines"]
        if naming.canonical_by_name(best.name):
            why.insert(0, f"named {naming.tokens(best.name)[0]}*")
        if len(ranked) > 1:
            short = naming.short_names([m.key for m in members])
            why.append("next candidates: " + ", ".join(short[m.key] for m in ranked[1:3]))
        return [m.key for m in ranked], "; ".join(why)

    # -- extractors ---------------------------------------------------------------------------------

    def _extractors(self, kind: str, keys: list[str], methods: list[str]) -> dict[str, list[str]]:
        guess = self.guesser
        calls = guess.wrapped(keys, methods)
        owner = guess.owner(keys)
        paths: dict[str, list[str]] = {"owner": owner}
        # what the call carries comes before what the instance was built with
        run_id = _merge(guess.from_args(calls, "run_id"), guess.from_self(keys, "run_id"))
        thread_id = _merge(guess.from_args(calls, "thread_id"), guess.from_self(keys, "thread_id"))
        users = guess.from_args(calls, "user_id")
        if kind == "execute":
            paths.update(subject=users, run_id=run_id, thread_id=thread_id)
            return paths
        message_type = self.message_keys.get("event_type", "type")
        message_run = self.message_keys.get("run_id", "run_id")
        event_type = guess.event_type_arg(calls) + guess.from_message(calls, message_type)
        if kind == "emit":
            # one per glob: strip_prefix(P) resolves only on the names starting with P
            event_type[:0] = [f"method.strip_prefix({m[:-1]})" for m in methods if m.endswith("*")]
            paths.update(target=_merge(users, owner), run_id=run_id, thread_id=thread_id,
                         event_type=event_type)
        else:
            paths.update(target=users, event_type=event_type,
                         run_id=run_id + guess.from_message(calls, message_run))
        return paths


def _merge(first: list[str], then: list[str]) -> list[str]:
    return first + [path for path in then if path not in first]


def _exact_or_glob(names: list[str], counts: Counter[str], members: int, what: str) -> tuple[list[str], str]:
    everywhere = sorted(m for m in names if counts[m] == members)
    partial = sorted(m for m in names if counts[m] < members)
    globs: list[str] = []
    for prefix in sorted({m.split("_", 1)[0] + "_" for m in partial if "_" in m}):
        covered = [m for m in names if m.startswith(prefix)]
        if len(covered) >= 2:
            globs.append(f"{prefix}*")
    left_out = [m for m in partial if not any(m.startswith(g[:-1]) for g in globs)]
    methods = [m for m in everywhere if not any(m.startswith(g[:-1]) for g in globs)] + globs
    detail = ", ".join(f"{m} {counts[m]}/{members}" for m in sorted(names, key=lambda m: (-counts[m], m)))
    note = f"{what} ({detail})"
    if not methods:   # nothing on all of them: the check at start will name the classes lacking these
        methods = sorted(partial, key=lambda m: (-counts[m], m))[:3]
        left_out = [m for m in left_out if m not in methods]
        note += "; WARNING: no method is on every implementation"
    if left_out:
        note += f"; not on every implementation, so not listed: {', '.join(left_out)}"
    return methods, note


def _common_prefix_glob(names: list[str], prefixes: tuple[str, ...]) -> str:
    best, best_count = "", 1
    for prefix in prefixes:
        count = sum(1 for m in names if m.startswith(prefix))
        if count > best_count:
            best, best_count = f"{prefix}*", count
    if not best:
        common = os.path.commonprefix([m for m in names if "_" in m])
        if common.endswith("_") and len(common) > 2:
            best = f"{common}*"
    return best


def _emit_globs(method_sets: dict[str, set[str]]) -> list[str]:
    """Prefix globs until every implementation has a method one of them matches: ``notify_*`` for a
    bridge and an emitter, then ``send_*`` for a notifier whose methods are ``send_agent_started``, ...
    (a class named in the path map with no method matched is never traced)."""
    globs: list[str] = []
    left = [methods for methods in method_sets.values() if methods]
    while left:
        glob = _common_prefix_glob(sorted({name for methods in left for name in methods}), EMIT_PREFIXES)
        if not glob or glob in globs:
            break
        globs.append(glob)
        left = [methods for methods in left if not any(name.startswith(glob[:-1]) for name in methods)]
    return globs


def _uncovered_note(patterns: list[str], method_sets: dict[str, set[str]]) -> str:
    """A WARNING naming the implementations none of ``patterns`` matches a method of, with their public
    methods: the path map names them, and they would never be traced."""
    short = naming.short_names(list(method_sets))
    uncovered = [f"{short[key]} ({', '.join(sorted(methods)[:5]) or 'no public method'})"
                 for key, methods in method_sets.items()
                 if not any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns for name in methods)]
    if not uncovered:
        return ""
    return (f"; WARNING: no method of {', '.join(uncovered)} matches, so it is never traced: add the "
            "methods it does the job in")


def _count_glob(counts: Counter[str], glob: str) -> int:
    return sum(1 for m in counts if m.startswith(glob[:-1]))
