import dataclasses
import json

import pytest
from prometheus_client import CollectorRegistry

from sidecar.config import RulesConfig, StateConfig
from sidecar.consolidation.canonical import CONCURRENT_S
from sidecar.inventory import Inventory
from sidecar.model import SpanRecord
from sidecar.telemetry import Telemetry
from sidecar.types import Detector
from tests.sidecar.detectors.factory import (
    EMITTER,
    ENGINE,
    OTHER_ENGINE,
    RETIRED_ENGINE,
    S,
    T0,
    Trace,
    clean_run,
    sample,
)

#: the sidecar's clock (wall time, as the pipeline passes it): after every span's time here — a
#: time the sidecar has not reached yet is read as now (test_a_time_ahead_of_the_sidecars_clock...)
NOW = T0 + 86_400 * S


@pytest.fixture
def telemetry() -> Telemetry:
    return Telemetry(CollectorRegistry())


def test_inventory_is_a_detector_that_raises_nothing():
    inventory = Inventory(RulesConfig(), StateConfig())
    assert isinstance(inventory, Detector)
    assert inventory.consume(clean_run(), NOW) == [] and inventory.tick(NOW) == []


def test_calls_and_last_seen_reach_prometheus_on_tick(telemetry):
    inventory = Inventory(RulesConfig(), StateConfig(), telemetry)
    spans = clean_run() + [Trace(entry_point="/api/runs").execute(RETIRED_ENGINE, retired=True)]
    inventory.consume(spans, NOW)
    labels = dict(role="execution_engine", implementation=ENGINE, canonical="true", retired="false",
                  entry_point="/ws", nested="false")
    assert sample(telemetry, "pathwatch_calls_total", **labels) == 0  # batched until tick
    inventory.tick(NOW)
    assert sample(telemetry, "pathwatch_calls_total", **labels) == 1
    assert sample(telemetry, "pathwatch_calls_total", role="event_emitter", implementation=EMITTER,
                  canonical="true", retired="false", entry_point="/ws", nested="false") == 5
    assert sample(telemetry, "pathwatch_calls_total", role="execution_engine", implementation=RETIRED_ENGINE,
                  canonical="false", retired="true", entry_point="/api/runs", nested="false") == 1
    assert sample(telemetry, "pathwatch_calls_total", role="transport", implementation="starlette.websockets.WebSocket",
                  canonical="true", retired="false", entry_point="/ws", nested="false") == 0  # writes are not calls
    execute = next(s for s in spans if s.kind == "execute" and s.implementation == ENGINE)
    assert sample(telemetry, "pathwatch_implementation_last_seen_timestamp_seconds",
                  role="execution_engine", implementation=ENGINE) == execute.end_ns / 1e9
    inventory.consume([Trace().execute(ENGINE)], NOW)
    inventory.tick(NOW)
    assert sample(telemetry, "pathwatch_calls_total", **labels) == 2
    # a call made inside another of its role (an adapter delegating) is labelled nested: the
    # dashboards' and alerts' canonical share count top-level calls only, as the API does
    inventory.consume([Trace().execute(ENGINE, nested=True)], NOW)
    inventory.tick(NOW)
    assert sample(telemetry, "pathwatch_calls_total", **{**labels, "nested": "true"}) == 1
    assert sample(telemetry, "pathwatch_calls_total", **labels) == 2


def test_a_role_without_a_canonical_implementation_has_no_canonical_share():
    inventory = Inventory()
    calls = [Trace(entry_point="/ws").execute("demo.engines.ExecutionEngine", canonical=False)
             for _ in range(3)]
    inventory.consume(calls, NOW)
    engines = inventory.snapshot(now_s=T0 / 1e9 + 1)["roles"]["execution_engine"]
    assert engines["canonical"] == [] and engines["canonical_share"] is None  # not 0 %: nothing to migrate to


