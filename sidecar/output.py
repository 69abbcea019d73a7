"""A command's output on stdout (``pathwatch report``, ``pathwatch discover``): one that cannot be
written — a full disk, an I/O error, stdout closed (``>&-``) — is one line on stderr and an exit
code, never a traceback. A reader that has gone (``| head -1``, ``BrokenPipeError``) is the command
line's: it exits 141 quietly (``sidecar.cli``). The standard library only: ``discover`` uses it."""

from __future__ import annotations

import os
import sys


def write_output(text: str, command: str, what: str) -> bool:
    """``text`` on stdout, flushed; False, said on stderr ("pathwatch COMMAND: cannot write WHAT to
    its output (No space left on device)"), when it cannot be written."""
    if sys.stdout is None:  # started with its stdout closed (`>&-`): print() would write nothing
        print(f"pathwatch {command}: cannot write {what} to its output (it is closed)",
              file=sys.stderr)
        return False
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        print(f"pathwatch {command}: cannot write {what} to its output ({exc.strerror or exc})",
              file=sys.stderr)
        discard_output()
        return False
    return True


def discard_output() -> None:
    """stdout pointed at /dev/null: what is still buffered would fail again in the interpreter's
    last flush ("Exception ignored ...", exit code 120)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no file descriptor (replaced, closed, None)
        pass
