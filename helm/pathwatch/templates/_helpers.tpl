{{/*
Every helper takes the pathwatch chart's context: `.` inside this chart, `.Subcharts.pathwatch` from a
parent chart. Names come from the values and the release, never from the including chart, so a parent's
pod and this chart's ConfigMap/Secret/Service agree on them.
*/}}

{{- define "pathwatch.name" -}}
{{- default "pathwatch" .Values.nameOverride | trunc 52 | trimSuffix "-" -}}
{{- end -}}

{{/* 52 characters leave room for the longest suffix ("-dashboard-consolidation" is cut below). */}}
{{- define "pathwatch.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "pathwatch.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "pathwatch.labels" -}}
helm.sh/chart: {{ printf "pathwatch-%s" .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "pathwatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ include "pathwatch.versionLabel" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pathwatch
{{- end -}}

{{/* The image's version as a label value (at most 63 characters of letters, digits, "-", "_" and ".",
beginning and ending with a letter or digit, or the API server refuses the object): image.tag without
a digest it is pinned to ("0.1.0@sha256:..." is a valid image reference, not a label value), other
characters as "_", cut to 63. */}}
{{- define "pathwatch.versionLabel" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag | toString | splitList "@" | first -}}
{{- regexReplaceAll "[^-A-Za-z0-9_.]" $tag "_" | trunc 63 | trimAll "-_." -}}
{{- end -}}

{{- define "pathwatch.gatewaySelectorLabels" -}}
app.kubernetes.io/name: {{ include "pathwatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end -}}

{{/* Labels to put on the backend pods: the Service, PodMonitor and NetworkPolicy select them. */}}
{{- define "pathwatch.backendPodLabels" -}}
{{- if .Values.backendSelector -}}
{{- toYaml .Values.backendSelector -}}
{{- else -}}
pathwatch.io/backend: {{ include "pathwatch.fullname" . }}
{{- end -}}
{{- end -}}

{{- define "pathwatch.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "pathwatch.configMapName" -}}
{{- printf "%s-config" (include "pathwatch.fullname" .) -}}
{{- end -}}

{{- define "pathwatch.secretName" -}}
{{- default (include "pathwatch.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* The key of the alert webhook's URL in the Secret the sidecar reads, or nothing when the URL does not
come from a Secret: secrets.webhookUrl is kept in the chart's Secret (under secrets.webhookUrlKey, else
webhook-url); with secrets.existingSecret, secrets.webhookUrlKey names the key of that Secret.
`helm upgrade --reuse-values` renders with the values of the release's chart, where a key added since
is missing (nil): nil printed by an include is "<no value>", not nothing, and nil is not a string to
regexMatch, hence `default ""` on these keys. */}}
{{- define "pathwatch.webhookUrlKey" -}}
{{- if .Values.secrets.existingSecret -}}
{{- .Values.secrets.webhookUrlKey | default "" -}}
{{- else if .Values.secrets.webhookUrl -}}
{{- .Values.secrets.webhookUrlKey | default "webhook-url" -}}
{{- end -}}
{{- end -}}

{{/* The keys of Alertmanager's password and bearer token in the Secret the sidecar reads, or nothing,
as pathwatch.webhookUrlKey: secrets.alertmanagerPassword / alertmanagerBearerToken are kept in the
chart's Secret (under secrets.alertmanagerPasswordKey / alertmanagerBearerTokenKey, else
alertmanager-password / alertmanager-bearer-token); with secrets.existingSecret, those keys name the
keys of that Secret. `default ""`: nil with `helm upgrade --reuse-values` (pathwatch.webhookUrlKey). */}}
{{- define "pathwatch.alertmanagerPasswordKey" -}}
{{- if .Values.secrets.existingSecret -}}
{{- .Values.secrets.alertmanagerPasswordKey | default "" -}}
{{- else if .Values.secrets.alertmanagerPassword -}}
{{- .Values.secrets.alertmanagerPasswordKey | default "alertmanager-password" -}}
{{- end -}}
{{- end -}}

{{- define "pathwatch.alertmanagerBearerTokenKey" -}}
{{- if .Values.secrets.existingSecret -}}
{{- .Values.secrets.alertmanagerBearerTokenKey | default "" -}}
{{- else if .Values.secrets.alertmanagerBearerToken -}}
{{- .Values.secrets.alertmanagerBearerTokenKey | default "alertmanager-bearer-token" -}}
{{- end -}}
{{- end -}}

{{- define "pathwatch.pathmapConfigMapName" -}}
{{- default (printf "%s-pathmap" (include "pathwatch.fullname" .)) .Values.pathmap.existingConfigMap -}}
{{- end -}}

{{- define "pathwatch.hasPathmap" -}}
{{- if or .Values.pathmap.existingConfigMap .Values.pathmap.content -}}true{{- end -}}
{{- end -}}

{{- define "pathwatch.claimName" -}}
{{- printf "%s-incidents" (include "pathwatch.fullname" .) -}}
{{- end -}}

{{- define "pathwatch.isGateway" -}}
{{- if eq .Values.mode "gateway" -}}true{{- end -}}
{{- end -}}

{{/* Gateway mode with persistence runs as a StatefulSet: one incident store (claim) per replica. */}}
{{- define "pathwatch.gatewayIsStatefulSet" -}}
{{- if and (eq .Values.mode "gateway") .Values.persistence.enabled -}}true{{- end -}}
{{- end -}}

{{/* What the sidecar would refuse in an alerting URL (sidecar/config.py _check_http_url, on httpx's
parser, httpx/_urlparse.py), in words that never quote it: a URL's credentials and a webhook's path
(/services/T0/B0/TOKEN) are secrets. Empty when the sidecar takes it; "no URL" for "". Sprig's urlParse
is not used: Go's parser differs from httpx's, and its error quotes the whole URL. The regular expressions
follow httpx's (Go's regexp picks the submatches Python's does): the authority is what follows "//" up to
"/", "?" or "#"; in it the host follows the last "@" and ends at ":" (or is [IPv6]), the port is the
rest. Stricter than the sidecar on purpose, and only there: a host with a non-ASCII character is refused
(the sidecar encodes one with IDNA 2008, which a template cannot run: a host it refuses would render and
the sidecar exit 2 at start), asking for its ASCII (xn--...) form, which both check alike (one with an
ASCII character no host name holds is "not a host name", as IDNA refuses it too); and a port written
with a sign, spaces, "_" or non-ASCII digits (int() takes them). tests/helm/test_alerting_urls.py
compares the verdicts with _check_http_url's. */}}
{{- define "pathwatch.httpUrlProblem" -}}
{{- $url := . -}}
{{- $octet := `(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])` -}}
{{- $ipv4 := printf `%s(\.%s){3}` $octet $octet -}}
{{- $h := `[0-9A-Fa-f]{1,4}` -}}
{{- $ls32 := printf `(%s:%s|%s)` $h $h $ipv4 -}}
{{- $ipv6 := printf `((%s:){6}%s|::(%s:){5}%s|(%s)?::(%s:){4}%s|((%s:){0,1}%s)?::(%s:){3}%s|((%s:){0,2}%s)?::(%s:){2}%s|((%s:){0,3}%s)?::%s:%s|((%s:){0,4}%s)?::%s|((%s:){0,5}%s)?::%s|((%s:){0,6}%s)?::)` $h $ls32 $h $ls32 $h $h $ls32 $h $h $h $ls32 $h $h $h $ls32 $h $h $h $ls32 $h $h $ls32 $h $h $h $h $h -}}
{{- $authorityForm := `^(?:.*@)?(\[.*\]|[^:@]*):?(.*)$` -}}
{{- $problem := "" -}}
{{- if not $url -}}{{- $problem = "no URL" -}}
{{- else if gt (len $url) 65536 -}}{{- $problem = "a URL longer than 65536 characters" -}}
{{- else if regexMatch `[\x00-\x1f\x7f]` $url -}}{{- $problem = "a control character (a tab or a line break, say)" -}}
{{- else if not (regexMatch `^[A-Za-z][A-Za-z0-9+.-]*:` $url) -}}{{- $problem = "no scheme" -}}
{{- else if not (regexMatch `^[hH][tT][tT][pP][sS]?:` $url) -}}{{- $problem = "a scheme other than http or https" -}}
{{- else -}}
{{- $authority := regexReplaceAll `^[A-Za-z]+:(//([^/?#]*))?.*$` $url "${2}" -}}
{{- $host := regexReplaceAll $authorityForm $authority "${1}" -}}
{{- $port := regexReplaceAll $authorityForm $authority "${2}" -}}
{{- $notAHost := "a host that is not a host name (letters, digits, \"_\", \".\" and \"-\") or an IP address" -}}
{{- if not $host -}}{{- $problem = "no host" -}}
{{- else if regexMatch `^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$` $host -}}
{{- if not (regexMatch (printf `^%s$` $ipv4) $host) -}}{{- $problem = "a host that is not an IPv4 address (four numbers in 0..255, without leading zeros)" -}}{{- end -}}
{{- else if regexMatch `^\[.*\]$` $host -}}
{{- if not (regexMatch (printf `^\[%s(%%[^%%]+)?\]$` $ipv6) $host) -}}{{- $problem = "brackets that do not hold an IPv6 address" -}}
{{- else if not (regexMatch `^[\x00-\x7f]*$` $host) -}}{{- $problem = "an IPv6 zone with a non-ASCII character" -}}
{{- end -}}
{{- else if regexMatch `^[\x00-\x7f]*$` $host -}}
{{- if not (regexMatch `^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_.])?$` $host) -}}{{- $problem = $notAHost -}}{{- end -}}
{{- else if regexMatch `[\x00-\x2c\x2f\x3a-\x40\x5b-\x5e\x60\x7b-\x7f]` $host -}}{{- $problem = $notAHost -}}
{{- else -}}{{- $problem = "a host with a non-ASCII character" -}}
{{- end -}}
{{- $digits := regexReplaceAll `^0+` $port "" -}}
{{- if or $problem (not $port) -}}
{{- else if not (regexMatch `^[0-9]+$` $port) -}}{{- $problem = "a port that is not a number (digits only)" -}}
{{- else if or (gt (len $digits) 5) (lt (atoi $digits) 1) (gt (atoi $digits) 65535) -}}{{- $problem = "a port not in 1..65535" -}}
{{- end -}}
{{- end -}}
{{- $problem -}}
{{- end -}}

{{/* Why pathwatch.validate refuses an alerting URL, after pathwatch.httpUrlProblem's words: the sidecar
refuses all of them but a non-ASCII host, which it may take (IDNA 2008 decides, which a template cannot
run), so the chart asks for the host's ASCII form, which both check alike. */}}
{{- define "pathwatch.httpUrlWhy" -}}
{{- if eq . "a host with a non-ASCII character" -}}
the sidecar checks a non-ASCII host with IDNA 2008, which the chart cannot, and exits 2 at start if IDNA refuses it: give the host in its ASCII (IDNA, xn--...) form
{{- else -}}
the sidecar would refuse it at start (exit 2)
{{- end -}}
{{- end -}}

{{/* "true" when an alerting URL (one pathwatch.httpUrlProblem takes) carries credentials before its
host, as the sidecar reads them (sidecar/config.py _has_userinfo: httpx's userinfo, what precedes the
last "@" of the authority, not empty); else nothing. */}}
{{- define "pathwatch.httpUrlHasUserinfo" -}}
{{- $authority := regexReplaceAll `^[A-Za-z]+:(//([^/?#]*))?.*$` . "${2}" -}}
{{- if regexReplaceAll `^(?:(.*)@)?(\[.*\]|[^:@]*):?(.*)$` $authority "${1}" -}}true{{- end -}}
{{- end -}}

{{/* What the sidecar would refuse in Alertmanager's password or bearer token as its variable holds it
(sidecar/config.py _read_alertmanager_authorization), in words that never quote it: takes (dict "value"
<the variable's value> "bearer" <true for a bearer token>); empty when the sidecar takes it. The sidecar
strips the surrounding whitespace (Python's, pathwatch.validate's $space) first. */}}
{{- define "pathwatch.alertmanagerSecretProblem" -}}
{{- $space := `\t\n\v\f\r\x1c-\x1f \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}` -}}
{{- $secret := regexReplaceAll (printf `^[%s]+|[%s]+$` $space $space) (.value | default "" | toString) "" -}}
{{- if not $secret -}}nothing, or only whitespace (which the sidecar strips)
{{- else if regexMatch `[\x00-\x1f\x7f]` $secret -}}a control character (a tab or a line break inside, say), which no HTTP header carries
{{- else if and .bearer (not (regexMatch `^[\x00-\x7f]*$` $secret)) -}}a character that is not ASCII (a bearer token is ASCII, RFC 6750)
{{- else if and .bearer (regexMatch `(?i)^bearer ` $secret) -}}a space: it begins with the scheme 'Bearer', which the sidecar writes itself; give the token alone
{{- else if and .bearer (contains " " $secret) -}}a space, which a bearer token does not (RFC 6750)
{{- end -}}
{{- end -}}

{{/*
Refuses a null (or missing) value the chart cannot render without, naming it, before any template reads
it: helm drops a key set to null (a values file's `sidecar: null`, `--set sidecar=null`) together with
the chart's defaults under it, so `.Values.sidecar.native` stopped the render on "nil pointer evaluating
interface {}.native", a null port rendered `127.0.0.1:<nil>`, a null image.repository
`%!s(<nil>):0.1.0`.
Every template includes it first (helm renders them in an order of its own and stops at the first
error). Null stays a value where it means something: `livenessProbe` / `readinessProbe`, `resources`,
`securityContext`, `podSecurityContext` left out; `config` and its sections, `pathmap.content`,
`backendSelector`, `imagePullSecrets`, the annotation and label maps, the names: none given (README
"Null values"). The schema refuses null for the values below in a file checked as written (an editor,
check-jsonschema), where it cannot see helm's dropped keys. `helm upgrade --reuse-values` of a release
whose chart lacked one of them is refused alike. tests/helm/test_null_values.py sets each key of
values.yaml, and each one below it, to null.
*/}}
{{- define "pathwatch.requireValues" -}}
{{- $sections := list "image" "ports" "secrets" "pathmap" "persistence" "sidecar" "gateway" "gateway.service"
      "service" "monitoring" "prometheusRule" "dashboards" "networkPolicy" "demoBackend" "demoBackend.image" -}}
{{- $switched := list "persistence" "service" "monitoring" "prometheusRule" "dashboards" "networkPolicy" "demoBackend" -}}
{{- $settings := list "mode" "image.repository" "ports.otlpGrpc" "ports.otlpHttp" "ports.api"
      "secrets.hmacKeyKey" "secrets.apiTokenKey" "pathmap.key" "pathmap.mountPath" "persistence.size"
      "persistence.accessModes" "persistence.mountPath"
      "monitoring.interval" "dashboards.label" "dashboards.folderAnnotation" "demoBackend.image.repository"
      "demoBackend.port" -}}
{{- range $path := concat $sections $settings -}}
{{- $here := $.Values -}}
{{- $found := true -}}
{{- range $key := splitList "." $path -}}
{{- if and $found (kindIs "map" $here) (hasKey $here $key) (not (kindIs "invalid" (index $here $key))) -}}
{{- $here = index $here $key -}}
{{- else -}}
{{- $found = false -}}
{{- end -}}
{{- end -}}
{{- if not $found -}}
{{- $why := printf "pathwatch: %s is null or missing: helm drops a key set to null (in a values file or with --set) together with the chart's default for it" $path -}}
{{- if has $path $sections -}}
{{- fail (printf "%s, and the chart renders from its keys. Leave %s out to keep its defaults, or set only the keys to change (%s.<key>)%s" $why $path $path (ternary (printf "; to turn it off, set %s.enabled: false" $path) "" (has $path $switched))) -}}
{{- else -}}
{{- fail (printf "%s, and the chart needs a value. Leave %s out to keep the default, or give one" $why $path) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Checks that make a bad combination of values fail at render time with a message naming the values.
Included by the config ConfigMap, which every mode renders.
*/}}
{{- define "pathwatch.validate" -}}
{{- if not (has .Values.mode (list "sidecar" "gateway")) -}}
{{- fail (printf "pathwatch: mode must be \"sidecar\" or \"gateway\", got %q" .Values.mode) -}}
{{- end -}}
{{- /* The secrets' content is checked here, not in values.schema.json: helm 4 quotes a value the schema
     refuses in its message ("'t\u00f6ken' does not match pattern ..."), which would put a mistyped
     real token or key in CI logs and terminal scrollback. These messages name the key and the rule,
     never the value (the schema keeps the type check, whose message has no value either).
     $space is Python's whitespace (str.strip, str.isspace), in Go's regexp syntax. */ -}}
{{- $space := `\t\n\v\f\r\x1c-\x1f \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}` -}}
{{- /* the Secret's keys of the webhook's URL and Alertmanager's credentials: a key of a Secret
     (letters, digits, "-", "_", "."), checked here rather than by a schema pattern, which helm 4 quotes
     with the value: a URL or a password written into the key's value by mistake */ -}}
{{- range $key := list "webhookUrlKey" "alertmanagerPasswordKey" "alertmanagerBearerTokenKey" -}}
{{- $name := index $.Values.secrets $key | default "" | toString -}}
{{- if not (regexMatch "^[-._a-zA-Z0-9]{0,253}$" $name) -}}
{{- fail (printf "pathwatch: secrets.%s must name a key of a Secret: letters, digits, '-', '_' and '.', at most 253 (the value is not shown here: was a URL or a secret given in its place?)" $key) -}}
{{- end -}}
{{- end -}}
{{- /* the keys the HMAC key, the API token and the path map are kept under (the Secret's, the
     ConfigMap's, or those of secrets.existingSecret / pathmap.existingConfigMap): what the API server
     takes as a key (no "/", not "." or ".."), which it otherwise refuses at install; not quoted, as
     above (a key or token pasted in the key's place) */ -}}
{{- range $pair := list (list "secrets.hmacKeyKey" .Values.secrets.hmacKeyKey) (list "secrets.apiTokenKey" .Values.secrets.apiTokenKey) (list "pathmap.key" .Values.pathmap.key) -}}
{{- $name := index $pair 1 | default "" | toString -}}
{{- if or (not (regexMatch "^[-._a-zA-Z0-9]{1,253}$" $name)) (hasPrefix ".." $name) (eq $name ".") -}}
{{- fail (printf "pathwatch: %s must name a key of a %s: letters, digits, '-', '_' and '.', at most 253, neither a lone dot nor beginning with two dots (the value is not shown here: was a secret given in its place?)" (index $pair 0) (ternary "ConfigMap" "Secret" (eq (index $pair 0) "pathmap.key"))) -}}
{{- end -}}
{{- end -}}
{{- /* one key, one value: the Secret's data held the key twice, which YAML readers resolve to the last
     (the backend's HMAC key became the API token, which monitors and API clients hold, or the salt),
     and a Secret of the owner's would give both variables the same value */ -}}
{{- if eq .Values.secrets.hmacKeyKey .Values.secrets.apiTokenKey -}}
{{- fail (printf "pathwatch: secrets.hmacKeyKey and secrets.apiTokenKey are both %q: the backend's HMAC key would be the API token (which the monitors and every API client hold, and with it users could be re-identified from their pseudonyms): give them keys of their own" .Values.secrets.hmacKeyKey) -}}
{{- end -}}
{{- if not .Values.secrets.existingSecret -}}
{{- range $key := list "hmacKeyKey" "apiTokenKey" -}}
{{- if eq (index $.Values.secrets $key) "checksum-salt" -}}
{{- fail (printf "pathwatch: secrets.%s \"checksum-salt\" is the key the chart's Secret keeps the checksum salt under (pathwatch.checksumSalt): give it a key of its own" $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* the sidecar strips PATHWATCH_API_TOKEN (sidecar/app.py), then wants printable ASCII on one line
     (sidecar/api.py require_token_for); empty: generated (sidecar mode) or refused below (gateway) */ -}}
{{- $tokenPattern := printf `^([%s]*[!-~]([ -~]*[!-~])?[%s]*)?$` $space $space -}}
{{- $givenToken := .Values.secrets.apiToken | default "" | toString -}}{{- /* null (helm drops the key): as "" */ -}}
{{- if not (regexMatch $tokenPattern $givenToken) -}}
{{- fail "pathwatch: secrets.apiToken is refused (the value is not shown here): a bearer token must be printable ASCII on one line once surrounding whitespace is stripped, and not whitespace only (no tab or line break inside, no non-ASCII character such as an umlaut or a no-break space), or the sidecar refuses it at start (exit 2); use a random one, e.g. `openssl rand -hex 24`" -}}
{{- end -}}
{{- /* a given token guards the API (incidents, the path inventory) of every pod running the sidecar:
     one a person could guess is refused. The sidecar only warns of a short one (a sidecar that does not
     start would hold a native sidecar's backend); 16 characters, as the key's 16 bytes */ -}}
{{- $token := regexReplaceAll (printf `^[%s]+|[%s]+$` $space $space) $givenToken "" -}}
{{- if and $token (lt (len $token) 16) -}}
{{- fail "pathwatch: secrets.apiToken is refused (the value is not shown here): a given bearer token needs at least 16 characters once surrounding whitespace is stripped; a short one can be guessed. Leave it empty to have one generated (sidecar mode), or use a random one, e.g. `openssl rand -hex 24`" -}}
{{- end -}}
{{- /* the backend (instrumentation/identity.py check_key) refuses a key shorter than 16 bytes of UTF-8
     (128 bits; len counts bytes) or only whitespace as Python's str.strip sees it ($space: a no-break
     space, U+3000, a vertical tab or U+001C too, which Go's and the schema's \S took for a key);
     empty: generated */ -}}
{{- $hmacKey := .Values.secrets.hmacKey -}}
{{- if and $hmacKey (or (lt (len $hmacKey) 16) (regexMatch (printf `^[%s]*$` $space) $hmacKey)) -}}
{{- fail "pathwatch: secrets.hmacKey is refused (the value is not shown here): a given key needs at least 16 bytes (128 bits, in UTF-8), not only whitespace (no-break spaces and other Unicode spaces count as whitespace), or the backend refuses it at start; leave it empty to have one generated, or use a random one, e.g. `openssl rand -hex 32`" -}}
{{- end -}}
{{- /* the salt is what keeps the secrets' checksum annotations from being an offline test of a guessed
     secret (pathwatch.checksumSalt): the key's rule */ -}}
{{- $salt := .Values.secrets.checksumSalt -}}
{{- if and $salt (or (lt (len $salt) 16) (regexMatch (printf `^[%s]*$` $space) $salt)) -}}
{{- fail "pathwatch: secrets.checksumSalt is refused (the value is not shown here): a given salt needs at least 16 bytes, not only whitespace; leave it empty to have one generated and kept in the Secret, or use a random one, e.g. `openssl rand -hex 16`" -}}
{{- end -}}
{{- /* the alerting URLs likewise: the sidecar never quotes them either (sidecar/config.py
     _check_http_url), a URL's credentials and a webhook's path (/services/T0/B0/TOKEN) are secrets */ -}}
{{- $alerting := (.Values.config | default dict).alerting | default dict -}}
{{- range $key := list "alertmanager_url" "webhook_url" "external_url" -}}
{{- $url := index $alerting $key | default "" | toString -}}
{{- with and $url (include "pathwatch.httpUrlProblem" $url) -}}
{{- fail (printf "pathwatch: config.alerting.%s is refused (the value is not shown here: a URL's credentials and a webhook's path are secrets): expected empty or http(s)://HOST[:PORT][/PATH] on one line, got %s; %s" $key . (include "pathwatch.httpUrlWhy" .)) -}}
{{- end -}}
{{- end -}}
{{- /* the webhook's URL from the Secret (PATHWATCH_WEBHOOK_URL, alerting.webhook_url_env): checked as
     config.alerting.webhook_url is, never quoted; one source of it, or the sidecar exits 2 */ -}}
{{- /* the sidecar strips the variable's surrounding whitespace first (a file given with --set-file
     ends in a line break; sidecar/config.py from_environment), and refuses it empty then */ -}}
{{- $secretUrl := .Values.secrets.webhookUrl | default "" | toString -}}
{{- $strippedUrl := regexReplaceAll (printf `^[%s]+|[%s]+$` $space $space) $secretUrl "" -}}
{{- with and $secretUrl (ternary "nothing but whitespace" (include "pathwatch.httpUrlProblem" $strippedUrl) (empty $strippedUrl)) -}}
{{- fail (printf "pathwatch: secrets.webhookUrl is refused (the value is not shown here: a webhook's path and a URL's credentials are secrets): expected empty or http(s)://HOST[:PORT][/PATH] on one line, got %s; %s" . (include "pathwatch.httpUrlWhy" .)) -}}
{{- end -}}
{{- if and .Values.secrets.existingSecret .Values.secrets.webhookUrl -}}
{{- fail "pathwatch: secrets.webhookUrl is set, but with secrets.existingSecret the chart creates no Secret to keep it in (the value is not shown here): put the URL in that Secret and name its key in secrets.webhookUrlKey" -}}
{{- end -}}
{{- /* a token or key given with existingSecret was never used (the pods read that Secret's): one
     that believes its value in force is told, as for webhookUrl */ -}}
{{- range $given := list (list "apiToken" "apiTokenKey") (list "hmacKey" "hmacKeyKey") -}}
{{- if and $.Values.secrets.existingSecret (index $.Values.secrets (first $given)) -}}
{{- fail (printf "pathwatch: secrets.%s is set, but with secrets.existingSecret the chart creates no Secret to keep it in and the pods read that Secret's (the value is not shown here): put it in that Secret and name its key in secrets.%s, or leave secrets.%s empty" (first $given) (last $given) (first $given)) -}}
{{- end -}}
{{- end -}}
{{- $webhookKey := include "pathwatch.webhookUrlKey" . -}}
{{- if $webhookKey -}}
{{- $from := ternary (printf "secrets.webhookUrlKey (%q of secrets.existingSecret)" $webhookKey) "secrets.webhookUrl" (not (empty .Values.secrets.existingSecret)) -}}
{{- if $alerting.webhook_url -}}
{{- fail (printf "pathwatch: config.alerting.webhook_url and %s both give the alert webhook's URL, and the sidecar refuses both (exit 2): keep the URL in the Secret only and remove config.alerting.webhook_url, which lands in the ConfigMap in clear" $from) -}}
{{- end -}}
{{- if $alerting.webhook_url_env -}}
{{- fail (printf "pathwatch: config.alerting.webhook_url_env is set, but with %s the chart sets it (PATHWATCH_WEBHOOK_URL, from the Secret): remove config.alerting.webhook_url_env" $from) -}}
{{- end -}}
{{- if and (not .Values.secrets.existingSecret) (has $webhookKey (list .Values.secrets.hmacKeyKey .Values.secrets.apiTokenKey "checksum-salt")) -}}
{{- fail (printf "pathwatch: secrets.webhookUrlKey %q is already a key of the chart's Secret (secrets.hmacKeyKey, secrets.apiTokenKey, checksum-salt): give it a key of its own, or leave it empty for webhook-url" $webhookKey) -}}
{{- end -}}
{{- end -}}
{{- /* the variables the chart sets in the sidecar container (pathwatch.sidecarContainer): the same name
     in sidecar.extraEnv is a second entry in one env list, which Kubernetes resolves to the last (the
     extraEnv value silently replaces the Secret's, while the checksum annotations and the
     ServiceMonitor's credentials follow the Secret) and server-side apply refuses ("duplicate entries
     for key", naming no value). The message never quotes the entry's value: it may be a secret. */ -}}
{{- $chartEnv := dict "PATHWATCH_API_TOKEN" "the API token from the Secret: to take it from a Secret of yours, set secrets.existingSecret and secrets.apiTokenKey" -}}
{{- if $webhookKey -}}
{{- $_ := set $chartEnv "PATHWATCH_WEBHOOK_URL" "the webhook URL from the Secret (secrets.webhookUrl, or secrets.webhookUrlKey of secrets.existingSecret): to give it in a variable of your own, leave those empty and set config.alerting.webhook_url_env to its name" -}}
{{- end -}}
{{- /* Alertmanager's password or bearer token from the Secret (secrets.alertmanagerPassword /
     alertmanagerBearerToken, or their ...Key of secrets.existingSecret): the chart gives it to the
     sidecar as PATHWATCH_ALERTMANAGER_PASSWORD / PATHWATCH_ALERTMANAGER_BEARER_TOKEN and sets
     config.alerting.alertmanager_password_env / alertmanager_bearer_token_env to that name, as it does
     the webhook's URL; the value is checked as the sidecar checks the variable, never quoted */ -}}
{{- $amSecrets := list
      (list "Password" "alertmanager_password_env" "PATHWATCH_ALERTMANAGER_PASSWORD" (include "pathwatch.alertmanagerPasswordKey" .) false)
      (list "BearerToken" "alertmanager_bearer_token_env" "PATHWATCH_ALERTMANAGER_BEARER_TOKEN" (include "pathwatch.alertmanagerBearerTokenKey" .) true) -}}
{{- /* the variables' names the sidecar gets (the user's, or the chart's), and the values giving them */ -}}
{{- $amEnv := dict "alertmanager_password_env" ($alerting.alertmanager_password_env | default "" | toString)
                   "alertmanager_bearer_token_env" ($alerting.alertmanager_bearer_token_env | default "" | toString) -}}
{{- $amFrom := dict "alertmanager_password_env" "config.alerting.alertmanager_password_env" "alertmanager_bearer_token_env" "config.alerting.alertmanager_bearer_token_env" -}}
{{- $secretKeys := dict .Values.secrets.hmacKeyKey "secrets.hmacKeyKey" .Values.secrets.apiTokenKey "secrets.apiTokenKey" "checksum-salt" "checksum-salt" -}}
{{- if $webhookKey -}}{{- $_ := set $secretKeys $webhookKey "the webhook URL's key" -}}{{- end -}}
{{- range $amSecret := $amSecrets -}}
{{- $value := index $.Values.secrets (printf "alertmanager%s" (index $amSecret 0)) | default "" | toString -}}
{{- $valueKey := printf "secrets.alertmanager%s" (index $amSecret 0) -}}
{{- $configKey := index $amSecret 1 -}}
{{- $variable := index $amSecret 2 -}}
{{- $secretKey := index $amSecret 3 -}}
{{- if $value -}}
{{- with include "pathwatch.alertmanagerSecretProblem" (dict "value" $value "bearer" (index $amSecret 4)) -}}
{{- fail (printf "pathwatch: %s is refused (the value is not shown here): it holds %s, and the sidecar refuses it at start (exit 2)" $valueKey .) -}}
{{- end -}}
{{- if $.Values.secrets.existingSecret -}}
{{- fail (printf "pathwatch: %s is set, but with secrets.existingSecret the chart creates no Secret to keep it in (the value is not shown here): put it in that Secret and name its key in %sKey" $valueKey $valueKey) -}}
{{- end -}}
{{- end -}}
{{- if $secretKey -}}
{{- $from := ternary (printf "%sKey (%q of secrets.existingSecret)" $valueKey $secretKey) $valueKey (not (empty $.Values.secrets.existingSecret)) -}}
{{- if index $alerting $configKey -}}
{{- fail (printf "pathwatch: config.alerting.%s is set, but with %s the chart sets it (%s, from the Secret): remove config.alerting.%s" $configKey $from $variable $configKey) -}}
{{- end -}}
{{- if not $.Values.secrets.existingSecret -}}
{{- if hasKey $secretKeys $secretKey -}}
{{- fail (printf "pathwatch: %sKey %q is already a key of the chart's Secret (%s): give it a key of its own, or leave it empty for the default" $valueKey $secretKey (get $secretKeys $secretKey)) -}}
{{- end -}}
{{- $_ := set $secretKeys $secretKey (printf "%sKey" $valueKey) -}}
{{- end -}}
{{- $_ := set $chartEnv $variable (printf "Alertmanager's credential from the Secret (%s): to give it in a variable of your own, leave %s and %sKey empty and set config.alerting.%s to its name" $from $valueKey $valueKey $configKey) -}}
{{- $_ := set $amEnv $configKey $variable -}}
{{- $_ := set $amFrom $configKey $from -}}
{{- end -}}
{{- end -}}
{{- range $index, $item := .Values.sidecar.extraEnv | default list -}}
{{- $name := "" -}}
{{- if kindIs "map" $item -}}{{- $name = get $item "name" | default "" | toString -}}{{- end -}}
{{- if hasKey $chartEnv $name -}}
{{- fail (printf "pathwatch: sidecar.extraEnv[%d] sets %s, which the chart already sets in the sidecar container (%s); Kubernetes would take one of the two entries silently, server-side apply refuses them: remove it from sidecar.extraEnv" $index $name (get $chartEnv $name)) -}}
{{- end -}}
{{- end -}}
{{- range $index, $peer := $alerting.alertmanager_peers | default list -}}
{{- with include "pathwatch.httpUrlProblem" (toString $peer) -}}
{{- fail (printf "pathwatch: config.alerting.alertmanager_peers[%d] is refused (the value is not shown here: a URL's credentials are secrets): expected http(s)://HOST[:PORT][/PATH], got %s; %s" $index . (include "pathwatch.httpUrlWhy" .)) -}}
{{- end -}}
{{- end -}}
{{- /* Alertmanager's credentials (config.alerting.alertmanager_username + alertmanager_password_env, or
     alertmanager_bearer_token_env): what the sidecar refuses at start (sidecar/config.py AlertingConfig,
     exit 2, which in sidecar mode holds the backend's pod) is refused here, naming the keys, never a
     URL or a secret. The variable is the sidecar container's: sidecar.extraEnv or one the chart sets
     ($chartEnv), or the sidecar exits 2 ("is not set"). */ -}}
{{- $amUsername := $alerting.alertmanager_username | default "" | toString -}}
{{- $amPasswordEnv := $amEnv.alertmanager_password_env -}}
{{- $amBearerEnv := $amEnv.alertmanager_bearer_token_env -}}
{{- $amPasswordFrom := $amFrom.alertmanager_password_env -}}
{{- $amBearerFrom := $amFrom.alertmanager_bearer_token_env -}}
{{- if regexMatch `[:\x00-\x1f\x7f]` $amUsername -}}
{{- fail "pathwatch: config.alerting.alertmanager_username is refused: a basic-auth username holds no \":\" and no control character, or the sidecar refuses it at start (exit 2)" -}}
{{- end -}}
{{- range $key := list "alertmanager_password_env" "alertmanager_bearer_token_env" -}}
{{- if regexMatch `[=\x00]` (index $alerting $key | default "" | toString) -}}
{{- fail (printf "pathwatch: config.alerting.%s is refused: expected the name of an environment variable (no \"=\", no NUL), or the sidecar refuses it at start (exit 2)" $key) -}}
{{- end -}}
{{- end -}}
{{- if and $amUsername (not $amPasswordEnv) -}}
{{- fail "pathwatch: config.alerting.alertmanager_username is set without config.alerting.alertmanager_password_env, and the sidecar refuses that at start (exit 2): basic auth takes both, the username and the password (secrets.alertmanagerPassword, kept in the chart's Secret; or config.alerting.alertmanager_password_env naming a variable of sidecar.extraEnv from a Secret of yours)" -}}
{{- end -}}
{{- if and $amPasswordEnv (not $amUsername) -}}
{{- fail (printf "pathwatch: %s is set without config.alerting.alertmanager_username, and the sidecar refuses that at start (exit 2): basic auth takes both, the username and the password" $amPasswordFrom) -}}
{{- end -}}
{{- if and $amUsername $amBearerEnv -}}
{{- fail (printf "pathwatch: config.alerting.alertmanager_username (with %s) and %s are both set, and the sidecar refuses that at start (exit 2): Alertmanager takes basic auth or a bearer token, not both" $amPasswordFrom $amBearerFrom) -}}
{{- end -}}
{{- if or $amUsername $amBearerEnv -}}
{{- $credentials := ternary (printf "config.alerting.alertmanager_username and %s" $amPasswordFrom) $amBearerFrom (not (empty $amUsername)) -}}
{{- if not $alerting.alertmanager_url -}}
{{- fail (printf "pathwatch: %s give Alertmanager's credentials, but config.alerting.alertmanager_url is not set, and the sidecar refuses that at start (exit 2): set config.alerting.alertmanager_url, or remove the credentials" $credentials) -}}
{{- end -}}
{{- $urls := list (list "config.alerting.alertmanager_url" $alerting.alertmanager_url) -}}
{{- range $index, $peer := $alerting.alertmanager_peers | default list -}}
{{- $urls = append $urls (list (printf "config.alerting.alertmanager_peers[%d]" $index) $peer) -}}
{{- end -}}
{{- range $pair := $urls -}}
{{- if include "pathwatch.httpUrlHasUserinfo" (index $pair 1 | toString) -}}
{{- fail (printf "pathwatch: %s holds credentials (user:password@ before its host; the value is not shown here) beside %s, and the sidecar refuses that at start (exit 2): give them in one place, and keep them out of the URL, which lands in the ConfigMap in clear" (index $pair 0) $credentials) -}}
{{- end -}}
{{- end -}}
{{- $key := ternary "alertmanager_password_env" "alertmanager_bearer_token_env" (not (empty $amUsername)) -}}
{{- $variable := ternary $amPasswordEnv $amBearerEnv (not (empty $amUsername)) -}}
{{- $given := dict -}}
{{- range $index, $item := $.Values.sidecar.extraEnv | default list -}}
{{- if and (kindIs "map" $item) (eq (get $item "name" | default "" | toString) $variable) -}}
{{- $given = dict "index" $index "item" $item -}}
{{- end -}}
{{- end -}}
{{- if and (not $given) (not (hasKey $chartEnv $variable)) -}}
{{- /* the name is quoted only when it is one of letters, digits and "_": a URL or a secret given in
     a name's place is not (what else a name may hold is the user's to read in the values) */ -}}
{{- $named := ternary (printf "the environment variable %s" $variable) "an environment variable (the name is not shown here: it is not only letters, digits and \"_\"; a URL or a secret given in its place? the *_env keys name the variable holding it)" (regexMatch `^[A-Za-z_][A-Za-z0-9_]*$` $variable) -}}
{{- fail (printf "pathwatch: config.alerting.%s names %s, which is neither in sidecar.extraEnv nor set by the chart, and the sidecar refuses to start without it (exit 2, \"is not set\"): add it to sidecar.extraEnv (valueFrom.secretKeyRef of a Secret of yours)" $key $named) -}}
{{- end -}}
{{- /* the last entry of a name is the one the container gets; a literal value (no valueFrom) is
     checked as the sidecar checks the variable (a valueFrom's is the kubelet's to resolve) */ -}}
{{- if and $given (not (hasKey $given.item "valueFrom")) -}}
{{- with include "pathwatch.alertmanagerSecretProblem" (dict "value" (get $given.item "value") "bearer" (empty $amUsername)) -}}
{{- fail (printf "pathwatch: sidecar.extraEnv[%d] (%s, named by config.alerting.%s) is refused (the value is not shown here): it holds %s, and the sidecar refuses it at start (exit 2)" $given.index $variable $key .) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* config.alerting.webhook_url_env of the user's (with secrets.webhookUrl(Key) the chart sets it, and
     refuses it above): the sidecar exits 2 when webhook_url is set too, and when its variable is not
     set, empty or not a URL it takes (sidecar/config.py _with_webhook_url) */ -}}
{{- $webhookEnv := $alerting.webhook_url_env | default "" | toString -}}
{{- if and $webhookEnv (not $webhookKey) -}}
{{- if $alerting.webhook_url -}}
{{- fail "pathwatch: config.alerting.webhook_url and config.alerting.webhook_url_env are both set, and the sidecar refuses that at start (exit 2): give the webhook's URL in one of them (prefer secrets.webhookUrl, kept in the chart's Secret)" -}}
{{- end -}}
{{- $given := dict -}}
{{- range $index, $item := $.Values.sidecar.extraEnv | default list -}}
{{- if and (kindIs "map" $item) (eq (get $item "name" | default "" | toString) $webhookEnv) -}}
{{- $given = dict "index" $index "item" $item -}}
{{- end -}}
{{- end -}}
{{- if and (not $given) (not (hasKey $chartEnv $webhookEnv)) -}}
{{- /* the name is quoted only when it is one of letters, digits and "_": a URL or a secret given in
     a name's place is not (what else a name may hold is the user's to read in the values) */ -}}
{{- $named := ternary (printf "the environment variable %s" $webhookEnv) "an environment variable (the name is not shown here: it is not only letters, digits and \"_\"; a URL or a secret given in its place? the *_env keys name the variable holding it)" (regexMatch `^[A-Za-z_][A-Za-z0-9_]*$` $webhookEnv) -}}
{{- fail (printf "pathwatch: config.alerting.webhook_url_env names %s, which is neither in sidecar.extraEnv nor set by the chart, and the sidecar refuses to start without it (exit 2, \"is not set\"): add it to sidecar.extraEnv (valueFrom.secretKeyRef of a Secret of yours), or give the URL as secrets.webhookUrl" $named) -}}
{{- end -}}
{{- /* a literal value is checked as the sidecar checks the variable; not one with a $(VAR) reference,
     which the kubelet expands from a variable defined before it (or a Service's): what the container
     gets is not in the values */ -}}
{{- if and $given (not (hasKey $given.item "valueFrom")) (not (regexMatch `\$\(` (get $given.item "value" | default "" | toString))) -}}
{{- $url := regexReplaceAll (printf `^[%s]+|[%s]+$` $space $space) (get $given.item "value" | default "" | toString) "" -}}
{{- with ternary "nothing, or only whitespace (which the sidecar strips)" (include "pathwatch.httpUrlProblem" $url) (empty $url) -}}
{{- fail (printf "pathwatch: sidecar.extraEnv[%d] (%s, named by config.alerting.webhook_url_env) is refused (the value is not shown here: a webhook's path is a secret): expected http(s)://HOST[:PORT][/PATH] on one line, got %s; %s" $given.index $webhookEnv . (ternary "the sidecar would refuse it at start (exit 2)" (include "pathwatch.httpUrlWhy" .) (empty $url))) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.mode "gateway") (not .Values.secrets.existingSecret) (not .Values.secrets.apiToken) -}}
{{- fail (printf "pathwatch: gateway mode serves the sidecar API on %s behind a Service, so the sidecar requires a bearer token: set secrets.apiToken, or secrets.existingSecret naming a Secret with the key %q" (include "pathwatch.apiEndpoint" .) .Values.secrets.apiTokenKey) -}}
{{- end -}}
{{- /* a pod killed before the sidecar has drained loses accepted spans, alerts and incidents */ -}}
{{- $grace := include "pathwatch.terminationGracePeriodSeconds" . | int64 -}}
{{- $minimum := include "pathwatch.minTerminationGracePeriodSeconds" . | int64 -}}
{{- if lt $grace $minimum -}}
{{- fail (printf "pathwatch: sidecar.terminationGracePeriodSeconds is %d, but the sidecar may take up to %d s to stop after SIGTERM (draining the spans it accepted, flushing alerts and incidents: sidecar/app.py); the kubelet would kill it mid-drain and they would be lost: give it at least %d" $grace $minimum $minimum) -}}
{{- end -}}
{{- /* a native sidecar (restartPolicy: Always on an init container) needs Kubernetes 1.29 (beta, on by
     default); before, the API server drops the field (unknown before 1.28, behind the SidecarContainers
     gate in 1.28) and refuses the pod, whose init container carries the sidecar's probes ("may not be
     set for init containers"): in sidecar mode that is the backend's own Deployment. The chart's
     kubeVersion admits those clusters for the classic sidecar. helm template without --kube-version
     renders for helm's own (recent) version: Argo CD passes the cluster's */ -}}
{{- if and .Values.sidecar.native (eq .Values.mode "sidecar") (semverCompare "<1.29.0-0" .Capabilities.KubeVersion.Version) -}}
{{- fail (printf "pathwatch: sidecar.native is true, but the cluster runs Kubernetes %s: a native sidecar (restartPolicy: Always under initContainers) needs Kubernetes 1.29 or later; before, the API server refuses the pod (the sidecar's probes on an init container), in sidecar mode your backend's Deployment: set sidecar.native false (the sidecar then runs beside the backend under containers)" .Capabilities.KubeVersion.Version) -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled (eq .Values.mode "sidecar") (not .Values.networkPolicy.extraIngress) -}}
{{- fail "pathwatch: in sidecar mode the NetworkPolicy selects the backend pods and would cut off the backend's own traffic: list it in networkPolicy.extraIngress, or leave networkPolicy.enabled false" -}}
{{- end -}}
{{- /* the kubelet's probes (httpGet on the pod IP), Prometheus and, in gateway mode, the exporters reach
     the pod's address, never its loopback: on 127.0.0.0/8, ::1 or an IPv4-mapped 127/8 address (any
     spelling the schema takes) the startup or readiness probe could never pass, and the sidecar would
     be restarted for ever (a native sidecar holding the backend's start with it) */ -}}
{{- $listen := include "pathwatch.listenAddress" . -}}
{{- if or (regexMatch `^127\.` $listen) (regexMatch `^[0:]*:0{0,3}1$` $listen) (regexMatch `(?i)^[0:]*:ffff:(127\.|7f[0-9a-f]{2}:)` $listen) -}}
{{- fail (printf "pathwatch: sidecar.listenAddress %q is a loopback address, which the kubelet's probes (httpGet on the pod IP), Prometheus%s never reach: the sidecar's probes could never pass, and the kubelet would restart it for ever. Use 0.0.0.0, or :: in an IPv6 or dual-stack cluster%s" $listen (ternary ", the backends exporting OTLP and the Service" " and the Service" (eq .Values.mode "gateway")) (ternary "" " (in sidecar mode the OTLP receivers stay on the pod's loopback whatever it is)" (eq .Values.mode "gateway"))) -}}
{{- end -}}
{{- /* the sidecar listens on all three ports (in sidecar mode the receivers on 127.0.0.1, which still
     takes the port from the API's wildcard sidecar.listenAddress): one port for two of them and it
     cannot start */ -}}
{{- range $pair := list (list "api" "otlpGrpc") (list "api" "otlpHttp") (list "otlpGrpc" "otlpHttp") -}}
{{- $port := index $.Values.ports (index $pair 0) -}}
{{- if eq (int $port) (int (index $.Values.ports (index $pair 1))) -}}
{{- fail (printf "pathwatch: ports.%s and ports.%s are both %v: the sidecar listens on each of ports.api, ports.otlpGrpc and ports.otlpHttp and cannot bind one port twice (it would exit at start, 'Address already in use'): give them different ports" (index $pair 0) (index $pair 1) $port) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.demoBackend.enabled (eq .Values.mode "sidecar") -}}
{{- range $name := list "api" "otlpGrpc" "otlpHttp" -}}
{{- if eq (int $.Values.demoBackend.port) (int (index $.Values.ports $name)) -}}
{{- fail (printf "pathwatch: demoBackend.port and ports.%s are both %v: the demo backend and its sidecar share the pod's network, so one of them could not listen: give them different ports" $name $.Values.demoBackend.port) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* the sidecar container mounts its config at /etc/pathwatch (read-only) and its scratch volume at
     /tmp: the data volume on either is two mounts at one path, which the API server refuses; inside
     /etc/pathwatch the runtime cannot create the mount point in the read-only config volume */ -}}
{{- $dataPath := clean .Values.persistence.mountPath -}}
{{- if or (eq $dataPath "/tmp") (eq $dataPath "/etc/pathwatch") (hasPrefix "/etc/pathwatch/" $dataPath) -}}
{{- fail (printf "pathwatch: persistence.mountPath %q is on the sidecar container's own mounts (/etc/pathwatch: its configuration, read-only; /tmp: its scratch volume), and Kubernetes refuses two volume mounts at one path (nor can a mount point be made inside the read-only one): choose another directory, e.g. the default /var/lib/pathwatch" .Values.persistence.mountPath) -}}
{{- end -}}
{{- include "pathwatch.checkMountPath" (dict "key" "persistence.mountPath" "path" .Values.persistence.mountPath "default" "/var/lib/pathwatch") -}}
{{- include "pathwatch.checkMountPath" (dict "key" "pathmap.mountPath" "path" .Values.pathmap.mountPath "default" "/etc/pathwatch/pathmap") -}}
{{- /* the prometheus-operator refuses a monitor whose scrapeTimeout is longer than its interval
     ('scrapeTimeout "10s" greater than scrapeInterval "5s"', as Prometheus refuses the scrape config):
     it is left out of Prometheus's configuration, nothing is scraped and PathwatchSidecarAbsent fires.
     monitoring.interval below the default scrapeTimeout (10s) alone did it */ -}}
{{- if .Values.monitoring.enabled -}}
{{- $interval := .Values.monitoring.interval | default "" | toString -}}
{{- $timeout := .Values.monitoring.scrapeTimeout | default "" | toString -}}
{{- if gt (include "pathwatch.durationMs" $timeout | int64) (include "pathwatch.durationMs" $interval | int64) -}}
{{- fail (printf "pathwatch: monitoring.scrapeTimeout %q is longer than monitoring.interval %q, and the prometheus-operator refuses such a monitor (Prometheus would not scrape the sidecar at all): set monitoring.scrapeTimeout to at most the interval, e.g. --set monitoring.scrapeTimeout=%s" $timeout $interval $interval) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.persistence.enabled (eq .Values.mode "sidecar") .Values.demoBackend.enabled (gt (int .Values.demoBackend.replicas) 1) -}}
{{- fail "pathwatch: persistence in sidecar mode is one SQLite incident file, and the sidecars of several backend replicas (demoBackend.replicas > 1) cannot share it (each keeps its incidents in memory and overwrites the others' rows): use mode gateway (a StatefulSet, one claim per replica), or persistence.enabled false (a store per pod)" -}}
{{- end -}}
{{- end -}}

{{/* A duration of the monitors' (monitoring.interval, .scrapeTimeout: digits and a unit, h, m, s or
ms, the schema's pattern) in milliseconds, as an integer's text; 0 for "". */}}
{{- define "pathwatch.durationMs" -}}
{{- $units := dict "h" 3600000 "m" 60000 "s" 1000 "ms" 1 -}}
{{- $ms := 0 -}}
{{- range $part := regexFindAll `[0-9]+(ms|h|m|s)` . -1 -}}
{{- $ms = add $ms (mul (regexFind `^[0-9]+` $part | int64) (get $units (regexReplaceAll `^[0-9]+` $part ""))) -}}
{{- end -}}
{{- $ms -}}
{{- end -}}

{{/*
Refuses a volume's mount path (dict "key" <the value's name> "path" <its value> "default" <the value's
default>) that would hide a
directory the container needs: a mount on a directory, or on one of its parents, hides what is there.
Kubernetes refuses two mounts at one path only when the strings are equal ("/tmp" twice: the Deployment
is refused at install, naming no value), so "/tmp/" or "/etc/pathwatch/../../tmp" passed it and the
runtime, which cleans the path, mounted the volume over the scratch directory; "/" hid the whole image.
Hence a clean absolute path (no "." or ".." component, no "//"), on none of these nor a parent of one.
*/}}
{{- define "pathwatch.checkMountPath" -}}
{{- $given := .path -}}
{{- $unslashed := ternary $given (trimSuffix "/" $given) (eq $given "/") -}}
{{- if or (not (hasPrefix "/" $given)) (ne (clean $unslashed) $unslashed) -}}
{{- fail (printf "pathwatch: %s %q is not a clean absolute path: write it from / without . or .. components or // (Kubernetes compares mount paths as strings, the container runtime after cleaning them, so such a path can land on another mount), e.g. the default %s" .key $given .default) -}}
{{- end -}}
{{- $needed := list
      (list "/tmp" "the scratch directory (an emptyDir in the sidecar container and in the demo backend, where a backend writes its temporary files)")
      (list "/etc/hosts" "a file the kubelet mounts into every container")
      (list "/etc/resolv.conf" "a file the kubelet mounts into every container")
      (list "/dev/termination-log" "a file the kubelet mounts into every container")
      (list "/var/run/secrets/kubernetes.io/serviceaccount" "the service account token the kubelet mounts")
      (list "/proc" "a kernel file system the container runtime mounts")
      (list "/sys" "a kernel file system the container runtime mounts")
      (list "/usr/local/lib" "the Python the chart's images run")
      (list "/usr/lib" "the image's libraries")
      (list "/lib" "the image's libraries")
      (list "/bin" "the image's programs")
      (list "/opt/pathwatch" "pathwatch's virtualenv in the chart's images")
      (list "/app" "the demo backend's code") -}}
{{- if eq $unslashed "/" -}}
{{- fail (printf "pathwatch: %s \"/\" would hide the container's whole file system (its programs, /tmp, the files the kubelet mounts): choose a directory of its own, e.g. the default %s" .key .default) -}}
{{- end -}}
{{- range $pair := $needed -}}
{{- $dir := index $pair 0 -}}
{{- if or (eq $unslashed $dir) (hasPrefix (printf "%s/" $unslashed) $dir) -}}
{{- fail (printf "pathwatch: %s %q would hide %s, %s: a volume mounted on a directory or on one of its parents hides what is there (and Kubernetes refuses two mounts at one path): choose a directory of its own, e.g. the default %s" $.key $given $dir (index $pair 1) $.default) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* sidecar.listenAddress: the IP address the sidecar listens on for the pod's network (its API; in
gateway mode its receivers too). "0.0.0.0" where the values lack the key: `helm upgrade --reuse-values`
of a release whose chart had none renders it nil. */}}
{{- define "pathwatch.listenAddress" -}}
{{- .Values.sidecar.listenAddress | default "0.0.0.0" | toString -}}
{{- end -}}

{{/* The fewest seconds the sidecar may need to stop after SIGTERM (Sidecar.shutdown in sidecar/app.py,
one step after another): the receivers' calls in flight, SHUTDOWN_GRACE_S (5) for gRPC and again for
OTLP/HTTP; the pipeline's drain of every accepted span, DRAIN_TIMEOUT_S (60); the alerts' flush, 5;
the API's stop, 5: 80 s; and 10 s for the steps without a timeout of their own (gRPC's extra second,
closing the incident store and the ledger, the process's exit). Killed sooner (the kubelet's SIGKILL
at the end of terminationGracePeriodSeconds) it loses accepted spans, unflushed alerts and incidents
not yet written. tests/helm/test_termination_grace.py derives it from sidecar/app.py's constants. */}}
{{- define "pathwatch.minTerminationGracePeriodSeconds" -}}90{{- end -}}

{{/*
The terminationGracePeriodSeconds of a pod running the sidecar (sidecar.terminationGracePeriodSeconds,
at least pathwatch.minTerminationGracePeriodSeconds: pathwatch.validate refuses less), as an integer:
  spec:
    terminationGracePeriodSeconds: {{ include "pathwatch.terminationGracePeriodSeconds" .Subcharts.pathwatch }}
A values file's number is a float64, which a template prints 1e+06: hence int64. 120 where the values
lack the key (`helm upgrade --reuse-values` of a release whose chart had none: nil, 0 to int).
*/}}
{{- define "pathwatch.terminationGracePeriodSeconds" -}}
{{- $given := .Values.sidecar.terminationGracePeriodSeconds -}}
{{- if kindIs "invalid" $given -}}120{{- else -}}{{- $given | int64 -}}{{- end -}}
{{- end -}}

{{/* HOST:PORT as the sidecar reads an endpoint (sidecar/config.py _check_endpoint), from (list <an IP
address> <a port>): an IPv6 address in brackets, "[::]:9464" — joined bare, ":::9464" is refused at
start (exit 2) and "::1:4317" would be another address to gRPC. */}}
{{- define "pathwatch.endpoint" -}}
{{- $host := index . 0 | toString -}}
{{- if contains ":" $host -}}{{- $host = printf "[%s]" $host -}}{{- end -}}
{{- printf "%s:%v" $host (index . 1) -}}
{{- end -}}

{{/* Where the sidecar's API listens: sidecar.listenAddress and ports.api. */}}
{{- define "pathwatch.apiEndpoint" -}}
{{- include "pathwatch.endpoint" (list (include "pathwatch.listenAddress" .) .Values.ports.api) -}}
{{- end -}}

{{/* The sidecar configuration (docs/sidecar.md); the chart owns endpoints, token_env and incidents.path,
and alerting.webhook_url_env when the webhook's URL comes from the Secret (pathwatch.webhookUrlKey), as
alerting.alertmanager_password_env / alertmanager_bearer_token_env when Alertmanager's password or
bearer token does (pathwatch.alertmanagerPasswordKey, pathwatch.alertmanagerBearerTokenKey).
Takes (dict "ctx" <the chart's context> "out" <a dict>) and sets out.config to the configuration (a
dict: the callers spell it as YAML or as JSON). */}}
{{- define "pathwatch.sidecarConfigInto" -}}
{{- with .ctx -}}
{{- /* sidecar mode: the receivers on the pod's loopback, where the backend exports (pathwatch.backendEnv) */ -}}
{{- $bind := ternary (include "pathwatch.listenAddress" .) "127.0.0.1" (eq .Values.mode "gateway") -}}
{{- $owned := dict
      "receiver" (dict "grpc_endpoint" (include "pathwatch.endpoint" (list $bind .Values.ports.otlpGrpc))
                       "http_endpoint" (include "pathwatch.endpoint" (list $bind .Values.ports.otlpHttp)))
      "api" (dict "endpoint" (include "pathwatch.apiEndpoint" .) "token_env" "PATHWATCH_API_TOKEN"
                  "metrics_requires_token" .Values.monitoring.authorize)
      "incidents" (dict "path" (printf "%s/incidents.sqlite" (trimSuffix "/" .Values.persistence.mountPath))) -}}
{{- $alerting := dict -}}
{{- if include "pathwatch.webhookUrlKey" . -}}
{{- $_ := set $alerting "webhook_url_env" "PATHWATCH_WEBHOOK_URL" -}}
{{- end -}}
{{- if include "pathwatch.alertmanagerPasswordKey" . -}}
{{- $_ := set $alerting "alertmanager_password_env" "PATHWATCH_ALERTMANAGER_PASSWORD" -}}
{{- end -}}
{{- if include "pathwatch.alertmanagerBearerTokenKey" . -}}
{{- $_ := set $alerting "alertmanager_bearer_token_env" "PATHWATCH_ALERTMANAGER_BEARER_TOKEN" -}}
{{- end -}}
{{- if $alerting -}}
{{- $_ := set $owned "alerting" $alerting -}}
{{- end -}}
{{- /* config: null (helm drops the key): no settings, as {} */ -}}
{{- $config := mustMergeOverwrite (deepCopy (.Values.config | default dict)) $owned -}}
{{- range $section, $body := $config -}}
{{- if not $body -}}{{- $_ := unset $config $section -}}{{- end -}}
{{- end -}}
{{- $_ := set $.out "config" $config -}}
{{- end -}}
{{- end -}}

{{/* The sidecar configuration as YAML: what checksum/pathwatch-config is computed over (unchanged
since the ConfigMap holds JSON, so an upgrade does not roll the pods for the new spelling). */}}
{{- define "pathwatch.sidecarConfig" -}}
{{- $out := dict -}}
{{- include "pathwatch.sidecarConfigInto" (dict "ctx" . "out" $out) -}}
{{- toYaml $out.config -}}
{{- end -}}

{{/* The text of sidecar.yaml in the ConfigMap: the configuration as indented JSON
(pathwatch.yamlSafeJson), so that every string reaches the sidecar's PyYAML loader as written: toYaml
wrote a bare `=` (e.g. a rules.required_events entry) plain, YAML 1.1's value tag the loader cannot
construct (the sidecar exits 2), U+2028/U+2029 at a string's end raw inside the ConfigMap's block
scalar (the manifest no longer parsed), U+0085 as a raw NEL the loader read as a space. */}}
{{- define "pathwatch.sidecarConfigText" -}}
{{- $out := dict -}}
{{- include "pathwatch.sidecarConfigInto" (dict "ctx" . "out" $out) -}}
{{- include "pathwatch.yamlSafeJson" $out.config -}}
{{- end -}}

{{/* The salt of the secrets' checksum annotations. Anyone allowed to read pods (a wider audience than
the Secret's readers) sees the annotations: a bare SHA-256 of a secret let them test guesses offline
(a guessed HMAC key re-identifies users from their pseudonyms; a guessed token opens the API). Salted
with a random value kept in the Secret, an annotation tells them nothing without it. The salt is
secrets.checksumSalt, else the live Secret's (read back on upgrade, so an unchanged secret rolls no
pod), else drawn anew: at install, and on every helm template or --dry-run, which have no cluster to
read it from (those pipelines set secrets.checksumSalt, or every apply rolls the pods). Drawn once
per render: it is kept in .Values.secrets, which every template of the render shares, so the Secret
and each annotation agree. */}}
{{- define "pathwatch.checksumSalt" -}}
{{- if not .Values.secrets.checksumSalt -}}
{{- $live := lookup "v1" "Secret" .Release.Namespace (include "pathwatch.fullname" .) | default dict -}}
{{- $_ := set .Values.secrets "checksumSalt" (dig "data" "checksum-salt" "" $live | b64dec | default (randAlphaNum 32)) -}}
{{- end -}}
{{- .Values.secrets.checksumSalt -}}
{{- end -}}

{{/* secrets.apiToken as the sidecar reads PATHWATCH_API_TOKEN: without surrounding whitespace (Python's,
as pathwatch.validate's $space), which the chart's Secret holds. Every reader of the Secret's key gets
what the sidecar compares against: the monitors' authorization (the prometheus-operator sends the
value as it is, and "Bearer <token>\n" is no valid header: nothing was scraped), an API client's
kubectl. A token given with --set-file ends in a line break. */}}
{{- define "pathwatch.givenApiToken" -}}
{{- $space := `\t\n\v\f\r\x1c-\x1f \x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}` -}}
{{- regexReplaceAll (printf `^[%s]+|[%s]+$` $space $space) (.Values.secrets.apiToken | default "" | toString) "" -}}
{{- end -}}

{{/* A checksum of secrets given in the values (a list), salted (pathwatch.checksumSalt); JSON keeps
the parts apart. */}}
{{- define "pathwatch.secretChecksum" -}}
{{- prepend .secrets (include "pathwatch.checksumSalt" .ctx) | toJson | sha256sum -}}
{{- end -}}

{{/* Pod annotations that roll the pods running the sidecar when what they read at start changes: the
sidecar configuration, the API token and the webhook URL (secrets.webhookUrl, an annotation of its own
in both modes), and Alertmanager's password or bearer token (secrets.alertmanagerPassword /
alertmanagerBearerToken, one annotation of its own in both modes) given in the values. In sidecar mode the pod is the backend's,
so also what the backend reads (pathwatch.backendPodAnnotations: the HMAC key, a changed key on some
pods only would make false bleed findings, and the path map of pathmap.content): one checksum of the
token and the key. In gateway mode the gateway pods read the token only; the backends carry
pathwatch.backendPodAnnotations. The secrets' checksums are salted (pathwatch.checksumSalt). A Secret
of secrets.existingSecret, a ConfigMap of pathmap.existingConfigMap, are the owner's to roll. */}}
{{- define "pathwatch.podAnnotations" -}}
checksum/pathwatch-config: {{ include "pathwatch.sidecarConfig" . | sha256sum }}
{{- if eq .Values.mode "sidecar" }}
{{- if and (not .Values.secrets.existingSecret) (or .Values.secrets.apiToken .Values.secrets.hmacKey) }}
checksum/pathwatch-secret: {{ include "pathwatch.secretChecksum" (dict "ctx" . "secrets" (list .Values.secrets.apiToken .Values.secrets.hmacKey)) }}
{{- end }}
{{- include "pathwatch.pathmapChecksum" . }}
{{- else if and (not .Values.secrets.existingSecret) .Values.secrets.apiToken }}
checksum/pathwatch-api-token: {{ include "pathwatch.secretChecksum" (dict "ctx" . "secrets" (list .Values.secrets.apiToken)) }}
{{- end }}
{{- if and (not .Values.secrets.existingSecret) .Values.secrets.webhookUrl }}
checksum/pathwatch-webhook-url: {{ include "pathwatch.secretChecksum" (dict "ctx" . "secrets" (list .Values.secrets.webhookUrl)) }}
{{- end }}
{{- if and (not .Values.secrets.existingSecret) (or .Values.secrets.alertmanagerPassword .Values.secrets.alertmanagerBearerToken) }}
checksum/pathwatch-alertmanager-credentials: {{ include "pathwatch.secretChecksum" (dict "ctx" . "secrets" (list (.Values.secrets.alertmanagerPassword | default "") (.Values.secrets.alertmanagerBearerToken | default ""))) }}
{{- end }}
{{- end -}}

{{/* Pod annotations of a gateway-mode backend pod (empty when there is nothing to checksum): they roll
it when the HMAC key given in the values or pathmap.content changes, both read by the backend at start.
In sidecar mode pathwatch.podAnnotations holds them already. */}}
{{- define "pathwatch.backendPodAnnotations" -}}
{{- if and (not .Values.secrets.existingSecret) .Values.secrets.hmacKey }}
checksum/pathwatch-hmac-key: {{ include "pathwatch.secretChecksum" (dict "ctx" . "secrets" (list .Values.secrets.hmacKey)) }}
{{- end }}
{{- include "pathwatch.pathmapChecksum" . }}
{{- end -}}

{{/* The text of the path map ConfigMap: pathmap.content as indented JSON, which YAML 1.1 and 1.2 readers
(sigs.k8s.io/yaml reading the manifest, the backend's PyYAML) take alike: every string is double-quoted,
so none is read as another type (toYaml wrote a bare `=`, YAML 1.1's value tag the backend's loader
cannot construct), and the characters YAML 1.1 reads as line breaks or refuses are \u escapes (JSON
escapes U+2028/U+2029 and controls itself; NEL U+0085, DEL and the other C1 controls, U+FEFF, U+FFFE
and U+FFFF here), so that no raw break splits the ConfigMap's block scalar or folds a value. */}}
{{- define "pathwatch.pathmapText" -}}
{{- include "pathwatch.yamlSafeJson" .Values.pathmap.content -}}
{{- end -}}

{{/* An object as indented JSON that YAML 1.1 and 1.2 readers take alike (pathwatch.pathmapText): the
ConfigMap text of the path map and of sidecar.yaml. */}}
{{- define "pathwatch.yamlSafeJson" -}}
{{- $text := toPrettyJson . -}}
{{- range $code := concat (untilStep 127 160 1) (list 65279 65534 65535) -}}
{{- $text = replace (printf "%c" $code) (printf "\\u%04x" $code) $text -}}
{{- end -}}
{{- $text -}}
{{- end -}}

{{/* The annotation that rolls a backend pod when pathmap.content changes (nothing without it). */}}
{{- define "pathwatch.pathmapChecksum" -}}
{{- if and .Values.pathmap.content (not .Values.pathmap.existingConfigMap) }}
checksum/pathwatch-pathmap: {{ toYaml .Values.pathmap.content | sha256sum }}
{{- end }}
{{- end -}}

{{- define "pathwatch.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}

{{/* The demo backend pod's securityContext: demoBackend.podSecurityContext. Where the values lack the
key (`helm upgrade --reuse-values` of a release whose chart had none, or the key set to null) the
sidecar's podSecurityContext, which the demo backend had before: not no context at all. */}}
{{- define "pathwatch.demoBackendPodSecurityContext" -}}
{{- if kindIs "map" .Values.demoBackend.podSecurityContext -}}
{{- with .Values.demoBackend.podSecurityContext -}}{{- toYaml . -}}{{- end -}}
{{- else -}}
{{- include "pathwatch.podSecurityContext" . -}}
{{- end -}}
{{- end -}}

{{/*
The pull secrets of the chart's images, as list items of a pod's imagePullSecrets (empty when there are
none: then leave out the key). Every pod running a chart image includes it: the gateway's, the demo
backend's and, in sidecar mode, your backend's, which runs the pathwatch image:
  {{- with include "pathwatch.imagePullSecrets" .Subcharts.pathwatch }}
  imagePullSecrets:
    {{- . | nindent 4 }}
  {{- end }}
imagePullSecrets takes the form Kubernetes writes ({name: regcred}) and plain names (regcred); a name
given twice is one item (server-side apply refuses two entries of one name).
*/}}
{{- define "pathwatch.imagePullSecrets" -}}
{{- $names := list -}}
{{- range .Values.imagePullSecrets | default list -}}
{{- if kindIs "map" . -}}
{{- $names = append $names (get . "name" | default "" | toString) -}}
{{- else -}}
{{- $names = append $names (toString .) -}}
{{- end -}}
{{- end -}}
{{- $items := list -}}
{{- range $names | compact | uniq -}}
{{- $items = append $items (dict "name" .) -}}
{{- end -}}
{{- with $items -}}{{- toYaml . -}}{{- end -}}
{{- end -}}

{{/*
The sidecar container, as one item of a container list:
  containers:            (or initContainers: when sidecar.native is true)
    {{- include "pathwatch.sidecarContainer" .Subcharts.pathwatch | nindent 4 }}
*/}}
{{- define "pathwatch.sidecarContainer" -}}
- name: pathwatch
  image: {{ include "pathwatch.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if and .Values.sidecar.native (eq .Values.mode "sidecar") }}
  restartPolicy: Always
  {{- end }}
  command: ["pathwatch", "sidecar", "--config", "/etc/pathwatch/sidecar.yaml"]
  env:
    - name: PATHWATCH_API_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ include "pathwatch.secretName" . }}
          key: {{ .Values.secrets.apiTokenKey }}
    {{- with include "pathwatch.webhookUrlKey" . }}
    - name: PATHWATCH_WEBHOOK_URL
      valueFrom:
        secretKeyRef:
          name: {{ include "pathwatch.secretName" $ }}
          key: {{ . }}
    {{- end }}
    {{- with include "pathwatch.alertmanagerPasswordKey" . }}
    - name: PATHWATCH_ALERTMANAGER_PASSWORD
      valueFrom:
        secretKeyRef:
          name: {{ include "pathwatch.secretName" $ }}
          key: {{ . }}
    {{- end }}
    {{- with include "pathwatch.alertmanagerBearerTokenKey" . }}
    - name: PATHWATCH_ALERTMANAGER_BEARER_TOKEN
      valueFrom:
        secretKeyRef:
          name: {{ include "pathwatch.secretName" $ }}
          key: {{ . }}
    {{- end }}
    {{- with .Values.sidecar.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: pathwatch-api
      containerPort: {{ .Values.ports.api }}
      protocol: TCP
    {{- if eq .Values.mode "gateway" }}
    - name: otlp-grpc
      containerPort: {{ .Values.ports.otlpGrpc }}
      protocol: TCP
    - name: otlp-http
      containerPort: {{ .Values.ports.otlpHttp }}
      protocol: TCP
    {{- end }}
  {{- /* A probe set to null (livenessProbe: null, the common way to turn one off) is left out, as
       resources and securityContext set to null are; helm drops a null key, so it arrives missing. */}}
  {{- if kindIs "map" .Values.livenessProbe }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: pathwatch-api
    {{- with .Values.livenessProbe }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  {{- if eq .Values.mode "sidecar" }}
  {{- /* In the backend's pod a readiness probe would take the backend out of its Service whenever
       pathwatch answers slowly: pathwatch must never break the backend. A startup probe only
       (a native sidecar's also holds the backend's start until the receivers listen). */}}
  startupProbe:
    httpGet:
      path: /readyz
      port: pathwatch-api
    periodSeconds: 1
    timeoutSeconds: {{ dig "timeoutSeconds" 2 (.Values.readinessProbe | default dict) | default 2 }}
    failureThreshold: 60
  {{- else if kindIs "map" .Values.readinessProbe }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: pathwatch-api
    {{- with .Values.readinessProbe }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  {{- with .Values.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: pathwatch-config
      mountPath: /etc/pathwatch
      readOnly: true
    - name: pathwatch-data
      mountPath: {{ .Values.persistence.mountPath }}
    - name: pathwatch-tmp
      mountPath: /tmp
{{- end -}}

{{/*
The pod volumes the sidecar container (and the backend's path map mount) need, as list items:
  volumes:
    {{- include "pathwatch.sidecarVolumes" .Subcharts.pathwatch | nindent 4 }}
In gateway mode with persistence the StatefulSet's volumeClaimTemplates provide pathwatch-data.
*/}}
{{- define "pathwatch.sidecarVolumes" -}}
- name: pathwatch-config
  configMap:
    name: {{ include "pathwatch.configMapName" . }}
{{- if not (include "pathwatch.gatewayIsStatefulSet" .) }}
- name: pathwatch-data
  {{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "pathwatch.claimName" . }}
  {{- else }}
  emptyDir: {}
  {{- end }}
{{- end }}
- name: pathwatch-tmp
  emptyDir: {}
{{- if eq .Values.mode "sidecar" }}
{{- with include "pathwatch.backendVolumes" . }}
{{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
The backend's own volumes (the path map), as list items; pathwatch.sidecarVolumes includes them in
sidecar mode. A gateway-mode backend pod includes this one instead.
*/}}
{{- define "pathwatch.backendVolumes" -}}
{{- if include "pathwatch.hasPathmap" . -}}
- name: pathwatch-pathmap
  configMap:
    name: {{ include "pathwatch.pathmapConfigMapName" . }}
{{- end -}}
{{- end -}}

{{/*
Environment for the backend container (a list): the HMAC key, the path map location and where to send
OTLP. Spans leave through pathwatch's own exporter (PATHWATCH_OTLP_ENDPOINT, docs/pathmap.md), as in
README step 2: it needs only the `pathwatch` package in the backend image. The OTEL_EXPORTER_OTLP_*
variables would configure nothing there: only opentelemetry-distro turns them into an SDK exporter.
  env:
    {{- include "pathwatch.backendEnv" .Subcharts.pathwatch | nindent 4 }}
A backend whose opentelemetry-distro exports to an APM of its own includes pathwatch.backendPathwatchEnv
instead (the PATHWATCH_* variables alone) beside its own OTEL_*_EXPORTER: a second entry of one name
after this include is refused by server-side apply (helm 4's default, "duplicate entries for key").
*/}}
{{- define "pathwatch.backendEnv" -}}
{{ include "pathwatch.backendPathwatchEnv" . }}
{{- /* where opentelemetry-distro is installed too, its SDK exporter would send every span a second
     time (pathwatch then adds none, and counts no drops): pathwatch's exporter alone. Metrics and
     logs: the distro would export them over OTLP to a sidecar that answers UNIMPLEMENTED. */}}
- name: OTEL_TRACES_EXPORTER
  value: none
- name: OTEL_METRICS_EXPORTER
  value: none
- name: OTEL_LOGS_EXPORTER
  value: none
{{- end -}}

{{/* The PATHWATCH_* variables of pathwatch.backendEnv alone (a list), for a backend that keeps its own
OTEL_*_EXPORTER settings. */}}
{{- define "pathwatch.backendPathwatchEnv" -}}
- name: PATHWATCH_HMAC_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "pathwatch.secretName" . }}
      key: {{ .Values.secrets.hmacKeyKey }}
{{- if include "pathwatch.hasPathmap" . }}
- name: PATHWATCH_PATHMAP
  value: {{ printf "%s/%s" (trimSuffix "/" .Values.pathmap.mountPath) .Values.pathmap.key | quote }}
{{- end }}
- name: PATHWATCH_OTLP_ENDPOINT
  {{- if eq .Values.mode "gateway" }}
  value: {{ printf "%s.%s.svc:%v" (include "pathwatch.fullname" .) .Release.Namespace .Values.ports.otlpGrpc | quote }}
  {{- else }}
  value: {{ printf "127.0.0.1:%v" .Values.ports.otlpGrpc | quote }}
  {{- end }}
{{- end -}}

{{/*
Volume mounts for the backend container (a list; empty when there is no path map):
  volumeMounts:
    {{- include "pathwatch.backendVolumeMounts" .Subcharts.pathwatch | nindent 4 }}
*/}}
{{- define "pathwatch.backendVolumeMounts" -}}
{{- if include "pathwatch.hasPathmap" . -}}
- name: pathwatch-pathmap
  mountPath: {{ .Values.pathmap.mountPath }}
  readOnly: true
{{- end -}}
{{- end -}}

{{- define "pathwatch.claimSpec" -}}
accessModes:
  {{- toYaml .Values.persistence.accessModes | nindent 2 }}
{{- if .Values.persistence.storageClass }}
storageClassName: {{ ternary "" .Values.persistence.storageClass (eq .Values.persistence.storageClass "-") | quote }}
{{- end }}
resources:
  requests:
    storage: {{ .Values.persistence.size | quote }}
{{- end -}}

{{/* The scrape settings shared by the PodMonitor and the ServiceMonitor. */}}
{{- define "pathwatch.scrapeEndpoint" -}}
path: /metrics
scheme: http
interval: {{ .Values.monitoring.interval }}
scrapeTimeout: {{ .Values.monitoring.scrapeTimeout }}
{{- /* the alert rules find the sidecar by job=~".*pathwatch.*": the job is set, whatever the
     release is named (a PodMonitor's job is otherwise "<namespace>/<its name>") */}}
relabelings:
  - action: replace
    targetLabel: job
    replacement: pathwatch
{{- if .Values.monitoring.authorize }}
authorization:
  type: Bearer
  credentials:
    name: {{ include "pathwatch.secretName" . }}
    key: {{ .Values.secrets.apiTokenKey }}
{{- end }}
{{- end -}}
