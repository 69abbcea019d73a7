"""The standard detector set together: clean traffic raises nothing; a bleed scenario raises its rules."""

import re
from pathlib import Path

import pytest

import sidecar.detectors as detectors
import sidecar.rules as rules_module
from sidecar.detectors import build_detectors
from sidecar.detectors.deploys import DeployDetector
from sidecar.inventory import Inventory
from sidecar.model import SpanRecord
from sidecar.rules import BLEED_OWNER_VS_AMBIENT, BLEED_TARGET_VS_SOCKET_OWNER, CATALOG
from sidecar.types import ConsumeInterrupted, Detector
from tests.sidecar.detectors.factory import (
    EMITTER,
    ENGINE,
    MS,
    NOW,
    T0,
    Trace,
    clean_run,
    new_id,
    rules,
    sample,
    state,
)


def run_all(dets, batches, now_ns=NOW):
    findings = []
    for batch in batches:
        for detector in dets:
            findings += detector.consume(batch, now_ns)
    for step in range(1, 101):  # ten seconds of ticks: past every deadline and idle time
        for detector in dets:
            findings += detector.tick(now_ns + step * 100 * MS)
    return findings


def test_public_api():
    assert sorted(detectors.__all__) == [
        "BleedDetector", "DeliveryDetector", "DuplicatesDetector", "Inventory", "build_detectors"]


def test_standard_set_are_detectors_and_share_the_given_inventory(telemetry):
    inventory = Inventory(rules(), state(), telemetry)
    dets = build_detectors(rules(), state(), telemetry, inventory=inventory)
    assert all(isinstance(d, Detector) for d in dets)
    assert [d.name for d in dets] == ["bleed", "duplicates", "delivery", "inventory"]
    assert dets[-1] is inventory


def test_many_concurrent_clean_runs_raise_nothing(telemetry):
    dets = build_detectors(rules(), state(), telemetry)
    runs = [clean_run(f"user-{i}", start_ns=T0 + i * MS) for i in range(50)]
    # interleave the runs' spans as concurrent requests would arrive, in small batches
    interleaved = [span for group in zip(*runs) for span in group]
    batches = [interleaved[i:i + 7] for i in range(0, len(interleaved), 7)]
    assert run_all(dets, batches) == []
    assert sample(telemetry, "pathwatch_runs_completed_total", outcome="complete") == 50
    assert sample(telemetry, "pathwatch_events_emitted_total", event_type="agent_completed") == 50
    assert sample(telemetry, "pathwatch_calls_total", role="execution_engine", implementation=ENGINE,
                  canonical="true", retired="false", entry_point="/ws", nested="false") == 50


def test_shared_factory_bleed_raises_owner_and_target_rules(telemetry):
    """S1: a process-wide emitter reconfigured for user B serves user A's run."""
    a = Trace(user="user-a", run_id="run-a")
    emit = a.emit("tool_executing", owner="user-b", target="user-b", instance_id="factory-emitter")
    write = a.deliver(emit, connection_user="user-b", connection_id="conn-b")
    dets = build_detectors(rules(), state(), telemetry)
    findings = run_all(dets, [[write, emit, a.request(duration_ms=10_000)]])
    rules_raised = {f.rule for f in findings}
    assert BLEED_OWNER_VS_AMBIENT in rules_raised
    owner = next(f for f in findings if f.rule == BLEED_OWNER_VS_AMBIENT)
    assert owner.implementation == EMITTER and owner.received_ns == NOW


def test_bleed_written_to_the_wrong_socket_is_found_whatever_the_batching():
    a = Trace(user="user-a")
    emit = a.emit("tool_completed")
    write = a.deliver(emit, connection_user="user-b")
    for batches in ([[write, emit]], [[write], [emit]], [[emit], [write]]):
        findings = run_all(build_detectors(rules(), state()), batches)
        assert [f.rule for f in findings if f.rule.startswith("bleed.")] == [BLEED_TARGET_VS_SOCKET_OWNER]


def _rule_constants() -> dict[str, str]:
    return {value: name for name, value in vars(rules_module).items()
            if name.isupper() and isinstance(value, str) and value in CATALOG}


def test_every_catalog_rule_is_raised_by_a_detector_tested_and_documented():
    root = Path(__file__).resolve().parents[3]
    sources = "".join(p.read_text() for p in (root / "sidecar" / "detectors").glob("*.py"))
    tests = "".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    docs = (root / "docs" / "rules.md").read_text()
    constants = _rule_constants()
    assert set(constants) == set(CATALOG)
    for rule_id, constant in constants.items():
        assert constant in sources, f"{rule_id} is raised by no detector"
        assert constant in tests, f"{rule_id} has no test"
        assert f"`{rule_id}`" in docs, f"{rule_id} is not documented in docs/rules.md"


def test_rules_md_gives_each_rule_its_severity_and_names_every_module_raising_one():
    """docs/rules.md's rule tables carry each rule's severity (the bleed table in its heading), and
    its opening names the detector modules that raise rules: it said three families raise them
    (bleed.py, duplicates.py, delivery.py) after deploys.py raised the deploy.* rules too."""
    root = Path(__file__).resolve().parents[3]
    docs = (root / "docs" / "rules.md").read_text()
    documented = {}
    for section in docs.split("\n## ")[1:]:
        heading = section.split("\n", 1)[0]
        for rule_id, severity in re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \| (?:(critical|warning|info) \|)?",
                                            section, re.M):
            documented[rule_id] = severity or re.search(r"\((critical|warning|info)\b", heading).group(1)
    assert documented == {rule_id: rule.severity.value for rule_id, rule in CATALOG.items()}
    opening = docs.split("\n## ", 1)[0]
    raising = {p.name for p in (root / "sidecar" / "detectors").glob("*.py")
               if any(constant in p.read_text() for constant in _rule_constants().values())}
    assert raising and {name for name in raising if name not in opening} == set(), raising


class _Poisoned(SpanRecord):
    """A span whose every read of its kind raises: any detector meets the error on it."""

    __slots__ = ()

    @property
    def kind(self):
        raise RuntimeError("a bug met by one span")

    @kind.setter
    def kind(self, value):
        pass


@pytest.mark.parametrize("name", ["bleed", "duplicates", "delivery", "inventory", "deploys"])
def test_a_detector_says_which_span_it_failed_on_and_keeps_what_it_found_before(telemetry, name):
    """The pipeline merges batches into one call: the error must name the span (the pipeline then
    feeds the batches after its batch again), and what came before it must not be lost."""
    dets = {d.name: d for d in build_detectors(rules(), state(), telemetry)}
    dets["deploys"] = deploys = DeployDetector(rules(), state(), telemetry)
    counted = []
    deploys.callers.observe_calls = lambda *args: counted.append(args[5])  # count
    trace = Trace(user="user-a")
    before, after = trace.execute(owner="user-b"), trace.execute(owner="user-b")
    poisoned = _Poisoned(trace.trace_id, new_id(), None, "x", T0, T0 + MS)
    with pytest.raises(ConsumeInterrupted) as raised:
        dets[name].consume([before, poisoned, after], NOW)
    assert raised.value.span is poisoned
    assert isinstance(raised.value.__cause__, RuntimeError)
    if name == "bleed":
        assert [(f.rule, f.span_id) for f in raised.value.findings] == [
            (BLEED_OWNER_VS_AMBIENT, before.span_id)]
    if name == "deploys":  # its calls are counted after its loop: those before the span still are
        assert counted == [1]
