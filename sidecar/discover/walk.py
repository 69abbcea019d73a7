"""Find the Python files of a source tree, skipping what is not the backend's own code.

Skipped on purpose: virtualenvs, ``site-packages``, ``node_modules``, ``__pycache__``, hidden
directories, ``build``/``dist`` copies (a package of that name is read), and (unless asked) tests.
Reported, never read: anything that is not a regular file (a FIFO or a device named ``*.py``), and
names no import statement can reach (``async.py``, ``setup-old.py``, a ``class/`` package), which no
path map can name. Symlinks are followed once, and only after every real path was walked, so a link
(``compat -> engines``) never claims a folder or file before its real path does: a folder or file
whose real path was already visited is a loop (or a duplicate) and is reported, never read again. A
link to a folder outside the tree, or to one above it (``up -> ../..``, a loop that would read the
whole project), is reported and never followed; a link to one file outside the tree is read.
A folder without ``__init__.py`` its own code imports by name (``from acme.engines import X`` in
``acme/``) is a namespace package, named as one. A source root holding ``src/`` without ``__init__.py``
is a src layout: the modules under it are named from ``src/`` (``src/app/x.py`` is ``app.x``), unless
the code imports through ``src.``.
"""

from __future__ import annotations

import dataclasses
import keyword
import os
import re
import stat
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sidecar.discover.model import SkippedFile, SourceFile

SKIPPED_DIR_NAMES = frozenset({
    "__pycache__", "node_modules", "site-packages", "dist-packages", "venv", "virtualenv", "env.d",
})
TEST_DIR_NAMES = frozenset({"tests", "test", "testing"})
BUILD_DIR_NAMES = frozenset({"build", "dist"})  # copies made by packaging, unless a package itself
DEFAULT_MAX_FILE_BYTES = 2 * 1024 * 1024
SRC_LAYOUT_DIR = "src"
# an absolute import through the src folder (``from src.app import x``, ``import src.app``): the code
# is run with the repo itself on sys.path, and ``src`` is a namespace package of it
_IMPORTS_SRC = re.compile(rb"^[ \t]*(?:from[ \t]+src(?:[ \t]*\.|[ \t]+import\b)|import[ \t]+src\b)", re.MULTILINE)


@dataclass(slots=True)
class WalkResult:
    files: list[SourceFile]
    skipped: list[SkippedFile]
    module_prefix: str


def is_test_file(name: str) -> bool:
    return name.startswith("test_") or name.endswith("_test.py") or name == "conftest.py"


def unimportable(name: str) -> str:
    """Why an import statement cannot name a module or package called ``name``; "" when it can.

    Non-ASCII identifiers are fine (``moteur_é``): Python accepts them."""
    if keyword.iskeyword(name):
        return f"{name!r} is a Python keyword"
    if not name.isidentifier():
        return f"{name!r} is not a Python identifier"
    if unicodedata.normalize("NFKC", name) != name:   # the parser normalizes the names it reads
        return f"{name!r} is not in NFKC form, which an import statement looks for"
    return ""


def module_prefix_for(package_dir: Path) -> str:
    """Dotted name of ``package_dir`` as importers see it: climb while the parent is a package.

    A directory without ``__init__.py`` is a sys.path root (a project or ``src`` folder): prefix "".
    So is a package no import statement can name (``my-app``): only with it on sys.path can its
    modules be imported at all.
    """
    if not (package_dir / "__init__.py").is_file() or unimportable(package_dir.name):
        return ""
    parts = [package_dir.name]
    parent = package_dir.parent
    while (parent / "__init__.py").is_file() and parent != parent.parent and not unimportable(parent.name):
        parts.append(parent.name)
        parent = parent.parent
    return ".".join(reversed(parts))


def module_name(prefix: str, relpath: str) -> tuple[str, bool]:
    """``engines/user.py`` -> ``prefix.engines.user``; ``engines/__init__.py`` -> ``prefix.engines``."""
    parts = relpath[:-3].split("/")
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    dotted = ".".join(part for part in parts if part)
    if prefix:
        dotted = f"{prefix}.{dotted}" if dotted else prefix
    return dotted, is_package


def _is_venv(entry: os.DirEntry) -> bool:
    return os.path.exists(os.path.join(entry.path, "pyvenv.cfg"))


