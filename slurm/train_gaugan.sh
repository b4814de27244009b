#!/usr/bin/env bash
# Train GauGAN on a Slurm cluster:   sbatch slurm/train_gaugan.sh
#
# Settings (environment variables; `sbatch --export=ALL,CONFIG=...` or exported before sbatch):
#   CONFIG        YAML config, or a shipped preset's name (default configs/coco_stuff.yaml)
#   RUN_DIR       run directory on the shared filesystem (default runs/$SLURM_JOB_NAME)
#   OVERRIDES     dotted overrides, space separated (e.g. "data.batch_size=4 model.ngf=32");
#                 arguments after the script name are appended to them. Live metrics are on by default
#                 (metrics.enabled=true metrics.bind=0.0.0.0 metrics.port_base=0, docs/MONITORING.md);
#                 OVERRIDES come after and win, e.g. metrics.enabled=false or metrics.port_base=9400
#   LAUNCHER      torchrun | deepspeed | auto (default auto: deepspeed when train.backend is deepspeed,
#                 else torchrun, whose workers run the Accelerate backend)
#   NPROC_PER_NODE processes per node (default: GPUs per node, or 1 in CPU mode)
#   SPADE_DEVICE  gpu | cpu | auto (auto: cpu when the job has no GPUs, e.g. sbatch --gpus-per-node=0)
#   MASTER_PORT   rendezvous port on the head node (default 29500 + job id % 1000); with torchrun the
#                 batch shell itself hosts the rendezvous store there (spade-run rendezvous)
#   SPADE_ENV     a file to source first (e.g. a venv's bin/activate); default: .venv/bin/activate
#   SUBMIT_EVAL   1 to submit slurm/eval_fid.sh on first start (default: when eval.mode is slurm)
#   EVAL_CPUS     CPUs of the FID watcher job in CPU mode (default 1)
#   NCCL_DEBUG    NCCL log level for the training processes (default WARN; INFO to debug hangs)
#   PYTHONFAULTHANDLER  Python tracebacks on fatal signals / hangs (default 1)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING  what a failed / timed-out NCCL collective does (default 1: tear the
#                 process down, so srun --kill-on-bad-exit ends the step instead of hanging)
#   GPU_MEMORY_GIB  memory of one GPU for the start-up memory plan (default: nvidia-smi's, GPU mode only);
#                 the plan (spade-config --plan, docs/PERFORMANCE.md) is printed, with a warning when the
#                 configured data.batch_size will not fit
#   SPADE_EXTRA_ENV  more environment for the training processes: space-separated NAME=VALUE pairs
#                 (e.g. "NCCL_IB_HCA=mlx5 NCCL_SOCKET_IFNAME=ib0"); exported on every node
#
# CPU mode (a test cluster without GPUs):
#   SPADE_DEVICE=cpu sbatch --gpus-per-node=0 slurm/train_gaugan.sh
#
# Exit codes of this script (and so of the job):
#   0   training finished (the run's DONE marker exists and the launcher exited 0)
#   checkpoint.requeue_exit_code (75 by default): the run committed a checkpoint and asked to be
#       restarted (its REQUEUE marker exists), and the job was requeued
#   2   bad settings (missing config, malformed SPADE_EXTRA_ENV, unknown LAUNCHER, MASTER_PORT in use,
#       ...), as every spade-dist command
#   other: training failed with that code (1 when the launcher exited 0 without DONE or REQUEUE)
# The requeue decision reads the REQUEUE marker (spade-run verdict), not the exit code: launchers
# translate exit codes (DeepSpeed's launcher reports 1 for a worker's 75; srun one node's). See docs/SLURM.md.
#
#SBATCH --job-name=gaugan
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -uo pipefail

EXIT_BAD_SETTINGS=2

log() { echo "[train_gaugan $(date -u +%H:%M:%S)] $*"; }

# sbatch runs a copy of the script from the spool dir: use the submit dir as the project root.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}" || exit $EXIT_BAD_SETTINGS
ROOT=$(pwd)
SPADE_ENV=${SPADE_ENV:-$ROOT/.venv/bin/activate}
# shellcheck disable=SC1090
[ -f "$SPADE_ENV" ] && . "$SPADE_ENV"

