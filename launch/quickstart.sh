#!/usr/bin/env bash
# Quickstart: the main training job on this machine, CPU only, in a few minutes.
#   1. sets up .venv (launch/setup_env.sh)
#   2. generates the synthetic landscape dataset and shards it (spade-data synth / shard)
#   3. trains a tiny GauGAN with 2 processes (spade-train --nproc-per-node 2, gloo, synchronized BN), with live
#      metrics, TensorBoard logs and - when Inception weights are available - the FID watcher
#   4. prints the run's summary (losses, throughput, FID) and where everything is
# Environment: QUICKSTART_DIR (default work_data/quickstart), QUICKSTART_COUNT (train images, 300),
# QUICKSTART_STEPS (optimizer steps, default from configs/quickstart.yaml); extra arguments are
# passed to spade-train as dotted overrides (e.g. ./launch/quickstart.sh train.max_steps=100).
# A rerun starts a fresh run in the same directory: the whole previous run (checkpoints, logs, samples,
# TensorBoard, FID results, report) is moved to $RUN_DIR/archive/ (checkpoint.existing=archive; the
# newest checkpoint.keep_archives=2 are kept, the log prints their size), never mixed with the new one.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
PY=.venv/bin/python
DATA=${QUICKSTART_DIR:-work_data/quickstart}
COUNT=${QUICKSTART_COUNT:-300}
RUN_DIR=${QUICKSTART_RUN_DIR:-runs/quickstart}

if [ ! -f "$DATA/shards/manifest.json" ]; then
  echo "[quickstart] generating $COUNT synthetic 64 px landscapes in $DATA/raw"
  .venv/bin/spade-data synth --out "$DATA/raw" --count "$COUNT" --val-count 32 --seed 0 --size 64
  for split in train val; do
    .venv/bin/spade-data shard --layout custom --root "$DATA/raw" --out "$DATA/shards" --split "$split" \
      --max-count 64 --no-progress
  done
else
  echo "[quickstart] reusing shards in $DATA/shards"
fi

overrides=("data.shards=$DATA/shards/manifest.json" "data.val_shards=$DATA/shards/manifest.json" "train.run_dir=$RUN_DIR")
# Per-rank Prometheus exporters on free ports (discovery file in $RUN_DIR/metrics while training,
# docs/MONITORING.md) and TensorBoard curves + sample grids in $RUN_DIR/tensorboard.
overrides+=("metrics.enabled=true" "metrics.port_base=0" "train.trackers=[tensorboard]")
# The asynchronous FID job (eval.mode=subprocess) whenever Inception weights are found the way
# spade-eval finds them: eval.inception_weights, $SPADE_INCEPTION_WEIGHTS, or the torch hub cache.
if weights=$("$PY" -c 'import sys
from spade_dist.config import load_config
from spade_dist.eval.inception import resolve_inception_weights
print(resolve_inception_weights(load_config("configs/quickstart.yaml", sys.argv[1:]).eval.inception_weights))' \
    "${overrides[@]}" "$@" 2>/dev/null); then
  echo "[quickstart] FID watcher on (Inception weights: $weights)"
  overrides+=("eval.mode=subprocess")
else
  echo "[quickstart] FID watcher off: no Inception weights; to enable it, export SPADE_INCEPTION_WEIGHTS=/path/to/weights-inception-2015-12-05-6726825d.pth (docs/EVALUATION.md)"
fi
if [ -n "${QUICKSTART_STEPS:-}" ]; then overrides+=("train.max_steps=$QUICKSTART_STEPS"); fi

# spade-train is the launcher of its 2 workers: Ctrl-C checkpoints on both ranks and ends in one line (exit 75).
echo "[quickstart] training: 2 CPU processes (spade-train --nproc-per-node 2, gloo, synchronized BN)"
OMP_NUM_THREADS=1 .venv/bin/spade-train --nproc-per-node 2 \
  --config configs/quickstart.yaml --resume none checkpoint.existing=archive "${overrides[@]}" "$@"

echo
echo "[quickstart] finished. Metrics of the run:"
.venv/bin/spade-report --run-dir "$RUN_DIR" --summary | tail -n +2
echo
echo "[quickstart] Everything is in $RUN_DIR:"
echo "  report          : $RUN_DIR/report.html   (losses, throughput, FID, latest samples)"
echo "  TensorBoard     : $RUN_DIR/tensorboard   (tensorboard --logdir $RUN_DIR/tensorboard)"
echo "  resolved config : $RUN_DIR/config.yaml"
echo "  sample grids    : $RUN_DIR/samples/step-*.png   (colourised label | EMA fake | real)"
echo "  gallery         : $RUN_DIR/samples/index.html"
echo "  checkpoints     : $RUN_DIR/checkpoints/"
if [ -f "$RUN_DIR/eval/metrics.jsonl" ]; then echo "  FID results     : $RUN_DIR/eval/metrics.jsonl"; fi
echo "  done marker     : $RUN_DIR/DONE"
if [ -d "$RUN_DIR/archive" ]; then echo "  earlier runs    : $RUN_DIR/archive/   (checkpoint.keep_archives of them are kept)"; fi
