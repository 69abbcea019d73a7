"""The version book: which versions it keeps within max_versions, and what it says about the rest."""

from __future__ import annotations

import random

from sidecar.consolidation import Thresholds, VersionBook
from sidecar.consolidation.deploys import CONCURRENT_S, LIVE_S, KnownVersion
from sidecar.consolidation.paths import CompletedPath
from sidecar.model import Finding, SpanRecord


def bleed(service: str, version: str, entry_point: str) -> Finding:
    return Finding(rule="bleed.owner_vs_ambient", severity="critical", summary="x",
                   service_name=service, service_version=version, entry_point=entry_point)


def test_a_stable_services_live_version_outlasts_the_deploys_of_another_service():
    book = VersionBook(Thresholds(min_runs=5), max_versions=4)
    now = 0.0
    for _ in range(10):
        book.count_run("A", "1", "/chat", now)
    for deploy in range(4):  # B deploys four times while A 1 keeps serving
        for _ in range(10):
            book.count_run("B", f"b{deploy}", "/ws", now)
            book.count_run("A", "1", "/chat", now)
            now += 1
    assert ("A", "1") in book.versions and len(book.versions) == 4
    assert book.ignored == 0
    for _ in range(10):  # A 2 leaks: a regression against A 1
        book.count_run("A", "2", "/chat", now)
        book.count_finding("A", "2", "/chat", "bleed", bleed("A", "2", "/chat"), now)
    assert [(f["kind"], f["service"], f["previous_version"]) for f in book.judge()] == [
        ("regression", "A", "1")]


def test_a_regression_blames_the_implementation_with_the_most_findings_and_samples_one_trace():
    book = VersionBook(Thresholds(min_runs=5))
    for _ in range(5):
        book.count_run("A", "1", "/ws", 0.0)
    culprits = [("emitter", "app.Rare"), ("engine", "app.Common"), ("engine", "app.Common"),
                ("emitter", "app.Rare2"), ("engine", "app.Common")]
    for number, (role, implementation) in enumerate(culprits):
        book.count_run("A", "2", "/ws", 1.0)
        finding = bleed("A", "2", "/ws")
        finding.role, finding.implementation, finding.trace_id = role, implementation, f"t{number}"
        book.count_finding("A", "2", "/ws", "bleed", finding, 1.0)
    (regression,) = book.judge()
    assert (regression["role"], regression["implementation"]) == ("engine", "app.Common")
    assert (regression["findings"], regression["runs"], regression["rate"]) == (5, 5, 1.0)
    assert regression["trace_id"] == "t4"  # the latest finding's


def test_more_live_services_than_max_versions_keep_the_tracked_ones_and_the_newcomer_waits():
    book = VersionBook(Thresholds(), max_versions=16)
    for second in range(3):
        for service in range(17):
            book.count_run(f"svc{service}", "1.0.0", "/api", float(second))
    assert [service for service, _ in book.versions] == [f"svc{i}" for i in range(16)]
    assert all(stats.total_runs == 3 for stats in book.versions.values())
    assert book.overflow() == {"max_versions": 16, "dropped": 0, "refused": 1, "ignored": 3,
                               "waiting": [{"service": "svc16", "version": "1.0.0"}]}


def test_a_waiting_version_gets_in_once_a_service_stopped_and_that_one_may_come_back():
    book = VersionBook(Thresholds(), max_versions=2)
    book.count_run("a", "1", "/x", 0.0)
    book.count_run("b", "1", "/x", 0.0)
    book.count_run("c", "1", "/x", 10.0)  # both others still run: c waits
    assert list(book.versions) == [("a", "1"), ("b", "1")]
    book.count_run("a", "1", "/x", LIVE_S)
    book.count_run("c", "1", "/x", LIVE_S + 1)  # b has not run for LIVE_S: it stopped, c gets in
    assert list(book.versions) == [("a", "1"), ("c", "1")]
    assert book.overflow()["waiting"] == [{"service": "b", "version": "1"}]
    book.count_run("a", "1", "/x", 3 * LIVE_S)
    book.count_run("b", "1", "/x", 3 * LIVE_S)  # b is back (c stopped in turn): tracked again
    assert list(book.versions) == [("a", "1"), ("b", "1")]
    assert book.dropped == 0