def test_snapshot_reports_roles_share_retired_and_paths():
    inventory = Inventory()
    now_s = T0 / 1e9 + 100
    canonical = [Trace(entry_point="/ws").execute(ENGINE) for _ in range(3)]
    alias = Trace(entry_point="/api/runs")
    outer = alias.execute("demo.engines.ExecutionEngine", canonical=False)
    inner = alias.execute(ENGINE, nested=True, parent=outer.span_id)
    retired = Trace(entry_point="/api/runs").execute(RETIRED_ENGINE, retired=True)
    inventory.consume([*canonical, inner, outer, retired], NOW)
    snap = inventory.snapshot(now_s=now_s)
    json.dumps(snap)  # JSON-ready
    engines = snap["roles"]["execution_engine"]
    assert (engines["calls"], engines["top_level_calls"]) == (6, 5)
    assert engines["canonical"] == [ENGINE]
    assert engines["canonical_share"] == 0.6  # 3 of 5 top-level calls; the alias's delegation is nested
    assert engines["retired_still_called"] == [RETIRED_ENGINE]
    assert engines["entry_points"] == ["/api/runs", "/ws"]
    user_engine = engines["implementations"][ENGINE]
    assert (user_engine["calls"], user_engine["top_level_calls"], user_engine["canonical"]) == (4, 3, True)
    assert user_engine["entry_points"] == ["/api/runs", "/ws"]
    assert user_engine["first_seen"] == min(s.start_ns for s in [*canonical, inner]) / 1e9
    assert user_engine["idle_s"] == round(now_s - max(s.end_ns for s in [*canonical, inner]) / 1e9, 3)
    assert snap["entry_points"]["/api/runs"]["execution_engine"] == {
        "demo.engines.ExecutionEngine": 1, ENGINE: 1, RETIRED_ENGINE: 1}
    assert snap["entry_points"]["/ws"] == {"execution_engine": {ENGINE: 3}}


def test_cardinality_is_bounded_with_an_overflow_bucket(telemetry):
    inventory = Inventory(telemetry=telemetry, max_entry_points=2, max_implementations=2)
    spans = [Trace(entry_point=f"/route/{i}").execute(f"demo.engines.E{i}") for i in range(10)]
    inventory.consume(spans, NOW)
    inventory.tick(NOW)
    snap = inventory.snapshot(now_s=T0 / 1e9)
    assert sorted(snap["entry_points"]) == ["/route/0", "/route/1", "other"]
    assert sorted(snap["roles"]["execution_engine"]["implementations"]) == [
        "demo.engines.E0", "demo.engines.E1", "other"]
    assert snap["roles"]["execution_engine"]["implementations"]["other"]["calls"] == 8
    assert snap["overflow"] == {"roles": 0, "implementations": 8, "entry_points": 8, "cells": 0}
    assert sample(telemetry, "pathwatch_calls_total", role="execution_engine", implementation="other",
                  canonical="false", retired="false", entry_point="other", nested="false") == 8


def test_the_cells_are_bounded_not_only_each_label(telemetry):
    """Each label within its limit, their product is not: 16 implementations x 16 entry points
    would be 256 cells (series of pathwatch_calls_total, rows of the inventory). Past three
    quarters of max_cells a new combination's entry point folds into other, past max_cells its
    implementation too; every call is still counted, and the folds in overflow."""
    inventory = Inventory(telemetry=telemetry, max_cells=16)
    spans = [Trace(entry_point=f"/e{j}").execute(f"demo.engines.E{i}", canonical=False)
             for i in range(16) for j in range(16)]
    inventory.consume(spans, NOW)
    inventory.consume(spans, NOW)  # the same combinations again: no further fold counted
    inventory.tick(NOW)
    assert len(inventory._by_label) <= 16 + 1  # + the role's (other, other) cell
    snap = inventory.snapshot(now_s=T0 / S)
    engines = snap["roles"]["execution_engine"]
    assert engines["calls"] == 2 * 256
    assert sum(sum(role["execution_engine"].values()) for role in snap["entry_points"].values()) == 512
    # the first 12 cells as they came (E0 at 12 entry points), then E0's other entry points and
    # three more implementations in other entry point cells; the rest in (other, other)
    assert engines["implementations"]["demo.engines.E0"]["calls"] == 2 * 16
    assert sorted(engines["implementations"]) == [
        "demo.engines.E0", "demo.engines.E1", "demo.engines.E2", "demo.engines.E3", "other"]
    assert engines["implementations"]["other"]["calls"] == 2 * 12 * 16
    assert snap["overflow"]["cells"] == 256 - 12
    assert snap["overflow"]["entry_points"] == 256 - 12
    assert snap["overflow"]["implementations"] == 12 * 16
    assert snap["limits"]["cells"] == 16
    assert sample(telemetry, "pathwatch_calls_total", role="execution_engine", implementation="other",
                  canonical="false", retired="false", entry_point="other", nested="false") == 2 * 12 * 16
    series = [s for metric in telemetry.registry.collect() if metric.name == "pathwatch_calls"
              for s in metric.samples if s.name == "pathwatch_calls_total"]
    assert len(series) == len(inventory._by_label)


