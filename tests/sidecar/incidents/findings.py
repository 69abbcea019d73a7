"""Findings to feed the store in tests."""

from __future__ import annotations

from sidecar import rules
from sidecar.model import Finding, Severity

BASE_NS = 1_764_160_000 * 1_000_000_000  # 2025-11-26T12:26:40Z


def bleed(trace: str = "t1", *, at_s: float = 0.0, implementation: str = "demo.engines.UserExecutionEngine",
          entry_point: str = "/ws", rule: str = rules.BLEED_OWNER_VS_AMBIENT,
          service: str | None = None) -> Finding:
    return Finding(rule=rule, severity=rules.CATALOG[rule].severity,
                   summary="user-scoped engine built for one user served another user's request",
                   role="execution_engine", implementation=implementation, entry_point=entry_point,
                   trace_id=trace, span_id="s" + trace, detected_ns=BASE_NS + int(at_s * 1e9),
                   service_name=service)


def duplicate(trace: str = "d1", *, at_s: float = 0.0) -> Finding:
    return Finding(rule=rules.DUPLICATE_EXECUTION, severity=Severity.WARNING,
                   summary="run executed by two engines", role="execution_engine",
                   implementation="demo.engines.ExecutionEngine", entry_point="/api/runs",
                   trace_id=trace, detected_ns=BASE_NS + int(at_s * 1e9))