CONFIG=${CONFIG:-configs/coco_stuff.yaml}
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-gaugan}}
OVERRIDES="metrics.enabled=true metrics.bind=0.0.0.0 metrics.port_base=0 ${OVERRIDES:-} $*"
RESTART_COUNT=${SLURM_RESTART_COUNT:-0}

# Environment of the training processes (srun exports the batch shell's environment to every node).
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export PYTHONFAULTHANDLER=${PYTHONFAULTHANDLER:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
for pair in ${SPADE_EXTRA_ENV:-}; do
  if [[ ! "$pair" =~ ^[A-Za-z_][A-Za-z0-9_]*=.*$ ]]; then
    log "SPADE_EXTRA_ENV: '$pair' is not NAME=VALUE"
    exit $EXIT_BAD_SETTINGS
  fi
  export "$pair"
done
NNODES=${SLURM_JOB_NUM_NODES:-1}
mkdir -p "$RUN_DIR"
RUN_DIR=$(cd "$RUN_DIR" && pwd)

# Resolve the effective settings through the project's own config loader (one source of truth; a
# missing config file or unknown preset name is its one-line error, above this script's own).
read -r BACKEND EVAL_MODE REQUEUE_RC < <(python -m spade_dist.cli.show_config --config "$CONFIG" \
    --get train.backend eval.mode checkpoint.requeue_exit_code -- $OVERRIDES) || {
  log "invalid config $CONFIG with overrides '$OVERRIDES'"; exit $EXIT_BAD_SETTINGS; }

GPUS=${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
GPUS=${GPUS##*:}  # "gpu:8" -> 8
DEVICE=${SPADE_DEVICE:-auto}
if [ "$DEVICE" = auto ]; then
  if [ "${GPUS:-0}" -gt 0 ] 2>/dev/null; then DEVICE=gpu; else DEVICE=cpu; fi
fi
if [ "$DEVICE" = cpu ]; then
  NPROC_PER_NODE=${NPROC_PER_NODE:-1}
  export ACCELERATE_USE_CPU=1
  DEVICE_OVERRIDE="train.device=cpu"
else
  NPROC_PER_NODE=${NPROC_PER_NODE:-$GPUS}
  DEVICE_OVERRIDE="train.device=cuda"
fi
LAUNCHER=${LAUNCHER:-auto}
[ "$LAUNCHER" = auto ] && { [ "$BACKEND" = deepspeed ] && LAUNCHER=deepspeed || LAUNCHER=torchrun; }
case "$LAUNCHER" in
  torchrun|deepspeed) ;;
  *) log "LAUNCHER: '$LAUNCHER' is not torchrun, deepspeed or auto"; exit $EXIT_BAD_SETTINGS ;;
esac

# A node's address as Slurm knows it (NodeAddr), so that node names need not resolve; exported for
# the launch command, which runs on every node.
node_addr() {
  local addr
  addr=$(scontrol show node "$1" -o | tr ' ' '\n' | sed -n 's/^NodeAddr=//p')
  echo "${addr:-$1}"
}
export -f node_addr
# Head node: the first host of the allocation, where this batch shell runs.
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
HEAD_ADDR=$(node_addr "$HEAD_NODE")
MASTER_PORT=${MASTER_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 1000))}
WORLD_SIZE=$((NNODES * NPROC_PER_NODE))
# Run directory entries come from the project (spade-run), never spelled out here. `prepare` removes
# a STOP / REQUEUE left by the previous start of this job.
{ read -r STOP_FILE && read -r EVAL_DIR && read -r HOSTFILE && read -r EVAL_JOB_FILE; } < <(
  python -m spade_dist.cli.run path --run-dir "$RUN_DIR" stop eval deepspeed_hostfile eval_job) || {
  log "cannot resolve the run directory layout of $RUN_DIR"; exit $EXIT_BAD_SETTINGS; }
python -m spade_dist.cli.run prepare --run-dir "$RUN_DIR" || { log "cannot prepare $RUN_DIR"; exit $EXIT_BAD_SETTINGS; }