def test_the_default_cap_keeps_every_implementation_of_a_role_with_many_entry_points():
    """A role with 512 implementations, each called from 16 entry points (each label within its
    limit): 8192 cells before the cap (262,144 with 512 entry points). Now at most MAX_CELLS, and
    every implementation keeps its name (the entry points fold first)."""
    import dataclasses

    from sidecar.inventory import MAX_CELLS

    inventory = Inventory()
    call = Trace().execute(ENGINE, canonical=False)
    for i in range(512):
        inventory.consume([dataclasses.replace(call, implementation=f"m.Impl{i}", entry_point=f"/e{j}")
                           for j in range(16)], NOW)
    assert len(inventory._by_label) <= MAX_CELLS
    snap = inventory.snapshot(now_s=T0 / S)
    assert len(snap["roles"]["execution_engine"]["implementations"]) == 512
    assert snap["roles"]["execution_engine"]["calls"] == 512 * 16
    assert snap["overflow"]["implementations"] == 0 and snap["overflow"]["cells"] > 0


def test_work_outside_a_request_is_listed_without_entry_point():
    inventory = Inventory()
    inventory.consume([Trace(entry_point=None).emit("agent_thinking")], NOW)
    snap = inventory.snapshot(now_s=T0 / 1e9 + 1)
    assert snap["roles"]["event_emitter"]["entry_points"] == []
    assert snap["entry_points"] == {"(none)": {"event_emitter": {EMITTER: 1}}}


def test_empty_inventory_snapshot():
    snap = Inventory().snapshot(now_s=1.0)
    assert (snap["roles"], snap["entry_points"], snap["generated_at"]) == ({}, {}, 1.0)


def test_role_idle_since_tracks_the_latest_call():
    inventory = Inventory()
    old = Trace(start_ns=T0).execute(OTHER_ENGINE)
    new = Trace(start_ns=T0 + 50 * S).execute(ENGINE)
    inventory.consume([new, old], NOW)
    engines = inventory.snapshot(now_s=(new.end_ns + 10 * S) / 1e9)["roles"]["execution_engine"]
    assert engines["idle_s"] == 10.0
    assert engines["implementations"][OTHER_ENGINE]["idle_s"] == round((new.end_ns - old.end_ns) / 1e9 + 10, 3)
    assert engines["first_seen"] == old.start_ns / 1e9 and engines["last_seen"] == new.end_ns / 1e9


def test_a_time_ahead_of_the_sidecars_clock_or_missing_is_read_as_now(telemetry):
    # a backend clock years ahead left the class last seen in the future, idle 0 s for the rest of
    # the process's life (and the last-seen gauge there); a span without a start time (0) made it
    # first seen in 1970
    inventory = Inventory(telemetry=telemetry)
    year_2500_ns = 16_725_225_600 * S
    ahead = Trace(start_ns=year_2500_ns).execute(ENGINE)
    no_start = dataclasses.replace(Trace(start_ns=T0).execute(OTHER_ENGINE), start_ns=0)
    inventory.consume([ahead, no_start], NOW)
    inventory.flush()
    later_s = NOW / S + 60
    engines = inventory.snapshot(now_s=later_s)["roles"]["execution_engine"]
    assert engines["implementations"][ENGINE]["last_seen"] == NOW / S
    assert engines["implementations"][ENGINE]["first_seen"] == NOW / S
    assert engines["implementations"][ENGINE]["idle_s"] == 60.0
    assert engines["implementations"][OTHER_ENGINE]["first_seen"] == no_start.end_ns / S
    assert engines["first_seen"] == no_start.end_ns / S and engines["last_seen"] == NOW / S
    assert sample(telemetry, "pathwatch_implementation_last_seen_timestamp_seconds",
                  role="execution_engine", implementation=ENGINE) == NOW / S


