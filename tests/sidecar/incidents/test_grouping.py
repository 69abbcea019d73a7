from sidecar.incidents import add_sample, merge_finding, new_incident
from sidecar.incidents.grouping import MAX_SERVICES
from sidecar.model import Severity
from tests.sidecar.incidents.findings import BASE_NS, bleed


def test_new_incident_takes_the_findings_identity():
    finding = bleed("t1", at_s=3)
    incident = new_incident(finding, sample_limit=4)
    assert incident.id == finding.fingerprint
    assert (incident.rule, incident.role, incident.implementation, incident.entry_point) == (
        finding.rule, "execution_engine", "demo.engines.UserExecutionEngine", "/ws")
    assert incident.severity is Severity.CRITICAL
    assert incident.count == 1
    assert incident.first_seen_ns == incident.last_seen_ns == BASE_NS + 3_000_000_000
    assert incident.sample_trace_ids == ["t1"]
    assert incident.alerted is False and incident.status == "open"


def test_merge_counts_and_widens_the_seen_window():
    incident = new_incident(bleed("t1", at_s=5), sample_limit=4)
    merge_finding(incident, bleed("t2", at_s=9), sample_limit=4)
    merge_finding(incident, bleed("t3", at_s=2), sample_limit=4)  # late arrival, older timestamp
    assert incident.count == 3
    assert incident.first_seen_ns == BASE_NS + 2_000_000_000
    assert incident.last_seen_ns == BASE_NS + 9_000_000_000


def test_samples_are_distinct():
    samples: list[str] = []
    for trace in ("a", "b", "a", "b", "c"):
        add_sample(samples, trace, limit=10)
    assert samples == ["a", "b", "c"]


def test_samples_keep_the_first_half_and_the_latest():
    samples: list[str] = []
    for n in range(20):
        add_sample(samples, f"t{n}", limit=6)
    assert samples == ["t0", "t1", "t2", "t17", "t18", "t19"]


def test_a_single_sample_slot_holds_the_latest():
    samples: list[str] = []
    for trace in ("a", "b", "c"):
        add_sample(samples, trace, limit=1)
    assert samples == ["c"]


def test_a_finding_without_a_trace_adds_no_sample():
    incident = new_incident(bleed("t1"), sample_limit=3)
    finding = bleed("t9")
    finding.trace_id = None
    merge_finding(incident, finding, sample_limit=3)
    assert incident.sample_trace_ids == ["t1"] and incident.count == 2


def test_samples_kept_under_a_higher_limit_are_cut_back_to_the_limit():
    # incidents.sample_trace_ids lowered and the store reopened: the stored list shrinks at once
    samples = [f"t{n}" for n in range(10)]
    add_sample(samples, "t10", limit=4)
    assert samples == ["t0", "t1", "t9", "t10"]
    add_sample(samples, "t11", limit=4)
    assert samples == ["t0", "t1", "t10", "t11"]
    single = ["a", "b", "c"]
    add_sample(single, "d", limit=1)
    assert single == ["d"]


def test_an_incident_keeps_the_services_its_findings_came_from_the_most_recent_last():
    incident = new_incident(bleed("t1", service="checkout"), sample_limit=5)
    for trace, service in (("t2", "billing"), ("t3", None), ("t4", "checkout")):
        merge_finding(incident, bleed(trace, service=service), sample_limit=5)
    assert incident.services == ["billing", "checkout"]  # t3 named none: the list stays


def test_the_services_kept_are_bounded_the_least_recently_seen_dropped_first():
    incident = new_incident(bleed("t0", service="s0"), sample_limit=5)
    for n in range(1, MAX_SERVICES + 3):
        merge_finding(incident, bleed(f"t{n}", service=f"s{n}"), sample_limit=5)
    assert incident.services == [f"s{n}" for n in range(3, MAX_SERVICES + 3)]
    merge_finding(incident, bleed("again", service="s3"), sample_limit=5)
    assert incident.services[-1] == "s3" and len(incident.services) == MAX_SERVICES
