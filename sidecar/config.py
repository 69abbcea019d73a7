"""Sidecar configuration: keyword-only, validated models (see docs/sidecar.md for the reference).

Unknown keys are errors; every error names its key. Loading from YAML lives in ``load_config``.
"""

from __future__ import annotations

import base64
import difflib
import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import httpx
import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, Strict, ValidationError, field_validator,
                      model_validator)

from instrumentation.yaml_loader import DuplicateKeyError, UniqueKeyLoader


class ConfigError(ValueError):
    """The sidecar configuration is invalid; the message names the file and key."""


class _Section(BaseModel):
    # no inf/nan: durations become integer nanoseconds, and an infinite one cannot
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _not_a_boolean(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean (YAML reads true, false, yes, no, on and "
                         "off as booleans)")
    return value


#: the largest count any setting takes (a signed 64-bit integer): far beyond any sensible one; a
#: larger one (10**400) passed, then raised OverflowError in every detector's tick, published as a float
MAX_COUNT = 2**63 - 1

# Numbers are numbers: in pydantic's lax mode `max_message_bytes: yes` was 1 and `ttl_s: true` 1.0
# (and "100" or 10.0 an integer). An integer setting takes an integer; a float setting an integer or
# a float.
Int = Annotated[int, Strict(), BeforeValidator(_not_a_boolean), Field(le=MAX_COUNT)]
Float = Annotated[float, Strict(), BeforeValidator(_not_a_boolean)]

_DAY_S = 86400.0
#: the longest duration accepted (a year): far beyond any sensible setting, far below overflow
MAX_DURATION_S = 365 * _DAY_S
#: the shortest ``api.liveness_grace_s``: a pause of the process (the collector, a commit) must not
#: fail liveness
MIN_LIVENESS_GRACE_S = 1.0
#: the most open connections a server may be allowed (2**20): Linux's default ``fs.nr_open``, the
#: most file descriptors a process can be given at all, so a larger cap could never be reached
MAX_OPEN_CONNECTIONS = 1_048_576
#: the longest ``rules.export_retry_window_s``: an OpenTelemetry Collector's exporter gives a refused
#: request up 300 s after its first attempt (``retry_on_failure.max_elapsed_time``, by default), the
#: longest any exporter retries by default. While requests are refused the detectors hold their
#: timed judgements (emits, runs, held findings) up to the window longer, so the state tables fill
#: that much sooner and findings come that much later
MAX_EXPORT_RETRY_WINDOW_S = 300.0


def _check_endpoint(value: str) -> str:
    """``HOST:PORT`` to listen on: HOST an IPv4 address, an IPv6 address in brackets or a host name;
    PORT 0..65535 (0: any free port). Checked here, so that a malformed one is exit code 2 naming
    its key, not a failure to bind (exit code 1) or, for gRPC, a bind to another address."""
    if value == "":
        return value
    if "://" in value:
        hostport = value.partition("://")[2].partition("/")[0]
        raise ValueError(f"expected HOST:PORT, not a URL: write {hostport!r} (no scheme, no path)")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()):
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}: the port {int(port)} is not in 0..65535")
    problem = _host_problem(host)
    if problem:
        raise ValueError(f"expected HOST:PORT, got {value!r}: {problem}")
    return value


def _host_problem(host: str) -> str | None:
    if host.startswith("[") or host.endswith("]"):
        if not (host.startswith("[") and host.endswith("]") and _is_ipv6_address(host[1:-1])):
            return "brackets hold an IPv6 address, as in [::1]:4317"
        return None
    if ":" in host:  # gRPC reads ::1:4317 as [::0.1.0.0]:443
        return (f"an IPv6 address goes in brackets: [{host}]:PORT" if _is_ipv6_address(host) else
                f"the host {host!r} is not an IP address or a host name")
    if re.fullmatch(r"[0-9.]+", host):
        return None if _is_ip_address(host) else f"{host!r} is not an IPv4 address"
    if not _HOSTNAME.fullmatch(host):
        return f"the host {host!r} is not an IP address or a host name"
    return None


