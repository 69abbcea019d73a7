import errno
import logging
import os
import socket
import sqlite3
from pathlib import Path

import pytest

from sidecar.incidents import IncidentStoreError
from sidecar.incidents import lock as lock_module
from sidecar.incidents.lock import StateInUse, StateLock, lock_path_of


def test_the_lock_file_is_beside_the_database_and_names_its_holder(tmp_path):
    incidents = str(tmp_path / "incidents.sqlite")
    held = StateLock.acquire(incidents)
    try:
        assert held.held and held.path == lock_path_of(incidents) == incidents + ".lock"
        assert (tmp_path / "incidents.sqlite.lock").read_text() == (
            f"{os.getpid()} {socket.gethostname()}\n")
        with pytest.raises(StateInUse) as refused:
            StateLock.acquire(incidents)
        assert str(refused.value).startswith(
            f"another sidecar (pid {os.getpid()}) is using {incidents}: incidents.path {incidents!r}")
        assert "give this one an incidents.path of its own" in str(refused.value)
    finally:
        held.release()
    assert (tmp_path / "incidents.sqlite.lock").read_text() == ""  # stays, emptied
    StateLock.acquire(incidents).release()
    held.release()  # idempotent


def test_a_holder_on_another_host_or_unknown_is_said_so(tmp_path):
    incidents = str(tmp_path / "incidents.sqlite")
    held = StateLock.acquire(incidents)
    try:
        os.pwrite(held._fd, b"1 web-1          \n", 0)  # noqa: SLF001 (another pod's sidecar)
        with pytest.raises(StateInUse, match=r"^another sidecar \(pid 1 on host web-1\) is using"):
            StateLock.acquire(incidents)
        os.ftruncate(held._fd, 0)  # noqa: SLF001 (locked, its pid not written yet)
        with pytest.raises(StateInUse, match=r"^another sidecar is using"):
            StateLock.acquire(incidents)
    finally:
        held.release()


def test_a_path_in_a_missing_directory_names_incidents_path_and_the_directory(tmp_path):
    with pytest.raises(IncidentStoreError, match=r"incidents.path '.*no-such-dir.*': its directory "
                                                 r"'.*no-such-dir' does not exist"):
        StateLock.acquire(str(tmp_path / "no-such-dir" / "x.sqlite"))


@pytest.mark.parametrize("suffix", ["", "/"])
def test_a_directory_as_incidents_path_is_refused_before_a_lock_file_is_made(tmp_path, suffix):
    # the volume's mount point given for the file: SQLite said only "unable to open database
    # file", and the lock file went to the directory's parent
    volume = tmp_path / "volume"
    volume.mkdir()
    with pytest.raises(IncidentStoreError, match=rf"^incidents.path '{volume}{suffix}': is a "
                                                 rf"directory; name a file in it, e.g. "
                                                 rf"'{volume}/incidents.sqlite'$"):
        StateLock.acquire(str(volume) + suffix)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["volume"]
    assert list(volume.iterdir()) == []


def test_an_unopenable_lock_file_names_incidents_path(tmp_path, monkeypatch):
    def refused(path, flags, mode=0o777):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(lock_module.os, "open", refused)
    with pytest.raises(IncidentStoreError, match=r"incidents.path '.*x.sqlite': cannot open its "
                                                 r"lock file '.*x.sqlite.lock': Permission denied"):
        StateLock.acquire(str(tmp_path / "x.sqlite"))


@pytest.mark.parametrize("path", [":memory:", ""])
def test_an_in_memory_store_has_nothing_to_lock(path):
    assert lock_path_of(path) is None
    first, second = StateLock.acquire(path), StateLock.acquire(path)
    assert not first.held and not second.held
    first.release()


def test_a_file_system_without_locks_is_a_warning_not_a_failure(tmp_path, monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(lock_module.fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="sidecar.incidents.lock"):
        unguarded = StateLock.acquire(str(tmp_path / "incidents.sqlite"))
    assert not unguarded.held
    assert "does not support locks" in caplog.text


def test_a_symbolic_link_to_the_database_takes_the_lock_of_the_database_itself(tmp_path):
    # SQLite follows the link: both names open one database, so both must take one lock
    incidents = tmp_path / "incidents.sqlite"
    link = tmp_path / "link.sqlite"
    link.symlink_to(incidents)  # dangling: the database is created through it
    held = StateLock.acquire(str(link))
    try:
        assert held.path == str(incidents) + ".lock"
        with pytest.raises(StateInUse, match=rf"^another sidecar \(pid {os.getpid()}\) is using"):
            StateLock.acquire(str(incidents))
    finally:
        held.release()
    held = StateLock.acquire(str(incidents))
    try:
        with pytest.raises(StateInUse):
            StateLock.acquire(str(link))
    finally:
        held.release()


def test_a_hard_link_to_the_database_is_refused_as_the_database_itself(tmp_path):
    # a hard link is the same file under another name, in another directory here: SQLite opens one
    # database through both (each name with a -wal of its own: SQLite's "how to corrupt" list),
    # so the lock must follow the file, not the name
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    incidents = tmp_path / "a" / "incidents.sqlite"
    link = tmp_path / "b" / "other.sqlite"
    sqlite3.connect(incidents).close()
    os.link(incidents, link)
    for first, second in ((incidents, link), (link, incidents)):
        held = StateLock.acquire(str(first))
        try:
            with pytest.raises(StateInUse) as refused:
                StateLock.acquire(str(second))
            assert str(refused.value).startswith(
                f"another sidecar (pid {os.getpid()}) is using {second} under another name (a hard "
                f"link to it): incidents.path {str(second)!r} and the consolidation ledger beside "
                "it belong to one sidecar at a time")
            assert str(refused.value).endswith(
                "stop that sidecar first, or give this one an incidents.path of its own")
            assert Path(str(second) + ".lock").read_text() == ""  # the refused one let its own go
        finally:
            held.release()
        StateLock.acquire(str(second)).release()  # nothing of the refused one left held


def test_the_database_file_is_created_and_locked_with_the_lock_file(tmp_path):
    # a database that does not exist yet is created by the lock (an empty file is an empty SQLite
    # database), so that a hard link made to it while the sidecar runs is refused too
    incidents = tmp_path / "incidents.sqlite"
    held = StateLock.acquire(str(incidents))
    try:
        assert incidents.exists() and incidents.stat().st_size == 0
        os.link(incidents, tmp_path / "linked.sqlite")
        with pytest.raises(StateInUse, match=r"under another name \(a hard link to it\)"):
            StateLock.acquire(str(tmp_path / "linked.sqlite"))
    finally:
        held.release()
    assert sqlite3.connect(incidents).execute("PRAGMA quick_check").fetchone() == ("ok",)
