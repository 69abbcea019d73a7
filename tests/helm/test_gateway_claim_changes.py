"""The chart README says which values a gateway's `helm upgrade` cannot change (the StatefulSet's
volumeClaimTemplates are immutable: the API server refuses the upgrade) and names the claims its
remedy patches and deletes: both are read off the rendered chart here, so the README cannot drift."""

from __future__ import annotations

from pathlib import Path

from tests.helm.charting import Helm, one

GATEWAY = ("mode=gateway", "secrets.apiToken=t0ken-0123456789", "persistence.enabled=true")
# every persistence value, each with a value other than the default
CHANGES = {"persistence.size": "persistence.size=5Gi", "persistence.storageClass": "persistence.storageClass=fast",
           "persistence.accessModes": "persistence.accessModes={ReadWriteOncePod}",
           "persistence.mountPath": "persistence.mountPath=/var/lib/pw"}


def section(chart: Path) -> str:
    text = (chart / "README.md").read_text()
    return text.split("### Changing the claims after install", 1)[1].split("\n## ", 1)[0]


def claim_templates(helm: Helm, chart: Path, *sets: str) -> list[dict]:
    return one(helm.template(chart, sets=(*GATEWAY, *sets)), "StatefulSet")["spec"]["volumeClaimTemplates"]


def test_the_readme_names_every_value_that_changes_the_claim_templates(helm: Helm, chart: Path) -> None:
    before = claim_templates(helm, chart)
    immutable = {key for key, change in CHANGES.items() if claim_templates(helm, chart, change) != before}
    assert immutable == {"persistence.size", "persistence.storageClass", "persistence.accessModes"}
    text = section(chart)
    for key in immutable:
        assert f"`{key}`" in text, key
    assert "--cascade=orphan" in text and "allowVolumeExpansion" in text


def test_the_readme_s_claim_and_statefulset_names_are_the_rendered_ones(helm: Helm, chart: Path) -> None:
    """A StatefulSet's claim for replica N is <template>-<statefulset>-<N>; release "pw" here."""
    docs = helm.template(chart, sets=GATEWAY, release="pw")
    statefulset = one(docs, "StatefulSet")
    [template] = statefulset["spec"]["volumeClaimTemplates"]
    text = section(chart).replace("<release>", "pw")
    assert f"{template['metadata']['name']}-{statefulset['metadata']['name']}-0" in text
    assert f"delete statefulset {statefulset['metadata']['name']} --cascade=orphan" in text
