#!/usr/bin/env bash
# Set up everything, lint (ruff, configured in pyproject.toml), then run the whole test suite (unit,
# multi-process gloo, end-to-end with services).
# Extra arguments go to pytest, e.g.  ./launch/test.sh -m "not e2e"
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
bash launch/install_services.sh
.venv/bin/ruff check .
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/spade-dist/torch_extensions}
exec .venv/bin/python -m pytest -ra --durations=25 "$@"
