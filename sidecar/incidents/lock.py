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

A hard link is another name of the same file, possibly in another directory, where no lock file
beside a name can meet the other: so the database file itself is locked too (``flock`` on its
inode, the file created empty if it does not exist yet: an empty file is an empty SQLite
database). A sidecar whose lock file is free but whose database is locked is refused the same way,
told that the holder uses another name of it, and the holder's pid read from ``/proc/locks`` (the
lock of that inode; none where the holder is not visible, another pid namespace). SQLite opens a
database through each name with its own ``-wal`` and ``-shm`` files, so two processes on two names
of one database corrupt it (SQLite's "How To Corrupt An SQLite Database File", 2.5).

A file of its own, besides the database: SQLite locks the database with POSIX record locks, which
the process loses when it closes *any* descriptor of that file, and its ``-wal``/``-shm`` files are
its own business: the descriptor locking the database stays open until ``release``, which the
sidecar calls once its SQLite connections are closed (a sidecar refused closes its own before it
opens any), and the pid is written to the lock file, never to the database. ``flock`` locks belong
to the open file description: a second sidecar in the same process (tests) is refused too. On NFS,
Linux implements ``flock`` with a POSIX lock of the whole file, which on the database would meet
SQLite's own: but SQLite's WAL mode does not work over network file systems anyway.

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

    def __init__(self, incidents_path: str, lock_path: str | None, fd: int | None,
                 database_fd: int | None = None) -> None:
        self.incidents_path = incidents_path
        self.path = lock_path  # None: nothing locked (in memory, or no locks on that file system)
        self._fd = fd
        self._database_fd = database_fd  # the database file's own lock (hard links)

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
            raise StateInUse(_in_use(incidents_path, holder, f"it holds {lock_path}")) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_LOCKS:
                _warn_unguarded(incidents_path, exc)
                return cls(incidents_path, None, None)
            raise IncidentStoreError(f"incidents.path {incidents_path!r}: cannot lock "
                                     f"{lock_path!r}: {exc.strerror}") from None
        try:
            database_fd = _lock_database(incidents_path)
        except BaseException:
            _empty_and_close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        except OSError:
            pass  # the pid is only for the message of the sidecar refused
        return cls(incidents_path, lock_path, fd, database_fd)

    def release(self) -> None:
        """Unlock the database file (after its SQLite connections are closed: closing a descriptor
        of it drops the process's POSIX locks on it), then empty the lock file (still holding its
        lock: a new holder's pid is never erased) and unlock it."""
        database_fd, self._database_fd = self._database_fd, None
        if database_fd is not None:
            os.close(database_fd)
        fd, self._fd = self._fd, None
        if fd is not None:
            _empty_and_close(fd)


def _in_use(incidents_path: str, holder: str, held: str, name: str = "") -> str:
    return (f"another sidecar{holder} is using {incidents_path}{name}: incidents.path "
            f"{incidents_path!r} and the consolidation ledger beside it belong to one sidecar at "
            f"a time ({held}); stop that sidecar first, or give this one an incidents.path of its "
            "own")


def _warn_unguarded(incidents_path: str, exc: OSError) -> None:
    log.warning("incidents.path %r: the file system does not support locks (%s): nothing keeps a "
                "second sidecar from using the same files", incidents_path, exc.strerror)


def _empty_and_close(fd: int) -> None:
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
    os.close(fd)  # the lock goes with the last descriptor of its open file description


def _lock_database(incidents_path: str) -> int | None:
    """A descriptor holding ``flock`` on the database file itself (created empty if missing), so
    that a sidecar given another name of it (a hard link) is refused too; None where the file
    system supports no locks (logged)."""
    try:
        fd = os.open(incidents_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise IncidentStoreError(f"incidents.path {incidents_path!r}: cannot open it: "
                                 f"{exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _inode_holder(os.fstat(fd))
        os.close(fd)  # nothing of SQLite's open in this process yet (see the module's docstring)
        raise StateInUse(_in_use(incidents_path, holder, "it holds the database file itself",
                                 " under another name (a hard link to it)")) from None
    except OSError as exc:
        os.close(fd)
        if exc.errno in _NO_LOCKS:
            _warn_unguarded(incidents_path, exc)
            return None
        raise IncidentStoreError(f"incidents.path {incidents_path!r}: cannot lock it: "
                                 f"{exc.strerror}") from None
    return fd


def _inode_holder(stat: os.stat_result) -> str:
    """`` (pid N)`` of the process holding ``flock`` on this file, read from ``/proc/locks``
    (Linux: ``N: FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF``, the device in hex),
    or "" when not found (no /proc, or a holder in another pid namespace: its locks are not
    listed)."""
    inode = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            for line in locks:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode \
                        and fields[4].isdigit():
                    return f" (pid {fields[4]})"
    except OSError:
        pass
    return ""


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
