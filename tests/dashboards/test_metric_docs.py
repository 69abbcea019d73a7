"""Every metric family the sidecar exports is named in the documentation operators read."""

from __future__ import annotations

from tests.dashboards.catalog import sidecar_metrics
from tests.dashboards.tooling import DASHBOARDS, ROOT

DOCS = [*sorted((ROOT / "docs").rglob("*.md")), DASHBOARDS / "README.md", ROOT / "README.md"]


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