def test_a_retired_implementation_is_still_called_only_within_the_window():
    inventory = Inventory(RulesConfig(), StateConfig(), retired_window_s=3600)
    inventory.consume([Trace().execute(RETIRED_ENGINE, retired=True)], NOW)
    called_at = inventory.snapshot(now_s=T0 / S)["roles"]["execution_engine"]
    assert called_at["retired_still_called"] == [RETIRED_ENGINE]
    later = inventory.snapshot(now_s=T0 / S + 5 * 3600)
    assert later["retired_window_s"] == 3600
    assert later["roles"]["execution_engine"]["retired_still_called"] == []


def test_a_canonical_class_the_path_map_replaced_is_no_longer_listed_canonical():
    """Once the old path map's last call as canonical is more than CONCURRENT_S before the new
    one's (the rollout is over), the old class is no longer canonical."""
    inventory = Inventory()
    later = T0 + int(2 * CONCURRENT_S * S)
    old = [Trace().execute(OTHER_ENGINE, canonical=True) for _ in range(3)]  # the old path map
    new = [Trace(start_ns=later).execute(ENGINE, canonical=True)]  # names another canonical class
    inventory.consume(old, NOW)
    inventory.consume(new, NOW)
    engines = inventory.snapshot(now_s=later / S)["roles"]["execution_engine"]
    assert engines["canonical"] == [ENGINE]
    assert engines["implementations"][OTHER_ENGINE]["canonical"] is False
    assert engines["canonical_share"] == 0.25  # the old class's calls are not the canonical's
    rollback = later + int(2 * CONCURRENT_S * S)
    inventory.consume([Trace(start_ns=rollback).execute(OTHER_ENGINE, canonical=True)], NOW)
    assert inventory.snapshot(now_s=rollback / S)["roles"]["execution_engine"]["canonical"] == [
        OTHER_ENGINE]


def test_a_rolling_deploy_that_moves_the_canonical_class_counts_both_while_both_serve():
    """Half the pods on a path map naming OTHER_ENGINE canonical, half on one naming ENGINE: both
    are canonical while both are called as such, and the share does not flip with whichever
    version's span came last (it read 0.5 or 0.75 by the last span, for calls that all went to
    their own path map's canonical class)."""
    inventory = Inventory()
    old = [Trace().execute(OTHER_ENGINE, canonical=True, service_version="1")]
    new = [Trace().execute(ENGINE, canonical=True, service_version="2") for _ in range(3)]
    shares = set()
    for order in (old + new, new + old, old + new):
        inventory.consume(order, NOW)
        engines = inventory.snapshot(now_s=T0 / S)["roles"]["execution_engine"]
        assert engines["canonical"] == sorted([ENGINE, OTHER_ENGINE])
        shares.add(engines["canonical_share"])
    assert shares == {1.0}


def test_a_gateways_services_each_keep_their_own_canonical_class():
    """Gateway mode: two services, each with its own canonical class in one role. Each stays
    canonical whichever service's span came last; a service's path map moving on demotes only
    that service's old canonical class."""
    inventory = Inventory()
    a_engine, b_engine = ENGINE, "b.engines.UnifiedExecutionEngine"

    def calls(service: str, implementation: str, count: int, start_ns: int = T0) -> list:
        return [Trace(start_ns=start_ns).execute(implementation, canonical=True, service_name=service)
                for _ in range(count)]

    for batch in range(4):
        spans = calls("a", a_engine, 9) + calls("b", b_engine, 1)
        inventory.consume(spans if batch % 2 else spans[::-1], NOW)
        engines = inventory.snapshot(now_s=T0 / S)["roles"]["execution_engine"]
        assert engines["canonical"] == sorted([a_engine, b_engine])
        assert engines["canonical_share"] == 1.0
    later = T0 + int(2 * CONCURRENT_S * S)  # b's new path map names another class, b's old one is gone
    inventory.consume(calls("b", OTHER_ENGINE, 10, later), NOW)
    engines = inventory.snapshot(now_s=later / S)["roles"]["execution_engine"]
    assert engines["canonical"] == sorted([a_engine, OTHER_ENGINE])
    assert engines["implementations"][b_engine]["canonical"] is False
    assert engines["canonical_share"] == round(46 / 50, 4)  # b's old class's 4 calls left it


