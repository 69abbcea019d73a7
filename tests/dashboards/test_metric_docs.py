"""Every metric family the sidecar exports is named in the documentation operators read, and every
metric name (and label list) the documentation gives is one the sidecar exports."""

from __future__ import annotations

import re

from tests.dashboards.catalog import sidecar_families, sidecar_metrics
from tests.dashboards.tooling import DASHBOARDS, ROOT

DOCS = [*sorted((ROOT / "docs").rglob("*.md")), DASHBOARDS / "README.md", ROOT / "README.md"]
#: every text that tells a user a metric's name: the docs above, the chart's README, the API's
NAMING_DOCS = [*DOCS, ROOT / "helm" / "pathwatch" / "README.md", ROOT / "sidecar" / "openapi.yaml"]
# a name, not the prefix of a pattern (`pathwatch_backend_*_total`)
_NAME = re.compile(r"\bpathwatch_[a-z0-9_]*[a-z0-9](?![a-z0-9_]*\*)")
# `metric{label,label}`: the labels a doc lists (a selector with matchers is the queries' tests')
_LABEL_LIST = re.compile(r"\b(pathwatch_[a-z0-9_]+)\{([a-z_]+(?:, ?[a-z_]+)*)\}")


def test_every_exported_metric_is_documented() -> None:
    text = "\n".join(path.read_text() for path in DOCS)
    exported = {name for name in sidecar_metrics() if name != "up" and not name.endswith("_created")}
    # a histogram is documented under its family name (its _bucket, _count and _sum come with it)
    families = {name.removesuffix(suffix) for name in exported
                for suffix in ("_bucket", "_count", "_sum") if name.endswith(suffix)}
    missing = sorted(name for name in exported - {f + s for f in families
                                                 for s in ("_bucket", "_count", "_sum")}
                     if name not in text) + sorted(f for f in families if f not in text)
    assert not missing, f"exported but named in no doc (docs/, dashboards/README.md, README.md): {missing}"


def named_metrics(text: str) -> set[str]:
    return set(_NAME.findall(text))


def test_every_metric_the_docs_name_is_exported() -> None:
    """A metric a doc names that the sidecar does not export is a query that silently finds nothing
    (the runbooks' queries are checked further in test_rules.py)."""
    known = set(sidecar_metrics()) | set(sidecar_families())
    unknown = {f"{path.relative_to(ROOT)}: {name}" for path in NAMING_DOCS
               for name in named_metrics(path.read_text()) if name not in known}
    assert not unknown, f"named in the docs, exported by no sidecar: {sorted(unknown)}"


def labels_of(name: str, catalog: dict[str, frozenset[str]]) -> frozenset[str]:
    """A sample's labels, or a family's (a histogram's without `le`)."""
    for sample in (name, f"{name}_total", f"{name}_bucket", f"{name}_info"):
        if sample in catalog:
            return catalog[sample] - {"le"}
    raise AssertionError(f"{name} is not exported")


def test_the_label_lists_the_docs_give_are_the_metrics_labels() -> None:
    catalog = sidecar_metrics()
    wrong = [f"{path.relative_to(ROOT)}: {name}{{{listed}}} (its labels: {sorted(labels_of(name, catalog))})"
             for path in NAMING_DOCS for name, listed in _LABEL_LIST.findall(path.read_text())
             if not {label.strip() for label in listed.split(",")} <= labels_of(name, catalog)]
    assert not wrong, wrong


def test_the_doc_checks_catch_a_wrong_name_and_a_wrong_label() -> None:
    catalog = sidecar_metrics()
    assert named_metrics("`pathwatch_receiver_spans_total{outcome}`, `pathwatch_backend_*_total`") == {
        "pathwatch_receiver_spans_total"}
    assert "pathwatch_receiver_span_total" not in set(catalog) | set(sidecar_families())
    assert _LABEL_LIST.findall("`pathwatch_alerts_sent_total{sink,outcome}`") == [
        ("pathwatch_alerts_sent_total", "sink,outcome")]
    assert "reason" not in labels_of("pathwatch_alerts_sent_total", catalog)
    assert labels_of("pathwatch_delivery_latency_seconds", catalog) == {"event_type"}