def test_a_newcomer_drops_old_history_first_never_its_own_base_nor_a_live_latest_version():
    book = VersionBook(Thresholds(), max_versions=4)
    for now, (service, version) in enumerate([("b", "1"), ("a", "1"), ("a", "2"), ("a", "3")]):
        book.count_run(service, version, "/x", float(now))
    book.count_run("a", "1", "/x", 10.0)  # a straggler of a 1: the latest active, still history
    book.count_run("b", "2", "/x", 11.0)
    # a 1 (history) goes, not b 1 (b 2's base, first seen), a 2 (a 3's base) nor a 3 (a's live one)
    assert list(book.versions) == [("b", "1"), ("a", "2"), ("a", "3"), ("b", "2")]
    book.count_run("a", "1", "/x", 12.0)  # a dropped old version stays dropped
    assert ("a", "1") not in book.versions and book.ignored == 1
    book.count_run("c", "1", "/x", 13.0)  # only bases and live versions left, all ran this hour
    assert ("c", "1") not in book.versions and book.refused == 1  # it waits
    book.count_run("a", "3", "/x", LIVE_S + 5)
    book.count_run("b", "2", "/x", LIVE_S + 5)
    book.count_run("c", "1", "/x", LIVE_S + 6)  # b 1 idle for an hour now: the idlest base goes
    assert list(book.versions) == [("a", "2"), ("a", "3"), ("b", "2"), ("c", "1")]


