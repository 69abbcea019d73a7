"""pathwatch's exporter failing: its failures in the app's log once an outage, not at each attempt.

The OTLP/gRPC exporter logs every failed attempt (a warning per retry, an error per batch given up):
with the sidecar down, the app's log had a line every few seconds for as long as it was down, 13 in
40 s (review s30, /tmp/s30_priv/probe_export_log_flood.py), where pathwatch logs each of its errors
once.
"""

from __future__ import annotations

import logging

import pytest
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from instrumentation.export_log import EXPORTER_LOGGER
from instrumentation.exporting import CountingExporter, DropCounter

ENDPOINT = "127.0.0.1:9"


class _Sidecar(SpanExporter):
    """Logs as the OTLP/gRPC exporter (1.45) does on its logger while its endpoint is down."""

    _endpoint = ENDPOINT

    def __init__(self) -> None:
        self.up = False

    def export(self, spans):
        if self.up:
            return SpanExportResult.SUCCESS
        log = logging.getLogger(EXPORTER_LOGGER)
        log.warning("Transient error %s encountered while exporting %s to %s, retrying in %.2fs. "
                    "Error details: %s", "StatusCode.UNAVAILABLE", "traces", self._endpoint, 1.0, "refused")
        log.error("Failed to export %s to %s, error code: %s, error details: %s", "traces",
                  self._endpoint, "StatusCode.UNAVAILABLE", "refused")
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        pass


def _lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if record.name in (EXPORTER_LOGGER, "instrumentation.export_log")]


@pytest.fixture(autouse=True)
def only_ours(monkeypatch):
    """The logger without the SDK's DuplicateFilter, which hides a line the same as its last within
    20 s: another test's line must not hide this one's."""
    monkeypatch.setattr(logging.getLogger(EXPORTER_LOGGER), "filters", [])


@pytest.fixture
def sidecar():
    sidecar = _Sidecar()
    exporter = CountingExporter(sidecar, DropCounter())
    yield sidecar, exporter
    exporter.shutdown()


def test_an_outage_is_logged_once_and_its_end_once(sidecar, caplog):
    caplog.set_level(logging.INFO)
    down, exporter = sidecar
    for _ in range(3):
        assert exporter.export([]) is SpanExportResult.FAILURE
    lines = _lines(caplog)
    assert len(lines) == 1 and lines[0].startswith("Transient error")
    down.up = True
    for _ in range(2):
        assert exporter.export([]) is SpanExportResult.SUCCESS
    lines = _lines(caplog)
    assert len(lines) == 2
    assert lines[1].startswith(f"pathwatch: its exporter reaches {ENDPOINT} again (5 later failure")
    down.up = False  # a next outage: logged again
    exporter.export([])
    exporter.export([])
    assert len(_lines(caplog)) == 3


def test_another_endpoints_failures_pass_as_they_are(sidecar, caplog):
    """An exporter of the app's own logs on the same logger: none of its records is held back."""
    caplog.set_level(logging.INFO)
    _, exporter = sidecar
    exporter.export([])
    for _ in range(3):
        logging.getLogger(EXPORTER_LOGGER).warning("Transient error %s encountered while exporting %s "
                                                   "to %s", "UNAVAILABLE", "traces", "collector:4317")
        logging.getLogger(EXPORTER_LOGGER).error("Failed to export %s to %s", "traces", "collector:4317")
    assert len([line for line in _lines(caplog) if "collector:4317" in line]) == 6


def test_the_filter_leaves_with_the_exporter(caplog):
    exporter = CountingExporter(_Sidecar(), DropCounter())
    exporter.shutdown()
    assert not [f for f in logging.getLogger(EXPORTER_LOGGER).filters
                if getattr(f, "endpoint", None) == ENDPOINT]
