"""Render a discovery as a draft path map (YAML with ``# TODO confirm:`` comments) or a JSON report.

The YAML is written by hand because the comments are the point: every guess says why it was made.
``pathmap_dict`` is the same draft as plain data; the YAML parses to exactly that (a test pins it).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from sidecar.discover import naming
from sidecar.discover.model import Discovery, RoleProposal, SkippedFile

EXTRACTOR_KEYS = ("owner", "subject", "target", "run_id", "thread_id", "event_type")
_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")
_YAML_WORDS = frozenset({"true", "false", "yes", "no", "on", "off", "null", "y", "n"})


def scalar(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    # a JSON string is a valid YAML double-quoted scalar; non-ASCII identifiers stay readable
    # (``printable`` escapes what is not printable)
    return json.dumps(text, ensure_ascii=False)


def printable(text: str) -> str:
    r"""``text`` with every character that is not printable escaped (``\x0a``, ``\x85``, ``\u2028``, ``\udcff``).

    File names, symlink targets and error messages reach the draft's comments; a line break in one
    (``\n``, ``\r``, and for YAML also U+0085, U+2028, U+2029) would end the comment and turn the rest
    into path-map keys; a control character makes the YAML reader reject the whole file; a file name
    that is not UTF-8 (a lone surrogate here) cannot even be written. Printable text is left as is.
    """
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char) for char in text)


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def flow(values: list[object]) -> str:
    return "[" + ", ".join(scalar(v) for v in values) + "]"


def flow_maps(values: list[dict[str, str]]) -> str:
    return "[" + ", ".join("{" + ", ".join(f"{k}: {scalar(v)}" for k, v in item.items()) + "}"
                           for item in values) + "]"


# -- plain data ----------------------------------------------------------------------------------------

def role_dict(role: RoleProposal) -> dict[str, object]:
    data: dict[str, object] = {"kind": role.kind, "implementations": role.implementations}
    if role.canonical:
        data["canonical"] = role.canonical
    if role.retired:
        data["retired"] = role.retired
    data["methods"] = role.methods
    if role.fan_out:
        data["fan_out"] = role.fan_out
    if role.user_scoped:
        data["user_scoped"] = True
    for key in EXTRACTOR_KEYS:
        if role.extractors.get(key):
            data[key] = role.extractors[key]
    return data


def pathmap_dict(found: Discovery) -> dict[str, object]:
    return {"version": 1, "identity": found.identity,
            "roles": {role.name: role_dict(role) for role in found.roles if role.methods},
            "messages": found.messages}


def _skip_dict(item: SkippedFile) -> dict[str, object]:
    return {"path": item.path, "line": item.line, "reason": item.reason}


def report_dict(found: Discovery) -> dict[str, object]:
    return {
        "package_dir": found.package_dir,
        "module_prefix": found.module_prefix,
        "files": {"read": found.files_read, "skipped": len(found.skipped), "with_notes": len(found.notes)},
        "skipped": [_skip_dict(item) for item in found.skipped],
        "notes": [_skip_dict(item) for item in found.notes],
        "roles": [{"name": role.name, **role_dict(role),
                   "members": [{"class": m.key, "reasons": m.reasons, "retired_reason": m.retired_reason,
                                "thin_adapter": m.thin_adapter} for m in role.members],
                   "canonical_reason": role.canonical_reason,
                   "canonical_candidates": role.canonical_candidates, "methods_reason": role.method_note,
                   "fan_out_reason": role.fan_out_note,
                   "interfaces": role.interfaces} for role in found.roles],
        "aliases": [{"name": a.name, "target": a.target, "how": a.how} for a in found.aliases],
        "type_checking_only": [{"class": c.key, "path": c.path, "line": c.line} for c in found.type_only],
        "rebound": [{"class": c.key, "path": c.path, "line": c.line, "reason": c.reason} for c in found.rebound],
        "candidate_groups": [{"classes": g.classes, "shared_methods": g.shared_methods}
                             for g in found.candidate_groups],
        "classes": {key: {"lineno": c.lineno, "lines": c.lines, "bases": c.bases,
                          "resolved_bases": c.resolved_bases,
                          "methods": {name: m.kind for name, m in c.methods.items()},
                          "init_params": [p.name for p in c.init_params],
                          "self_attrs": sorted(c.self_attrs), "deprecation": c.deprecation}
                    for key, c in sorted(found.classes.items())},
        "draft_pathmap": pathmap_dict(found),
    }


def render_json(found: Discovery) -> str:
    return json.dumps(report_dict(found), indent=2, sort_keys=False) + "\n"


# -- YAML with comments --------------------------------------------------------------------------------

def _category(reason: str) -> str:
    return re.split(r"[:(]| ->", reason, maxsplit=1)[0].strip()


def _skipped_lines(found: Discovery, limit: int) -> list[str]:
    lines = []
    for title, items in (("skipped", found.skipped), ("read with caveats", found.notes)):
        if not items:
            continue
        counts = Counter(_category(item.reason) for item in items)
        summary = ", ".join(f"{reason}: {n}" for reason, n in counts.most_common())
        lines.append(f"# {title}: {len(items)} file(s) ({summary})")
        for item in items[:limit]:
            where = f"{item.path}:{item.line}" if item.line else item.path
            lines.append(f"#   {where}: {item.reason}")
        if len(items) > limit:
            lines.append(f"#   ... and {len(items) - limit} more (see --json)")
    if not found.skipped:
        lines.append("# skipped: 0 files")
    return lines


def _role_lines(role: RoleProposal, aliases: list[str]) -> list[str]:
    out = [f"  {role.name}:"]
    # a role of naming.ROLE_KINDS has its kind from there; only another one's is read off its methods
    kind_note = "" if role.name in naming.ROLE_KINDS else "  # TODO confirm: kind guessed from method names"
    out.append(f"    kind: {role.kind}{kind_note}")
    out.append("    implementations:")
    for member in role.members:
        out.append(f"      - {scalar(member.key)}  # TODO confirm: {'; '.join(member.reasons)}")
    for alias in aliases:
        out.append(f"    # alias, not listed again (the same class under another name): {alias}")
    for interface in role.interfaces:
        out.append(f"    # abstract base, not an implementation: {interface}")
    if role.canonical:
        out.append(f"    # TODO confirm: canonical is a guess ({role.canonical_reason})")
        out.append(f"    canonical: {scalar(role.canonical)}")
    else:
        out.append(f"    # canonical: none guessed ({role.canonical_reason})  # TODO confirm: name the SSOT")
    retired = [m for m in role.members if m.retired_reason]
    if retired:
        short = naming.short_names(role.implementations)
        reasons = "; ".join(f"{short[m.key]}: {m.retired_reason}" for m in retired)
        out.append(f"    # TODO confirm: retired are guesses ({reasons})")
        out.append(f"    retired: {flow([m.key for m in retired])}")
    out.append(f"    # TODO confirm: methods are {role.method_note}")
    out.append(f"    methods: {flow(role.methods)}")
    out += _fan_out_lines(role)
    if role.user_scoped:
        out.append("    # TODO confirm: user_scoped because an owner is assigned in __init__")
        out.append("    user_scoped: true")
    for key in EXTRACTOR_KEYS:
        paths = role.extractors.get(key)
        if paths:
            out.append(f"    {key}: {flow(paths)}  # TODO confirm: guessed from names and annotations")
        elif key in role.extractors:
            out.append(f"    # {key}: none found  # TODO confirm: add a path if the calls carry it")
    return out


def _fan_out_lines(role: RoleProposal) -> list[str]:
    if role.kind != "dispatch":
        return []
    # the price of a mistake either way, next to the guess: the reader decides with it in view
    if not role.fan_out:
        found = f" ({role.fan_out_note})" if role.fan_out_note else ""
        return [f"    # fan_out: none guessed{found}  # TODO confirm: list the methods that send one message "
                "to several users by design (a room, everyone): left out, each of their writes to another "
                "user's socket pages bleed.target_vs_socket_owner"]
    return [f"    # TODO confirm: fan_out is a guess ({role.fan_out_note})",
            "    # (a fan-out names no target and its writes are not judged against their event's user: "
            "a per-user send listed here would hide its bleeds)",
            f"    fan_out: {flow(role.fan_out)}"]


def render_yaml(found: Discovery, *, skipped_limit: int = 20) -> str:
    by_target: dict[str, list[str]] = {}
    for alias in found.aliases:
        by_target.setdefault(alias.target, []).append(f"{alias.name} -> {alias.target}")
    lines = [
        f"# Draft path map proposed by `pathwatch discover` from a static read of {found.package_dir}",
        f"# ({found.files_read} modules read, {len(found.classes)} classes indexed, "
        f"{len(found.skipped)} files skipped). Nothing was imported or executed.",
        "# Every line marked 'TODO confirm' is a guess: check it before handing this file to instrument().",
        "version: 1",
        "",
    ]
    note = "  # TODO confirm: not visible in the code; these are defaults" if found.identity_guessed \
        else "  # TODO confirm: from headers/query params read in the code"
    lines.append(f"identity:{note}")
    for channel, sources in found.identity.items():
        lines.append(f"  {channel}: {flow_maps(sources)}")
    lines += ["", "roles:"]
    if not found.roles:
        lines[-1] = "roles: {}  # TODO confirm: no engine/supervisor/emitter/socket manager found"
    elif not any(role.methods for role in found.roles):
        lines[-1] = "roles: {}  # TODO confirm: the roles below have no method to wrap yet"
    for role in found.roles:
        aliases = [text for member in role.implementations for text in by_target.get(member, [])]
        role_lines = _role_lines(role, aliases)
        if not role.methods:
            # a role without methods does not load: left as a comment for the reader to complete
            role_lines = [f"  # {role.name}: no public method found on its classes (inherited from a base "
                          "outside the tree?)  # TODO confirm: name the methods to wrap, then uncomment",
                          *(f"  # {line[2:]}" for line in role_lines)]
        lines += role_lines
    lines += ["", _messages_comment(found), "messages:"]
    lines += [f"  {key}: {scalar(value)}" for key, value in found.messages.items()]
    lines += ["", *_candidate_lines(found), *_type_only_lines(found, skipped_limit),
              *_rebound_lines(found, skipped_limit),
              *_skipped_lines(found, skipped_limit)]
    # every line through printable(): paths, link targets and messages from the tree sit in comments
    # (data values are already escaped by scalar()), and none may break out of its line
    return "\n".join(printable(line) for line in lines).rstrip("\n") + "\n"


def _messages_comment(found: Discovery) -> str:
    if found.messages_guessed:
        return "# TODO confirm: no outgoing message dicts with a 'type' key found; these are defaults"
    return "# TODO confirm: keys seen in dict literals carrying a 'type' key"


def _type_only_lines(found: Discovery, limit: int) -> list[str]:
    return _listed_lines(
        found.type_only, limit,
        f"# type-checking only: {len(found.type_only)} class(es) defined under `if TYPE_CHECKING:`, "
        "absent at run time, so not proposed (naming one in a path map is an error: class not found)",
        lambda item: f"{item.key} ({item.path}:{item.line})")


def _rebound_lines(found: Discovery, limit: int) -> list[str]:
    return _listed_lines(
        found.rebound, limit,
        f"# rebound: {len(found.rebound)} class(es) whose name their module binds to something else "
        "afterwards, so not proposed (module.Name is that other object at run time)",
        lambda item: f"{item.key} ({item.path}:{item.line}): {item.reason}")


def _listed_lines(items: Sequence[Any], limit: int, header: str,
                  text: Callable[[Any], str]) -> list[str]:
    """A commented block: ``header``, then the first ``limit`` items, one a line (none: no block)."""
    if not items:
        return []
    lines = [header] + [f"#   {text(item)}" for item in items[:limit]]
    if len(items) > limit:
        lines.append(f"#   ... and {len(items) - limit} more (see --json)")
    return lines + [""]


def _candidate_lines(found: Discovery, limit: int = 10) -> list[str]:
    if not found.candidate_groups:
        return []
    lines = ["# Other look-alike classes (no known role name); add a role if they do the same job:"]
    for group in found.candidate_groups[:limit]:
        lines.append(f"#   {', '.join(group.classes)}: shared {', '.join(group.shared_methods)}")
    if len(found.candidate_groups) > limit:
        lines.append(f"#   ... and {len(found.candidate_groups) - limit} more groups (see --json)")
    return lines + [""]
