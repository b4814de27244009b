#!/usr/bin/env bash
# Elastic spade-train: one torchrun agent per node, c10d rendezvous, nodes may leave and join.
#
#   SPADE_RDZV_ENDPOINT=head-node:29400 SPADE_NNODES=2:4 SPADE_NPROC_PER_NODE=8 SPADE_RDZV_ID=coco-1 \
#     launch/elastic.sh --config configs/coco_stuff.yaml train.run_dir=/shared/runs/coco ...
#
# Run the same command on every node (by hand, or `srun --ntasks-per-node=1` from a batch script;
# docs/ELASTIC.md). Everything after the script name goes to `spade-train` (spade_dist.cli.train).
# The agent on the host named by SPADE_RDZV_ENDPOINT hosts the rendezvous store: start it first.
# When a node is lost, the survivors' workers fail within train.collective_timeout_s, torchrun
# restarts them (at most SPADE_MAX_RESTARTS times), the rendezvous re-forms with the nodes left
# (at least the MIN of SPADE_NNODES) and the workers resume from the newest committed checkpoint
# at the new world size. A node joining makes the agents restart their workers at the larger size
# (this does not use up a restart). Losing the host of the rendezvous store ends the job.
#
# Environment (defaults in brackets):
#   SPADE_RDZV_ENDPOINT   host:port of the rendezvous store, the same on every node [required]
#   SPADE_NNODES          MIN:MAX nodes [1:2]
#   SPADE_NPROC_PER_NODE  workers per node [1]
#   SPADE_RDZV_ID         job id shared by all agents; restarted workers see it as TORCHELASTIC_RUN_ID
#                         [$SLURM_JOB_ID, else "spade-elastic"]
#   SPADE_MAX_RESTARTS    failure restarts per agent (membership changes do not count) [3]
#   SPADE_LAST_CALL_S     once MIN nodes are there, how long a rendezvous waits for more [30]
#   SPADE_MONITOR_S       how often an agent checks its workers and for waiting nodes [5]
#   SPADE_TORCHRUN        torchrun executable [.venv/bin/torchrun of this checkout]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ ! "${SPADE_RDZV_ENDPOINT:-}" =~ ^[^:[:space:]]+:[0-9]+$ ]]; then
    echo "launch/elastic.sh: SPADE_RDZV_ENDPOINT=${SPADE_RDZV_ENDPOINT:-}: expected host:port (the rendezvous store, the same on every node)" >&2
    exit 2
fi
nnodes="${SPADE_NNODES:-1:2}"
if [[ ! "$nnodes" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]]; then
    echo "launch/elastic.sh: SPADE_NNODES=$nnodes: expected MIN:MAX (e.g. 1:2)" >&2
    exit 2
fi
for var in SPADE_NPROC_PER_NODE SPADE_MAX_RESTARTS SPADE_LAST_CALL_S; do
    if [[ -n "${!var:-}" && ! "${!var}" =~ ^[0-9]+$ ]]; then
        echo "launch/elastic.sh: $var=${!var}: expected a whole number" >&2
        exit 2
    fi
done
if [[ -n "${SPADE_MONITOR_S:-}" && ! "$SPADE_MONITOR_S" =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
    echo "launch/elastic.sh: SPADE_MONITOR_S=$SPADE_MONITOR_S: expected seconds" >&2
    exit 2
fi
torchrun="${SPADE_TORCHRUN:-$here/.venv/bin/torchrun}"
if [[ ! -x "$torchrun" ]]; then
    echo "launch/elastic.sh: torchrun not found at $torchrun (set SPADE_TORCHRUN or run launch/setup_env.sh)" >&2
    exit 2
fi

# torchrun's c10d rendezvous shares its agent's TCP store with the workers by default; in torch 2.14
# a node joining a running job then hangs the next round (the staying rank-0 agent does not publish
# MASTER_ADDR for it; pytorch/pytorch#135712 for the restart side). Without sharing, rank 0's worker
# hosts a fresh store on a fresh port every round, so no keys of an earlier round can be read either.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1

exec "$torchrun" \
    --nnodes="$nnodes" \
    --nproc-per-node="${SPADE_NPROC_PER_NODE:-1}" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$SPADE_RDZV_ENDPOINT" \
    --rdzv-id="${SPADE_RDZV_ID:-${SLURM_JOB_ID:-spade-elastic}}" \
    --rdzv-conf="last_call_timeout=${SPADE_LAST_CALL_S:-30}" \
    --max-restarts="${SPADE_MAX_RESTARTS:-3}" \
    --monitor-interval="${SPADE_MONITOR_S:-5}" \
    -m spade_dist.cli.train "$@"
