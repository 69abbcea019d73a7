"""The ring of recent findings: bounded, counted evictions, filters, and the store feeding it."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest

from sidecar.config import IncidentsConfig
from sidecar.incidents import (FindingQuery, IncidentStore, QueryError, RecentFindings,
                               finding_to_dict)
from tests.sidecar.incidents.findings import BASE_NS, bleed, duplicate


def with_run(finding, run_id):
    return dataclasses.replace(finding, run_id=run_id)


def test_keeps_the_last_capacity_findings_and_counts_evictions():
    ring = RecentFindings(capacity=3)
    ring.add([bleed(f"t{i}") for i in range(5)])
    kept = ring.query()
    assert [finding.trace_id for _, finding in kept] == ["t2", "t3", "t4"]
    assert [seq for seq, _ in kept] == [3, 4, 5]
    assert ring.evicted == 2 and len(ring) == 3 and ring.last_seq == 5


def test_filters_by_rule_run_trace_time_and_sequence():
    ring = RecentFindings()
    ring.add([with_run(bleed("t1", at_s=1), "run-a"), with_run(duplicate("d1", at_s=2), "run-b"),
              with_run(bleed("t2", at_s=3), "run-b")])
    assert [f.trace_id for _, f in ring.query(FindingQuery(rule="bleed.owner_vs_ambient"))] == ["t1", "t2"]
    assert [f.trace_id for _, f in ring.query(FindingQuery(run_id="run-b"))] == ["d1", "t2"]
    assert [f.trace_id for _, f in ring.query(FindingQuery(trace_id="d1"))] == ["d1"]
    assert [f.trace_id for _, f in ring.query(FindingQuery(since_ns=BASE_NS + int(2e9)))] == ["d1", "t2"]
    assert [seq for seq, _ in ring.query(FindingQuery(after=1, limit=1))] == [2]


@pytest.mark.parametrize("field", ["detected_unix", "detected"])
def test_since_with_a_findings_own_detected_time_lists_it(field):
    ring = RecentFindings()
    finding = bleed("t1")
    finding.detected_ns = 1_795_784_463_181_176_449  # as a float's shortest form: ...1811767
    ring.add([finding])
    ((seq, kept),) = ring.query()
    shown = json.loads(json.dumps(finding_to_dict(seq, kept)))
    assert ring.query(FindingQuery.from_params({"since": str(shown[field])})) == [(seq, kept)]


def test_the_cursor_of_a_full_page_is_its_last_seq_and_otherwise_the_newest():
    ring = RecentFindings(capacity=3)
    ring.add([bleed(f"t{i}") for i in range(5)])
    full = ring.page(FindingQuery(limit=2))
    assert [seq for seq, _ in full.findings] == [3, 4] and full.cursor == 4 and full.last_seq == 5
    assert (full.first_seq, full.evicted) == (3, 2)
    rest = ring.page(FindingQuery(after=full.cursor, limit=2))
    assert [seq for seq, _ in rest.findings] == [5] and rest.cursor == 5
    filtered = ring.page(FindingQuery(rule="no.such_rule"))
    assert filtered.findings == [] and filtered.cursor == filtered.last_seq == 5  # all examined


def test_a_poller_following_the_cursor_sees_every_finding_once_while_they_arrive():
    ring, total = RecentFindings(capacity=100_000), 20_000
    writer = threading.Thread(target=lambda: [ring.add([bleed(f"t{n}")] * 10)
                                              for n in range(total // 10)])
    seen: list[int] = []
    cursor = 0
    writer.start()
    while cursor < total:
        page = ring.page(FindingQuery(after=cursor, limit=500))
        seen.extend(seq for seq, _ in page.findings)
        cursor = page.cursor
    writer.join()
    assert seen == list(range(1, total + 1))


def test_query_parameters_are_validated_by_name():
    query = FindingQuery.from_params({"rule": "duplicate.execution", "after": "7", "limit": "5",
                                      "trace_id": "ABC"})
    assert (query.rule, query.after, query.limit, query.trace_id) == ("duplicate.execution", 7, 5, "abc")
    for params, name in (({"limit": "0"}, "limit"), ({"after": "x"}, "after"), ({"colour": "red"}, "colour"),
                         ({"since": "yesterday"}, "since")):
        with pytest.raises(QueryError) as error:
            FindingQuery.from_params(params)
        assert error.value.parameter == name


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity"):
        RecentFindings(capacity=0)


def test_the_store_records_every_finding_in_its_ring():
    store = IncidentStore(":memory:")
    try:
        store.record([bleed("t1"), bleed("t2"), duplicate("d1")])
        assert len(store) == 2  # two incidents ...
        assert [f.trace_id for _, f in store.recent.query()] == ["t1", "t2", "d1"]  # ... three findings
    finally:
        store.close()


def test_a_poller_following_the_cursor_across_a_restart_reads_the_findings_made_after_it(tmp_path):
    # the ring lives in memory: a restarted sidecar's seq began at 1 again, so a poller passing the
    # next_after it had (3) as after read nothing, then was told next_after=2 and skipped both
    config = IncidentsConfig(path=str(tmp_path / "incidents.sqlite"))
    before = IncidentStore.from_config(config)
    before.record([bleed("t1"), bleed("t2"), duplicate("d1")])
    after = before.recent.page(FindingQuery()).cursor
    before.close()
    restarted = IncidentStore.from_config(config)
    try:
        assert restarted.recent.page(FindingQuery(after=after)).findings == []  # nothing new yet
        restarted.record([bleed("t3"), duplicate("d2")])
        page = restarted.recent.page(FindingQuery(after=after))
        assert [finding.trace_id for _, finding in page.findings] == ["t3", "d2"]
        assert page.first_seq - 1 > after  # says the findings the stopped sidecar held are gone
        assert [seq for seq, _ in page.findings] == [page.first_seq, page.first_seq + 1] == \
            [page.cursor - 1, page.cursor]
    finally:
        restarted.close()
