#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install spade-dist into it.
# Versions: pyproject.toml declares compatible ranges; launch/constraints.txt pins the tested set
# (torch 2.14.1, torchvision 0.29.1, ...), and this script installs exactly that set.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.spade-dist-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ launch/constraints.txt -nt "$stamp" ] \
   || [ setup.py -nt "$stamp" ]; then
  echo "[setup] installing spade-dist and its dependencies (tested versions: launch/constraints.txt)"
  .venv/bin/pip install --quiet --upgrade pip >/dev/null
  .venv/bin/pip install --quiet -c launch/constraints.txt -e ".[dev]"
  touch "$stamp"
fi
echo "[setup] environment ready: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
