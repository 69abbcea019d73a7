"""The whole static read: walk -> parse -> index -> resolve -> group -> propose.

Nothing here imports or executes the code it reads. Every file that cannot be used is recorded with
its reason and the run goes on: a draft from 4,990 of 5,000 files is still a useful draft.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from sidecar.discover.extractors import ExtractorGuesser, annotation_names
from sidecar.discover.index import index_module, relative_import_above_top
from sidecar.discover.model import ClassInfo, Discovery, ModuleInfo, ReboundClass, SkippedFile, TypeOnlyClass
from sidecar.discover.parse import NEWER_SYNTAX_HINT, parse_file
from sidecar.discover.propose import Proposer
from sidecar.discover.resolve import Resolver, ancestors, class_index
from sidecar.discover.roles import group_classes
from sidecar.discover.walk import DEFAULT_MAX_FILE_BYTES, find_python_files

DEFAULT_IDENTITY = {"http": [{"header": "x-user-id"}],
                    "websocket": [{"query_param": "user_id"}, {"header": "x-user-id"}]}


class DiscoveryError(ValueError):
    """The input cannot be read at all (missing or not a directory); the message names it."""


def read_modules(package_dir: Path, include_tests: bool, max_file_bytes: int, named_as: Path | None = None,
                 ) -> tuple[dict[str, ModuleInfo], str, list[SkippedFile], list[SkippedFile], int]:
    walked = find_python_files(package_dir, include_tests=include_tests, max_file_bytes=max_file_bytes,
                               named_as=named_as)
    modules: dict[str, ModuleInfo] = {}
    skipped = list(walked.skipped)
    notes: list[SkippedFile] = []
    broken: dict[str, str] = {}   # packages whose __init__.py cannot be imported -> relpath
    # pkg.py next to pkg/__init__.py: Python imports the package, whichever file sorts first
    packages = {source.module: source.relpath for source in walked.files if source.is_package}
    # pkg.py next to a folder pkg/ without __init__.py: a regular module wins over a namespace portion,
    # so nothing under pkg/ can be imported as pkg.x
    plain = {source.module: source.relpath for source in walked.files
             if not source.is_package and source.module not in packages}
    for source in walked.files:
        if not source.is_package and source.module in packages:
            skipped.append(SkippedFile(source.relpath, f"module {source.module} is shadowed by package "
                                                       f"{packages[source.module]}"))
            continue
        shadow = _shadowing_module(source.module, plain)
        if shadow:
            skipped.append(SkippedFile(source.relpath, f"not importable: {shadow} is the module {plain[shadow]} "
                                                       f"(its folder has no __init__.py), so {source.module} "
                                                       f"cannot be imported"))
            continue
        parsed = parse_file(source.path, source.relpath)
        if parsed.note:
            notes.append(parsed.note)
        if parsed.tree is None:
            skipped.append(parsed.skipped)
            if source.is_package and NEWER_SYNTAX_HINT not in parsed.skipped.reason:
                # its import fails (syntax error, bytes Python cannot decode), and with it every import
                # under it; syntax of a newer Python than the one reading it is fine where the app runs
                broken[source.module] = source.relpath
            continue
        climbs = relative_import_above_top(parsed.tree, source.module, source.is_package)
        if climbs:   # ImportError on import: no path map can name its classes
            lineno, reason = climbs
            skipped.append(SkippedFile(source.relpath, f"not importable: {reason}", lineno))
            if source.is_package:
                broken[source.module] = source.relpath
            continue
        try:
            modules[source.module] = index_module(source, parsed.tree, parsed.source)
        except (RecursionError, MemoryError, ValueError, AttributeError, TypeError) as exc:
            # a shape of code this reader does not expect must cost one file, never the whole run
            skipped.append(SkippedFile(source.relpath, f"cannot index: {exc.__class__.__name__}: {exc}"))
    # importing a.b.c imports a.b first: nothing under a package whose __init__ cannot import can be
    for name in [name for name in modules if _shadowing_module(name, broken)]:
        outer = _shadowing_module(name, broken)
        skipped.append(SkippedFile(modules.pop(name).relpath, f"not importable: its package {outer} "
                                                              f"({broken[outer]}) cannot be imported"))
    return modules, walked.module_prefix, skipped, notes, len(modules)


def _shadowing_module(module: str, outer_modules: dict[str, str]) -> str:
    """The outermost of ``outer_modules`` (``a.engines``) that ``module`` (``a.engines.impl``) lives under."""
    parts = module.split(".")
    for end in range(1, len(parts)):
        outer = ".".join(parts[:end])
        if outer in outer_modules:
            return outer
    return ""


def _attrs_lookup(resolver: Resolver, classes: dict[str, ClassInfo]):
    def attrs_of(module: str, annotation: str) -> set[str] | None:
        for name in annotation_names(annotation):
            key = resolver.class_key(module, name)
            if key in classes:
                found: set[str] = set()
                for owner in [key, *ancestors(key, classes)]:
                    found |= classes[owner].attributes
                return found
        return None
    return attrs_of


def _messages(modules: dict[str, ModuleInfo]) -> tuple[dict[str, str], bool]:
    seen: Counter[str] = Counter()
    for info in modules.values():
        for keys in info.message_keys:
            seen.update(keys)
    messages = {"event_type": "type", "run_id": "run_id"}
    if seen.get("event_id"):
        messages["event_id"] = "event_id"
    return messages, not seen.get("type")


def _identity(modules: dict[str, ModuleInfo]) -> tuple[dict[str, list[dict[str, str]]], bool]:
    hints = Counter(hint for info in modules.values() for hint in info.identity_hints)
    if not hints:
        return DEFAULT_IDENTITY, True
    headers = [{"header": key} for (source, key), _ in hints.most_common() if source == "header"]
    queries = [{"query_param": key} for (source, key), _ in hints.most_common() if source == "query_param"]
    return {"http": headers or DEFAULT_IDENTITY["http"], "websocket": queries + headers}, False


def discover(package_dir: str | Path, *, include_tests: bool = False,
             max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Discovery:
    root = Path(package_dir)
    if not root.exists():
        raise DiscoveryError(f"package directory {str(package_dir)!r} does not exist")
    if not root.is_dir():
        raise DiscoveryError(f"{str(package_dir)!r} is not a directory")
    try:   # a folder that cannot be listed gives no draft at all, not an empty one
        with os.scandir(root):
            pass
    except OSError as exc:
        raise DiscoveryError(f"cannot read package directory {str(package_dir)!r}: {exc.strerror or exc}") from None
    # the package is named after the path as given (a link proj/app -> releases/app-2.3 is imported as
    # app, with proj on sys.path); only the walk goes through the resolved folder
    named_as = Path(os.path.abspath(root))
    modules, prefix, skipped, notes, files_read = read_modules(root.resolve(), include_tests, max_file_bytes,
                                                               named_as)
    resolver = Resolver(modules, prefix)
    resolver.resolve_bases()
    classes = class_index(modules)
    deprecated = {name for name, info in modules.items() if info.deprecated_on_import}
    grouping = group_classes(classes, deprecated)
    messages, messages_guessed = _messages(modules)
    guesser = ExtractorGuesser(classes, _attrs_lookup(resolver, classes))
    roles = Proposer(classes, guesser, messages).propose(grouping)
    identity, identity_guessed = _identity(modules)
    return Discovery(
        package_dir=str(package_dir), module_prefix=prefix, files_read=files_read, skipped=skipped,
        notes=notes, classes=classes, aliases=resolver.aliases(), roles=roles,
        candidate_groups=grouping.candidates, messages=messages, messages_guessed=messages_guessed,
        identity=identity, identity_guessed=identity_guessed,
        type_only=[TypeOnlyClass(f"{info.name}.{name}", info.relpath, line)
                   for info in modules.values() for name, line in info.type_only_classes],
        rebound=[ReboundClass(f"{info.name}.{name}", info.relpath, line, why)
                 for info in modules.values() for name, line, why in info.rebound_classes])
