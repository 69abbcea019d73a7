"""A support user acting for a customer, on the spans the instrumentation really makes: the two
ways to declare it (docs/pathmap.md, Acting for another user) keep bleed quiet, and a bleed beside
them is still found."""

from __future__ import annotations

import itertools

import pytest
from fastapi import FastAPI, Request
from starlette.testclient import TestClient

from sidecar.detectors.bleed import BleedDetector
from sidecar.rules import BLEED_OWNER_VS_AMBIENT, BLEED_SHARED_INSTANCE, BLEED_SUBJECT_VS_AMBIENT
from tests.sidecar.detectors.factory import NOW, S, rules, state
from tests.sidecar.detectors.instrumented import decoded, instrumented_backend

PATHMAP = """\
version: 1
identity:
  http: {sources}
roles:
  execution_engine:
    kind: execute
    implementations: [{module}.Engine]
    methods: [execute_agent]
    user_scoped: true
    owner: [self.user_id]
    subject: [arg.user_id]
    run_id: [arg.run_id]
"""
BACKEND = """\
class Engine:
    def __init__(self, user_id):
        self.user_id = user_id

    async def execute_agent(self, run_id, user_id):
        return run_id
"""
ADMIN_ROUTE = "/admin/users/{user_id}/runs/{run_id}"
USER_HEADER = "[{header: x-user-id}]"
ACTING_FOR_FIRST = "[{header: x-act-as}, {header: x-user-id}]"
PATH_FIRST = "[{path_param: user_id}, {header: x-user-id}]"  # only the support route has one
_modules = itertools.count()


def support_session(tmp_path, monkeypatch, sources: str) -> list:
    """alice runs r1; then support-7 runs it again for her through the support route, with alice in
    its path and in ``x-act-as``; the decoded spans."""
    pathmap = PATHMAP.replace("{sources}", sources)
    with instrumented_backend(tmp_path, monkeypatch, f"pw_bleed_acting_{next(_modules)}", BACKEND,
                              pathmap) as (module, exporter):
        engines: dict[str, object] = {}  # one engine per user, kept
        app = FastAPI()

        @app.post(ADMIN_ROUTE)
        async def rerun(user_id: str, run_id: str) -> dict:
            engine = engines.setdefault(user_id, module.Engine(user_id))
            return {"done": await engine.execute_agent(run_id, user_id)}

        @app.post("/runs/{run_id}")
        async def run(run_id: str, request: Request) -> dict:
            user = request.headers["x-user-id"]
            engine = engines.setdefault(user, module.Engine(user))
            return {"done": await engine.execute_agent(run_id, user)}

        with TestClient(app) as client:
            assert client.post("/runs/r1", headers={"x-user-id": "alice"}).json() == {"done": "r1"}
            assert client.post("/admin/users/alice/runs/r1",
                               headers={"x-user-id": "support-7", "x-act-as": "alice"}).json() == {"done": "r1"}
        return decoded(exporter)


def findings_of(spans: list, **rule_overrides: object) -> list[str]:
    bleed = BleedDetector(rules(**rule_overrides), state())
    return sorted(f.rule for f in bleed.consume(spans, NOW) + bleed.tick(NOW + 60 * S))


ALL_THREE = [BLEED_OWNER_VS_AMBIENT, BLEED_SHARED_INSTANCE, BLEED_SUBJECT_VS_AMBIENT]


def test_undeclared_a_support_action_pages_three_times(tmp_path, monkeypatch):
    assert findings_of(support_session(tmp_path, monkeypatch, USER_HEADER)) == ALL_THREE


@pytest.mark.parametrize("sources", [ACTING_FOR_FIRST, PATH_FIRST], ids=["header", "path_param"])
def test_the_acted_for_user_read_first_makes_the_request_hers(tmp_path, monkeypatch, sources):
    assert findings_of(support_session(tmp_path, monkeypatch, sources)) == []


@pytest.mark.parametrize("declared", [ADMIN_ROUTE, "/admin/*"])
def test_a_declared_acting_for_entry_point_is_not_judged_by_owner_or_subject(
        tmp_path, monkeypatch, declared):
    spans = support_session(tmp_path, monkeypatch, USER_HEADER)
    assert findings_of(spans, acting_for_entry_points=(declared,)) == []
    # another entry point declared: as undeclared
    assert findings_of(spans, acting_for_entry_points=("/support/*",)) == ALL_THREE
