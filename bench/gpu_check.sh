#!/usr/bin/env bash
# One prepared GPU check: the cuda tests plus the GPU benchmarks, one JSON (docs/PERFORMANCE.md).
#
#   bash bench/gpu_check.sh [OUT_DIR]        (default OUT_DIR: $OUT, else bench/results)
#
# Runs unattended on a bare GPU machine with this repository and access to the pip registry: it
# creates .venv itself (launch/setup_env.sh; not counted in the time budget), then
#   1. pytest -m cuda tests/test_cuda.py        (<= CUDA_TESTS_S, default 100 s) -> OUT_DIR/cuda_tests.xml
#   2. bench/gpu_check.py                       (<= BENCH_S, default 130 s of sections, among them the
#      memory prediction vs torch.cuda.max_memory_allocated) -> OUT_DIR/gpu_check.json
# so tests + benchmarks stay within 4 minutes on one H100/H200.
#
# Exit codes: 0 all tests passed and every section ran; 1 a test or a section failed (the JSON says
# which); 2 no CUDA device (checked first, before any setup: fails fast on CPU machines).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-bench/results}}
CUDA_TESTS_S=${CUDA_TESTS_S:-100}
BENCH_S=${BENCH_S:-130}

no_cuda() { echo "gpu_check: no CUDA device: $1" >&2; exit 2; }
command -v nvidia-smi >/dev/null 2>&1 || no_cuda "nvidia-smi not found (run this on a GPU machine)"
nvidia-smi -L 2>/dev/null | grep -q "^GPU " || no_cuda "nvidia-smi lists no GPU"

bash launch/setup_env.sh || { echo "gpu_check: launch/setup_env.sh failed" >&2; exit 1; }
.venv/bin/python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || no_cuda "torch.cuda.is_available() is false (CPU-only torch build or driver mismatch)"

mkdir -p "$OUT_DIR"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/spade-dist/torch_extensions}
echo "[gpu_check] $(nvidia-smi -L | head -n 4 | tr '\n' ' ')| load: $(uptime)"
timeout "$CUDA_TESTS_S" .venv/bin/python -m pytest -m cuda tests/test_cuda.py -q -rs -p no:cacheprovider \
  --junitxml="$OUT_DIR/cuda_tests.xml"
tests_rc=$?
echo "[gpu_check] cuda tests exit code $tests_rc"
timeout $((BENCH_S + 60)) .venv/bin/python bench/gpu_check.py --out "$OUT_DIR/gpu_check.json" \
  --junit "$OUT_DIR/cuda_tests.xml" --tests-rc "$tests_rc" --budget-s "$BENCH_S" > "$OUT_DIR/gpu_check.log" 2>&1
bench_rc=$?
tail -n 5 "$OUT_DIR/gpu_check.log"
echo "[gpu_check] wrote $OUT_DIR/gpu_check.json (bench exit code $bench_rc)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && exit 0
exit 1
