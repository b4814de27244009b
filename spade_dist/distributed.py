"""Process group, device choice, rank helpers and the SyncBN statistics group.

Every process derives its role from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, set by ``accelerate launch``, ``torchrun``, the ``deepspeed`` launcher or Slurm
scripts) - there is no module-level state. The rules this module enforces:

- WORLD_SIZE > 1 must end in a real process group of that size; anything else (e.g. Accelerate
  falling back to a single-process state on a GPU-less machine) is a :class:`DistributedSetupError`,
  never a silent run of N independent jobs.
- gloo on CPU, NCCL on CUDA.
- SyncBN statistics are reduced over the whole world or over the ranks of one node
  (``train.syncbn_group``); every rank builds every node's subgroup because ``new_group`` is a
  collective over the world.
- Every collective has the same timeout, ``train.collective_timeout_s`` (torch's default is 30
  minutes): an elastic job must notice a lost peer quickly to re-form at the new size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


class DistributedSetupError(RuntimeError):
    """The launch environment and the process group disagree (message says how to fix it)."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise DistributedSetupError(f"environment variable {name}={raw!r} is not an integer") from exc


def env_dist_info() -> DistInfo:
    """Rank layout requested by the launcher (1 process when no launcher variables are set)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world:
        raise DistributedSetupError(f"inconsistent launch environment: RANK={rank}, WORLD_SIZE={world}")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world)


class DeviceError(DistributedSetupError, ValueError):
    """A requested device does not exist on this machine (a user error: the message names the key)."""


def resolve_device(requested: str, local_rank: int = 0, key: str = "train.device") -> torch.device:
    """The device for ``auto | cpu | cuda | cuda:N`` (or any torch device string) of setting ``key``.

    ``auto`` is CUDA when this machine has it, else the CPU. A bare ``cuda`` means this process's
    GPU, ``cuda:<local_rank>`` wrapped around the visible ones (Slurm's ``--gpus-per-task`` may
    leave each task a single visible GPU). Used by training, evaluation, generation and serving.
    """
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise DeviceError(f"{key}: unknown device {requested!r} ({exc})") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"{key} is {requested!r} but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def collective_timeout(seconds: float) -> timedelta:
    """``train.collective_timeout_s`` as the ``timeout=`` of process groups and stores."""
    return timedelta(seconds=seconds)


def elastic_job_id() -> str:
    """torchrun's rendezvous id (``--rdzv-id``, env TORCHELASTIC_RUN_ID), "" outside torchrun.

    The same for every (re)start of one elastic job: restarted workers (after a failure or a
    membership change) are recognisable as the same job by it.
    """
    return os.environ.get("TORCHELASTIC_RUN_ID", "")


def elastic_restart_attempt() -> int:
    """torchrun's failure-restart count (TORCHELASTIC_RESTART_COUNT), 0 outside torchrun.

    torchrun does not count membership changes (a node joining): those restart the workers with
    the same count.
    """
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0)


def elastic_store_prefix(world_size: int) -> str:
    """Key prefix for this (re)start in torchrun's shared rendezvous store; "" when not shared.

    torchrun (c10d rendezvous) hands its workers its own store (TORCHELASTIC_USE_AGENT_STORE) and
    keeps it across restarts; gloo's connection keys of an earlier attempt ("default_pg/...", and
    those of every ``new_group``) are still in it, so restarted ranks would read dead peers'
    addresses and fail with "Connection refused". The restart count alone does not separate
    attempts: a node joining restarts the workers without counting. Within one restart count,
    though, only joins happen (a lost node fails the survivors' collectives, which counts), and
    each join makes the world larger, so (restart count, world size) names every attempt once.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return ""
    return f"spade-restart-{elastic_restart_attempt()}-world-{world_size}"


def elastic_restart_store(world_size: int, timeout: timedelta) -> dict:
    """``store=`` kwargs for ``dist.init_process_group`` under torchrun's shared store; ``{}`` otherwise.

    (tests/test_checkpoint_train_e2e.py kills a rank with -9 and tests/test_elastic.py removes and
    adds a node to prove it; see :func:`elastic_store_prefix`.)
    """
    prefix = elastic_store_prefix(world_size)
    if not prefix:
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    return {"store": dist.PrefixStore(prefix, store)}


def init_process_group(device: torch.device, timeout: timedelta) -> DistInfo:
    """Initialise torch.distributed from the environment when WORLD_SIZE > 1 (idempotent).

    Used by the DeepSpeed backend, by torchrun launches without Accelerate, and by the ddp backend
    under torchrun's shared store (Accelerate adopts the group); otherwise the ddp backend lets
    Accelerate do it and then calls :func:`check_process_group`.
    """
    info = env_dist_info()
    if info.world_size == 1 or (dist.is_available() and dist.is_initialized()):
        return check_process_group(info.world_size)
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise DistributedSetupError(
            f"WORLD_SIZE={info.world_size} but {', '.join(missing)} not set: launch with accelerate launch, "
            "torchrun or deepspeed, which set the rendezvous address"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, rank=info.rank, world_size=info.world_size, timeout=timeout,
                                **elastic_restart_store(info.world_size, timeout))
    except Exception as exc:  # noqa: BLE001 - re-raised with the launch details
        raise DistributedSetupError(
            f"could not create the {backend} process group (rank {info.rank} of {info.world_size}, "
            f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}): {exc}"
        ) from exc
    return check_process_group(info.world_size)


