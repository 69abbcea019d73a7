"""A key of the values set to null (``sidecar: null`` in a values file, ``--set sidecar=null``) renders
or is refused naming the key, never with a Go template error: helm drops a null key together with the
chart's defaults under it, and ``.Values.sidecar.native`` stopped the render on "nil pointer evaluating
interface {}.native" (13 of the top-level sections, gateway.service and demoBackend.image too;
``config: null`` on "error calling deepCopy"), while a null port rendered ``127.0.0.1:<nil>`` and a null
image repository a manifest no YAML parser takes. The keys come from values.yaml: every top-level
key and every key one level below, so a section added later is covered without naming it here.
README "Null values" says which keys take null and what it means there."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.helm.charting import CHART, Helm, parse_documents, sidecar_config
from tests.helm.test_including_chart import write_backend_chart

VALUES = yaml.safe_load((CHART / "values.yaml").read_text())
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
TOP_LEVEL = tuple(VALUES)
ONE_DOWN = tuple(f"{key}.{sub}" for key, value in VALUES.items() if isinstance(value, dict) for sub in value)


def key_paths(node: dict, prefix: str = "") -> tuple[str, ...]:
    """Every key of ``node``, through its mappings: ``secrets``, ``secrets.hmacKey``, ..."""
    return tuple(path for key, value in node.items()
                 for path in (f"{prefix}{key}",
                              *(key_paths(value, f"{prefix}{key}.") if isinstance(value, dict) else ())))


# where the schema must agree with the chart: every key of values.yaml, a section or a single value
EVERY_KEY = key_paths(VALUES)
# the values each mode renders with, the null coming after them as a user's file would: the sidecar mode
# with what it can switch on (the demo backend runs the sidecar container; the claim, the network policy,
# the path map), the gateway mode with its token and network policy, without persistence (a Deployment)
MODES = {"sidecar": {"demoBackend": {"enabled": True}, "persistence": {"enabled": True},
                     "networkPolicy": {"enabled": True, "extraIngress": [{"ports": [{"port": 8000}]}]},
                     "pathmap": {"content": {"version": 1}}},
         "gateway": {"mode": "gateway", "secrets": {"apiToken": "t0ken-0123456789"},
                     "networkPolicy": {"enabled": True}}}
# what a template error says, beside a nil pointer: never what a null should meet
TEMPLATE_ERRORS = ("nil pointer", "error calling", "wrong type for value", "YAML parse error", "interface conversion",
                   "invalid value", "<nil>")
# what a template prints for nil, also as JSON escapes it (sidecar.yaml is JSON: "127.0.0.1:\u003cnil\u003e")
LEAKED = ("<nil>", "<no value>", "%!", "\\u003cnil\\u003e", "\\u003cno value\\u003e")


def null_at(path: str) -> dict:
    *parents, last = path.split(".")
    document: dict = {last: None}
    for parent in reversed(parents):
        document = {parent: document}
    return document


_RENDERED: dict[tuple[str, str, str | None, str], subprocess.CompletedProcess[str]] = {}


def render(helm: Helm, mode: str, path: str | None, how: str = "file") -> subprocess.CompletedProcess[str]:
    """helm template of the mode's values, then ``path`` set to null (a values file, or --set); kept
    for the schema's test, which asks for the same renders."""
    key = (str(helm.binary), mode, path, how)
    if key not in _RENDERED:
        folder = helm.home / "null-values"
        folder.mkdir(exist_ok=True)
        base = folder / f"{mode}.yaml"
        base.write_text(yaml.safe_dump(MODES[mode]))
        args: list[str | Path] = ["template", "pw", CHART, "--namespace", "observed", "--values", base]
        if path and how == "set":
            args += ["--set", f"{path}=null"]
        elif path:
            nulled = folder / f"{path}.yaml"
            nulled.write_text(yaml.safe_dump(null_at(path)))
            args += ["--values", nulled]
        _RENDERED[key] = helm.run(*args, check=False)
    return _RENDERED[key]


# fields a null renders null where the defaults render a value: Kubernetes (or the prometheus-operator,
# or the Grafana sidecar, for whom a null label or annotation value is "") reads them as unset, its own
# default; the README's "Null values" lists them. Any other field rendered null fails the test: a claim
# without storage (persistence.size: null) or a null containerPort is refused at install or never works.
NULL_FIELDS = {"image.pullPolicy": {"imagePullPolicy"}, "service.type": {"type"}, "gateway.replicas": {"replicas"},
               "demoBackend.replicas": {"replicas"}, "monitoring.scrapeTimeout": {"scrapeTimeout"},
               "dashboards.labelValue": {"grafana_dashboard"}, "dashboards.folder": {"grafana_folder"},
               "securityContext": {"securityContext"}, "podSecurityContext": {"securityContext"}}


def leaves(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict) and node:
        return {path: value for key, item in node.items() for path, value in leaves(item, f"{prefix}.{key}").items()}
    if isinstance(node, list) and node:
        return {path: value for i, item in enumerate(node) for path, value in leaves(item, f"{prefix}[{i}]").items()}
    return {prefix: node}


def documents(text: str) -> list[dict]:
    """The rendered objects, by libyaml: some hundred renders here (test_render.py checks the keys)."""
    return [doc for doc in yaml.load_all(text, Loader=yaml.CSafeLoader) if doc]