log "job ${SLURM_JOB_ID:-?} restart=$RESTART_COUNT nodes=$NNODES ($SLURM_JOB_NODELIST) head=$HEAD_NODE/$HEAD_ADDR:$MASTER_PORT"
log "launcher=$LAUNCHER device=$DEVICE procs/node=$NPROC_PER_NODE world=$WORLD_SIZE run_dir=$RUN_DIR config=$CONFIG"
log "env: NCCL_DEBUG=$NCCL_DEBUG PYTHONFAULTHANDLER=$PYTHONFAULTHANDLER TORCH_NCCL_ASYNC_ERROR_HANDLING=$TORCH_NCCL_ASYNC_ERROR_HANDLING SPADE_EXTRA_ENV='${SPADE_EXTRA_ENV:-}'"
# Memory plan for this allocation (informational: an unmeasured architecture only logs that).
if [ -z "${GPU_MEMORY_GIB:-}" ] && [ "$DEVICE" = gpu ] && command -v nvidia-smi >/dev/null; then
  GPU_MEMORY_GIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0 | awk '{printf "%.1f", $1 / 1024}')
fi
if [ -n "${GPU_MEMORY_GIB:-}" ]; then
  python -m spade_dist.cli.show_config --config "$CONFIG" --plan --gpu-memory "$GPU_MEMORY_GIB" --gpus "$WORLD_SIZE" \
    -- $OVERRIDES || log "no memory plan for this config (see above)"
fi

# The FID watcher follows the checkpoints as its own job; submit it once, on the first start.
SUBMIT_EVAL=${SUBMIT_EVAL:-$([ "$EVAL_MODE" = slurm ] && echo 1 || echo 0)}
if [ "$SUBMIT_EVAL" = 1 ] && [ "$RESTART_COUNT" -eq 0 ] && [ ! -f "$EVAL_JOB_FILE" ]; then
  mkdir -p "$EVAL_DIR"
  # The watcher reads the run's resolved RUN_DIR/config.yaml (overrides included): CONFIG is cleared
  # so that this script's own CONFIG (the unresolved preset) does not leak into its environment.
  EVAL_EXTRA=()
  # CPU mode: no GPU and few CPUs for the watcher (EVAL_CPUS, default 1).
  [ "$DEVICE" = cpu ] && EVAL_EXTRA+=(--gpus-per-node=0 --cpus-per-task="${EVAL_CPUS:-1}")
  eval_job=$(RUN_DIR="$RUN_DIR" sbatch --parsable --dependency="after:${SLURM_JOB_ID}" \
    --output="$EVAL_DIR/slurm-%j.out" "${EVAL_EXTRA[@]}" --export=ALL,RUN_DIR="$RUN_DIR",CONFIG=,SPADE_ENV="$SPADE_ENV" \
    slurm/eval_fid.sh) && echo "$eval_job" > "$EVAL_JOB_FILE" && log "submitted FID watcher job $eval_job"
fi

# Preemption / time limit: Slurm signals this batch shell (--signal=B:USR1@...). The training processes
# watch the run's STOP file (any launcher, any node, shared filesystem): they agree on a step,
# checkpoint synchronously, write the run's REQUEUE marker and exit with checkpoint.requeue_exit_code.
PREEMPTED=0
on_preempt() {
  log "preemption signal: asking the training processes to checkpoint and stop"
  PREEMPTED=1
  touch "$STOP_FILE"
}
trap on_preempt USR1 TERM

TRAIN_ARGS=(--config "$CONFIG" --resume auto train.run_dir="$RUN_DIR" "$DEVICE_OVERRIDE" checkpoint.stop_file="$STOP_FILE" $OVERRIDES)
if [ "$LAUNCHER" = deepspeed ]; then
  # DeepSpeed's launcher without ssh: every node runs it with --no_ssh --node_rank, and all of them
  # need a hostfile listing every node of the allocation (without one it refuses >1 node).
  scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$NPROC_PER_NODE/" > "$HOSTFILE"
  LAUNCH='deepspeed --hostfile='"$HOSTFILE"' --no_ssh --node_rank=$SLURM_NODEID \
    --master_addr='"$HEAD_ADDR"' --master_port='"$MASTER_PORT"' --module spade_dist.cli.train'
