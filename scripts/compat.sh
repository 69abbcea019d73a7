#!/usr/bin/env bash
# The instrumentation runs in the user's backend, on their Python: its tests (tests/instrumentation,
# tests/test_conventions.py) on each newer Python this machine has, in a venv of its own under
# .cache/ (installed from PyPI the first time, as scripts/setup.sh does for .venv). A version this
# machine lacks is skipped with a message, not failed: Debian 12's packages have 3.11 only, PyPI's
# CPython installers download it from elsewhere at run time, and pyenv's builds are on some
# machines, not all.
# COMPAT_PYTHONS="3.12 3.13" (default) chooses the versions.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE="$ROOT/.cache"
mkdir -p "$CACHE"
versions=${COMPAT_PYTHONS:-3.12 3.13}
tests=(tests/instrumentation tests/test_conventions.py)

# the interpreter of version $1: python3.X on PATH (Debian's, or pyenv's when it is the active one),
# else pyenv's newest build of it; nothing when there is none
interpreter() {
  local v=$1 candidate root
  candidate=$(command -v "python$v" 2>/dev/null || true)
  if [ -n "$candidate" ] && "$candidate" -c 'import sys' >/dev/null 2>&1; then
    echo "$candidate"; return
  fi
  root=${PYENV_ROOT:-${HOME:-}/.pyenv}
  for candidate in $(ls -d "$root/versions/$v".* 2>/dev/null | sort -V -r); do
    if [ -x "$candidate/bin/python$v" ] && "$candidate/bin/python$v" -c 'import sys' >/dev/null 2>&1; then
      echo "$candidate/bin/python$v"; return
    fi
  done
}

status=0
ran=0
for v in $versions; do
  py=$(interpreter "$v")
  if [ -z "$py" ]; then
    printf '\n==> compat: SKIPPED Python %s: not on this machine (no python%s on PATH, none in %s/versions);' \
      "$v" "$v" "${PYENV_ROOT:-${HOME:-}/.pyenv}"
    printf ' %s not run on it\n' "${tests[*]}"
    continue
  fi
  venv="$CACHE/compat-py$v"
  stamp="$venv/.pathwatch-installed"
  if [ -x "$venv/bin/python" ] && ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    rm -rf "$venv"  # made halfway (interrupted): made again
  fi
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    rm -rf "$venv"
    if ! "$py" -m venv "$venv" >"$CACHE/compat-py$v.log" 2>&1; then
      printf '\n==> compat: SKIPPED Python %s: %s cannot make a venv (%s)\n' "$v" "$py" \
        "$(tail -1 "$CACHE/compat-py$v.log")"
      continue
    fi
  fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    printf '\n==> compat: installing pathwatch and its test packages for Python %s (%s)\n' "$v" "$py"
    if ! "$venv/bin/python" -m pip install -q -e '.[sidecar,test]' >"$CACHE/compat-py$v.log" 2>&1; then
      grep -v "is ignored" "$CACHE/compat-py$v.log" >&2 || true
      echo "compat: installing the packages for Python $v failed (pip's output above)" >&2
      exit 1
    fi
    touch "$stamp"
  fi
  printf '\n==> compat: %s on Python %s\n' "${tests[*]}" "$("$venv/bin/python" -c 'import platform; print(platform.python_version())')"
  ran=$((ran + 1))
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}" || status=$?
done
[ "$ran" -gt 0 ] || echo "compat: no newer Python tested here; only the main suite's Python was"
exit "$status"
