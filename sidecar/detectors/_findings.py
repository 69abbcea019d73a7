"""Building findings: one place decides which span's fields a finding carries.

A finding names its *culprit* (the span whose role, implementation and entry point the incident is
filed under, so the fingerprint points at the code to fix) and the *completing* span (the one whose
arrival completed the evidence; its receipt time measures the pipeline's latency). Its service and
version are those of one span — the culprit's, or the completing span's when the culprit has no
version — so that the deploy comparison counts it for the (service, version) that ran it.
"""

from __future__ import annotations

from typing import NamedTuple

from sidecar.config import RulesConfig
from sidecar.model import Finding, SpanRecord
from sidecar.rules import CATALOG


def enabled_rules(rules: RulesConfig, family: str) -> frozenset[str]:
    """Rule ids of ``family`` that the configuration has not disabled."""
    disabled = set(rules.disabled)
    return frozenset(rid for rid, rule in CATALOG.items() if rule.family == family and rid not in disabled)


def make_finding(rule: str, culprit: SpanRecord | Culprit | tuple, now_ns: int, summary: str, *,
                 completing: SpanRecord | Culprit | tuple | None = None,
                 event_type: str | None = None,
                 details: dict[str, object] | None = None) -> Finding:
    culprit = named(culprit)
    completing = named(completing) if completing is not None else culprit
    # service and version from one span: a pair taken from two could name a version of another
    origin = (culprit if culprit.service_version is not None or completing.service_version is None
              else completing)
    return Finding(
        rule=rule,
        severity=CATALOG[rule].severity,
        summary=summary,
        role=culprit.role,
        implementation=culprit.implementation,
        entry_point=culprit.entry_point or completing.entry_point,
        trace_id=culprit.trace_id,
        span_id=culprit.span_id,
        run_id=culprit.run_id or completing.run_id,
        event_type=event_type or culprit.event_type or completing.event_type,
        service_version=origin.service_version,
        service_name=origin.service_name,
        detected_ns=now_ns,
        received_ns=completing.received_ns or culprit.received_ns,
        details=details if details is not None else {},
    )


def short(name: str | None) -> str:
    """``module.Class`` -> ``Class`` for one-line summaries; the full name is in the finding."""
    if not name:
        return "?"
    return name.rsplit(".", 1)[-1]


class Culprit(NamedTuple):
    """What detectors keep of a span they may later name in a finding: the fields ``make_finding``
    and the rules' summaries read. About 170 bytes, against about 330 for a ``SpanRecord`` (plus the
    strings only it references), and state keeps hundreds of thousands of them.

    State holds them as *plain* tuples in this field order (``culprit_of``), not as ``Culprit``
    instances: the cyclic garbage collector stops tracking a plain tuple of strings and numbers the
    first time it sees one, but walks every instance of a tuple subclass in each of its passes
    (CPython's ``PyTuple_CheckExact``). With hundreds of thousands held, that is most of the
    collector's work. Read a field with ``named(culprit).field``, or by index on a hot path
    (``TARGET`` below).

    ``service`` is the span's (``service.name``, ``service.version``) as one tuple shared by every
    culprit of that resource (``_service_pair``): a finding made on a tick from a culprit alone
    names its service too (gateway mode), in the slot the version alone took — no byte more per
    culprit. ``service_name`` and ``service_version`` read it."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    role: str | None
    implementation: str | None
    entry_point: str | None
    run_id: str | None
    event_type: str | None
    event_id: str | None
    service: tuple[str | None, str | None]
    received_ns: int
    start_ns: int
    canonical: bool
    target: str | None

    @property
    def service_name(self) -> str | None:
        return self.service[0]

    @property
    def service_version(self) -> str | None:
        return self.service[1]


#: field indexes of a plain culprit tuple, for the detectors' hot paths
TARGET = Culprit._fields.index("target")
ROLE = Culprit._fields.index("role")
EVENT_TYPE = Culprit._fields.index("event_type")
TRACE_ID = Culprit._fields.index("trace_id")
SPAN_ID = Culprit._fields.index("span_id")
PARENT_SPAN_ID = Culprit._fields.index("parent_span_id")
START_NS = Culprit._fields.index("start_ns")
_make_named = Culprit._make
MAX_SERVICE_PAIRS = 1024
_service_pairs: dict[tuple[str | None, str | None], tuple[str | None, str | None]] = {}
_last_service: list = [None, None, (None, None)]  # name, version, their pair: the previous span's


def _service_pair(name: str | None, version: str | None) -> tuple[str | None, str | None]:
    """One shared (service.name, service.version) tuple per resource (pipeline thread only), for a
    span of another resource than the previous one's (``culprit_of`` serves that one inline)."""
    pair = (name, version)
    shared = _service_pairs.get(pair)
    if shared is None:
        if len(_service_pairs) >= MAX_SERVICE_PAIRS:  # bounded: clearing only costs new copies
            _service_pairs.clear()
        shared = _service_pairs[pair] = pair
    last = _last_service
    last[0], last[1], last[2] = name, version, shared
    return shared


def culprit_of(span: SpanRecord) -> tuple:
    """The span's culprit as a plain tuple (see ``Culprit``), made once and shared by every detector
    that keeps it."""
    culprit = span.culprit
    if culprit is None:
        # the previous span's pair, inline: spans of one resource share the decoded strings, and
        # a call per culprit cost about a tenth of a microsecond
        name, version, last = span.service_name, span.service_version, _last_service
        culprit = span.culprit = (
            span.trace_id, span.span_id, span.parent_span_id, span.role, span.implementation,
            span.entry_point, span.run_id, span.event_type, span.event_id,
            last[2] if name is last[0] and version is last[1] else _service_pair(name, version),
            span.received_ns, span.start_ns, span.canonical, span.target)
    return culprit  # type: ignore[return-value]


def named(culprit):
    """A plain culprit tuple as a ``Culprit`` (fields by name); a span or a ``Culprit`` as it is."""
    return _make_named(culprit) if culprit.__class__ is tuple else culprit
