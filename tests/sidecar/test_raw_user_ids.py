"""User ids reaching the real sidecar process stay in its memory, raw or pseudonymized: another SDK,
the OpenTelemetry JS client or an instrumentation with raw ids allowed sends ``enduser.id`` in clear
(docs/conventions.md), pathwatch's instrumentation HMAC pseudonyms; the sidecar compares them (a
bleed between two of them is found) but writes none anywhere — not in its log (JSON lines), its
metrics, its API, ``pathwatch report``, the alert it pushes, nor its SQLite files (docs/sidecar.md,
Log lines, its last point)."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import subprocess
import sys

import httpx
import pytest

from instrumentation import attributes as A
from sidecar.rules import BLEED_OWNER_VS_AMBIENT
from sidecar.testing import SidecarProcess
from tests.e2e.fixture_sidecar import ROOT
from tests.sidecar.alerting.servers import Collector
from tests.sidecar.receiver.otlp_payloads import (export_order, make_request, make_span, otlp_json,
                                                  run_spans, user_pseudonym)
from tests.support import wait_until

pytestmark = pytest.mark.timeout(120)

#: the raw ids of the runs' users, in place of the stand-ins ``run_spans`` gives them
RAW = {user_pseudonym(index): f"user-{index}@example.com" for index in range(4)}
#: and their pseudonyms as the instrumentation makes them (32 hex digits of an HMAC)
PSEUDONYMS = {stand_in: hmac.new(b"a key of sixteen bytes", raw.encode(), hashlib.sha256).hexdigest()[:32]
              for stand_in, raw in RAW.items()}
USER_KEYS = {A.USER_OWNER, A.USER_SUBJECT, A.USER_TARGET, A.CONNECTION_USER}


def with_ids(spans: list, raw: bool) -> list:
    """``spans`` with the users' raw ids, as an SDK that sends them writes them (the ambient user as
    ``enduser.id``: an instrumentation with raw ids allowed, the other users raw too), or with their
    pseudonyms."""
    ids = RAW if raw else PSEUDONYMS
    for span in spans:
        for attribute in span.attributes:
            if attribute.key == A.ENDUSER_PSEUDO_ID and raw:
                attribute.key = A.ENDUSER_ID
            if attribute.key in USER_KEYS | {A.ENDUSER_ID, A.ENDUSER_PSEUDO_ID}:
                attribute.value.string_value = ids[attribute.value.string_value]
    return spans


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "pseudonyms"])
def test_user_ids_are_compared_and_written_nowhere(tmp_path, raw):
    config = {"rules": {"run_idle_s": 0.5, "delivery_deadline_s": 0.3,
                        "delivery_export_allowance_s": 0.0},
              "logging": {"format": "json", "level": "debug"}}
    rng = random.Random(33)
    clean = with_ids(run_spans(0, rng, users=4), raw)
    bleed = export_order(with_ids(run_spans(1, rng, users=4, bleed=True), raw))  # user-2's engine
    # the browser's span, parent of the backend's request span: the JS client's, raw id and all
    browser = make_span({A.ENDUSER_ID: RAW[user_pseudonym(3)], "http.method": "POST"},
                        trace_id=bleed[-1].trace_id, name="HTTP POST", rng=rng)
    bleed[-1].parent_span_id = browser.span_id  # (export_order: the request span ends last)
    with Collector() as webhook:
        config["alerting"] = {"webhook_url": webhook.url}
        sidecar = SidecarProcess(config, state_dir=tmp_path)
        with sidecar:
            response = httpx.post(f"http://{sidecar.http_endpoint}/v1/traces",
                                  content=otlp_json(make_request(export_order(clean) + [browser])),
                                  headers={"Content-Type": "application/json"}, timeout=20)
            assert response.status_code == 200 and response.json() == {}
            response = httpx.post(f"http://{sidecar.http_endpoint}/v1/traces",
                                  content=make_request(bleed).SerializeToString(),
                                  headers={"Content-Type": "application/x-protobuf"}, timeout=20)
            assert response.status_code == 200
            api = sidecar.api_url
            # the ids were read and compared: user-2's engine served user-1, paged at once
            [push] = wait_until(webhook.received, timeout=30, message="the bleed's page")
            assert push["incident"]["rule"] == BLEED_OWNER_VS_AMBIENT
            wait_until(lambda: 'pathwatch_runs_completed_total{outcome="complete"} 2.0' in httpx.get(
                f"{api}/metrics", timeout=5).text, timeout=30, message="both runs judged")
            outputs = {path: httpx.get(f"{api}{path}", timeout=5).text for path in (
                "/metrics", "/api/v1/incidents", "/api/v1/findings", "/api/v1/inventory",
                "/api/v1/consolidation")}
            assert BLEED_OWNER_VS_AMBIENT in outputs["/api/v1/findings"]
            report = subprocess.run([sys.executable, "-m", "sidecar", "report", "--api", api, "--wide"],
                                    capture_output=True, text=True, timeout=60, cwd=ROOT,
                                    env={**os.environ, "PYTHONPATH": str(ROOT)})
            assert report.returncode == 0 and BLEED_OWNER_VS_AMBIENT in report.stdout, report.stderr
            outputs["report"] = report.stdout
            outputs["webhook"] = json.dumps(webhook.received())
            assert sidecar.stop() == 0
        outputs["log"] = sidecar.log()
    assert "pathwatch sidecar stopped; 25 span(s) processed" in outputs["log"]
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert {path.name for path in files} >= {"incidents.sqlite", "incidents-consolidation.sqlite"}
    outputs |= {path.name: path.read_bytes().decode("latin-1") for path in files}
    for user in [*RAW.values(), *(() if raw else PSEUDONYMS.values())]:
        for name, text in outputs.items():
            assert user not in text and user.partition("@")[0] not in text, (user, name)