def _is_ipv6_address(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def is_loopback_endpoint(endpoint: str) -> bool:
    host = endpoint.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_HOSTNAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?")
_URL_FORM = "http(s)://HOST[:PORT][/PATH]"
_HOST_CHARS = re.compile(r"[A-Za-z0-9_.-]*")


def _check_http_url(value: str) -> str:
    """An http(s) URL with a host and a valid port, as httpx reads it: checked at start, not at the
    first page. The message quotes at most the scheme, host or port, never the URL: credentials and a
    webhook's path (``/services/T0/B0/TOKEN``) are secrets."""
    if value == "":
        return value
    try:
        url = httpx.URL(value)
        host = url.raw_host.decode("ascii")
    except UnicodeError:  # a non-ASCII character where IDNA does not apply (an IPv6 zone), or a
        # byte that is not UTF-8 anywhere (os.environ's surrogate escape): the codec's message would
        # quote it
        if any("\ud800" <= char <= "\udfff" for char in value):
            raise ValueError(f"expected {_URL_FORM}, got a byte that is not UTF-8 (not quoted)") from None
        raise ValueError(f"expected {_URL_FORM}, got a host (not quoted) with a non-ASCII character "
                         "outside a host name") from None
    except (httpx.InvalidURL, ValueError) as exc:  # ValueError: a bad IDNA host
        # "Invalid port: 's3cret'" (http://user:s3cret/ without @host): the part after ":" quotes it
        raise ValueError(f"expected {_URL_FORM}: {str(exc).partition(':')[0]}") from None
    if url.scheme not in ("http", "https"):
        got = f"the scheme {url.scheme!r}" if url.scheme else "no scheme"
        raise ValueError(f"expected {_URL_FORM}, got {got}")
    if not host:
        raise ValueError(f"expected {_URL_FORM}, got no host")
    if not _is_ip_address(host) and not _HOSTNAME.fullmatch(host):
        # quoted only when it holds nothing but a host name's characters: httpx takes a path written
        # with backslashes or an escaped "/" (%2F) for part of the host, the webhook's secret with it
        shown = f"the host {host!r}" if _HOST_CHARS.fullmatch(host) else "a host (not quoted)"
        raise ValueError(f"expected {_URL_FORM}, got {shown}: not a host name")
    if url.port is not None and not 1 <= url.port <= 65535:
        raise ValueError(f"expected {_URL_FORM}, got the port {url.port}: not in 1..65535")
    return value


def _has_userinfo(url: str) -> bool:
    """The URL (valid: ``_check_http_url``) carries a user or a password before its host."""
    return bool(httpx.URL(url).userinfo)


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class ReceiverConfig(_Section):
    grpc_endpoint: str = "127.0.0.1:4317"
    http_endpoint: str = "127.0.0.1:4318"
    max_message_bytes: Int = Field(4 * 1024 * 1024, gt=0, le=2**31 - 1)  # gRPC takes an int32
    max_pending_spans: Int = Field(200_000, gt=0)
    # spans (and resource/scope entries) in one request at most; more: refused whole before they
    # are parsed (RESOURCE_EXHAUSTED without RetryInfo / 413), whatever the pending-span budget
    max_spans_per_request: Int = Field(65_536, gt=0)
    # OTLP/JSON: attributes, events and links (of spans, scopes and resources, an event's or link's
    # attributes, array and kvlist values and entity refs included) in one request at most; more:
    # refused whole before the conversion, as above (protobuf bodies are not counted: their view
    # keeps attributes as raw bytes)
    max_attributes_per_request: Int = Field(524_288, gt=0)
    # a request's body must have arrived this long after the receiver took it up (HTTP 408, gRPC
    # CANCELLED): a stalled upload must not hold a receiver's slot for ever; an OTLP/HTTP request
    # head, this long after its connection opened or its previous response (else it is closed)
    read_timeout_s: Float = Field(30.0, gt=0, le=MAX_DURATION_S)
    # open connections each server serves at most; one beyond is closed at once (gRPC: the client
    # sees UNAVAILABLE; OTLP/HTTP: unanswered, counted). A gateway needs one per exporting pod
    grpc_max_connections: Int = Field(1024, gt=0, le=MAX_OPEN_CONNECTIONS)
    http_max_connections: Int = Field(1024, gt=0, le=MAX_OPEN_CONNECTIONS)

    _endpoints = field_validator("grpc_endpoint", "http_endpoint")(_check_endpoint)


_PLAIN_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def shown_env_name(name: str) -> str:
    """The name of an environment variable as a message may quote it: one of letters, digits and
    "_" (the portable names) is shown; another in words that do not show it — a webhook URL or a
    secret written by mistake in a ``*_env`` key (the place of its variable's name) must not reach
    a log or a terminal's scrollback (the Helm chart's refusals word it the same way)."""
    if _PLAIN_ENV_NAME.match(name):
        return name
    return ("(its name is not shown here: it is not only letters, digits and '_'; was a URL or a "
            "secret given in its place?)")


def _check_env_name(value: str) -> str:
    """The name of an environment variable: os.environ takes no "=" or NUL in one."""
    if "=" in value or "\0" in value:
        raise ValueError("expected the name of an environment variable, got one holding '=' or NUL "
                         "(not shown here: was a URL or a secret given in its place?)")
    return value


class ApiConfig(_Section):
    endpoint: str = "127.0.0.1:9464"
    token_env: str = "PATHWATCH_API_TOKEN"
    # with a token set, /metrics is open by default (as Prometheus exporters are); true: it needs it too
    metrics_requires_token: bool = False
    # open connections at most (Prometheus, probes, the report and scripts need far fewer); a
    # request head must arrive this long after its connection opened or its previous response
    max_connections: Int = Field(256, gt=0, le=MAX_OPEN_CONNECTIONS)
    head_timeout_s: Float = Field(10.0, gt=0, le=MAX_DURATION_S)
    # /healthz answers 503 once the pipeline thread has been inside one step (a batch, a tick) this
    # long (sidecar/liveness.py): long enough that a GC pause, a slow commit or a large merged batch
    # never restarts the sidecar; under a second, they would
    liveness_grace_s: Float = Field(60.0, ge=MIN_LIVENESS_GRACE_S, le=MAX_DURATION_S)

    _endpoint = field_validator("endpoint")(_check_endpoint)

    @field_validator("token_env")
    @classmethod
    def _token_env(cls, value: str) -> str:
        # "" looked up no variable: the token was silently none (and a public endpoint refused)
        if not value:
            raise ValueError("expected the name of an environment variable (default PATHWATCH_API_TOKEN), "
                             "got ''")
        return _check_env_name(value)


class RulesConfig(_Section):
    required_events: tuple[str, ...] = (
        "agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed")
    terminal_events: tuple[str, ...] = ("agent_completed", "agent_error")
    exactly_once_events: tuple[str, ...] = ("agent_started", "agent_completed")
    delivery_deadline_s: Float = Field(2.0, gt=0, le=MAX_DURATION_S)
    # how much longer than the deadline the sidecar waits, on its own clock, for an emit's writes
    # (a no-socket dispatch's queued write, a duplicate write's emit) to arrive (the backend's export schedule: the SDK's BatchSpanProcessor exports every 5 s);
    # whether a write was in time is judged on the backend's span times (docs/rules.md)
    delivery_export_allowance_s: Float = Field(6.0, ge=0, le=MAX_DURATION_S)
    # how long after an overload refusal (RESOURCE_EXHAUSTED / 429) the exporter's retry may still
    # bring the spans a timed judgement (an emit's deadline, a run's idle time, a hold) that ended
    # by then waits for: the Python SDK exporter's 10 s timeout; a Collector in front retries longer
    # (docs/sidecar.md, The detectors' clock). 0: no judgement waits for a retry
    export_retry_window_s: Float = Field(10.0, ge=0, le=MAX_EXPORT_RETRY_WINDOW_S)
    run_idle_s: Float = Field(1.0, gt=0, le=MAX_DURATION_S)
    # bleed.leaked_context: a span starting at most this long after its request's end is not leaked
    # (spans are stamped by different clocks); 0 = exact
    leaked_context_tolerance_ms: Float = Field(5.0, ge=0, le=MAX_DURATION_S * 1e3)
    # bleed: entry points (route templates as spans carry them, or globs of them) whose requests act
    # for other users by design (support and admin tools): owner and subject are not compared with
    # the ambient user there, nor is that user counted among a user-scoped instance's users
    acting_for_entry_points: tuple[str, ...] = ()
    disabled: tuple[str, ...] = ()

    @field_validator("required_events", "terminal_events", "exactly_once_events")
    @classmethod
    def _event_types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # no span carries a blank event type: a required one would fail every run
        if any(not event_type.strip() for event_type in value):
            raise ValueError("an event type is a name (agent_started), not blank")
        return value

    @field_validator("acting_for_entry_points")
    @classmethod
    def _entry_points(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not entry_point.strip() for entry_point in value):
            raise ValueError("an entry point is a route template (/admin/users/{user_id}/runs) or "
                             "a glob of them (/admin/*), not empty")
        return value

    @field_validator("disabled")
    @classmethod
    def _known_rules(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from sidecar.rules import CATALOG

        unknown = [rule for rule in value if rule not in CATALOG]
        if unknown:
            raise ValueError(f"unknown rule id(s) {unknown}; known: {sorted(CATALOG)}")
        return value


class StateConfig(_Section):
    ttl_s: Float = Field(300.0, gt=0, le=MAX_DURATION_S)
    max_traces: Int = Field(200_000, gt=0)
    max_runs: Int = Field(100_000, gt=0)
    max_events: Int = Field(400_000, gt=0)
    max_instances: Int = Field(100_000, gt=0)
    max_connections: Int = Field(100_000, gt=0)


class IncidentsConfig(_Section):
    path: str = "pathwatch-incidents.sqlite"
    sample_trace_ids: Int = Field(10, gt=0, le=1000)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        # SQLite opens "" as a private temporary database: every incident lost at the next restart
        if not value:
            raise ValueError("expected the incident database's file, or ':memory:' for none, got ''")
        return value


class ConsolidationConfig(_Section):
    """The consolidation workflow at run time (docs/consolidation.md)."""

    safe_to_delete_window_s: Float = Field(14 * _DAY_S, gt=0, le=10 * MAX_DURATION_S)  # zero calls this long -> deletable
    path_idle_s: Float = Field(5.0, gt=0, le=MAX_DURATION_S)  # a run's path is judged after this idle (or at its request's end)
    max_paths_per_entry_point: Int = Field(32, gt=0)
    max_versions: Int = Field(16, ge=2)
    min_runs_per_version: Int = Field(20, gt=0)  # runs per entry point before versions are compared
    regression_floor: Float = Field(0.05, ge=0)  # findings per run a rate must rise by, at least
    regression_factor: Float = Field(0.5, ge=0)  # ... or this fraction of the previous rate


class AlertingConfig(_Section):
    alertmanager_url: str = ""
    # the other instances of an Alertmanager cluster: every alert goes to each, as Prometheus sends
    alertmanager_peers: tuple[str, ...] = ()
    webhook_url: str = ""
    # the name of an environment variable holding the webhook URL (a Slack URL's path is its secret,
    # which a config file or a ConfigMap should not hold); read at start (``from_environment``)
    webhook_url_env: str = ""
    # credentials for Alertmanager (alertmanager_url and its peers alike), as Prometheus's
    # alertmanager_config has them, kept out of the URL (a config file or a ConfigMap has a wide
    # audience): basic auth, a username and the environment variable holding its password; or the
    # environment variable holding a bearer token (an authenticating proxy in front). Read at start
    # (``from_environment``), never written to a log
    alertmanager_username: str = ""
    alertmanager_password_env: str = ""
    alertmanager_bearer_token_env: str = ""
    min_severity: str = "critical"
    max_per_minute: Int = Field(60, gt=0)
    retry_attempts: Int = Field(5, ge=0, le=30)
    retry_backoff_s: Float = Field(0.5, ge=0, le=3600)
    # an alert stays firing in Alertmanager this long after the incident's last finding
    resolve_after_s: Float = Field(900.0, gt=0, le=MAX_DURATION_S)
    external_url: str = ""

    @field_validator("min_severity")
    @classmethod
    def _severity(cls, value: str) -> str:
        if value not in ("critical", "warning", "info"):
            raise ValueError("expected one of critical, warning, info")
        return value

    _urls = field_validator("alertmanager_url", "webhook_url", "external_url")(_check_http_url)

    _env_names = field_validator("webhook_url_env", "alertmanager_password_env",
                                 "alertmanager_bearer_token_env")(_check_env_name)
    # the Authorization header's value for Alertmanager, made by ``from_environment``: not a field
    # (neither in a config file nor in a dump or repr of the config)
    _alertmanager_authorization: str | None = PrivateAttr(None)

    @field_validator("alertmanager_username")
    @classmethod
    def _username(cls, value: str) -> str:
        if ":" in value or any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise ValueError("a basic-auth username holds no ':' and no control character")
        return value

    @field_validator("alertmanager_peers")
    @classmethod
    def _peers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for index, url in enumerate(value):
            if not url:
                raise ValueError(f"[{index}]: expected {_URL_FORM}, got an empty string")
            try:
                _check_http_url(url)
            except ValueError as exc:
                raise ValueError(f"[{index}]: {exc}") from None
        return value

    @model_validator(mode="after")
    def _peers_need_a_url(self) -> AlertingConfig:
        if self.alertmanager_peers and not self.alertmanager_url:
            raise ValueError("alertmanager_peers: set alertmanager_url too (the first instance)")
        if self.webhook_url and self.webhook_url_env:
            raise ValueError("webhook_url and webhook_url_env are both set: give the webhook's URL in "
                             "one of them (webhook_url_env names the environment variable holding it)")
        if bool(self.alertmanager_username) != bool(self.alertmanager_password_env):
            raise ValueError("alertmanager_username and alertmanager_password_env go together (basic "
                             "auth: the username, and the environment variable holding its password)")
        if self.alertmanager_username and self.alertmanager_bearer_token_env:
            raise ValueError("alertmanager_username and alertmanager_bearer_token_env are both set: "
                             "Alertmanager takes basic auth or a bearer token, not both")
        if self.alertmanager_username or self.alertmanager_bearer_token_env:
            if not self.alertmanager_url:
                raise ValueError("Alertmanager credentials are set but alertmanager_url is not")
            for key, url in (("alertmanager_url", self.alertmanager_url),
                             *((f"alertmanager_peers[{i}]", peer)
                               for i, peer in enumerate(self.alertmanager_peers))):
                if _has_userinfo(url):
                    raise ValueError(f"{key} holds credentials too: give them in one place, "
                                     "alertmanager_username / alertmanager_password_env or "
                                     "alertmanager_bearer_token_env")
        return self

    @property
    def alertmanager_authorization(self) -> str | None:
        """The ``Authorization`` header's value for every Alertmanager instance (None: none), once
        ``from_environment`` has read the credentials."""
        return self._alertmanager_authorization

    def from_environment(self, environ: Mapping[str, str]) -> AlertingConfig:
        """This section with ``webhook_url`` read from the variable ``webhook_url_env`` names (itself
        when it names none), and Alertmanager's credentials read from the variable
        ``alertmanager_password_env`` or ``alertmanager_bearer_token_env`` names (into
        ``alertmanager_authorization``). Surrounding whitespace is stripped (a secret mounted from a
        file often ends in a newline); then the URL is checked as ``webhook_url`` is. Raises
        ``ConfigError`` naming the key and the variable, never the URL or the secret: unset, empty or
        unusable, a configured sink would page nobody (Alertmanager would answer 401)."""
        resolved = self._with_webhook_url(environ)
        authorization = self._read_alertmanager_authorization(environ)
        if authorization is not None:
            resolved = resolved.model_copy()
            resolved._alertmanager_authorization = authorization
        return resolved

    def _read_alertmanager_authorization(self, environ: Mapping[str, str]) -> str | None:
        """Raises ``ConfigError`` naming the key and the variable (never the secret) when it is
        unset, empty or holds what no HTTP header can carry."""
        if self.alertmanager_username:
            key, name = "alertmanager_password_env", self.alertmanager_password_env
        elif self.alertmanager_bearer_token_env:
            key, name = "alertmanager_bearer_token_env", self.alertmanager_bearer_token_env
        else:
            return None
        secret = environ.get(name, "").strip()  # a secret mounted from a file often ends in a newline
        given, name = name in environ, shown_env_name(name)
        if not secret:
            raise ConfigError(f"alerting.{key}: the environment variable {name} is "
                              f"{'empty' if given else 'not set'}: set it, or remove the "
                              "Alertmanager credentials")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in secret):
            raise ConfigError(f"alerting.{key}: the environment variable {name} holds a control "
                              "character, which no HTTP header carries")
        if self.alertmanager_username:
            # RFC 7617, UTF-8; a password whose bytes are not UTF-8 (os.environ holds them as
            # surrogate escapes) goes as the variable's bytes, as Alertmanager's bcrypt compares bytes
            pair = f"{self.alertmanager_username}:{secret}".encode("utf-8", "surrogateescape")
            return "Basic " + base64.b64encode(pair).decode("ascii")
        if not secret.isascii():
            raise ConfigError(f"alerting.{key}: the environment variable {name} holds a character "
                              "that is not ASCII: a bearer token is ASCII (RFC 6750)")
        if " " in secret:
            # "Bearer <token>" pasted whole would go out as "Bearer Bearer <token>" (401); a token
            # (RFC 6750 b64token) has no space
            scheme = secret.split(" ", 1)[0].lower() == "bearer"
            raise ConfigError(f"alerting.{key}: the environment variable {name} holds a space, which "
                              "a bearer token does not (RFC 6750)" + (
                                  ": it begins with the scheme 'Bearer', which the sidecar writes "
                                  "itself; give the token alone" if scheme else ""))
        return f"Bearer {secret}"

    def _with_webhook_url(self, environ: Mapping[str, str]) -> AlertingConfig:
        name = self.webhook_url_env
        if not name:
            return self
        url = environ.get(name, "").strip()
        given, name = name in environ, shown_env_name(name)
        if not url:
            raise ConfigError(f"alerting.webhook_url_env: the environment variable {name} is "
                              f"{'empty' if given else 'not set'}: set it to the webhook's URL, "
                              "or leave alerting.webhook_url_env empty for no webhook")
        try:
            _check_http_url(url)
        except ValueError as exc:
            raise ConfigError(f"alerting.webhook_url_env: the environment variable {name}: {exc}") from None
        return self.model_copy(update={"webhook_url": url, "webhook_url_env": ""})


class LoggingConfig(_Section):
    level: str = "info"
    format: Literal["text", "json"] = "text"  # json: one JSON object per line (sidecar.jsonlog)

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("expected one of debug, info, warning, error")
        return value.lower()


class SidecarConfig(_Section):
    receiver: ReceiverConfig = ReceiverConfig()
    api: ApiConfig = ApiConfig()
    rules: RulesConfig = RulesConfig()
    state: StateConfig = StateConfig()
    incidents: IncidentsConfig = IncidentsConfig()
    consolidation: ConsolidationConfig = ConsolidationConfig()
    alerting: AlertingConfig = AlertingConfig()
    logging: LoggingConfig = LoggingConfig()


def parse_config(data: object, source: str = "<config>") -> SidecarConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    # a section whose keys are all commented out is YAML's null: its defaults, as one left out
    data = {key: {} if value is None and key in SidecarConfig.model_fields else value
            for key, value in data.items()}
    try:
        return SidecarConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {_problem(err)}" for err in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from None


def _problem(err: Mapping) -> str:
    """pydantic's message, in the words of the config file: an unknown key says so, with the key
    of its section it is nearest to (``rules.required_event``: did you mean rules.required_events?)
    or else the section's keys, as pydantic's "Extra inputs are not permitted" did not."""
    if err["type"] in ("tuple_type", "list_type"):  # pydantic: "Input should be a valid tuple"
        got = {str: "a string", dict: "a mapping"}.get(type(err.get("input")), "a single value")
        # the value is not quoted: alerting.alertmanager_peers' URLs may hold credentials
        return f"expected a list, got {got}: write it as a YAML list, in brackets: [a, b]"
    if err["type"] == "model_type":  # pydantic: "... a valid dictionary or instance of StateConfig"
        got = {str: "a string", list: "a list"}.get(type(err.get("input")), "a single value")
        return f"expected a mapping of its keys, got {got}"
    if err["type"] != "extra_forbidden":
        return str(err["msg"]).removeprefix("Value error, ")
    *section, key = err["loc"]
    model: type[BaseModel] | None = SidecarConfig
    for part in section:
        field = model.model_fields.get(part) if model is not None else None
        annotation = field.annotation if field is not None else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if model is None:
        return "unknown key"
    keys = list(model.model_fields)
    near = difflib.get_close_matches(str(key), keys, n=1)
    if near:
        return f"unknown key; did you mean {'.'.join([*map(str, section), near[0]])}?"
    return f"unknown key; {'.'.join(map(str, section)) or 'the top level'} takes: {', '.join(keys)}"


class _ConfigLoader(UniqueKeyLoader):
    """``UniqueKeyLoader`` that also reads a number with an exponent and no dot (``1e3``, ``1e-7``) as
    a float, as YAML 1.2 and JSON do: YAML 1.1 reads it as a string, which the number settings refuse
    ("Input should be a valid number"), and the Helm chart writes sidecar.yaml as JSON, in which Go's
    encoder writes a float below 1e-6 that way."""


_ConfigLoader.add_implicit_resolver(  # copies the base class's resolvers first: theirs stay as they are
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_config(path: str | Path) -> SidecarConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): a YAML config file is "
                          "expected") from None
    try:
        data = yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader
    except DuplicateKeyError as exc:
        # yaml.safe_load keeps the last one: a second ``alerting:`` would replace the first unseen
        key = ".".join(str(part) for part in exc.key_path)
        raise ConfigError(f"{path}: line {exc.problem_mark.line + 1}: {key} is given twice (first on "
                          f"line {exc.first_mark.line + 1}) and YAML keeps only the last: merge them into "
                          "one") from None
    except yaml.YAMLError as exc:
        # YAML's own message quotes the line it stopped on (its snippet): a webhook URL's secret
        # path or a URL's password with it. Its problem and its place only
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{path}: {where}not valid YAML: {problem}") from None
    return parse_config(data, str(path))
