#!/usr/bin/env bash
# Shard a dataset as a Slurm array job: task i of N writes shards n with n % N == i, then a final job
# (submitted by task 0 with an afterok dependency on the whole array) merges the manifest. The result is
# byte-identical to a single-process `spade-data shard` run.
#
#   LAYOUT=coco-stuff ROOT=/data/coco OUT=/data/shards/coco SPLIT=train \
#     sbatch --array=0-15 slurm/shard_dataset.sh [extra spade-data shard args...]
#
# Settings: LAYOUT, ROOT, OUT (required); SPLIT (default train); SPADE_ENV (file to source, default
# .venv/bin/activate); extra arguments are passed to `spade-data shard` (e.g. --max-count 1000).
# Exit codes: 0 ok, 4 bad settings, otherwise spade-data's exit code.
#
#SBATCH --job-name=shard
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --gpus-per-node=0
#SBATCH --time=04:00:00
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
SPADE_ENV=${SPADE_ENV:-$(pwd)/.venv/bin/activate}
# shellcheck disable=SC1090
[ -f "$SPADE_ENV" ] && . "$SPADE_ENV"

MODE=${1:-}
if [ "$MODE" = "--merge" ]; then
  # The merge step: runs once, after every array task succeeded.
  : "${OUT:?OUT is required}"
  exec python -m data_tools merge-manifest "$OUT" --split "${SPLIT:-train}"
fi

for var in LAYOUT ROOT OUT; do
  if [ -z "${!var:-}" ]; then echo "shard_dataset.sh: $var is required" >&2; exit 4; fi
done
SPLIT=${SPLIT:-train}
INDEX=${SLURM_ARRAY_TASK_ID:-0}
COUNT=${SLURM_ARRAY_TASK_COUNT:-1}
WORKERS=${SLURM_CPUS_PER_TASK:-1}

if [ "$INDEX" -eq "${SLURM_ARRAY_TASK_MIN:-0}" ] && [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
  merge_job=$(sbatch --parsable --dependency="afterok:${SLURM_ARRAY_JOB_ID}" --job-name=shard-merge --cpus-per-task=1 \
    --export=ALL,OUT="$OUT",SPLIT="$SPLIT" --output="${OUT%/}.merge-%j.out" slurm/shard_dataset.sh --merge)
  echo "submitted manifest merge job $merge_job"
fi

python -m data_tools shard --layout "$LAYOUT" --root "$ROOT" --out "$OUT" --split "$SPLIT" \
  --workers "$WORKERS" --shard-slice "$INDEX/$COUNT" --no-progress "$@"
