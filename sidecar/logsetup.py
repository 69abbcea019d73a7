"""The sidecar's logging (``logging.level``, ``logging.format``; docs/sidecar.md): on stderr, as text
(``TIME LEVEL LOGGER: MESSAGE``, a traceback on the lines after) or one JSON object per line
(``sidecar.jsonlog``).

With JSON, what would otherwise reach stderr as lines of text goes through the same handler:
warnings (``py.warnings``), an exception no code caught (the main thread's, another thread's, one
Python could only report as "Exception ignored in"), and uvicorn's records (``uvicorn.error``), which
uvicorn otherwise writes with its own handler (``uvicorn_log_config``).
"""

from __future__ import annotations

import codecs
import logging
import sys
import threading
import traceback
from typing import Any

from sidecar.jsonlog import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
log = logging.getLogger("pathwatch.sidecar")


def configure_logging(level: str, format: str = "text") -> None:  # noqa: A002 - the key's name
    if format == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter(ascii_only=not _writes_utf8(sys.stderr)))
        logging.basicConfig(level=level.upper(), handlers=[handler])
        if writes_json():  # not when the root logger had a handler already (basicConfig did nothing)
            logging.captureWarnings(True)
            _log_uncaught_exceptions()
    else:
        logging.basicConfig(level=level.upper(), format=TEXT_FORMAT)
    # httpx logs every request with its full URL at INFO: alert URLs may carry credentials
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))


def writes_json() -> bool:
    """The root logger writes JSON lines (``logging.format: json``)."""
    return any(isinstance(handler.formatter, JsonFormatter) for handler in logging.getLogger().handlers)


def uvicorn_log_config() -> dict[str, Any] | None:
    """``log_config`` for a ``uvicorn.Config``: uvicorn's own (its handler writes its text lines, as
    ever) unless the sidecar writes JSON; then none, and its records go to the root logger's handler."""
    from uvicorn.config import LOGGING_CONFIG

    return None if writes_json() else LOGGING_CONFIG


def _writes_utf8(stream: object) -> bool:
    try:
        return codecs.lookup(getattr(stream, "encoding", None) or "ascii").name == "utf-8"
    except LookupError:
        return False


def _log_uncaught_exceptions() -> None:
    def main_thread(exc_type, exc_value, traceback) -> None:  # type: ignore[no-untyped-def]
        log.critical("uncaught exception", exc_info=(exc_type, exc_value, traceback))

    def other_thread(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:  # as threading's own hook: a thread's sys.exit() is quiet
            return
        name = args.thread.name if args.thread is not None else "?"
        log.error("uncaught exception in thread %s", name,
                  exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    def unraisable(args: Any) -> None:  # sys.UnraisableHookArgs
        exc_info = (args.exc_type, args.exc_value, args.exc_traceback) if args.exc_type else None
        log.error("%s: %r", args.err_msg or "Exception ignored in", args.object, exc_info=exc_info)

    sys.excepthook = main_thread
    threading.excepthook = other_thread
    sys.unraisablehook = unraisable


def log_error_scrubbed(logger: logging.Logger, message: str, *args: object) -> None:
    """``logger.exception(message, *args)`` for an error met on span data: its traceback
    (``record.exc_text``: on the lines after, or the JSON ``exception`` field) is
    ``scrubbed_traceback``'s, which leaves the exceptions' messages out."""
    if not logger.isEnabledFor(logging.ERROR):
        return
    filename, line, function, _ = logger.findCaller(stacklevel=2)
    record = logger.makeRecord(logger.name, logging.ERROR, filename, line, message, args, None,
                               function)
    record.exc_text = scrubbed_traceback(sys.exc_info()[1])
    logger.handle(record)


def scrubbed_traceback(error: BaseException | None) -> str:
    """The error and its causes as Python prints them — where each was raised, innermost cause
    first — with each exception's message left out: an error met on a span may quote its data (a
    KeyError's key: a user's pseudonym, or the raw id where raw ids are allowed), and user ids never
    reach the log. The type and the lines of code are what a bug report needs."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    parts = []
    for error in reversed(chain):
        frames = "".join(traceback.format_list(traceback.extract_tb(error.__traceback__)))
        parts.append(f"Traceback (most recent call last):\n{frames}{type(error).__module__}."
                     f"{type(error).__qualname__} (message left out: it may quote span data)")
    return "\n\nThe above exception led to the following:\n\n".join(parts)
