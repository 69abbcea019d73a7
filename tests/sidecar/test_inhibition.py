"""Inhibition: info findings covered by a warning/critical finding on the same role and entry point."""

from prometheus_client import CollectorRegistry

from sidecar.inhibition import Inhibitor
from sidecar.model import Finding, Severity
from sidecar.telemetry import Telemetry

S = 1_000_000_000


def finding(rule: str, severity: Severity, role: str = "engine", entry_point: str = "/ws") -> Finding:
    return Finding(rule=rule, severity=severity, summary=rule, role=role, entry_point=entry_point)


def path(**kwargs) -> Finding:
    return finding("duplicate.entry_point_paths", Severity.INFO, **kwargs)


def execution(**kwargs) -> Finding:
    return finding("duplicate.execution", Severity.WARNING, **kwargs)


def inhibited(telemetry: Telemetry, rule: str = "duplicate.entry_point_paths") -> float:
    return telemetry.registry.get_sample_value("pathwatch_findings_inhibited_total", {"rule": rule}) or 0


def test_an_info_finding_is_held_then_released_when_nothing_covers_it():
    inhibitor = Inhibitor(1.0)
    alone = path()
    assert inhibitor.admit([alone], 10 * S) == []
    assert inhibitor.release(10 * S + S // 2) == []
    assert inhibitor.release(11 * S) == [alone]
    assert inhibitor.held == 0


def test_a_later_source_on_the_same_role_and_entry_point_inhibits_the_held_finding():
    telemetry = Telemetry(CollectorRegistry())
    inhibitor = Inhibitor(1.0, telemetry)
    inhibitor.admit([path()], 10 * S)
    source = execution()
    assert inhibitor.admit([source], 10 * S + S // 2) == [source]
    assert inhibitor.release(20 * S) == []
    assert inhibited(telemetry) == 1


def test_an_earlier_source_inhibits_at_once_and_only_within_the_window():
    telemetry = Telemetry(CollectorRegistry())
    inhibitor = Inhibitor(1.0, telemetry)
    inhibitor.admit([execution()], 10 * S)
    assert inhibitor.admit([path()], 10 * S + S // 2) == [] and inhibitor.held == 0
    assert inhibited(telemetry) == 1
    late = path()
    inhibitor.admit([late], 12 * S)  # the source is older than the window: the fact is news again
    assert inhibitor.release(13 * S) == [late]


def test_a_source_in_the_same_batch_inhibits_regardless_of_order():
    inhibitor = Inhibitor(1.0)
    source = execution()
    assert inhibitor.admit([path(), source], 10 * S) == [source]
    assert inhibitor.release(20 * S) == []


def test_other_roles_and_entry_points_are_not_inhibited():
    inhibitor = Inhibitor(1.0)
    other_role, other_entry = path(role="supervisor"), path(entry_point="/api/runs")
    inhibitor.admit([other_role, other_entry, execution()], 10 * S)
    assert inhibitor.release(11 * S) == [other_role, other_entry]


def test_warning_and_critical_findings_are_never_held():
    inhibitor = Inhibitor(1.0)
    bleed = finding("bleed.owner_vs_ambient", Severity.CRITICAL)
    source = execution()
    assert inhibitor.admit([bleed, source], 10 * S) == [bleed, source]
    assert inhibitor.held == 0


def test_overflow_reports_the_oldest_held_finding_early_instead_of_losing_it():
    inhibitor = Inhibitor(1.0, max_held=2)
    first, second, third = path(entry_point="/a"), path(entry_point="/b"), path(entry_point="/c")
    assert inhibitor.admit([first, second], 10 * S) == []
    assert inhibitor.admit([third], 10 * S) == [first]
    assert inhibitor.release(11 * S) == [second, third]