def test_the_canonical_class_of_each_service_is_remembered_within_a_bound(monkeypatch):
    import sidecar.consolidation.canonical as canonical_module

    monkeypatch.setattr(canonical_module, "MAX_CANONICAL_KEYS", 3)
    inventory = Inventory()
    for n in range(5):
        inventory.consume([Trace().execute(f"s{n}.Engine", canonical=True, service_name=f"s{n}")],
                          NOW)
    engines = inventory.snapshot(now_s=T0 / S)["roles"]["execution_engine"]
    assert engines["canonical"] == ["s2.Engine", "s3.Engine", "s4.Engine"]
    inventory.consume([Trace().execute("s0.Engine", canonical=True, service_name="s0")], NOW)
    engines = inventory.snapshot(now_s=T0 / S)["roles"]["execution_engine"]
    assert engines["canonical"] == ["s0.Engine", "s3.Engine", "s4.Engine"]  # at its next call


def test_a_class_crowned_by_a_service_that_is_gone_stops_being_canonical_after_the_window():
    inventory = Inventory(retired_window_s=100.0)
    old = [Trace().execute(ENGINE, canonical=True, service_name="a") for _ in range(3)]
    inventory.consume(old, NOW)
    last_old_s = max(span.end_ns for span in old) / S
    engines = inventory.snapshot(now_s=last_old_s + 50)["roles"]["execution_engine"]
    assert engines["canonical"] == [ENGINE]
    inventory.consume([Trace(start_ns=int((last_old_s + 150) * S)).execute(
        OTHER_ENGINE, canonical=True, service_name="a2")], NOW)  # renamed: another path map
    engines = inventory.snapshot(now_s=last_old_s + 151)["roles"]["execution_engine"]
    assert engines["canonical"] == [OTHER_ENGINE]


def test_a_canonical_class_still_called_somewhere_keeps_all_its_calls_in_the_share():
    """The window is the class's, not each entry point's: its older calls at another entry point
    still count as canonical."""
    inventory = Inventory(retired_window_s=100.0)
    old = [Trace(entry_point="/old").execute(ENGINE, canonical=True, service_name="a")
           for _ in range(9)]
    inventory.consume(old, NOW)
    last_old_s = max(span.end_ns for span in old) / S
    inventory.consume([Trace(entry_point="/ws", start_ns=int((last_old_s + 150) * S)).execute(
        ENGINE, canonical=True, service_name="a")], NOW)
    engines = inventory.snapshot(now_s=last_old_s + 151)["roles"]["execution_engine"]
    assert engines["canonical"] == [ENGINE] and engines["canonical_share"] == 1.0


def test_a_retired_class_called_before_a_restart_is_still_called_within_the_window(tmp_path):
    """retired_still_called promises "within the last retired_window_s, not since the sidecar
    started": the last calls of retired classes come from the persisted ledger, so a restart
    (a fresh inventory on the same ledger file) keeps the list; one called before the window
    is not listed."""
    from sidecar.consolidation import ActivityLedger

    now_s = T0 / S
    path = str(tmp_path / "ledger.sqlite")
    before = ActivityLedger(path, clock_s=lambda: now_s - 3600)
    for implementation, at_s in ((RETIRED_ENGINE, now_s - 3600), (OTHER_ENGINE, now_s - 5 * 3600)):
        before.observe_calls("execution_engine", implementation, canonical=False, retired=True,
                             caller="demo.routes.run_agent", count=1, now_s=at_s)
    before.close()
    inventory = Inventory(retired_window_s=4 * 3600,
                          ledger=ActivityLedger(path, clock_s=lambda: now_s))
    inventory.consume([Trace().execute(ENGINE)], NOW)  # the role is called after the restart
    role = inventory.snapshot(now_s=now_s)["roles"]["execution_engine"]
    assert role["retired_still_called"] == [RETIRED_ENGINE]
    assert list(role["implementations"]) == [ENGINE]  # the counts stay those since the start


