"""One sidecar per incident database: an exclusive lock on ``<incidents.path>.lock``.

The incident database and the consolidation ledger beside it (``ledger_path_beside``) belong to one
sidecar process at a time. Two would overwrite each other's rows (each holds its incidents in memory
and writes whole rows), and the second to start would take the first's ``running`` marker for an
unclean stop and record a false span loss in the live ledger — which keeps every idle class from
``safe_to_delete`` for a whole window. ``StateLock.acquire`` takes ``flock(LOCK_EX | LOCK_NB)`` on
the lock file before either file is read or written and writes the holder's pid and host name into
it; a sidecar that finds the lock held is refused (``StateInUse``, naming that pid) having touched
neither file. The kernel releases the lock when the process ends, however it ends (SIGKILL, OOM
kill): a crash leaves no stale lock behind. The file itself stays (removing it would let a third
process lock a new file while a second one locks the old); ``release`` empties it. A symbolic link
as ``incidents.path`` is followed (``lock_path_of``), so that a sidecar given the link and one given
its target share one lock, as they share one database.

A file of its own, not the database: SQLite locks the database with POSIX record locks, which the
process loses when it closes *any* descriptor of that file, and its ``-wal``/``-shm`` files are its
own business. ``flock`` locks belong to the open file description: a second sidecar in the same
process (tests) is refused too. On NFS, Linux implements ``flock`` with a POSIX lock of the whole
(separate) file, which conflicts with nothing of SQLite's.

``":memory:"`` (or ``""``) has no file and takes no lock. A file system that supports no locks
(``ENOLCK``, ``EOPNOTSUPP``) is logged as a warning and the sidecar runs unguarded, as before.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket

from sidecar.incidents.store import IncidentStoreError, check_path

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
_MAX_HOLDER_BYTES = 256


class StateInUse(IncidentStoreError):
    """Another sidecar holds the lock of this ``incidents.path``; the message names its pid."""


def lock_path_of(incidents_path: str) -> str | None:
    """``/data/incidents.sqlite`` -> ``/data/incidents.sqlite.lock``; None for an in-memory store.

    Beside the file the path resolves to (symbolic links followed, as SQLite follows them to open
    the database and put its ``-wal`` beside it): two sidecars given two names of one database (a
    link and its target) take one lock."""
    if incidents_path in ("", ":memory:"):
        return None
    return os.path.realpath(incidents_path) + LOCK_SUFFIX


class StateLock:
    """Held from ``acquire`` until ``release`` (idempotent) or the end of the process."""

    def __init__(self, incidents_path: str, lock_path: str | None, fd: int | None) -> None:
        self.incidents_path = incidents_path
        self.path = lock_path  # None: nothing locked (in memory, or no locks on that file system)
        self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    @classmethod
    def acquire(cls, incidents_path: str) -> StateLock:
        """Lock ``incidents_path``'s lock file without waiting. Raises ``StateInUse`` when another
        sidecar holds it, ``IncidentStoreError`` when ``incidents_path`` is a directory or in none
        (``check_path``) or the lock file cannot be opened (its directory not writable: the
        database could not be opened there either)."""
        lock_path = lock_path_of(incidents_path)
        if lock_path is None:
            return cls(incidents_path, None, None)
        check_path(incidents_path)  # before the lock file is created, beside what it would lock
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise IncidentStoreError(
                f"incidents.path {incidents_path!r}: cannot open its lock file {lock_path!r}: "
                f"{exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise StateInUse(
                f"another sidecar{holder} is using {incidents_path}: incidents.path "
                f"{incidents_path!r} and the consolidation ledger beside it belong to one sidecar "
                f"at a time (it holds {lock_path}); stop that sidecar first, or give this one an "
                "incidents.path of its own") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_LOCKS:
                log.warning("incidents.path %r: the file system does not support locks (%s): "
                            "nothing keeps a second sidecar from using the same files",
                            incidents_path, exc.strerror)
                return cls(incidents_path, None, None)
            raise IncidentStoreError(f"incidents.path {incidents_path!r}: cannot lock "
                                     f"{lock_path!r}: {exc.strerror}") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass  # the pid is only for the message of the sidecar refused
        return cls(incidents_path, lock_path, fd)

    def release(self) -> None:
        """Empty the file (still holding the lock: a new holder's pid is never erased), unlock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        os.close(fd)  # the lock goes with the last descriptor of its open file description


def _holder(fd: int) -> str:
    """`` (pid N)``, `` (pid N on host H)`` when H is not this host, or "" when not known (the holder
    has not written it yet, or could not)."""
    try:
        pid, _, host = os.pread(fd, _MAX_HOLDER_BYTES, 0).decode(errors="replace").strip().partition(" ")
    except OSError:
        return ""
    if not pid.isdigit():
        return ""
    if host and host != socket.gethostname():
        return f" (pid {pid} on host {host})"
    return f" (pid {pid})"
