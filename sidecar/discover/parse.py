"""Read one file and parse it with ``ast``: never import, never execute, never raise.

Bytes are decoded as Python would (PEP 263 coding line, UTF-8 by default). A file that is not valid
in that encoding but that Python still imports (bad bytes in comments only) is read with replacement
characters, and the caller reports it as a note; one whose import fails on them is skipped.
"""

from __future__ import annotations

import ast
import io
import re
import sys
import tokenize
import warnings
from dataclasses import dataclass

from sidecar.discover.model import SkippedFile


# syntax a newer Python added, which the interpreter running discover reports as a plain syntax error
# in a backend that is fine: (version, what, test on the error)
_NAME = r"[^\W\d]\w*"
_NEWER_SYNTAX = (
    ((3, 12), "a `type` statement", lambda exc: re.match(rf"\s*type\s+{_NAME}\s*(\[.*\])?\s*=", exc.text or "")),
    ((3, 12), "type parameters (`class C[T]`, `def f[T]`)",
     lambda exc: re.match(rf"\s*(async\s+)?(def|class)\s+{_NAME}\s*\[", exc.text or "")),
    ((3, 12), "quotes or backslashes inside an f-string's braces", lambda exc: (exc.msg or "").startswith("f-string")),
)


NEWER_SYNTAX_HINT = "run discover with the backend's Python"   # ends the note on newer syntax


def _newer_syntax(exc: SyntaxError) -> str:
    """A note for the reason when the error looks like syntax newer than this interpreter's, else ""."""
    for version, what, test in _NEWER_SYNTAX:
        if sys.version_info < version and test(exc):
            return (f" (Python {version[0]}.{version[1]} syntax? {what}, which this Python "
                    f"{sys.version_info[0]}.{sys.version_info[1]} cannot parse: {NEWER_SYNTAX_HINT})")
    return ""


@dataclass(slots=True)
class Parsed:
    tree: ast.Module | None
    source: str
    skipped: SkippedFile | None = None
    note: SkippedFile | None = None


def _decode(data: bytes, relpath: str) -> tuple[str, SkippedFile | None]:
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError as exc:   # an unknown codec in the coding line, or bytes that are not UTF-8 up front
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            reason = "not valid utf-8 (UnicodeDecodeError); read with replacement characters"
            return data.decode("utf-8", errors="replace"), SkippedFile(relpath, reason)
        return data.decode("utf-8", errors="replace"), SkippedFile(relpath, f"bad coding line: {exc.msg}")
    try:
        return data.decode(encoding), None
    except (UnicodeDecodeError, LookupError) as exc:
        reason = f"not valid {encoding} ({exc.__class__.__name__}); read with replacement characters"
        return data.decode("utf-8", errors="replace"), SkippedFile(relpath, reason)


def _import_decoding_error(data: bytes) -> SyntaxError | None:
    """The SyntaxError Python's import raises decoding these bytes, None when it reads them.

    Parsing the bytes decodes them as the import does: an unknown codec on the coding line, or a byte
    not valid in the encoding in a string or a name, fails; in a comment it does not (CPython does not
    check those), so such a file imports and its classes can be named."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(data)
    except SyntaxError as exc:
        return exc if ("codec" in (exc.msg or "") or "encoding" in (exc.msg or "")) else None
    except (ValueError, RecursionError, MemoryError):
        return None
    return None


def parse_file(path: str, relpath: str) -> Parsed:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        return Parsed(None, "", SkippedFile(relpath, f"cannot read: {exc.strerror or exc}"))
    source, note = _decode(data, relpath)
    if note is not None:
        undecodable = _import_decoding_error(data)
        if undecodable is not None:   # no path map can name a class of a module that cannot be imported
            reason = f"not importable: Python's import cannot decode it ({undecodable.msg})"
            return Parsed(None, source, SkippedFile(relpath, reason, undecodable.lineno or 0))
    if source.startswith("\ufeff"):
        source = source[1:]
    try:
        with warnings.catch_warnings():
            # invalid escape sequences and the like are the backend's business, not ours
            warnings.simplefilter("ignore")
            tree = ast.parse(source, filename=relpath)
    except SyntaxError as exc:
        return Parsed(None, source, SkippedFile(relpath, f"syntax error: {exc.msg}{_newer_syntax(exc)}",
                                                exc.lineno or 0), note)
    except (ValueError, RecursionError, MemoryError) as exc:   # null bytes, absurd nesting
        return Parsed(None, source, SkippedFile(relpath, f"cannot parse: {exc.__class__.__name__}: {exc}"), note)
    return Parsed(tree, source, None, note)