def test_a_class_the_path_map_no_longer_retires_is_not_retired_after_its_next_call():
    """The latest flag wins, as in the ledger's verdicts: a class retired once, then called under a
    path map that no longer retires it (rolled back), is neither retired nor still called; retired
    again, it is both; a retired call from before the window does not count."""
    inventory = Inventory(retired_window_s=3600)
    inventory.consume([Trace().execute(OTHER_ENGINE, canonical=False, retired=True)], NOW)
    role = inventory.snapshot(now_s=T0 / S + 20)["roles"]["execution_engine"]
    assert role["implementations"][OTHER_ENGINE]["retired"] is True
    assert role["retired_still_called"] == [OTHER_ENGINE]
    inventory.consume([Trace(start_ns=T0 + 10 * S).execute(OTHER_ENGINE, canonical=False,
                                                          retired=False) for _ in range(50)], NOW)
    role = inventory.snapshot(now_s=T0 / S + 20)["roles"]["execution_engine"]
    assert role["implementations"][OTHER_ENGINE]["retired"] is False
    assert role["retired_still_called"] == []
    assert role["implementations"][OTHER_ENGINE]["calls"] == 51  # every call still counted
    # retired again (say, an hour later), at another entry point: retired and still called
    again = Trace(entry_point="/api/runs", start_ns=T0 + 3600 * S).execute(
        OTHER_ENGINE, canonical=False, retired=True)
    inventory.consume([again], NOW)
    role = inventory.snapshot(now_s=again.end_ns / S + 1)["roles"]["execution_engine"]
    assert role["implementations"][OTHER_ENGINE]["retired"] is True
    assert role["retired_still_called"] == [OTHER_ENGINE]
    # idle for the window since its retired call: retired, no longer "still called"
    role = inventory.snapshot(now_s=again.end_ns / S + 3600)["roles"]["execution_engine"]
    assert role["implementations"][OTHER_ENGINE]["retired"] is True
    assert role["retired_still_called"] == []


def test_a_class_retired_now_is_still_called_by_its_retired_calls_only():
    """Called for long under a path map that did not retire it, then once retired: listed while
    that retired call is within the window, whatever the calls from before."""
    inventory = Inventory(retired_window_s=3600)
    inventory.consume([Trace(start_ns=T0 - 7200 * S).execute(OTHER_ENGINE, canonical=False)
                       for _ in range(5)], NOW)
    inventory.consume([Trace(start_ns=T0).execute(OTHER_ENGINE, canonical=False, retired=True)], NOW)
    role = inventory.snapshot(now_s=T0 / S + 10)["roles"]["execution_engine"]
    assert role["implementations"][OTHER_ENGINE]["retired"] is True
    assert role["retired_still_called"] == [OTHER_ENGINE]
    assert inventory.snapshot(now_s=T0 / S + 3601)["roles"]["execution_engine"][
        "retired_still_called"] == []


def test_a_gateways_service_that_retires_a_class_keeps_it_retired_until_it_no_longer_does():
    """Each service's path map decides for its own calls, as for canonical: another service calling
    the class unretired does not un-retire it; the retiring service's next unretired call does."""
    inventory = Inventory()

    def call(service: str, retired: bool) -> list:
        return [Trace().execute(OTHER_ENGINE, canonical=False, retired=retired, service_name=service)]

    inventory.consume(call("a", True), NOW)
    inventory.consume(call("b", False), NOW)
    role = inventory.snapshot(now_s=T0 / S + 1)["roles"]["execution_engine"]
    assert role["implementations"][OTHER_ENGINE]["retired"] is True
    assert role["retired_still_called"] == [OTHER_ENGINE]
    inventory.consume(call("a", False), NOW)
    role = inventory.snapshot(now_s=T0 / S + 1)["roles"]["execution_engine"]
    assert role["implementations"][OTHER_ENGINE]["retired"] is False
    assert role["retired_still_called"] == []


def test_the_retired_flag_of_each_service_is_remembered_within_a_bound(monkeypatch):
    import sidecar.inventory as inventory_module

    monkeypatch.setattr(inventory_module, "MAX_RETIRED_KEYS", 2)
    inventory = Inventory()
    for n in range(3):
        inventory.consume([Trace().execute(f"s{n}.Engine", canonical=False, retired=True,
                                           service_name=f"s{n}")], NOW)
    assert len(inventory._retired) == 2
    assert sum(map(len, inventory._retired_by.values())) == 2
    role = inventory.snapshot(now_s=T0 / S + 1)["roles"]["execution_engine"]
    assert role["retired_still_called"] == ["s1.Engine", "s2.Engine"]
    inventory.consume([Trace().execute("s0.Engine", canonical=False, retired=True,
                                       service_name="s0")], NOW)
    role = inventory.snapshot(now_s=T0 / S + 1)["roles"]["execution_engine"]
    assert role["retired_still_called"] == ["s0.Engine", "s2.Engine"]  # at its next call


