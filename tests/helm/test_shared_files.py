"""The chart ships the checked-in rule file and dashboards through symlinks: same content, no copies."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml

from tests.helm.charting import CHART, DASHBOARDS, ROOT, RULES, Helm, by_kind, one, render_scenario


def chart_links() -> dict[Path, Path]:
    """Each file under the chart's files/ -> the repository path it links to."""
    links = {}
    for path in sorted((CHART / "files").rglob("*")):
        if path.is_symlink():
            target = (path.parent / os.readlink(path)).resolve(strict=False)
            links[path.relative_to(CHART)] = target.relative_to(ROOT)
    return links


def test_every_file_under_files_is_a_symlink_into_dashboards() -> None:
    regular = [p for p in (CHART / "files").rglob("*") if p.is_file() and not p.is_symlink()]
    assert regular == [], "copies drift: link to dashboards/ instead"
    assert chart_links() == {
        Path("files/rules.yaml"): RULES,
        **{Path("files/dashboards") / path.name: path for path in DASHBOARDS},
    }


def test_every_checked_in_dashboard_is_linked_from_the_chart() -> None:
    linked = set(chart_links().values())
    on_disk = {p.relative_to(ROOT) for p in (ROOT / "dashboards").glob("*.json")}
    assert on_disk <= linked, f"add a symlink under helm/pathwatch/files/dashboards/ for {on_disk - linked}"


def test_prometheus_rule_equals_the_rule_file(helm: Helm, chart: Path) -> None:
    expected = yaml.safe_load((ROOT / RULES).read_text())
    rule = one(render_scenario(helm, chart, "default"), "PrometheusRule")
    assert rule["spec"] == {"groups": expected["groups"]}
    assert rule["spec"]["groups"] and all(group["rules"] for group in rule["spec"]["groups"])


def test_dashboard_configmaps_equal_the_dashboard_files(helm: Helm, chart: Path) -> None:
    maps = by_kind(render_scenario(helm, chart, "sidecar-example"), "ConfigMap")
    dashboards = {}
    for config_map in maps:
        if config_map["metadata"].get("labels", {}).get("grafana_dashboard") == "1":
            assert config_map["metadata"]["annotations"] == {"grafana_folder": "pathwatch"}
            [(key, text)] = config_map["data"].items()
            dashboards[key] = json.loads(text)
    assert dashboards == {path.name: json.loads((ROOT / path).read_text()) for path in DASHBOARDS}


def test_dashboard_label_and_folder_are_configurable(helm: Helm, chart: Path) -> None:
    docs = helm.template(chart, sets=("dashboards.label=dash", "dashboards.labelValue=yes",
                                      "dashboards.folderAnnotation=k8s-sidecar-target-directory",
                                      "dashboards.folder=/tmp/dashboards/pw", "dashboards.namespace=grafana"))
    maps = [m for m in by_kind(docs, "ConfigMap") if "dash" in m["metadata"]["labels"]]
    assert len(maps) == len(DASHBOARDS)
    for config_map in maps:
        assert config_map["metadata"]["labels"]["dash"] == "yes"
        assert config_map["metadata"]["namespace"] == "grafana"
        assert config_map["metadata"]["annotations"] == {"k8s-sidecar-target-directory": "/tmp/dashboards/pw"}


def test_helm_package_resolves_the_symlinks(helm: Helm, chart: Path, tmp_path: Path) -> None:
    helm.run("package", chart, "--destination", tmp_path)
    [archive] = tmp_path.glob("pathwatch-*.tgz")
    with tarfile.open(archive) as tar:
        packaged = {m.name: m for m in tar.getmembers()}
        for link, source in {"pathwatch/files/rules.yaml": RULES,
                             **{f"pathwatch/files/dashboards/{p.name}": p for p in DASHBOARDS}}.items():
            assert packaged[link].isfile(), f"{link} is not a regular file in the package"
            assert tar.extractfile(link).read() == (ROOT / source).read_bytes()
    # the packaged chart renders the same rules as the source tree
    rule = one(helm.template(archive), "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load((ROOT / RULES).read_text())["groups"]


@pytest.mark.parametrize("missing", ["files/rules.yaml", "files/dashboards"])
def test_a_missing_shared_file_fails_rendering_clearly(helm: Helm, chart: Path,
                                                       tmp_path: Path, missing: str) -> None:
    copy = tmp_path / "pathwatch"
    shutil.copytree(chart, copy, symlinks=False)
    target = copy / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    result = helm.run("template", "pw", copy, check=False)
    assert result.returncode != 0
    assert "dashboards/" in result.stderr and "pathwatch:" in result.stderr
