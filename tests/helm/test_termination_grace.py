"""The pods running the sidecar give it time to drain: sidecar.terminationGracePeriodSeconds.

The chart set no terminationGracePeriodSeconds, so the pods had Kubernetes' 30 s, while the sidecar's
shutdown (sidecar/app.py Sidecar.shutdown) may take 80 s by its own timeouts: the receivers' calls in
flight, the pipeline's drain of every accepted span (DRAIN_TIMEOUT_S), the alerts' flush and the API's
stop. At 30 s the kubelet's SIGKILL cut the drain short: accepted spans were lost, unflushed pages and
incidents not yet written with them. The value (default 120) is refused at render below the minimum,
which is derived from sidecar/app.py's constants here, so that the two cannot drift apart."""

from __future__ import annotations

import ast
import inspect
import json
import math
import textwrap
from pathlib import Path

import pytest

from sidecar import app
from tests.helm.charting import Helm, by_kind, pod_spec, upgrade_reusing_old_values
from tests.helm.test_including_chart import BACKEND_CHART, write_backend_chart

GATEWAY = ("mode=gateway", "secrets.apiToken=t0ken-0123456789")
#: seconds for the shutdown steps without a timeout of their own: gRPC's extra second past its grace,
#: the alert workers' abort, closing the incident store and the ledger, the process's exit
MARGIN_S = 10


