"""A sidecar owns its incident database and consolidation ledger alone: a second sidecar on the same
``incidents.path`` (other ports) exits 1 before it reads either file.

Before the lock, the second one opened the live sidecar's ledger, took its ``running`` marker for an
unclean stop and wrote a span loss (``unclean_stop``) into it, which outlived the live sidecar's
clean stop and kept every idle class from ``safe_to_delete`` for a whole window.
"""

from __future__ import annotations

import os
import time

import httpx
import pytest
from prometheus_client import CollectorRegistry

from instrumentation import attributes as A
from sidecar.app import Sidecar
from sidecar.config import parse_config
from sidecar.consolidation import LedgerError
from sidecar.incidents import IncidentStoreError
from sidecar.incidents.lock import StateInUse
from sidecar.testing import SidecarProcess
from tests.sidecar.receiver.otlp_payloads import make_request, make_span
from tests.support import wait_until

pytestmark = pytest.mark.timeout(120)

ROLE = "execution_engine"
RETIRED = "app.engines.LegacyEngine"


def _config(incidents_path: str) -> dict:
    return {"receiver": {"grpc_endpoint": "", "http_endpoint": "127.0.0.1:0"},
            "incidents": {"path": incidents_path}}


def _consolidation(sidecar: SidecarProcess) -> dict:
    return httpx.get(f"{sidecar.api_url}/api/v1/consolidation/verdicts", timeout=10).json()["verdicts"]


def _exited_or_ready(sidecar: SidecarProcess) -> str:
    if sidecar.process.poll() is not None:
        return "exited"
    try:
        return "ready" if httpx.get(f"{sidecar.api_url}/readyz", timeout=2).status_code == 200 else ""
    except httpx.HTTPError:
        return ""


def test_a_second_sidecar_on_the_same_incidents_path_exits_1_and_touches_nothing(tmp_path):
    incidents = str(tmp_path / "shared" / "incidents.sqlite")
    (tmp_path / "shared").mkdir()
    first = SidecarProcess(_config(incidents), state_dir=tmp_path, name="first")
    second = SidecarProcess(_config(incidents), state_dir=tmp_path, name="second")
    first.start(ready_timeout=30)
    try:
        span = make_span({A.SPAN_KIND: "execute", A.ROLE: ROLE, A.IMPLEMENTATION: RETIRED,
                          A.RETIRED: True, A.ENTRY_POINT: "/ws", A.CALLER: "app.routes.old"},
                         start_ns=time.time_ns())
        response = httpx.post(f"http://{first.http_endpoint}/v1/traces",
                              content=make_request([span]).SerializeToString(),
                              headers={"Content-Type": "application/x-protobuf"}, timeout=10)
        assert response.status_code == 200, response.text
        wait_until(lambda: _consolidation(first)["implementations"], message="the call in the ledger")

        second.start()
        try:
            # a deadline, not a sleep: without the lock the second one comes up instead of exiting
            outcome = wait_until(lambda: _exited_or_ready(second), timeout=30,
                                 message="the second sidecar to exit or be ready")
            assert outcome == "exited", second.log()
            assert second.process.returncode == 1, second.log()
        finally:
            second.stop()
        log = second.log()
        assert (f"cannot start: another sidecar (pid {first.process.pid}) is using {incidents}: "
                f"incidents.path {incidents!r} and the consolidation ledger beside it belong to one "
                "sidecar at a time") in log, log
        assert "was not closed by the last sidecar" not in log and "Traceback" not in log, log
        assert "listening" not in log, log  # refused before any port was bound

        assert first.stop() == 0, first.log()
        first.start(ready_timeout=30)  # the first one's clean restart: its ledger has no loss
        verdicts = _consolidation(first)
        assert verdicts["span_loss"] is None, verdicts
        assert [row["implementation"] for row in verdicts["implementations"]] == [RETIRED]
        assert "was not closed by the last sidecar" not in first.log(), first.log()
    finally:
        first.stop()
        second.stop()


def _in_process(incidents_path: str) -> Sidecar:
    return Sidecar(parse_config({"incidents": {"path": incidents_path}}), registry=CollectorRegistry())


def test_the_lock_is_released_at_shutdown(tmp_path):
    incidents = str(tmp_path / "incidents.sqlite")
    first = _in_process(incidents)
    try:
        with pytest.raises(StateInUse, match="another sidecar .*is using"):
            _in_process(incidents)  # the same process: flock belongs to the open file
    finally:
        assert first.shutdown(quiet=True) is True
    second = _in_process(incidents)
    assert second.state_lock.held
    assert second.shutdown(quiet=True) is True
    assert not second.state_lock.held


def test_a_second_sidecar_on_a_hard_link_of_the_database_is_refused(tmp_path):
    # another name of the same file, in another directory (no lock file beside it meets the
    # first's): SQLite would open one database through both, each name with a -wal of its own
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    incidents = str(tmp_path / "a" / "incidents.sqlite")
    linked = str(tmp_path / "b" / "incidents.sqlite")
    first = _in_process(incidents)
    try:
        os.link(incidents, linked)
        with pytest.raises(StateInUse, match=rf"^another sidecar \(pid {os.getpid()}\) is using "
                                              rf"{linked} under another name \(a hard link to it\)"):
            _in_process(linked)
    finally:
        assert first.shutdown(quiet=True) is True
    _in_process(linked).shutdown(quiet=True)  # its own lock file was let go


@pytest.mark.parametrize("spoiled, error", [
    ("incidents.sqlite", IncidentStoreError), ("incidents-consolidation.sqlite", LedgerError)])
def test_a_sidecar_that_fails_to_open_its_state_releases_the_lock(tmp_path, spoiled, error):
    (tmp_path / spoiled).mkdir()  # a directory: neither SQLite file can be opened there
    incidents = str(tmp_path / "incidents.sqlite")
    with pytest.raises(error):
        _in_process(incidents)
    (tmp_path / spoiled).rmdir()
    _in_process(incidents).shutdown(quiet=True)  # not refused by a lock left behind


def test_in_memory_stores_take_no_lock(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sidecars = [_in_process(":memory:"), _in_process(":memory:")]
    try:
        assert not any(sidecar.state_lock.held for sidecar in sidecars)
        assert list(tmp_path.iterdir()) == []
    finally:
        for sidecar in sidecars:
            sidecar.shutdown(quiet=True)
