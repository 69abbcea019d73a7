"""``logging.format: json``: each log record as one JSON object on one line (docs/sidecar.md).

``time`` (RFC 3339, UTC, milliseconds), ``level`` (``info``, ``warning``, ...), ``logger``,
``message``, ``exception`` (the formatted traceback) when the record carries one, ``stack`` when it
carries a stack, then the record's extras (``log.info(..., extra={...})``); an extra named like one
of those fields comes as ``extra.<name>``. The line holds no line break of any kind: JSON escapes
``\\n``, and U+0085, U+2028 and U+2029, which JSON leaves as they are and some readers split lines
on, are escaped too. A lone surrogate (a byte that was not UTF-8, as ``os.environ`` and file names
carry one) is written as Python's text output shows it, ``\\udcXX``, as text: a JSON escape of
one is refused by strict parsers.
"""

from __future__ import annotations

import json
import logging
import re
import time

#: the attributes every LogRecord has: anything else on a record is an extra
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}
_FIELDS = frozenset({"time", "level", "logger", "message", "exception", "stack"})
# what json.dumps(ensure_ascii=False) leaves raw and must not be: line breaks to some readers, lone
# surrogates; and for a stream that is not UTF-8, every non-ASCII character
_UNSAFE = re.compile("[\u0085\u2028\u2029\ud800-\udfff]")
_NON_ASCII = re.compile("[^\x00-\x7f]")


class JsonFormatter(logging.Formatter):
    """``ascii_only``: non-ASCII characters as JSON escapes (``\\u00e9``), for a stream that cannot
    write them (an ASCII or Latin-1 stderr would write ``\\xe9``, which is no JSON); else as they are."""

    def __init__(self, *, ascii_only: bool = False) -> None:
        super().__init__()
        self.ascii_only = ascii_only
        self._unsafe = _NON_ASCII if ascii_only else _UNSAFE

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": _message(record),
        }
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES:
                entry[f"extra.{key}" if key in _FIELDS else key] = _jsonable(value)
        text = json.dumps(entry, ensure_ascii=False, default=str)
        return self._unsafe.sub(_escape, text)


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception as exc:  # noqa: BLE001 - a log call whose arguments do not fit its format: on
        # this line (the handler's own report of it is a multi-line traceback); the arguments are
        # left out, as they are the values
        return f"{record.msg!s} (its arguments could not be formatted: {type(exc).__name__})"


def _jsonable(value: object) -> object:
    """An extra as it is when JSON can hold it (an unknown type as its ``str``), else its ``repr``
    (a NaN, a circular list, a mapping with keys that are not strings)."""
    try:
        json.dumps(value, allow_nan=False, default=str)
    except (ValueError, TypeError, RecursionError):
        return repr(value)
    return value


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xD800 <= code <= 0xDFFF:  # lone: "\udcXX" as text (the backslash escaped)
        return f"\\\\u{code:04x}"
    if code > 0xFFFF:  # a JSON escape holds 16 bits: the pair of surrogates that stands for it
        code -= 0x10000
        return f"\\u{0xD800 | code >> 10:04x}\\u{0xDC00 | code & 0x3FF:04x}"
    return f"\\u{code:04x}"