def shutdown_timeouts() -> dict[str, float]:
    """The timeouts Sidecar.shutdown waits on, one after another: every module constant (or number)
    it passes to a call, log calls aside. A wait added there with a timeout of its own changes this."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(app.Sidecar.shutdown)))
    timeouts: dict[str, float] = {}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "log":
            continue
        for index, arg in enumerate([*node.args, *(k.value for k in node.keywords)]):
            if isinstance(arg, ast.Name) and isinstance(getattr(app, arg.id, None), (int, float)):
                timeouts[f"{arg.id}@{node.lineno}.{index}"] = getattr(app, arg.id)
            elif isinstance(arg, ast.Constant) and type(arg.value) in (int, float):
                timeouts[f"{arg.value}@{node.lineno}.{index}"] = arg.value
    return timeouts


def minimum_grace_s() -> int:
    return math.ceil(sum(shutdown_timeouts().values())) + MARGIN_S


def grace_periods(docs: list[dict]) -> dict[str, int | None]:
    return {doc["metadata"]["name"]: pod_spec(doc).get("terminationGracePeriodSeconds")
            for doc in [*by_kind(docs, "Deployment"), *by_kind(docs, "StatefulSet")]}


def test_the_shutdown_waits_are_the_ones_counted() -> None:
    # receivers (gRPC, HTTP), alerts and API: SHUTDOWN_GRACE_S each; the pipeline: DRAIN_TIMEOUT_S
    names = sorted(key.partition("@")[0] for key in shutdown_timeouts())
    assert names == ["DRAIN_TIMEOUT_S", *["SHUTDOWN_GRACE_S"] * 4]
    assert minimum_grace_s() == 90


def test_the_chart_s_minimum_is_the_sidecar_s_shutdown_budget(helm: Helm, chart: Path) -> None:
    minimum = minimum_grace_s()
    accepted = helm.run("template", "pw", chart, "--set", f"sidecar.terminationGracePeriodSeconds={minimum}",
                        check=False)
    assert accepted.returncode == 0, accepted.stderr
    refused = helm.run("template", "pw", chart, "--set", f"sidecar.terminationGracePeriodSeconds={minimum - 1}",
                       check=False)
    assert refused.returncode != 0
    assert "sidecar.terminationGracePeriodSeconds" in refused.stderr, refused.stderr
    assert f"at least {minimum}" in refused.stderr, refused.stderr


@pytest.mark.parametrize("value", ["0", "30", "89"])
def test_too_short_a_grace_period_is_refused_in_both_modes(helm: Helm, chart: Path, value: str) -> None:
    for mode in ((), GATEWAY):
        args = [arg for s in (*mode, f"sidecar.terminationGracePeriodSeconds={value}") for arg in ("--set", s)]
        refused = helm.run("template", "pw", chart, *args, check=False)
        assert refused.returncode != 0 and "sidecar.terminationGracePeriodSeconds" in refused.stderr, refused.stderr


@pytest.mark.parametrize(("sets", "expected"), [
    ((), {"pw-pathwatch-demo-backend": 120}),                     # sidecar mode: the backend runs it
    (GATEWAY, {"pw-pathwatch": 120, "pw-pathwatch-demo-backend": None}),   # no sidecar in that backend
    ((*GATEWAY, "persistence.enabled=true"), {"pw-pathwatch": 120, "pw-pathwatch-demo-backend": None}),
    (("sidecar.terminationGracePeriodSeconds=300",), {"pw-pathwatch-demo-backend": 300}),
], ids=["sidecar", "gateway", "gateway-statefulset", "given"])
def test_the_pods_running_the_sidecar_get_it(helm: Helm, chart: Path, sets: tuple[str, ...],
                                             expected: dict[str, int | None]) -> None:
    assert grace_periods(helm.template(chart, sets=(*sets, "demoBackend.enabled=true"))) == expected


def test_a_large_value_renders_as_an_integer(helm: Helm, chart: Path, tmp_path: Path) -> None:
    # values files are read as JSON numbers (float64): printed bare, 1000000 was "1e+06"
    values = tmp_path / "grace.json"
    values.write_text(json.dumps({"sidecar": {"terminationGracePeriodSeconds": 1000000}}))
    docs = helm.template(chart, values, sets=("demoBackend.enabled=true",))
    assert grace_periods(docs) == {"pw-pathwatch-demo-backend": 1000000}


def test_the_schema_refuses_what_is_not_a_whole_number_of_seconds(helm: Helm, chart: Path, tmp_path: Path) -> None:
    values = tmp_path / "grace.json"
    for value in (120.5, "120", -1):
        values.write_text(json.dumps({"sidecar": {"terminationGracePeriodSeconds": value}}))
        refused = helm.run("template", "pw", chart, "--values", values, check=False)
        assert refused.returncode != 0 and "terminationGracePeriodSeconds" in refused.stderr, (value, refused.stderr)


def test_an_upgrade_reusing_values_without_the_key_gets_the_default(helm: Helm, chart: Path, tmp_path: Path) -> None:
    """Nil in values reused from a chart without the key: 120, not a refusal (nil is 0 to `int`)."""
    _, docs = upgrade_reusing_old_values(helm, chart, tmp_path, {"demoBackend": {"enabled": True}}, (), [],
                                         missing_paths=("sidecar.terminationGracePeriodSeconds",))
    assert grace_periods(docs) == {"pw-pathwatch-demo-backend": 120}


def test_the_including_chart_s_pod_gets_it(helm: Helm, chart: Path, tmp_path: Path) -> None:
    """The README's wiring of a backend's pod (test_including_chart.BACKEND_CHART) includes the template."""
    wiring = 'include "pathwatch.terminationGracePeriodSeconds" .Subcharts.pathwatch'
    assert wiring in BACKEND_CHART["templates/deployment.yaml"]
    for name in ("README.md", "templates/NOTES.txt"):
        assert wiring in (chart / name).read_text(), name
    root = write_backend_chart(tmp_path, chart)
    assert grace_periods(helm.template(root)) == {"pw-backend": 120}
    given = grace_periods(helm.template(root, sets=("pathwatch.sidecar.terminationGracePeriodSeconds=200",)))
    assert given == {"pw-backend": 200}
    refused = helm.run("template", "pw", root, "--set", "pathwatch.sidecar.terminationGracePeriodSeconds=60",
                       check=False)
    assert refused.returncode != 0 and "sidecar.terminationGracePeriodSeconds" in refused.stderr