class _Walker:
    def __init__(self, root: Path, include_tests: bool, max_file_bytes: int, named_as: Path | None = None) -> None:
        self.root = root
        self.include_tests = include_tests
        self.max_file_bytes = max_file_bytes
        named_as = named_as or root
        self.named_as = named_as
        self.prefix = module_prefix_for(named_as)
        self.root_why = unimportable(named_as.name)
        self.files: list[SourceFile] = []
        self.skipped: list[SkippedFile] = []
        self.seen_dirs: set[str] = set()
        self.seen_files: set[str] = set()
        self.links: list[tuple[os.DirEntry, str]] = []   # symlinks met, followed once the real paths are read

    def run(self) -> WalkResult:
        self.root_real = os.path.realpath(self.root)
        self.seen_dirs.add(self.root_real)
        pending = [(str(self.root), "")]
        while pending:
            # an explicit stack, not recursion: deep trees must not hit the recursion limit
            directory, rel = pending.pop()
            subdirs = list(self._scan(directory, rel))
            pending.extend(reversed(subdirs))
            if not pending:   # every real path read: now the links (and, next round, links met in them)
                pending = list(reversed(self._follow_links()))
        self.files.sort(key=lambda source: source.relpath)
        namespace = self._namespace_prefix()
        if namespace:
            self.prefix = namespace
            self.files = [dataclasses.replace(source, module=module_name(namespace, source.relpath)[0])
                          for source in self.files]
        if self._src_layout():
            self._name_from_src()
        return WalkResult(self.files, self.skipped, self.prefix)

    def _namespace_prefix(self) -> str:
        """The dotted name of a ``PACKAGE_DIR`` without ``__init__.py`` that its own code imports by name
        (``from acme.engines import X`` in ``acme/``, where ``engines`` is in the tree): a namespace
        package (PEP 420), not a source root; "" when nothing says so."""
        if self.prefix or self.root_why or os.path.exists(os.path.join(self.root, "__init__.py")):
            return ""
        name = self.named_as.name
        tops = {source.module.split(".")[0] for source in self.files if source.module}
        pattern = re.compile(rf"^[ \t]*(?:from|import)[ \t]+((?:[^\W\d]\w*\.)*){re.escape(name)}\.([^\W\d]\w*)",
                             re.MULTILINE)
        needle = f"{name}.".encode()
        for source in self.files:
            try:
                with open(source.path, "rb") as handle:
                    data = handle.read()
            except OSError:   # reported when the file is parsed
                continue
            if needle not in data:
                continue
            for match in pattern.finditer(data.decode("utf-8", errors="replace")):
                outer = [part for part in match.group(1).split(".") if part]
                if match.group(2) in tops and self._parents_are(outer):
                    return ".".join([*outer, name])
        return ""

    def _parents_are(self, outer: list[str]) -> bool:
        """The folders above ``PACKAGE_DIR`` are named ``outer`` (``company/acme`` for ``company.acme``)."""
        parent = self.named_as.parent
        for part in reversed(outer):
            if parent.name != part:
                return False
            parent = parent.parent
        return True

    def _src_layout(self) -> bool:
        """A source root holding ``src/`` without ``__init__.py`` (the src layout): ``src`` is the folder
        on sys.path, not a package -- unless the code itself imports through it (``from src.app ...``)."""
        under_src = [source for source in self.files if source.relpath.startswith(f"{SRC_LAYOUT_DIR}/")]
        if self.prefix or not under_src or os.path.exists(os.path.join(self.root, SRC_LAYOUT_DIR, "__init__.py")):
            return False
        return not any(_imports_src(source.path) for source in self.files)

    def _name_from_src(self) -> None:
        renamed = [dataclasses.replace(source, module=module_name("", source.relpath[len(SRC_LAYOUT_DIR) + 1:])[0])
                   if source.relpath.startswith(f"{SRC_LAYOUT_DIR}/") else source for source in self.files]
        from_src = {source.module: source.relpath for source in renamed
                    if source.relpath.startswith(f"{SRC_LAYOUT_DIR}/")}
        self.files = []
        for source in renamed:
            if source.module in from_src and from_src[source.module] != source.relpath:
                # app/x.py beside src/app/x.py: the src layout's is the one installed and imported
                self.skipped.append(SkippedFile(source.relpath, f"module {source.module} is also "
                                                                f"{from_src[source.module]} (src layout), read there"))
                continue
            self.files.append(source)

    def _scan(self, directory: str, rel: str) -> Iterator[tuple[str, str]]:
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as exc:
            self.skipped.append(SkippedFile(rel or ".", f"cannot list directory: {exc.strerror or exc}"))
            return
        for entry in entries:
            entry_rel = f"{rel}/{entry.name}" if rel else entry.name
            if self._visit(entry, entry_rel, follow_link=False):
                yield entry.path, entry_rel

    def _follow_links(self) -> list[tuple[str, str]]:
        links, self.links = self.links, []
        return [(entry.path, entry_rel) for entry, entry_rel in links
                if self._visit(entry, entry_rel, follow_link=True)]

    def _visit(self, entry: os.DirEntry, entry_rel: str, follow_link: bool) -> bool:
        """Record a file, or say whether a directory is to be walked; a symlink waits unless following."""
        try:
            if entry.is_dir():
                return self._keep_dir(entry, entry_rel, follow_link)
            if entry.name.endswith(".py"):
                self._add_file(entry, entry_rel, follow_link)
            elif entry.is_symlink() and not os.path.exists(entry.path):
                self._report_broken(entry, entry_rel)
        except OSError as exc:   # ELOOP on a link to itself, EACCES, ...
            if entry.is_symlink():
                self._report_broken(entry, entry_rel)
            else:
                self.skipped.append(SkippedFile(entry_rel, f"cannot stat: {exc.strerror or exc}"))
        return False

    def _report_broken(self, entry: os.DirEntry, entry_rel: str) -> None:
        # a symlink loop on a file (a -> b -> a) also lands here: os.path.exists follows and fails
        target = os.readlink(entry.path)
        if entry.name.endswith(".py") or "." not in entry.name:
            self.skipped.append(SkippedFile(entry_rel, f"broken or looping symlink -> {target}"))

    def _keep_dir(self, entry: os.DirEntry, entry_rel: str, follow_link: bool) -> bool:
        name = entry.name
        if name.startswith(".") or name in SKIPPED_DIR_NAMES or _is_venv(entry):
            return False
        if name in BUILD_DIR_NAMES and not os.path.isfile(os.path.join(entry.path, "__init__.py")):
            return False   # build/lib/app/... is a copy of app/: its classes would be proposed twice
        if not self.include_tests and name in TEST_DIR_NAMES:
            return False
        why = unimportable(name)
        if why:   # "my-scripts", "class": not backend packages; said when there is Python in them
            if any(child.endswith(".py") for child in os.listdir(entry.path)):
                self.skipped.append(SkippedFile(entry_rel, f"not importable: {why}"))
            return False
        if entry.is_symlink() and not follow_link:
            self.links.append((entry, entry_rel))
            return False
        real = os.path.realpath(entry.path)
        if entry.is_symlink() and not _within(real, self.root_real):
            # a folder above the package holds the link itself (a loop for Python, and the whole project
            # or filesystem to read); one elsewhere is not part of the tree that was asked for
            why = "symlink loop (to a folder above the package)" if _within(self.root_real, real) \
                else "symlink to a folder outside the tree, not followed"
            self.skipped.append(SkippedFile(entry_rel, f"{why} -> {real}"))
            return False
        if real in self.seen_dirs:
            self.skipped.append(SkippedFile(entry_rel, f"{_why_seen(entry, real)} -> {real}"))
            return False
        self.seen_dirs.add(real)
        return True

    def _add_file(self, entry: os.DirEntry, entry_rel: str, follow_link: bool = False) -> None:
        if not os.path.exists(entry.path):
            self._report_broken(entry, entry_rel)
            return
        if not self.include_tests and is_test_file(entry.name):
            return
        why = unimportable(entry.name[:-3])
        if why:   # "setup-old.py", "async.py" cannot be imported, so they cannot hold an implementation
            self.skipped.append(SkippedFile(entry_rel, f"not importable: {why}"))
            return
        if entry_rel == "__init__.py" and not self.prefix and self.root_why:
            self.skipped.append(SkippedFile(entry_rel, f"not importable: {self.root_why}; the modules inside "
                                                       "are named as if the folder were on sys.path"))
            return
        if entry.is_symlink() and not follow_link:
            self.links.append((entry, entry_rel))
            return
        real = os.path.realpath(entry.path)
        if real in self.seen_files:
            self.skipped.append(SkippedFile(entry_rel, f"same file already read via another path -> {real}"))
            return
        self.seen_files.add(real)
        status = entry.stat()   # follows a symlink: what would be read
        if not stat.S_ISREG(status.st_mode):
            # a FIFO would block the read forever, a device would read without end
            self.skipped.append(SkippedFile(entry_rel, "not a regular file"))
            return
        size = status.st_size
        if size > self.max_file_bytes:
            self.skipped.append(SkippedFile(entry_rel, f"too large ({size} bytes > {self.max_file_bytes})"))
            return
        module, is_package = module_name(self.prefix, entry_rel)
        self.files.append(SourceFile(entry.path, entry_rel, module, is_package))


def _imports_src(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            return bool(_IMPORTS_SRC.search(handle.read()))
    except OSError:   # reported when the file is parsed
        return False


def _within(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or under it (both real, absolute paths)."""
    return os.path.commonpath([path, folder]) == folder


def _why_seen(entry: os.DirEntry, real: str) -> str:
    if not entry.is_symlink():
        return "directory already read"
    holder = os.path.realpath(os.path.dirname(entry.path))
    if os.path.commonpath([holder, real]) == real:   # the link points at a folder it sits in
        return "symlink loop"
    return "symlink to a directory read under its real path"


def find_python_files(root: Path, *, include_tests: bool = False, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                      named_as: Path | None = None) -> WalkResult:
    """Walk ``root``; module names come from ``named_as`` (default ``root``): the path as given, whose
    name and parent folders are what an importer sees, where ``root`` may be its resolved target
    (``proj/app -> releases/app-2.3`` is the package ``app``, not a folder ``app-2.3``)."""
    return _Walker(root, include_tests, max_file_bytes, named_as).run()
