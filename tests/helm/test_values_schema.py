"""values.schema.json catches typos, accepts the shipped values, and mirrors the sidecar's configuration."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from sidecar.config import SidecarConfig, parse_config
from tests.helm.charting import CHART, ROOT, Helm, by_kind

SCHEMA = CHART / "values.schema.json"
CHECK_JSONSCHEMA = ROOT / ".venv" / "bin" / "check-jsonschema"
# keys of the sidecar configuration the chart sets itself (from ports, mode and persistence)
CHART_OWNED = {"receiver": {"grpc_endpoint", "http_endpoint"},
               "api": {"endpoint", "token_env", "metrics_requires_token"},  # monitoring.authorize
               "incidents": {"path"}}


def check_jsonschema(instance: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CHECK_JSONSCHEMA), "--schemafile", str(SCHEMA), str(instance)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("values", ["values.yaml", "examples/sidecar-values.yaml", "examples/gateway-values.yaml"])
def test_check_jsonschema_accepts_the_shipped_values(values: str) -> None:
    result = check_jsonschema(CHART / values)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("typo", "where"), [
    ("persistance:\n  enabled: true\n", "persistance"),                 # top level
    ("monitoring:\n  intervall: 1m\n", "intervall"),                     # a main section
    ("config:\n  rules:\n    delivery_deadline: 3\n", "delivery_deadline"),  # inside the sidecar config
])
def test_a_typo_is_rejected(helm: Helm, chart: Path, tmp_path: Path, typo: str, where: str) -> None:
    values = tmp_path / "typo.yaml"
    values.write_text(typo)
    checked = check_jsonschema(values)
    assert checked.returncode != 0 and where in checked.stdout + checked.stderr
    rendered = helm.run("template", "pw", chart, "--values", values, check=False)
    assert rendered.returncode != 0
    assert where in rendered.stderr and "schema" in rendered.stderr


def test_a_wrong_type_is_rejected(helm: Helm, chart: Path) -> None:
    rendered = helm.run("template", "pw", chart, "--set", "mode=daemonset", check=False)
    assert rendered.returncode != 0 and "mode" in rendered.stderr


def test_top_level_and_main_sections_forbid_unknown_keys() -> None:
    schema = json.loads(SCHEMA.read_text())
    assert schema["additionalProperties"] is False
    for section in ("image", "ports", "config", "secrets", "pathmap", "persistence", "sidecar", "gateway",
                    "service", "monitoring", "prometheusRule", "dashboards", "networkPolicy", "demoBackend"):
        assert schema["properties"][section]["additionalProperties"] is False, section


def test_config_schema_mirrors_the_sidecar_configuration() -> None:
    config = json.loads(SCHEMA.read_text())["properties"]["config"]["properties"]
    expected = {
        section: set(field.annotation.model_fields) - CHART_OWNED.get(section, set())
        for section, field in SidecarConfig.model_fields.items()
    }
    assert {section: set(body["properties"]) for section, body in config.items()} == {
        section: fields for section, fields in expected.items() if fields}


@pytest.mark.parametrize(("setting", "where"), [
    ("config.receiver.max_message_bytes=3000000000", "max_message_bytes"),  # gRPC takes an int32
    ("config.receiver.grpc_max_connections=0", "grpc_max_connections"),
    ("config.receiver.http_max_connections=2000000", "http_max_connections"),  # above fs.nr_open
    ("config.api.max_connections=0", "max_connections"),
    ("config.api.head_timeout_s=0", "head_timeout_s"),
    ("config.api.liveness_grace_s=0.5", "liveness_grace_s"),  # a GC pause would restart the sidecar
    ("config.api.endpoint=0.0.0.0:1", "endpoint"),  # the chart's
    ("config.rules.disabled={bleed.nope}", "disabled"),                      # not a rule id
    ("config.alerting.alertmanager_peers[0]=http://am-1:9093", "alertmanager_url"),  # peers alone
    ("config.alerting.alertmanager_url=http://am-0:9093,"
     "config.alerting.alertmanager_peers[0]=am-1:9093", "alertmanager_peers"),     # no scheme
])
def test_values_the_sidecar_would_refuse_are_refused_by_the_schema(helm: Helm, chart: Path,
                                                                  setting: str, where: str) -> None:
    rendered = helm.run("template", "pw", chart, "--set", setting, check=False)
    assert rendered.returncode != 0 and where in rendered.stderr


def echoed_forms(value: str) -> set[str]:
    """How a message could quote ``value``: as it is, and as Go (%q), JSON or Python escape it, each
    between quotes; a value with a CANARY inside also bare, and by that word alone."""
    escaped = {value, json.dumps(value)[1:-1], json.dumps(value, ensure_ascii=False)[1:-1], repr(value)[1:-1]}
    forms = {f"{quote}{form}{quote}" for form in escaped for quote in ("'", '"')}
    if "CANARY" in value:
        forms |= {*escaped, "CANARY"}
    return forms


def assert_refused_without_the_value(rendered: subprocess.CompletedProcess[str], key: str, value: str) -> None:
    """Refused naming ``key``, and the value nowhere in the output: a mistyped real token or key must
    not reach CI logs or scrollback (helm 4 quotes the value a schema pattern refuses)."""
    assert rendered.returncode != 0, rendered.stdout
    assert key in rendered.stderr, rendered.stderr
    output = rendered.stdout + rendered.stderr
    echoed = [form for form in echoed_forms(value) if form in output]
    assert not echoed, f"the refused {key} is quoted in helm's output ({echoed!r}):\n{output}"


@pytest.mark.parametrize("key", ["k3y", "0123456789abcde", " " * 16, "short-CANARY", "\t CANARY \n"])
def test_a_weak_hmac_key_is_refused_at_render_without_the_key(helm: Helm, chart: Path, tmp_path: Path,
                                                              key: str) -> None:
    """The backend refuses a key under 16 bytes (128 bits) or only whitespace: so does the chart,
    naming secrets.hmacKey but never the key, while an empty one (the default) is still generated."""
    rendered = helm.run("template", "pw", chart, "--set-string", f"secrets.hmacKey={key}", check=False)
    assert_refused_without_the_value(rendered, "secrets.hmacKey", key)
    values = tmp_path / "key.json"   # JSON: the string reaches helm exactly
    values.write_text(json.dumps({"secrets": {"hmacKey": key}}))
    assert_refused_without_the_value(helm.run("template", "pw", chart, "--values", values, check=False),
                                     "secrets.hmacKey", key)
    accepted = helm.run("template", "pw", chart, "--set-string", "secrets.hmacKey=0123456789abcdef",
                        check=False)
    assert accepted.returncode == 0, accepted.stderr


def test_the_schema_knows_every_rule_id() -> None:
    from sidecar.rules import CATALOG

    rules = json.loads(SCHEMA.read_text())["properties"]["config"]["properties"]["rules"]
    assert rules["properties"]["disabled"]["items"]["enum"] == sorted(CATALOG)


def test_every_config_section_and_key_is_documented_in_values_and_readme() -> None:
    # the README's values table and the comments of values.yaml are where operators look them up
    config = json.loads(SCHEMA.read_text())["properties"]["config"]["properties"]
    readme = (CHART / "README.md").read_text()
    values = (CHART / "values.yaml").read_text()
    # the schema still lists the sections, each with its keys: else the loops below check nothing
    assert {"receiver", "rules", "alerting", "state"} <= config.keys(), sorted(config)
    assert all(body["properties"] for body in config.values()), sorted(config)
    for section, body in config.items():
        rows = [line for line in readme.splitlines() if line.startswith(f"| `config.{section}` |")]
        assert rows, f"README.md: no row for config.{section}"
        comment = [line for line in values.splitlines() if line.strip().startswith(f"{section}: {{}}")]
        assert comment, f"values.yaml: no config.{section} entry"
        for key in body["properties"]:
            assert f"`{key}`" in rows[0], f"README.md: config.{section} does not name {key}"
            assert key in comment[0], f"values.yaml: config.{section} does not name {key}"


def test_an_alertmanager_cluster_renders_into_the_sidecar_config(helm: Helm, chart: Path) -> None:
    rendered = helm.run("template", "pw", chart, "--set", "config.alerting.alertmanager_url="
                        "http://am-0:9093,config.alerting.alertmanager_peers[0]=HTTP://am-1:9093")
    assert "alertmanager_peers" in rendered.stdout and "HTTP://am-1:9093" in rendered.stdout


@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
def test_connection_caps_render_into_the_sidecar_config_beside_the_charts_api_keys(helm: Helm, chart: Path,
                                                                                  mode: str) -> None:
    """A gateway for more than 1024 exporting pods needs receiver.grpc_max_connections raised; the
    api section is merged with the keys the chart owns, not replaced by the user's."""
    docs = helm.template(chart, sets=(f"mode={mode}", "secrets.apiToken=t0ken-0123456789",
                                      "config.receiver.grpc_max_connections=5000",
                                      "config.api.max_connections=64", "config.api.head_timeout_s=5",
                                      "config.api.liveness_grace_s=120"))
    config_map = next(c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-config"))
    config = parse_config(yaml.safe_load(config_map["data"]["sidecar.yaml"]))
    assert config.receiver.grpc_max_connections == 5000
    assert config.receiver.http_max_connections == 1024  # left out: the sidecar's default
    assert (config.api.max_connections, config.api.head_timeout_s) == (64, 5.0)
    assert config.api.liveness_grace_s == 120.0
    assert config.api.endpoint == "0.0.0.0:9464" and config.api.token_env == "PATHWATCH_API_TOKEN"


def _sidecar_bounds(field) -> dict[str, float]:
    """A config field's numeric bounds as JSON Schema keywords; an integer's `gt n` is `minimum n+1`."""
    import annotated_types

    bounds: dict[str, float] = {}
    for item in field.metadata:
        for kind, keyword, attr in ((annotated_types.Gt, "exclusiveMinimum", "gt"),
                                    (annotated_types.Ge, "minimum", "ge"),
                                    (annotated_types.Lt, "exclusiveMaximum", "lt"),
                                    (annotated_types.Le, "maximum", "le")):
            if isinstance(item, kind):  # the tightest: a count has the general bound and its own
                value = getattr(item, attr)
                tighter = min if keyword in ("exclusiveMaximum", "maximum") else max
                bounds[keyword] = tighter(bounds.get(keyword, value), value)
    if field.annotation is int and "exclusiveMinimum" in bounds:
        bounds["minimum"] = bounds.pop("exclusiveMinimum") + 1
    return bounds


def test_config_schema_has_the_sidecars_numeric_bounds() -> None:
    """A value inside the schema but beyond the sidecar's bound (rules.delivery_deadline_s: 1e8, a
    duration above a year) rendered a sidecar.yaml the sidecar refuses at start: exit 2, a crash loop
    that `helm install` and `helm lint` did not foresee."""
    config = json.loads(SCHEMA.read_text())["properties"]["config"]["properties"]
    mismatched = []
    for section, model in SidecarConfig.model_fields.items():
        for key, field in model.annotation.model_fields.items():
            if key in CHART_OWNED.get(section, set()):
                continue
            expected = _sidecar_bounds(field)
            got = {keyword: value for keyword, value in config[section]["properties"][key].items()
                   if keyword in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")}
            if got != expected:
                mismatched.append(f"config.{section}.{key}: schema {got}, sidecar {expected}")
    assert not mismatched, mismatched


@pytest.mark.parametrize("setting", ["config.rules.delivery_deadline_s=100000000",
                                     "config.state.ttl_s=100000000",
                                     "config.consolidation.safe_to_delete_window_s=1000000000"])
def test_a_duration_beyond_the_sidecars_limit_is_refused_by_the_schema(helm: Helm, chart: Path,
                                                                       setting: str) -> None:
    rendered = helm.run("template", "pw", chart, "--set", setting, check=False)
    assert rendered.returncode != 0 and setting.split("=")[0].rpartition(".")[2] in rendered.stderr


@pytest.mark.parametrize("setting", [
    "livenessProbe.successThreshold=2",                # Kubernetes: "must be 1" for a liveness probe
    "readinessProbe.terminationGracePeriodSeconds=5",  # "must not be set for readinessProbes"
    "livenessProbe.terminationGracePeriodSeconds=0",   # "must be greater than 0"
])
def test_probe_settings_the_api_server_refuses_are_refused_by_the_schema(helm: Helm, chart: Path,
                                                                          setting: str) -> None:
    """helm template rendered them into the gateway's pod, which the API server then refused at install."""
    rendered = helm.run("template", "pw", chart, "--set", "mode=gateway", "--set", "secrets.apiToken=t0ken-0123456789",
                        "--set", setting, check=False)
    assert rendered.returncode != 0 and setting.split("=")[0].rpartition(".")[2] in rendered.stderr
    accepted = helm.run("template", "pw", chart, "--set", "mode=gateway", "--set", "secrets.apiToken=t0ken-0123456789",
                        "--set", "livenessProbe.successThreshold=1", "--set",
                        "livenessProbe.terminationGracePeriodSeconds=10", "--set",
                        "readinessProbe.successThreshold=2", check=False)
    assert accepted.returncode == 0, accepted.stderr


def _case_variants(word: str) -> list[str]:
    import itertools

    return ["".join(chars) for chars in itertools.product(*((c.lower(), c.upper()) for c in word))]


def test_the_schema_accepts_exactly_the_log_levels_the_sidecar_accepts() -> None:
    """The sidecar takes a level in any case (`INFO`, as Python's logging spells it); the schema took the
    lower-case spelling only and refused at render what the sidecar would have run with."""
    import re

    from sidecar.config import ConfigError, parse_config

    level = json.loads(SCHEMA.read_text())["properties"]["config"]["properties"]["logging"]["properties"]["level"]
    candidates = [variant for word in ("debug", "info", "warning", "error") for variant in _case_variants(word)]
    candidates += ["", "warn", "trace", "critical", "info ", " info", "in fo", "\u0130nfo", "INFO\n", "debug1"]

    def sidecar_accepts(value: str) -> bool:
        try:
            parse_config({"logging": {"level": value}})
        except ConfigError:
            return False
        return True

    def schema_accepts(value: str) -> bool:
        if "enum" in level:
            return value in level["enum"]
        # `$` is the end of the text in Go's regexp (helm) and ECMA; Python's also matches before a final "\n"
        assert level["pattern"].endswith("$")
        return re.search(level["pattern"][:-1] + r"\Z", value) is not None

    differ = [value for value in candidates if schema_accepts(value) != sidecar_accepts(value)]
    assert not differ, f"schema and sidecar disagree on {differ}"


@pytest.mark.parametrize("value", ["INFO", "Debug", "wArNiNg"])
def test_a_log_level_in_upper_or_mixed_case_renders_and_runs(helm: Helm, chart: Path, value: str) -> None:
    import yaml

    from sidecar.config import parse_config

    rendered = helm.run("template", "pw", chart, "--set", f"config.logging.level={value}", check=False)
    assert rendered.returncode == 0, rendered.stderr
    [config_map] = [doc for doc in yaml.safe_load_all(rendered.stdout)
                    if doc and doc["kind"] == "ConfigMap" and doc["metadata"]["name"].endswith("-config")]
    assert parse_config(yaml.safe_load(config_map["data"]["sidecar.yaml"])).logging.level == value.lower()
    refused = helm.run("template", "pw", chart, "--set", "config.logging.level=verbose", check=False)
    assert refused.returncode != 0 and "level" in refused.stderr


def test_the_schema_accepts_exactly_the_log_formats_the_sidecar_accepts() -> None:
    from sidecar.config import ConfigError, parse_config

    schema = json.loads(SCHEMA.read_text())["properties"]["config"]["properties"]["logging"]["properties"]
    candidates = ["text", "json", "JSON", "Json", "Text", "xml", "logfmt", "", "json ", " text", "console"]

    def sidecar_accepts(value: str) -> bool:
        try:
            parse_config({"logging": {"format": value}})
        except ConfigError:
            return False
        return True

    differ = [value for value in candidates if (value in schema["format"]["enum"]) != sidecar_accepts(value)]
    assert not differ, f"schema and sidecar disagree on {differ}"


def test_the_json_log_format_renders_into_the_sidecar_config_and_a_wrong_one_is_refused(helm: Helm,
                                                                                        chart: Path) -> None:
    import yaml

    from sidecar.config import parse_config

    for mode in (["--set", "mode=sidecar"], ["--set", "mode=gateway", "--set", "secrets.apiToken=t0ken-0123456789"]):
        rendered = helm.run("template", "pw", chart, *mode, "--set", "config.logging.format=json",
                            "--set", "config.logging.level=debug", check=False)
        assert rendered.returncode == 0, rendered.stderr
        [config_map] = [doc for doc in yaml.safe_load_all(rendered.stdout)
                        if doc and doc["kind"] == "ConfigMap" and doc["metadata"]["name"].endswith("-config")]
        logging = parse_config(yaml.safe_load(config_map["data"]["sidecar.yaml"])).logging
        assert (logging.format, logging.level) == ("json", "debug")
    refused = helm.run("template", "pw", chart, "--set", "config.logging.format=logfmt", check=False)
    assert refused.returncode != 0 and "format" in refused.stderr


def _sidecar_refuses_token(value: str) -> bool:
    """What the sidecar does with PATHWATCH_API_TOKEN at start (sidecar/app.py: stripped, then
    require_token_for on the chart's API endpoint, which is never loopback)."""
    from sidecar.api import ApiTokenRequired, require_token_for

    try:
        require_token_for("0.0.0.0:9464", value.strip() or None)
    except ApiTokenRequired:
        return True
    return False


def _chart_pattern(name: str) -> str:
    """A regexp of pathwatch.validate (``$name := `...```, or ``printf `...` $space $space``), in
    Python's syntax (Go's ``\\x{2028}`` is Python's ``\\U00002028``)."""
    import re

    text = (CHART / "templates" / "_helpers.tpl").read_text()
    space = re.search(r"\$space := `([^`]*)`", text).group(1)
    found = re.search(rf"\${name} := (?:printf )?`([^`]*)`", text).group(1)
    found = found.replace("%s", space)
    return re.sub(r"\\x\{([0-9a-fA-F]+)\}", lambda m: "\\U%08x" % int(m.group(1), 16), found)


def _backend_refuses_key(key: str) -> bool:
    """What the backend does with PATHWATCH_HMAC_KEY (instrumentation/identity.py: the environment's
    text as UTF-8, check_key)."""
    from instrumentation.errors import ConfigurationError
    from instrumentation.identity import check_key

    try:
        check_key(key.encode("utf-8"))
    except ConfigurationError:
        return True
    return False


def test_the_chart_refuses_exactly_the_hmac_keys_the_backend_refuses() -> None:
    """The chart's rule was at least 16 characters with a match of \\S, which Go reads as ASCII only:
    sixteen no-break spaces (or U+3000, vertical tabs, U+001C) rendered a key the backend refuses as
    only whitespace, while eight "é" (16 bytes, accepted by the backend) were refused. pathwatch.validate
    now counts UTF-8 bytes (Go's len) and takes Python's whitespace ($space)."""
    import re

    space = re.compile(f"[{_chart_pattern('space')}]*")

    def chart_refuses(key: str) -> bool:
        return len(key.encode("utf-8")) < 16 or space.fullmatch(key) is not None

    candidates = ["0123456789abcdef", "0123456789abcde", " " * 16, "\u00e9" * 8, "\u00e9" * 7 + "e"]
    for code in [*range(1, 0x3100), 0xFEFF, 0xFFFD, 0x1F600, 0x10FFFF]:
        char = chr(code)
        candidates += [char * 16, char * 15, char * 5, f" {char * 15}", f"{char}{' ' * 15}",
                       f"{char}0123456789abcde"]
    differ = [key for key in candidates if chart_refuses(key) != _backend_refuses_key(key)]
    assert not differ, f"chart and backend disagree on {differ[:20]!r}"


@pytest.mark.parametrize("key", ["\u00a0" * 16, "\u3000" * 16, "\v" * 16, "\x1c" * 16, "\u2028" * 16,
                                 " \u00a0\t" * 8])
def test_an_hmac_key_of_unicode_whitespace_is_refused_at_render(helm: Helm, chart: Path, tmp_path: Path,
                                                                key: str) -> None:
    """... naming secrets.hmacKey and never quoting the key; a key of 16 bytes in 8 characters renders."""
    assert _backend_refuses_key(key)
    values = tmp_path / "key.json"   # JSON: the string reaches helm exactly
    values.write_text(json.dumps({"secrets": {"hmacKey": key}}))
    assert_refused_without_the_value(helm.run("template", "pw", chart, "--values", values, check=False),
                                     "secrets.hmacKey", key)
    values.write_text(json.dumps({"secrets": {"hmacKey": "\u00e9" * 8}}))
    assert not _backend_refuses_key("\u00e9" * 8)
    accepted = helm.run("template", "pw", chart, "--values", values, check=False)
    assert accepted.returncode == 0, accepted.stderr


def test_the_chart_refuses_exactly_the_api_tokens_the_sidecar_refuses() -> None:
    """A token of whitespace only, or with a character that is not printable ASCII (a tab inside, an
    "ö", a no-break space), passed the schema and rendered a Secret the sidecar refuses at start: exit 2
    in a crash loop. An empty one is the chart's to generate (sidecar mode) or to refuse (gateway mode).
    The rule is pathwatch.validate's (the schema's message would quote the token)."""
    import re

    source = _chart_pattern("tokenPattern")
    assert source.endswith("$")
    pattern = re.compile(source[:-1] + r"\Z")  # `$`: the end of the text, as in Go
    candidates = ["", "t", "s3cret", "  padded\n", "two words", "~!@#$%^&*()_+{}|:<>?"]
    for code in [*range(0x3100), 0xFEFF, 0xFFFD, 0x1F600, 0x10FFFF]:
        char = chr(code)
        candidates += [char, f"tok{char}en", f"{char}token", f"token{char}", char * 3]
    differ = [value for value in candidates
              if (pattern.search(value) is None) != (value != "" and _sidecar_refuses_token(value))]
    assert not differ, f"chart and sidecar disagree on {differ[:20]!r}"


def test_the_schema_holds_no_content_rule_for_a_secret() -> None:
    """helm 4 quotes a value that a schema pattern (or enum, const, length...) refuses: the secrets
    keep a type only, pathwatch.validate checks their content without quoting them."""
    secrets = json.loads(SCHEMA.read_text())["properties"]["secrets"]["properties"]
    for key in ("apiToken", "hmacKey"):
        assert set(secrets[key]) == {"type", "description"}, key


@pytest.mark.parametrize("mode", ["sidecar", "gateway"])
@pytest.mark.parametrize("token", ["   ", "\t", "t\u00f6ken-0123", "tok\u00a0en", "tok\ten",
                                   "t\u00f6ken-CANARY", "CANARY\u00a0token", "CANARY token\tx", "CANARY\nline"])
def test_an_api_token_the_sidecar_refuses_is_refused_at_render(helm: Helm, chart: Path, tmp_path: Path,
                                                               mode: str, token: str) -> None:
    """... naming secrets.apiToken, and never quoting the token (helm 4 quoted it from the schema)."""
    values = tmp_path / "token.json"   # JSON: the string reaches helm exactly
    values.write_text(json.dumps({"mode": mode, "secrets": {"apiToken": token}}))
    rendered = helm.run("template", "pw", chart, "--values", values, check=False)
    assert_refused_without_the_value(rendered, "secrets.apiToken", token)
    if "\n" not in token:   # --set takes one line
        rendered = helm.run("template", "pw", chart, "--set", f"mode={mode}", "--set-string",
                            f"secrets.apiToken={token}", check=False)
        assert_refused_without_the_value(rendered, "secrets.apiToken", token)
    values.write_text(json.dumps({"mode": mode, "secrets": {"apiToken": f"  {mode}-token 0123 \n"}}))
    accepted = helm.run("template", "pw", chart, "--values", values, check=False)
    assert accepted.returncode == 0, accepted.stderr


PEERS = "config.alerting.alertmanager_url=http://am-0:9093,config.alerting.alertmanager_peers[0]=http://am-1:9093,"


@pytest.mark.parametrize(("setting", "key", "valid"), [
    ("config.alerting.webhook_url=hooks.slack.com/services/T0/B0/CANARY", "config.alerting.webhook_url",
     "config.alerting.webhook_url=https://hooks.slack.com/services/T0/B0/X"),
    ("config.alerting.alertmanager_url=htps://user:CANARY@am:9093", "config.alerting.alertmanager_url",
     "config.alerting.alertmanager_url=https://user:pw@am:9093"),
    ("config.alerting.external_url=ftp://CANARY.example", "config.alerting.external_url",
     "config.alerting.external_url=https://pathwatch.example"),
    (PEERS + "config.alerting.alertmanager_peers[1]=user:CANARY@am-2:9093", "config.alerting.alertmanager_peers[1]",
     PEERS + "config.alerting.alertmanager_peers[1]=http://am-2:9093"),
])
def test_a_refused_alerting_url_is_not_quoted(helm: Helm, chart: Path, setting: str, key: str,
                                              valid: str) -> None:
    """The sidecar never quotes an alerting URL (a webhook's path, a URL's credentials are secrets), but
    the schema's patterns had helm 4 print a refused one in full: pathwatch.validate checks them now,
    naming the key only. Valid URLs still render."""
    rendered = helm.run("template", "pw", chart, "--set", setting, check=False)
    assert_refused_without_the_value(rendered, key, "CANARY")
    accepted = helm.run("template", "pw", chart, "--set", valid, check=False)
    assert accepted.returncode == 0, accepted.stderr


def test_the_schema_holds_no_pattern_for_an_alerting_url() -> None:
    alerting = json.loads(SCHEMA.read_text())["properties"]["config"]["properties"]["alerting"]["properties"]
    for key in ("alertmanager_url", "webhook_url", "external_url"):
        assert "pattern" not in alerting[key], key
    assert "pattern" not in alerting["alertmanager_peers"]["items"]


@pytest.mark.parametrize("key", ["required_events", "terminal_events", "exactly_once_events",
                                 "acting_for_entry_points"])
def test_a_blank_name_the_sidecar_refuses_in_a_rules_list_is_refused_by_the_schema(
        helm: Helm, chart: Path, key: str) -> None:
    """The sidecar refuses a blank event type (`RulesConfig._event_types`) and a blank entry point: rendered, the
    chart's sidecar would exit 2 at start, a crash loop `helm install` did not foresee."""
    rendered = helm.run("template", "pw", chart, "--set-json", f'config.rules.{key}=["x", " "]',
                        check=False)
    assert rendered.returncode != 0 and key in rendered.stderr, rendered.stderr