def test_the_book_never_holds_more_than_max_versions():
    rng = random.Random(7)
    book = VersionBook(Thresholds(), max_versions=5)
    for second in range(3000):
        service = f"s{rng.randrange(8)}"
        book.count_run(service, str(rng.randrange(second // 300 + 1)), "/x", float(second))
        assert len(book.versions) <= 5
    overflow = book.overflow()
    assert overflow["dropped"] > 0 and overflow["ignored"] > 0


def _path(version: str, engine: str) -> CompletedPath:
    steps = (("execution_engine", engine, False),)
    return CompletedPath(entry_point="/ws", version=version, steps=steps, id=engine, truncated=False,
                         service="A")


def test_no_new_path_while_the_previous_versions_runs_still_settle():
    """A run counts at its first span, its path only when it is judged: the previous version's 20
    runs counted but 5 of them judged say little about the paths it takes."""
    book = VersionBook(Thresholds(min_runs=20), max_versions=4)
    for _ in range(20):
        book.count_run("A", "1", "/ws", 0.0)
    for _ in range(5):
        book.see_path(_path("1", "app.UserEngine"), 0.0)
    for _ in range(20):
        book.count_run("A", "2", "/ws", 1.0)
        book.see_path(_path("2", "app.UserEngine"), 1.0)
        book.see_path(_path("2", "app.RequestScopedEngine"), 1.0)
    assert [f for f in book.judge() if f["kind"] == "new_path"] == []
    for _ in range(15):  # the rest of version 1's runs settle: it took the request-scoped path too
        book.see_path(_path("1", "app.RequestScopedEngine"), 2.0)
    assert [f for f in book.judge() if f["kind"] == "new_path"] == []
    book.see_path(_path("2", "app.IsolatedEngine"), 3.0)  # a path version 1 never took
    assert [f["path_id"] for f in book.judge() if f["kind"] == "new_path"] == ["app.IsolatedEngine"]


def test_after_a_rollback_the_version_that_runs_again_is_the_live_one():
    """B 1 -> B 2 -> back to B 1: B 1 serves B's traffic and must not be dropped as an old base."""
    book = VersionBook(Thresholds(min_runs=5), max_versions=3)
    now = 0.0

    def traffic(*versions: tuple[str, str]) -> None:
        nonlocal now
        for service, version in versions:
            book.count_run(service, version, "/ws", now)
        now += 1

    for _ in range(10):
        traffic(("B", "1"), ("A", "1"))
    for _ in range(10):
        traffic(("B", "2"), ("A", "1"))  # B 2 deployed ...
    for _ in range(int(LIVE_S) + 10):
        traffic(("B", "1"), ("A", "1"))  # ... and rolled back for more than an hour
    for _ in range(10):
        traffic(("A", "2"), ("B", "1"))  # A deploys
    for _ in range(10):
        traffic(("C", "1"), ("A", "2"), ("B", "1"))  # a new service: something must go
    assert ("B", "1") in book.versions and ("B", "2") not in book.versions
    ignored = book.ignored
    for _ in range(100):
        traffic(("B", "1"))
    assert book.ignored == ignored  # B 1's runs still count


def _runs(book: VersionBook, service: str, version: str, count: int, now: float,
          path: str = "P") -> None:
    for _ in range(count):
        book.count_run(service, version, "/ws", now)
        steps = (("execution_engine", f"{service}.{path}", False),)
        book.see_path(CompletedPath("/ws", version, steps, f"{service}-{path}", False, False,
                                    service), now)


def test_a_latest_version_dropped_while_idle_is_not_reported_again_when_it_comes_back():
    book = VersionBook(Thresholds(min_runs=2), max_versions=3)
    _runs(book, "S", "v1", 3, 0.0, "P1")
    _runs(book, "S", "v2", 3, 10.0, "P2")
    assert [(f["kind"], f["version"]) for f in book.judge()] == [("new_path", "v2")]
    _runs(book, "T", "t1", 3, 20.0, "Q1")
    _runs(book, "T", "t2", 3, 10 + LIVE_S + 1, "Q2")  # S v2 idle an hour: dropped, waits
    assert [(f["kind"], f["version"]) for f in book.judge()] == [("new_path", "t2")]
    assert book.overflow()["waiting"] == [{"service": "S", "version": "v2"}]
    _runs(book, "S", "v2", 3, LIVE_S + 200, "P2")  # S wakes up on the same version
    assert ("S", "v2") in book.versions
    assert book.judge() == []  # its new path was reported already


def test_what_was_reported_is_forgotten_with_the_versions_dropped_for_good():
    rng = random.Random(11)
    book = VersionBook(Thresholds(min_runs=2), max_versions=3)
    for step in range(3000):
        service = f"s{rng.randrange(6)}"
        version = str(rng.randrange(step // 200 + 1))
        _runs(book, service, version, 3, step * 120.0, f"P{rng.randrange(4)}")
        book.judge()
        waiting = {(service, version) for service, version in book._waiting.items()}
        assert {raised[1] for raised in book._raised} <= set(book.versions) | waiting
    assert book.overflow()["dropped"] > 0 and book.overflow()["waiting"]


def _rollback_then_deploy(max_versions: int, rolled_back_for_s: float) -> tuple[list, dict]:
    """S 1 (clean) -> 2 (leaks) -> rolled back to 1 -> 3 with 2's bug: 3 is compared with 1, what
    ran before it, whether the book is full or not and however long the rollback lasted."""
    book = VersionBook(Thresholds(min_runs=5), max_versions=max_versions)

    def traffic(version: str, now: float, leaks: bool) -> None:
        for _ in range(10):
            book.count_run("S", version, "/ws", now)
            if leaks:
                book.count_finding("S", version, "/ws", "bleed", bleed("S", version, "/ws"), now)

    traffic("1", 0.0, leaks=False)
    traffic("2", 100.0, leaks=True)
    traffic("1", 200.0, leaks=False)
    book.judge()
    traffic("3", 200.0 + rolled_back_for_s, leaks=True)
    regressions = [(f["version"], f["previous_version"]) for f in book.judge()
                   if f["kind"] == "regression"]
    return regressions, {row["version"]: row["previous_version"] for row in book.snapshot()}


def test_after_a_rollback_the_next_version_is_compared_with_the_one_rolled_back_to():
    for max_versions in (2, 16):
        for rolled_back_for_s in (100.0, LIVE_S + 10):
            regressions, previous = _rollback_then_deploy(max_versions, rolled_back_for_s)
            assert regressions == [("3", "1")], (max_versions, rolled_back_for_s)
            assert previous["3"] == "1"


def test_a_canary_started_during_a_rolling_deploy_is_compared_with_the_new_version():
    """1 -> 2 rolling (both serve; 1's batch happens to come last), then canary 3, which revives
    the retired class 1 ran and 2 dropped: 3 is compared with 2, the newest version still running,
    not with whichever sent the last span (was 1: deploy.retired_revived missed)."""
    book = VersionBook(Thresholds(min_runs=5))
    for i in range(10):
        book.count_run("S", "1", "/ws", float(i))
    book.see_ran("S", "1", "engine", "app.Legacy", 5.0)
    for i in range(10):
        book.count_run("S", "2", "/ws", 10.0 + i * 0.2)
        book.count_run("S", "1", "/ws", 10.1 + i * 0.2)
    legacy = SpanRecord(trace_id="t3", span_id="s3", parent_span_id=None, name="n", start_ns=0,
                        end_ns=0, role="engine", implementation="app.Legacy", retired=True)
    for _ in range(10):
        book.count_run("S", "3", "/ws", 12.2)
        book.see_retired("S", "3", legacy, "/ws", 12.2)
        book.see_ran("S", "3", "engine", "app.Legacy", 12.2)
    assert {row["version"]: row["previous_version"] for row in book.snapshot()}["3"] == "2"
    assert [(f["kind"], f["previous_version"]) for f in book.judge()] == [("retired_revived", "2")]


def test_a_canary_rolled_back_before_the_next_deploy_is_not_its_base():
    """2 serves, canary 3 beside it, rolled back (stopped); 4 is first seen 15 s later: compared
    with 2, which still serves, not with the abandoned 3 (the soak's timeline: a minute of
    CONCURRENT_S took 3, stopped 6 s before, for a version still running)."""
    book = VersionBook(Thresholds(min_runs=5))
    for i in range(30):
        book.count_run("S", "2", "/ws", float(i))
        if i < 15:
            book.count_run("S", "3", "/ws", float(i) + 0.5)
    book.count_run("S", "4", "/ws", 30.0)
    assert book.versions[("S", "4")].base == ("S", "2")


def test_a_revival_not_judged_yet_is_judged_after_a_restart():
    """Canary 3 runs the retired class once (a rare entry point) while its base 2 has fewer than
    min_runs runs; the sidecar restarts; 2 then has enough runs. 3's retired calls were not
    persisted: deploy.retired_revived was never raised, unless 3 ran that class again."""
    legacy = SpanRecord(trace_id="t3", span_id="s3", parent_span_id=None, name="n", start_ns=0,
                        end_ns=0, role="engine", implementation="app.Legacy", retired=True)
    book = VersionBook(Thresholds(min_runs=5))
    for i in range(2):
        book.count_run("S", "2", "/ws", float(i))
    book.count_run("S", "3", "/export", 2.0)
    book.see_retired("S", "3", legacy, "/export", 2.0)
    book.see_ran("S", "3", "engine", "app.Legacy", 2.0)
    assert book.judge() == []  # 2 has too few runs yet
    book = VersionBook(book.thresholds, known=book.take_known(), counts=book.take_counts())
    for i in range(5):
        book.count_run("S", "2", "/ws", 10.0 + i)
    book.count_run("S", "3", "/ws", 20.0)
    assert [(f["kind"], f["implementation"], f["entry_point"], f["trace_id"])
            for f in book.judge()] == [("retired_revived", "app.Legacy", "/export", "t3")]


def test_a_version_that_stopped_a_while_ago_is_no_base_even_if_newer():
    """1 -> 2, rolled back to 1, 2 silent for more than CONCURRENT_S: 3 is compared with 1."""
    book = VersionBook(Thresholds(min_runs=5))
    book.count_run("S", "1", "/ws", 0.0)
    book.count_run("S", "2", "/ws", 10.0)
    book.count_run("S", "1", "/ws", 10.0 + CONCURRENT_S + 1)
    book.count_run("S", "3", "/ws", 10.0 + CONCURRENT_S + 2)
    assert book.versions[("S", "3")].base == ("S", "1")


def test_a_base_that_still_runs_is_not_dropped_for_another_services_deploy():
    """Within the hour of a rollback (1 -> 2 -> 1), or with a canary (1 main, 2 canary), version 1
    is 2's comparison base and serves traffic: another service's newcomer waits instead."""
    book = VersionBook(Thresholds(min_runs=5), max_versions=3)

    def traffic(service: str, version: str, now: float) -> None:
        for _ in range(10):
            book.count_run(service, version, "/ws", now)

    traffic("S", "1", 0.0)
    traffic("S", "2", 100.0)
    traffic("S", "1", 150.0)
    traffic("T", "t1", 200.0)
    traffic("T", "t2", 300.0)  # the book is full: T 2 waits
    assert ("S", "1") in book.versions and book.dropped == 0
    ignored = book.ignored
    traffic("S", "1", 400.0)
    assert book.ignored == ignored


# --- the order of a service's versions across a restart (persisted by the ledger) ----------------

def _restarted(book: VersionBook, **kwargs) -> VersionBook:
    """A new process's book, given what the last one's wrote to the ledger."""
    return VersionBook(book.thresholds, known=book.take_known(), **kwargs)


def _leaky_runs(book: VersionBook, version: str, now: float, bleeds: bool, runs: int = 10) -> None:
    for _ in range(runs):
        book.count_run("svc", version, "/ws", now)
        if bleeds:
            book.count_finding("svc", version, "/ws", "bleed", bleed("svc", version, "/ws"), now)


def test_after_a_restart_in_a_rolling_deploy_the_new_version_is_still_compared_with_the_old():
    """1 ran before the restart; after it, 2's spans come first, then 1's (both run during the
    rolling deploy). 1 is not the deploy after 2: it keeps its first sighting (persisted), 2 is
    compared with 1, whichever sent the first span. 2 fixing 1's bleed raises nothing; 2 bringing
    one is a regression of 2."""
    for new_bleeds in (False, True):
        before = VersionBook(Thresholds(min_runs=5))
        _leaky_runs(before, "1", 100.0, bleeds=not new_bleeds)
        book = _restarted(before)
        _leaky_runs(book, "2", 200.0, bleeds=new_bleeds)
        _leaky_runs(book, "1", 201.0, bleeds=not new_bleeds)
        assert list(book.versions) == [("svc", "1"), ("svc", "2")]  # in the order first seen
        assert {row["version"]: row["previous_version"] for row in book.snapshot()} == {
            "1": None, "2": "1"}
        assert book.versions[("svc", "1")].first_seen_s == 100.0
        found = [(f["kind"], f["previous_version"], f["version"]) for f in book.judge()]
        assert found == ([("regression", "1", "2")] if new_bleeds else [])


def test_a_version_new_since_a_restart_is_compared_with_the_one_that_ran_last_before_it():
    """Rolled back before the restart (1 -> 2 -> 1): 3, first seen after it, is compared with 1 —
    as it would have been without the restart; a version that ran since the start is more recent
    than any the last process saw."""
    before = VersionBook(Thresholds(min_runs=5))
    _leaky_runs(before, "1", 0.0, bleeds=False)
    _leaky_runs(before, "2", 10.0, bleeds=False)
    _leaky_runs(before, "1", 20.0, bleeds=False)
    known = before.take_known()
    book = VersionBook(before.thresholds, known=known)
    book.count_run("svc", "3", "/ws", 30.0)
    assert book.versions[("svc", "3")].base == ("svc", "1")
    book = VersionBook(before.thresholds, known=known)
    book.count_run("svc", "2", "/ws", 30.0)  # a straggler of 2: restored, compared with 1
    book.count_run("svc", "3", "/ws", 31.0)
    assert book.versions[("svc", "2")].base == ("svc", "1")
    assert book.versions[("svc", "3")].base == ("svc", "2")  # 2 ran since the start, 1 did not


def test_a_restored_older_version_is_not_taken_for_its_services_latest():
    """After a restart 2 is tracked before 1 and 0: they are still the older ones (kept in the order
    first seen), so a newcomer that needs room drops 0 (superseded, no one's base) — not 2, the
    service's live version, nor 1, its base."""
    before = VersionBook(Thresholds(min_runs=5))
    _leaky_runs(before, "0", 0.0, bleeds=False)
    _leaky_runs(before, "1", 10.0, bleeds=False)
    book = _restarted(before, max_versions=3)
    book.count_run("svc", "2", "/ws", 20.0)  # base 1 (carried)
    book.count_run("svc", "1", "/ws", 21.0)
    book.count_run("svc", "0", "/ws", 22.0)
    assert list(book.versions) == [("svc", "0"), ("svc", "1"), ("svc", "2")]
    book.count_run("other", "a", "/x", 23.0)  # 0: superseded and no one's base
    assert list(book.versions) == [("svc", "1"), ("svc", "2"), ("other", "a")]


def test_the_versions_remembered_are_bounded_and_written_only_when_changed(monkeypatch):
    from sidecar.consolidation import deploys

    monkeypatch.setattr(deploys, "MAX_KNOWN_VERSIONS", 3)
    book = VersionBook(Thresholds(), max_versions=2)
    assert book.take_known() is None
    for now, version in enumerate("abcd"):
        book.count_run("svc", version, "/ws", float(now))
    assert [(v.version, v.base) for v in book.take_known()] == [("b", "a"), ("c", "b"), ("d", "c")]
    assert book.take_known() is None  # nothing new
    book.count_run("svc", "d", "/ws", 10.0)
    assert [(v.version, v.last_active_s) for v in book.take_known()][-1] == ("d", 10.0)
    assert book.take_known() is None


def test_a_version_that_ran_since_the_start_is_the_base_whatever_the_last_process_clock_said():
    """The last sidecar's clock was ahead of this one's (or a damaged ledger holds a time to come):
    1's last activity as persisted is later than anything this process sees for a while. 2, new
    since the start with nothing of its service run since, is compared with 1; 3 with 2, which ran
    since the start — not with 1 again."""
    now = 1_800_000_000.0
    known = [KnownVersion("svc", "1", now - 86_400, None, now + 7_200)]
    book = VersionBook(Thresholds(min_runs=5), known=known)
    book.count_run("svc", "2", "/ws", now)
    book.count_run("svc", "3", "/ws", now + 60)
    assert book.versions[("svc", "2")].base == ("svc", "1")
    assert book.versions[("svc", "3")].base == ("svc", "2")


def _restarted_with_counts(book: VersionBook, **kwargs) -> VersionBook:
    """A new process's book, given the versions and the counts the last one's wrote to the ledger."""
    return VersionBook(book.thresholds, known=book.take_known(), counts=book.take_counts(),
                       **kwargs)


def test_a_restarted_book_goes_on_from_the_counts_the_last_one_had():
    """1 ran 10 runs clean; 2, rolling out, 3 runs each with a bleed; min_runs 5. After a restart 2
    runs twice more and 1 once (both serve): 2 has 5 runs, 1 has 11 — the regression is judged
    now, with the runs seen before the restart, not after 5 more of each."""
    before = VersionBook(Thresholds(min_runs=5))
    _leaky_runs(before, "1", 100.0, bleeds=False)
    _leaky_runs(before, "2", 110.0, bleeds=True, runs=3)
    assert before.judge() == []
    book = _restarted_with_counts(before)
    _leaky_runs(book, "2", 200.0, bleeds=True, runs=2)
    _leaky_runs(book, "1", 201.0, bleeds=False, runs=1)
    assert {row["version"]: row["runs"] for row in book.snapshot()} == {"1": 11, "2": 5}
    [found] = book.judge()
    assert (found["kind"], found["previous_version"], found["version"]) == ("regression", "1", "2")
    assert (found["runs"], found["previous_runs"], found["findings"]) == (5, 11, 5)


def test_what_a_version_ran_before_a_restart_is_no_revival_after_it():
    """1 ran X (not retired then) before the restart; 2's path map retires X and Y and runs both.
    With 1's runs restored, so is what it ran: X is no revival, Y (never run by 1) is one — judged
    at once, with the runs seen before the restart."""
    x, y = ("engine", "X"), ("engine", "Y")
    before = VersionBook(Thresholds(min_runs=5))
    for _ in range(10):
        before.count_run("svc", "1", "/ws", 100.0)
        before.see_ran("svc", "1", *x, 100.0)
    book = _restarted_with_counts(before)
    book.count_run("svc", "1", "/ws", 200.0)
    for role, implementation in (x, y):
        span = SpanRecord(trace_id="t", span_id="s", parent_span_id=None, name="n", start_ns=0,
                          end_ns=0,
                          role=role, implementation=implementation, retired=True)
        book.count_run("svc", "2", "/ws", 201.0)
        book.see_ran("svc", "2", role, implementation, 201.0)
        book.see_retired("svc", "2", span, "/ws", 201.0)
    assert [(f["kind"], f["implementation"]) for f in book.judge()] == [("retired_revived", "Y")]


def test_the_counts_remembered_are_bounded_kept_until_seen_and_written_only_when_changed(
        monkeypatch):
    from sidecar.consolidation import deploys

    before = VersionBook(Thresholds(min_runs=5))
    _leaky_runs(before, "1", 100.0, bleeds=True)
    _leaky_runs(before, "2", 110.0, bleeds=False)
    book = _restarted_with_counts(before)
    # nothing seen since the start: the last process's counts are written again as they were
    assert [(c.version, c.runs) for c in book.take_counts()] == [("1", (("/ws", 10),)),
                                                                 ("2", (("/ws", 10),))]
    assert book.take_counts() is None  # nothing changed
    book.count_run("svc", "2", "/ws", 200.0)
    assert [(c.version, c.runs) for c in book.take_counts()] == [("1", (("/ws", 10),)),
                                                                 ("2", (("/ws", 11),))]
    monkeypatch.setattr(deploys, "MAX_KNOWN_VERSIONS", 2)
    book.count_run("svc", "3", "/ws", 300.0)
    assert [c.version for c in book.take_counts()] == ["2", "3"]  # the tracked ones kept first


def test_runs_and_the_findings_of_their_spans_count_together_once_settled_and_only_then_persist():
    """settle_s 2: a run opened, and a finding of a span received, within the last 2 s is neither
    compared, shown nor persisted; a finding of a span received before anything still settling (a
    longer run's) counts at once."""
    book = VersionBook(Thresholds(min_runs=1), settle_s=2.0)
    book.batch_received(100.0, 5_000)  # a batch received at 5,000 ns (monotonic), processed at 100 s

    def delivery(received_ns: int) -> Finding:
        return Finding(rule="delivery.missing_required_events", severity="warning", summary="x",
                       service_name="svc", service_version="1", entry_point="/ws",
                       received_ns=received_ns)

    book.count_run("svc", "1", "/ws", 100.0)
    book.count_finding("svc", "1", "/ws", "delivery", delivery(5_000), 100.2)  # of that batch
    book.count_finding("svc", "1", "/ws", "delivery", delivery(4_000), 100.2)  # of an older span

    def counted() -> tuple:
        [row] = book.snapshot()
        [counts] = book.take_counts() or [None]
        return (row["runs"], row["findings"]["delivery"],
                counts and (counts.runs, [f[2] for f in counts.findings]))

    assert counted() == (0, 1, ((), [1]))
    book.settle(102.0)  # the bucket of 100 s ends at 100.25
    assert counted() == (0, 1, None)  # nothing changed: nothing to write
    book.settle(102.25)
    assert counted() == (1, 2, ((("/ws", 1),), [2]))


def test_runs_opened_after_the_wall_clock_stepped_back_settle_settle_s_later():
    """A clock an hour ahead at start, stepped back (NTP): the runs opened after the step count
    settle_s after they opened, as the detectors judge them, not an hour later with the bucket of
    the run opened before the step (reproducer /tmp/s19/review2/repro_settle_clock_back.py)."""
    book = VersionBook(Thresholds(min_runs=1), settle_s=2.5)
    ahead = 1_700_003_600.0
    book.batch_received(ahead, 1)
    book.count_run("svc", "1", "/ws", ahead)
    book.settle(ahead)
    stepped = ahead - 3600.0
    for second in range(60):  # a run a second for a minute, settled each tick
        book.batch_received(stepped + second, 2 + second)
        book.count_run("svc", "1", "/ws", stepped + second)
        book.settle(stepped + second)
    [row] = book.snapshot()
    # 61 runs: those of the last settle_s (2.5 s, rounded up to the bucket) still wait
    assert row["runs"] == 58
    book.settle(stepped + 63.0)
    [row] = book.snapshot()
    assert row["runs"] == 61
