#!/usr/bin/env bash
# Creates .venv (once) and installs requirements.txt and requirements-nodeps.txt (--no-deps) into it
# (again only when they change).
# Source it: `source scripts/setup.sh`. Needs Python >= 3.10 with pip. The caller's shell
# options are restored at the end (an interactive shell is not left in `set -euo pipefail`).
_MDLM_CALLER_FLAGS="$-"
_MDLM_CALLER_PIPEFAIL="$(shopt -po pipefail)"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MDLM_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV" 2>/dev/null || {
    echo "[setup] 'python3 -m venv' is unavailable (Debian/Ubuntu: apt install python3-venv); using virtualenv"
    "$PYTHON" -m pip install --user -q virtualenv && "$PYTHON" -m virtualenv -q "$VENV"
  }
fi
STAMP="$VENV/.requirements.sha256"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-nodeps.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing requirements.txt into $VENV (first time: a few minutes)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt"
  "$VENV/bin/python" -m pip install -q --no-deps -r "$ROOT/requirements-nodeps.txt"
  echo "$WANT" > "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
cd "$ROOT"
set +eu
case "$_MDLM_CALLER_FLAGS" in *e*) set -e ;; esac
case "$_MDLM_CALLER_FLAGS" in *u*) set -u ;; esac
eval "$_MDLM_CALLER_PIPEFAIL"
unset _MDLM_CALLER_FLAGS _MDLM_CALLER_PIPEFAIL