else
  # torchrun's c10d rendezvous in a store that this shell hosts for the whole step (is_host=false on
  # every node): an agent hosting it would leave with it while the others still wait in torchrun's
  # exit barrier, which ends a successful run with a traceback (spade_dist/rendezvous_store.py).
  STORE_READY=$(mktemp -u "${TMPDIR:-/tmp}/spade-rdzv-${SLURM_JOB_ID:-0}.XXXXXX")
  python -m spade_dist.cli.run rendezvous --port "$MASTER_PORT" --ready-file "$STORE_READY" &
  STORE_PID=$!
  until [ -e "$STORE_READY" ]; do
    kill -0 $STORE_PID 2>/dev/null || { log "no rendezvous store on port $MASTER_PORT: set MASTER_PORT to a free port"; exit $EXIT_BAD_SETTINGS; }
    sleep 0.2
  done
  rm -f "$STORE_READY"
  # torchrun's agent through spade_dist/launcher.py: a scancel / requeue SIGTERM is forwarded to the
  # workers (checkpoint, REQUEUE) and the agent ends in one line with the workers' exit code, not in
  # torch's SignalException traceback.
  LAUNCH='python -m spade_dist.launcher --nnodes='"$NNODES"' --nproc-per-node='"$NPROC_PER_NODE"' --rdzv-backend=c10d \
    --rdzv-endpoint='"$HEAD_ADDR:$MASTER_PORT"' --rdzv-id='"${SLURM_JOB_ID:-0}-$RESTART_COUNT"' \
    --rdzv-conf=is_host=false --local-addr="$(node_addr "$SLURMD_NODENAME")" -m spade_dist.cli.train'
fi
# One launcher per node; each starts NPROC_PER_NODE processes. Run srun in the background so the
# trap can fire while we wait.
srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  bash -c "$LAUNCH"' "$@"' _ "${TRAIN_ARGS[@]}" &
SRUN_PID=$!
while true; do
  wait $SRUN_PID
  rc=$?
  # `wait` returns > 128 when interrupted by a trapped signal while the step still runs.
  if kill -0 $SRUN_PID 2>/dev/null; then continue; fi
  break
done
# Every node's launcher has exited: the rendezvous store is no longer needed.
[ -n "${STORE_PID:-}" ] && { kill -HUP $STORE_PID 2>/dev/null; wait $STORE_PID 2>/dev/null; }

# What to do follows from the run's DONE / REQUEUE markers (spade-run verdict), not from $rc alone.
PREEMPTED_FLAG=()
[ $PREEMPTED -eq 1 ] && PREEMPTED_FLAG=(--preempted)
read -r ACTION JOB_RC VERDICT < <(python -m spade_dist.cli.run verdict --run-dir "$RUN_DIR" --rc "$rc" "${PREEMPTED_FLAG[@]}" \
    --requeue-exit-code "$REQUEUE_RC") || { ACTION=failed; JOB_RC=1; VERDICT="cannot read the outcome of $RUN_DIR"; }
log "$VERDICT"
python -m spade_dist.cli.run prepare --run-dir "$RUN_DIR"  # STOP / REQUEUE have been read: the next start begins clean
# Slurm counts every requeue in the job's Restarts; more than this start's SLURM_RESTART_COUNT means the
# job is already requeued (an external `scontrol requeue` or a preemption with PreemptMode=REQUEUE,
# which signal this shell with TERM): then a second requeue would only fail ("Job is pending execution").
requeued_by_slurm() {
  local restarts
  restarts=$(scontrol show job "$SLURM_JOB_ID" -o 2>/dev/null | tr ' ' '\n' | sed -n 's/^Restarts=//p')
  [ "${restarts:-0}" -gt "$RESTART_COUNT" ] 2>/dev/null
}
if [ "$ACTION" = requeue ]; then
  if requeued_by_slurm; then
    log "Slurm has already requeued job $SLURM_JOB_ID: it will continue from the run's last checkpoint"
  else
    log "requeueing job $SLURM_JOB_ID"
    if ! scontrol requeue "$SLURM_JOB_ID" && ! requeued_by_slurm; then
      log "scontrol requeue failed: resubmit this script with the same RUN_DIR to continue"
      exit 1
    fi
  fi
fi
exit "$JOB_RC"
