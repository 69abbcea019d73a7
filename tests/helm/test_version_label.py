"""Every label the chart renders is a label value the API server takes, whatever image.tag holds.

`app.kubernetes.io/version` was image.tag as given: a tag pinned to a digest (`0.1.0@sha256:<64 hex>`,
a valid image reference the chart renders as `<repository>:0.1.0@sha256:...`) or a CI tag longer than
63 characters made every object's labels invalid, and the API server refused the whole install
("must be no more than 63 characters", "a valid label must be ...")."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helm.charting import Helm, all_containers, parse_documents, pod_spec

# k8s.io/apimachinery validation.IsValidLabelValue
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
DIGEST = "sha256:" + "0123456789abcdef" * 4
GATEWAY = ("mode=gateway", "secrets.apiToken=0123456789abcdef-token", "persistence.enabled=true",
           "demoBackend.enabled=true")


def labels_of(doc: dict) -> Iterator[tuple[str, str, str]]:
    yield from (("metadata", k, v) for k, v in doc["metadata"].get("labels", {}).items())
    spec = doc.get("spec", {})
    yield from (("template", k, v) for k, v in spec.get("template", {}).get("metadata", {}).get("labels", {}).items())
    for claim in spec.get("volumeClaimTemplates", []):
        yield from (("claim", k, v) for k, v in claim["metadata"].get("labels", {}).items())


@pytest.mark.parametrize("mode", [(), GATEWAY])
@pytest.mark.parametrize(("tag", "version"), [
    (f"0.1.0@{DIGEST}", "0.1.0"),
    ("main-" + "f" * 40 + "-20261126T101112Z-build", ("main-" + "f" * 40 + "-20261126T101112Z-build")[:63].rstrip("-_.")),
    ("0.2.0", "0.2.0"),
])
def test_every_label_is_valid_whatever_the_image_tag(helm: Helm, chart: Path, mode: tuple[str, ...],
                                                     tag: str, version: str) -> None:
    sets = [*mode, "demoBackend.enabled=true"]
    args = [arg for s in sets for arg in ("--set", s)]
    docs = parse_documents(helm.run("template", "pw", chart, *args, "--set-string", f"image.tag={tag}").stdout)
    bad = [(doc["kind"], where, key, value) for doc in docs for where, key, value in labels_of(doc)
           if len(value) > 63 or not LABEL_VALUE.fullmatch(value)]
    assert not bad
    versions = {value for doc in docs for _, key, value in labels_of(doc) if key == "app.kubernetes.io/version"}
    assert versions == {version}
    # the image itself keeps the tag as given (a digest pins it)
    images = {c["image"] for doc in docs if doc["kind"] in ("Deployment", "StatefulSet")
              for c in all_containers(pod_spec(doc)) if c["name"] == "pathwatch"}
    assert images == {f"ghcr.io/pathwatch/pathwatch:{tag}"}
