#!/usr/bin/env bash
# Evaluation watcher as its own Slurm job: follows RUN_DIR's committed checkpoints, scores each with
# every metric of the run's eval.metrics (FID / KID / mIoU / pixel accuracy, see docs/EVALUATION.md)
# and ends by itself after the training run's DONE marker. (The file keeps its historical name.)
#
#   RUN_DIR=runs/coco sbatch slurm/eval_fid.sh [extra spade-eval watch args, e.g. --policy newest]
#
# slurm/train_gaugan.sh submits it (eval.mode: slurm) with --dependency=after:<training job>.
# Settings (environment variables):
#   RUN_DIR       the training run directory (required; its config.yaml is read unless CONFIG is set)
#   CONFIG        a config file (or a shipped preset's name) instead of RUN_DIR/config.yaml
#   SPADE_DEVICE  gpu | cpu | auto (auto: gpu when the job has GPUs)
#   SPADE_ENV     a file to source first (default .venv/bin/activate)
#   SPADE_INCEPTION_WEIGHTS  the Inception weights file when eval.inception_weights is not set
# The segmenter (miou / pixel_accuracy) is eval.segmenter.path of the config, or an extra argument
# such as eval.segmenter.path=/data/segmenters/drn-d-105-cityscapes.pt after the script name.
# Several tasks (sbatch --ntasks=N) split generation, features and confusion matrices across N processes
# (the same scores as one process).
# Requeue-safe: a restarted job skips the steps already in RUN_DIR/eval/metrics.jsonl.
# Exit codes: 0 done (the run finished and every checkpoint was handled), 2 bad settings or spade-eval
# refused its input (e.g. no Inception weights, a missing segmenter or a class map that does not fit:
# the message names the file and key), else its code.
#
# Resources: one GPU by default (override with sbatch --gpus-per-node=N for N tasks, or
# --gpus-per-node=0 for a CPU job, which then uses --cpus-per-task threads per task).
#SBATCH --job-name=gaugan-fid
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --time=72:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -uo pipefail

EXIT_BAD_SETTINGS=2
log() { echo "[eval_fid $(date -u +%H:%M:%S)] $*"; }

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}" || exit $EXIT_BAD_SETTINGS
ROOT=$(pwd)
SPADE_ENV=${SPADE_ENV:-$ROOT/.venv/bin/activate}
# shellcheck disable=SC1090
[ -f "$SPADE_ENV" ] && . "$SPADE_ENV"

if [ -z "${RUN_DIR:-}" ]; then
  log "RUN_DIR is required (the training run directory)"
  exit $EXIT_BAD_SETTINGS
fi
if [ -n "${CONFIG:-}" ] && ! python -m spade_dist.cli.show_config --config "$CONFIG" --get eval.mode >/dev/null; then
  log "CONFIG: not a config file or preset: $CONFIG"
  exit $EXIT_BAD_SETTINGS
fi
# The run directory's layout comes from the project (spade-run), never spelled out here.
EVAL_DIR=$(python -m spade_dist.cli.run path --run-dir "$RUN_DIR" eval) && mkdir -p "$EVAL_DIR" || exit $EXIT_BAD_SETTINGS

DEVICE=${SPADE_DEVICE:-auto}
if [ "$DEVICE" = auto ]; then
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] || [ -n "${SLURM_JOB_GPUS:-}" ] || [ -n "${SLURM_STEP_GPUS:-}" ]; then
    DEVICE=gpu
  else
    DEVICE=cpu
  fi
fi
case "$DEVICE" in
  gpu) EVAL_DEVICE=cuda ;;
  cpu) EVAL_DEVICE=cpu; export CUDA_VISIBLE_DEVICES= ;;
  *) log "SPADE_DEVICE must be gpu, cpu or auto, got $DEVICE"; exit $EXIT_BAD_SETTINGS ;;
esac
THREADS=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=$THREADS SPADE_EVAL_CPU_THREADS=$THREADS

ARGS=(watch --run-dir "$RUN_DIR" --device "$EVAL_DEVICE")
[ -n "${CONFIG:-}" ] && ARGS+=(--config "$CONFIG")
ARGS+=("$@")

NTASKS=${SLURM_NTASKS:-1}
log "job ${SLURM_JOB_ID:-local} restart=${SLURM_RESTART_COUNT:-0} run_dir=$RUN_DIR device=$DEVICE tasks=$NTASKS"
if [ "$NTASKS" -gt 1 ]; then
  # One process per task; spade-eval joins the process group from the torch.distributed variables.
  HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  export MASTER_ADDR=$HEAD MASTER_PORT=${MASTER_PORT:-$((29600 + ${SLURM_JOB_ID:-0} % 1000))} WORLD_SIZE=$NTASKS
  srun --kill-on-bad-exit=1 bash -c \
    'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID; exec python -m spade_dist.cli.eval "$@"' spade-eval "${ARGS[@]}"
else
  python -m spade_dist.cli.eval "${ARGS[@]}"
fi
code=$?
log "spade-eval exited with $code"
exit $code