def test_a_call_after_a_forward_step_of_the_wall_clock_is_not_read_as_idle_for_the_step():
    """After the wall clock stepped 6 h forward, the pipeline's now_ns lags it (it catches a step
    up at 5 %): every span, stamped by the backend's clock, was ahead of that now_ns and clamped to
    it, so the snapshot (the wall clock) read a retired class called a second ago as idle 6 h and
    left it out of retired_still_called (window 1 h). Clamped to the later of now_ns and the wall
    clock, it is the call's own time; a span ahead of both still reads as the wall clock's now."""
    wall_ns = T0 + 3600 * S
    inventory = Inventory(retired_window_s=3600.0, wall_clock_ns=lambda: wall_ns)
    lagging_now_ns = wall_ns - 6 * 3600 * S
    called = Trace(start_ns=wall_ns - S).execute(RETIRED_ENGINE, retired=True, duration_ms=200)
    ahead = Trace(start_ns=wall_ns + 3600 * S).execute(ENGINE)
    inventory.consume([called, ahead], lagging_now_ns)
    role = inventory.snapshot(now_s=wall_ns / S)["roles"]["execution_engine"]
    assert role["implementations"][RETIRED_ENGINE]["last_seen"] == called.end_ns / S
    assert role["implementations"][RETIRED_ENGINE]["idle_s"] == pytest.approx(0.8)
    assert role["retired_still_called"] == [RETIRED_ENGINE]
    assert role["implementations"][ENGINE]["last_seen"] == wall_ns / S


class _Gateway:
    """The sidecar's inventory and consolidation detector on one ledger file, fed the same spans
    (as the pipeline feeds them) on a clock the test moves: what /api/v1/inventory and
    /api/v1/consolidation answer."""

    def __init__(self, path: str, wall_s: list[float], window_s: float) -> None:
        from sidecar.config import ConsolidationConfig
        from sidecar.consolidation import ActivityLedger
        from sidecar.detectors.deploys import DeployDetector

        self.wall_s = wall_s
        clock = lambda: wall_s[0]  # noqa: E731
        self.ledger = ActivityLedger(path, clock_s=clock, max_gap_s=10 * window_s)
        self.inventory = Inventory(retired_window_s=window_s, ledger=self.ledger,
                                   wall_clock_ns=lambda: int(wall_s[0] * S))
        self.deploys = DeployDetector(
            config=ConsolidationConfig(safe_to_delete_window_s=window_s), clock_s=clock,
            ledger=self.ledger)

    def calls(self, *calls: tuple[str, str, bool]) -> None:
        """(service, implementation, flagged canonical) each, now."""
        now_ns = int(self.wall_s[0] * S)
        spans = [Trace(start_ns=now_ns - 300 * 10**6).execute(
            implementation, canonical=canonical, service_name=service)
            for service, implementation, canonical in calls]
        for detector in (self.inventory, self.deploys):
            detector.consume(spans, now_ns)

    def canonical(self) -> tuple[list[str], list[str]]:
        """(the inventory's canonical classes, the verdicts' canonical classes) now."""
        now_s = self.wall_s[0]
        roles = self.inventory.snapshot(now_s=now_s)["roles"]
        verdicts = self.deploys.snapshot(now_s=now_s)["verdicts"]["implementations"]
        return (roles["execution_engine"]["canonical"] if "execution_engine" in roles else [],
                sorted(r["implementation"] for r in verdicts if r["canonical"]))

    def verdict(self, implementation: str) -> str:
        rows = self.deploys.snapshot(now_s=self.wall_s[0])["verdicts"]["implementations"]
        return next(r["verdict"] for r in rows if r["implementation"] == implementation)

    def close(self) -> None:
        self.deploys.close()