def nulled_fields(docs: list[dict], defaults: list[dict]) -> list[str]:
    """The fields null in ``docs`` that the defaults render with a value (of an object both render)."""
    before = {f"{d['kind']}/{d['metadata']['name']}": leaves(d) for d in defaults}
    found = []
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        for path, value in leaves(doc).items():
            if value is None and name in before and any(
                    (other == path and was is not None) or other.startswith((f"{path}.", f"{path}["))
                    for other, was in before[name].items()):
                found.append(f"{name} {path}")
    return found


def assert_rendered_or_refused_naming(rendered: subprocess.CompletedProcess[str], path: str,
                                      defaults: subprocess.CompletedProcess[str]) -> None:
    if rendered.returncode == 0:
        leaked = [text for text in LEAKED if text in rendered.stdout]
        assert not leaked, f"{path}: null rendered {leaked} into the manifests"
        nulled = [field for field in nulled_fields(documents(rendered.stdout), documents(defaults.stdout))
                  if field.rpartition(".")[2].partition("[")[0] not in NULL_FIELDS.get(path, set())]
        assert not nulled, f"{path}: null rendered these fields null: {nulled}"
        return
    errors = [line for line in rendered.stderr.splitlines() if line.startswith("Error")]
    assert errors, rendered.stderr
    template_errors = [text for text in TEMPLATE_ERRORS if text in rendered.stderr]
    assert not template_errors, f"{path}: null stops the render on a template error:\n{rendered.stderr}"
    assert "pathwatch: " in errors[0] and path in errors[0], \
        f"{path}: null is refused without naming it:\n{rendered.stderr}"


@pytest.mark.parametrize("mode, how", [("sidecar", "file"), ("sidecar", "set"), ("gateway", "file")])
@pytest.mark.parametrize("path", TOP_LEVEL)
def test_a_top_level_key_set_to_null_renders_or_is_refused_naming_it(helm: Helm, path: str, how: str,
                                                                     mode: str) -> None:
    assert_rendered_or_refused_naming(render(helm, mode, path, how), path, render(helm, mode, None))


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("path", ONE_DOWN)
def test_a_key_one_level_down_set_to_null_renders_or_is_refused_naming_it(helm: Helm, path: str,
                                                                          mode: str) -> None:
    assert_rendered_or_refused_naming(render(helm, mode, path), path, render(helm, mode, None))


@pytest.mark.parametrize("path", EVERY_KEY)
def test_the_schema_takes_null_where_the_chart_does(helm: Helm, path: str) -> None:
    """helm drops a null key before it validates, so the schema never sees it there; an editor or
    check-jsonschema reads a values file as written: null is valid there exactly where the chart renders
    it (``sidecar: null``: "None is not of type 'object'" at $.sidecar), sections and single values
    alike (``secrets.hmacKey: null``, read as "", was "None is not of type 'string'"). Where the chart
    renders it in one mode only, the other refuses it as it refuses its empty value (``secrets.apiToken``
    in gateway mode, as ""; ``networkPolicy.extraIngress`` with the policy on in sidecar mode, as []):
    the schema takes it, as it takes "" and []."""
    valid = jsonschema.Draft7Validator(SCHEMA).is_valid(null_at(path))
    renders = [mode for mode in sorted(MODES) if render(helm, mode, path).returncode == 0]
    assert valid == bool(renders), f"{path}: null {'valid' if valid else 'refused'} by the schema, " \
                                   f"{'rendered' if renders else 'refused'} by the chart"


def test_the_sections_that_were_a_nil_pointer_are_refused_with_the_way_to_turn_them_off(helm: Helm) -> None:
    refused = render(helm, "sidecar", "monitoring", "set")
    assert refused.returncode != 0
    assert "pathwatch: monitoring is null or missing" in refused.stderr
    assert "monitoring.enabled: false" in refused.stderr
    refused = render(helm, "gateway", "sidecar")
    assert refused.returncode != 0 and "pathwatch: sidecar is null or missing" in refused.stderr
    assert "enabled: false" not in refused.stderr   # sidecar has no switch


@pytest.mark.parametrize("path", ["config", "config.alerting"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_null_config_is_no_settings(helm: Helm, path: str, mode: str) -> None:
    """config: null rendered nothing (deepCopy of nil): it is the sidecar's defaults, as config: {}."""
    from sidecar.config import parse_config

    defaults = render(helm, mode, None)
    nulled = render(helm, mode, path)
    assert nulled.returncode == 0, nulled.stderr
    config = sidecar_config(parse_documents(nulled.stdout))
    assert config == sidecar_config(parse_documents(defaults.stdout))
    parse_config(config)


def test_a_null_section_of_the_including_chart_is_refused_naming_it(helm: Helm, chart: Path,
                                                                     tmp_path: Path) -> None:
    """The parent's templates read the subchart's values through .Subcharts.pathwatch: the subchart's
    own templates refuse the null first."""
    root = write_backend_chart(tmp_path, chart)
    values = tmp_path / "values.yaml"
    values.write_text("pathwatch:\n  sidecar: null\n")
    refused = helm.run("template", "shop", root, "--values", values, check=False)
    assert refused.returncode != 0
    assert "nil pointer" not in refused.stderr
    assert "pathwatch: sidecar is null or missing" in refused.stderr, refused.stderr
