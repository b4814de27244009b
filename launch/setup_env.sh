#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install spade-dist into it.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.spade-dist-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing spade-dist and its dependencies (torch 2.14.1 from the local wheel cache)"
  .venv/bin/pip install --quiet --upgrade pip >/dev/null
  # torch first and pinned: anything else that names torch must not pull another build.
  .venv/bin/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
  .venv/bin/pip install --quiet -e ".[dev]"
  touch "$stamp"
fi
echo "[setup] environment ready: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