def test_the_inventory_and_the_verdicts_agree_on_a_gone_services_canonical_class(tmp_path):
    """Gateway: a's path map names ENGINE canonical, b's OTHER_ENGINE, and b still calls ENGINE.
    a stops. The inventory dropped ENGINE's canonical label a window after a's last call, while
    the verdicts kept it canonical as long as b called it (and callers_to_migrate with them). Now
    both read one answer (the ledger's): canonical for the window, then not — ENGINE in_use while
    b calls it — and a restart changes neither."""
    window_s = 100.0
    wall_s = [T0 / S + 3600]
    path = str(tmp_path / "ledger.sqlite")
    sidecar = _Gateway(path, wall_s, window_s)
    sidecar.calls(("a", ENGINE, True), ("b", OTHER_ENGINE, True), ("b", ENGINE, False))
    start_s = wall_s[0]
    assert sidecar.canonical() == ([OTHER_ENGINE, ENGINE], [OTHER_ENGINE, ENGINE])
    while wall_s[0] < start_s + 2 * window_s:  # a is gone; b keeps calling both
        wall_s[0] += 10
        sidecar.calls(("b", OTHER_ENGINE, True), ("b", ENGINE, False))
        inventory, verdicts = sidecar.canonical()
        assert inventory == verdicts
        assert inventory == ([OTHER_ENGINE, ENGINE] if wall_s[0] - start_s < window_s
                             else [OTHER_ENGINE])
    assert sidecar.verdict(ENGINE) == "in_use"
    sidecar.close()
    wall_s[0] += 5
    restarted = _Gateway(path, wall_s, window_s)
    restarted.calls(("b", ENGINE, False))
    assert restarted.canonical() == ([], [OTHER_ENGINE])  # OTHER_ENGINE not called since the start
    restarted.calls(("b", OTHER_ENGINE, True))
    assert restarted.canonical() == ([OTHER_ENGINE], [OTHER_ENGINE])


def test_after_a_restart_the_inventory_keeps_an_idle_services_canonical_class(tmp_path):
    """Within the window, a's class is canonical in the verdicts (persisted); the restarted
    inventory, which has seen only b's unflagged calls of it, said it was not."""
    window_s = 100.0
    wall_s = [T0 / S + 3600]
    path = str(tmp_path / "ledger.sqlite")
    sidecar = _Gateway(path, wall_s, window_s)
    sidecar.calls(("a", ENGINE, True), ("b", OTHER_ENGINE, True))
    wall_s[0] += 30
    sidecar.close()
    wall_s[0] += 5
    restarted = _Gateway(path, wall_s, window_s)
    restarted.calls(("b", OTHER_ENGINE, True), ("b", ENGINE, False))
    assert restarted.canonical() == ([OTHER_ENGINE, ENGINE], [OTHER_ENGINE, ENGINE])
    engines = restarted.inventory.snapshot(now_s=wall_s[0])["roles"]["execution_engine"]
    assert engines["canonical_share"] == 0.5  # b's unflagged call of ENGINE is not a canonical one
    wall_s[0] += window_s
    restarted.calls(("b", OTHER_ENGINE, True), ("b", ENGINE, False))
    assert restarted.canonical() == ([OTHER_ENGINE], [OTHER_ENGINE])


def _read_mid_count(span: SpanRecord, on_read) -> SpanRecord:
    """``span`` calling ``on_read`` when its end time is read: as the API thread's snapshot may run
    at that moment of ``consume`` (the GIL switches threads between any two steps)."""
    class ReadMidCount(SpanRecord):
        __slots__ = ()

        @property
        def end_ns(self) -> int:
            on_read()
            return SpanRecord.end_ns.__get__(self)

    copy = object.__new__(ReadMidCount)
    for field in dataclasses.fields(SpanRecord):
        getattr(SpanRecord, field.name).__set__(copy, getattr(span, field.name))
    return copy


def test_a_snapshot_taken_while_a_new_class_is_counted_shows_it_with_its_times_or_not_at_all():
    # its cell was counted before its times were set: a snapshot then showed the class first and
    # last seen 0 (1970) and idle for 56 years, its role first seen in 1970 too
    inventory = Inventory(RulesConfig(), StateConfig())
    inventory.consume([Trace().execute(ENGINE)], NOW)
    snapshots = []
    span = _read_mid_count(Trace().execute(OTHER_ENGINE),
                           lambda: snapshots.append(inventory.snapshot(now_s=NOW / S)))
    inventory.consume([span], NOW)
    snapshots.append(inventory.snapshot(now_s=NOW / S))
    assert len(snapshots) >= 2
    for snapshot in snapshots:
        role = snapshot["roles"]["execution_engine"]
        assert ENGINE in role["implementations"]
        for implementation in role["implementations"].values():
            assert implementation["first_seen"] > 0 and implementation["last_seen"] > 0
            assert implementation["idle_s"] < 86_400 + 1
        assert role["first_seen"] > 0
    assert snapshots[-1]["roles"]["execution_engine"]["implementations"][OTHER_ENGINE]["calls"] == 1