def check_process_group(expected_world_size: int, launcher_processes: Optional[int] = None) -> DistInfo:
    """Fail loudly when the launcher asked for N processes but we are not in an N-rank group.

    ``launcher_processes`` is what the framework (Accelerate) believes; measured: on a GPU-less
    machine an Accelerator without ``cpu=True`` reports 1 process while WORLD_SIZE says 2.
    """
    info = env_dist_info()
    if launcher_processes is not None and launcher_processes != expected_world_size:
        raise DistributedSetupError(
            f"WORLD_SIZE={expected_world_size} but the accelerator runs {launcher_processes} process(es): this would "
            "train independent copies. On CPU launch with `accelerate launch --multi_gpu --num_processes N` "
            "(launch/accelerate_cpu_2proc.yaml) so that Accelerator(cpu=True) builds a gloo group"
        )
    if expected_world_size > 1:
        if not (dist.is_available() and dist.is_initialized()):
            raise DistributedSetupError(
                f"WORLD_SIZE={expected_world_size} but no torch.distributed process group is initialised"
            )
        actual = dist.get_world_size()
        if actual != expected_world_size:
            raise DistributedSetupError(
                f"WORLD_SIZE={expected_world_size} but the process group has {actual} rank(s)"
            )
        return DistInfo(dist.get_rank(), actual, info.local_rank, info.local_world_size)
    return DistInfo(0, 1, 0, 1)


def syncbn_group(kind: str, info: DistInfo) -> Optional[dist.ProcessGroup]:
    """The process group SyncBN reduces over: None (= world) or this node's subgroup.

    "node" groups ranks ``[k * local_world_size, (k + 1) * local_world_size)``; all ranks create all
    subgroups (``new_group`` must be called by every rank in the same order).
    """
    if kind == "world" or info.world_size == 1:
        return None
    if kind != "node":
        raise DistributedSetupError(f"train.syncbn_group: unknown value {kind!r} (world | node)")
    per_node = info.local_world_size
    if per_node < 1 or info.world_size % per_node:
        raise DistributedSetupError(
            f"train.syncbn_group=node needs WORLD_SIZE ({info.world_size}) divisible by LOCAL_WORLD_SIZE ({per_node})"
        )
    mine: Optional[dist.ProcessGroup] = None
    for node in range(info.world_size // per_node):
        ranks = list(range(node * per_node, (node + 1) * per_node))
        group = dist.new_group(ranks)
        if info.rank in ranks:
            mine = group
    return mine


def batch_geometry(per_rank: int, grad_accum: int, world: int, global_batch: int, absorb: str) -> tuple[int, int]:
    """(per-rank batch, gradient accumulation) for this launch's world size.

    Global batch = per-rank batch x world x accumulation. ``global_batch`` 0: both as configured
    (the global batch follows the world size). ``global_batch`` > 0 is kept on any world size, so
    also across elastic resizes; ``absorb`` (``train.elastic_batch``) says which factor changes:
    ``per_rank_batch`` -> ``global_batch / (world x grad_accum)``, ``grad_accum`` ->
    ``global_batch / (world x per_rank)``. Either must divide exactly.
    """
    if global_batch <= 0:
        return per_rank, grad_accum
    if absorb == "grad_accum":
        share, fixed = world * per_rank, f"data.batch_size {per_rank}"
    else:
        share, fixed = world * grad_accum, f"train.grad_accum {grad_accum}"
    if global_batch % share:
        raise DistributedSetupError(
            f"train.global_batch_size={global_batch} is not divisible by world size {world} x {fixed} = {share} "
            f"(train.elastic_batch={absorb})"
        )
    return (per_rank, global_batch // share) if absorb == "grad_accum" else (global_batch // share, grad_accum)
