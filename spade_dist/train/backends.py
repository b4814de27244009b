"""How gradients are reduced and optimizers applied: ``ddp`` (Accelerate) or ``deepspeed`` engines.

The train step (``step.py``) only talks to the small :class:`TrainBackend` interface:

- ``generator`` / ``discriminator``: the wrapped modules to call when that network is being
  trained (DDP module or DeepSpeed engine); ``discriminator_module``: D's bare module, used with
  frozen parameters in the G step (measured: calling the DDP-wrapped D there all-reduces its
  gradients, calling the DeepSpeed engine there fails at ZeRO 0 and 2).
- ``micro_batch(which, is_last)``: context for one accumulation micro-batch (DDP ``no_sync``
  except on the last one).
- ``backward(which, loss, n_micro)`` then ``apply(which, loss_finite)``: reduce, check for
  non-finite values, step the optimizer or skip it. ``apply`` returns a 0-d float tensor, 1 when
  the update was skipped, without a host sync on the ddp path (fused Adam's ``found_inf``).

Accelerate is used for what it is good at (process group from any launcher, device placement,
DDP wrapping); we keep our own optimizers and GradScalers because a GAN needs two of each and
Accelerate has one scaler (and its DeepSpeed plugin cannot drive two engines: it refuses a second
DeepSpeed model, and its multi-plugin mode routes ``backward`` to the wrong engine).
"""
from __future__ import annotations

import abc
import contextlib
import copy
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from spade_dist.config import Config
from spade_dist.distributed import (
    DistInfo,
    DistributedSetupError,
    check_process_group,
    collective_timeout,
    elastic_store_prefix,
    env_dist_info,
    init_process_group,
)

if TYPE_CHECKING:
    from spade_dist.train.state import TrainState

NETS = ("G", "D")


def _grads(params: list[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def nonfinite_flag(loss_finite: torch.Tensor, params: list[nn.Parameter], reduce: bool) -> torch.Tensor:
    """1.0 when the loss or any gradient is non-finite on any rank, else 0.0 (device tensor)."""
    grads = _grads(params)
    bad = ~loss_finite
    if grads:
        norms = torch._foreach_norm(grads)
        bad = bad | ~torch.isfinite(torch.stack([n.float() for n in norms]).sum())
    flag = bad.float().reshape(1)
    if reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank must take the same decision
    return flag.reshape(())


class TrainBackend(abc.ABC):
    """Interface used by the train step; see the module docstring."""

    name = "base"
    info: DistInfo
    device: torch.device
    generator: Callable[..., Any]
    discriminator: Callable[..., Any]
    generator_module: nn.Module
    discriminator_module: nn.Module

    # What differs between the backends, for the loop: fused Adam is ours (DDP) or DeepSpeed's;
    # with a partitioned optimizer (ZeRO 1/2) a rank holds only its share of the optimizer state.
    fused_adam = False
    partitioned_optimizer = False

    @abc.abstractmethod
    def wrap_state(self, state: "TrainState", per_rank_batch: int) -> None:
        """Wrap the models and optimizers of ``state`` for this backend (the one call the loop makes)."""

    @abc.abstractmethod
    def micro_batch(self, which: str, is_last: bool) -> ContextManager[None]:
        """Context of one micro-batch of network ``which``; gradient sync only on the last one."""

    @abc.abstractmethod
    def backward(self, which: str, loss: torch.Tensor, n_micro: int) -> None:
        """Backward of ``loss`` (a micro-batch mean) scaled for ``n_micro`` accumulated micro-batches."""

    @abc.abstractmethod
    def apply(self, which: str, loss_finite: torch.Tensor) -> torch.Tensor:
        """Step (or skip, when the loss or a gradient is non-finite on any rank) network ``which``'s
        optimizer; returns the 0-d skip flag."""

    @abc.abstractmethod
    def optimizer(self, which: str) -> torch.optim.Optimizer:
        """The optimizer of network ``which``."""


class DDPBackend(TrainBackend):
    """Accelerate-initialised process group + DDP modules + our Adam/GradScaler pairs."""

    name = "ddp"
    fused_adam = True

    def __init__(self, cfg: Config, device: torch.device, info: DistInfo, accelerator: Any) -> None:
        self.cfg = cfg
        self.device = device
        self.info = info
        self.accelerator = accelerator
        self.scalers: dict[str, Optional[torch.amp.GradScaler]] = {"G": None, "D": None}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.params: dict[str, list[nn.Parameter]] = {}

    @classmethod
    def setup(cls, cfg: Config) -> "DDPBackend":
        """Create the Accelerator (and with it the process group) before any model exists."""
        from accelerate import Accelerator, InitProcessGroupKwargs

        from spade_dist.distributed import resolve_device

        env = env_dist_info()
        device = resolve_device(cfg.train.device, env.local_rank)
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if env.world_size > 1 and not os.environ.get(v)]
        if missing and not (dist.is_available() and dist.is_initialized()):
            raise DistributedSetupError(
                f"WORLD_SIZE={env.world_size} but {', '.join(missing)} not set, so no process group can be formed: "
                "launch with accelerate launch, torchrun or deepspeed (they set the rendezvous address)"
            )
        # cpu=True is what turns `accelerate launch --multi_gpu` into MULTI_CPU/gloo on a GPU-less
        # machine (without it each process runs alone); mixed precision is ours (two scalers), so Accelerate gets "no".
        timeout = collective_timeout(cfg.train.collective_timeout_s)
        try:
            if env.world_size > 1 and not dist.is_initialized() and elastic_store_prefix(env.world_size):
                init_process_group(device, timeout)  # torchrun's shared store: fresh keys; Accelerator adopts the group
            accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision="no",
                                      kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])
        except (RuntimeError, ValueError) as exc:
            raise DistributedSetupError(
                f"could not form the process group of WORLD_SIZE={env.world_size} (rank {env.rank}, "
                f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}, MASTER_PORT={os.environ.get('MASTER_PORT')}): {exc}"
            ) from exc
        info = check_process_group(env.world_size, launcher_processes=accelerator.num_processes)
        return cls(cfg, accelerator.device if device.type == "cuda" else device, info, accelerator)

    def wrap_state(self, state: "TrainState", per_rank_batch: int) -> None:
        self.wrap(state.generator_side, state.discriminator, state.opt_G, state.opt_D, state.scaler_G, state.scaler_D)

    def wrap(self, generator: nn.Module, discriminator: nn.Module, opt_G: torch.optim.Optimizer,
             opt_D: torch.optim.Optimizer, scaler_G: Optional[torch.amp.GradScaler],
             scaler_D: Optional[torch.amp.GradScaler]) -> None:
        self.generator_module = generator
        self.discriminator_module = discriminator
        if self.info.world_size > 1 and self.device.type == "cuda":
            self.generator = self.accelerator.prepare_model(generator)
            self.discriminator = self.accelerator.prepare_model(discriminator)
        elif self.info.world_size > 1:
            self.generator, self.discriminator = CpuDDP(generator), CpuDDP(discriminator)
        else:
            self.generator, self.discriminator = generator, discriminator
        self.optimizers = {"G": opt_G, "D": opt_D}
        self.scalers = {"G": scaler_G, "D": scaler_D}
        self.params = {"G": [p for p in generator.parameters()], "D": [p for p in discriminator.parameters()]}

    def _wrapped(self, which: str) -> Any:
        return self.generator if which == "G" else self.discriminator

    def micro_batch(self, which: str, is_last: bool) -> ContextManager[None]:
        module = self._wrapped(which)
        if not is_last and isinstance(module, nn.parallel.DistributedDataParallel):
            return module.no_sync()
        return contextlib.nullcontext()

    def backward(self, which: str, loss: torch.Tensor, n_micro: int) -> None:
        loss = loss / n_micro if n_micro > 1 else loss
        scaler = self.scalers[which]
        (scaler.scale(loss) if scaler is not None else loss).backward()

    def apply(self, which: str, loss_finite: torch.Tensor) -> torch.Tensor:
        opt = self.optimizers[which]
        scaler = self.scalers[which]
        if scaler is not None:
            scaler.unscale_(opt)  # records the scaler's own inf check, used by update()
        # DDP already averaged the gradients, so they agree on all ranks; the loss check is local
        # and gets all-reduced inside nonfinite_flag.
        flag = nonfinite_flag(loss_finite, self.params[which], reduce=True)
        # Fused Adam reads found_inf on the device and leaves params, moments and its step
        # counter untouched when it is 1: the skip costs no host synchronisation.
        opt.grad_scale = None
        opt.found_inf = flag.to(torch.float32)
        opt.step()
        if scaler is not None:
            scaler.update()
        opt.zero_grad(set_to_none=True)
        return flag

    def optimizer(self, which: str) -> torch.optim.Optimizer:
        return self.optimizers[which]


class CpuDDP(nn.parallel.DistributedDataParallel):
    """DDP for CPU/gloo modules that contain the project's SyncBatchNorm2d.

    torch's DDP refuses any ``nn.SyncBatchNorm`` in a CPU module ("SyncBatchNorm layers only work
    with GPU modules") because the stock layer has no CPU kernel. SyncBatchNorm2d subclasses it for
    state-dict and CUDA compatibility but synchronizes on gloo itself, so the check is lifted for it
    (and only for it: a stock nn.SyncBatchNorm is still rejected).
    """

    def _passing_sync_batchnorm_handle(self, module: nn.Module) -> None:
        from spade_dist.models.sync_bn import SyncBatchNorm2d

        for layer in module.modules():
            if isinstance(layer, nn.SyncBatchNorm) and not isinstance(layer, SyncBatchNorm2d):
                raise ValueError(f"{type(layer).__name__}: stock nn.SyncBatchNorm cannot run on CPU; use SyncBatchNorm2d")


class DeepSpeedBackend(TrainBackend):
    """Two DeepSpeed engines (G and D), torch Adam, ZeRO 0/1/2, fp32 master weights."""

    name = "deepspeed"

    def __init__(self, cfg: Config, device: torch.device, info: DistInfo) -> None:
        self.cfg = cfg
        self.device = device
        self.info = info
        self.engines: dict[str, Any] = {}

    @classmethod
    def setup(cls, cfg: Config) -> "DeepSpeedBackend":
        from spade_dist.distributed import resolve_device

        if cfg.train.mixed_precision == "fp16":
            raise DistributedSetupError(
                "train.mixed_precision=fp16 is not supported with train.backend=deepspeed (the two GradScalers "
                "live in the ddp backend); use bf16 or the ddp backend"
            )
        if cfg.train.grad_accum != 1:
            raise DistributedSetupError(
                f"train.grad_accum={cfg.train.grad_accum} is not supported with train.backend=deepspeed: a "
                "non-finite micro-batch could not be kept out of the update; raise data.batch_size instead"
            )
        # The CPU shm all-reduce extension is JIT-built on first use; keep it cached.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
        env = env_dist_info()
        device = resolve_device(cfg.train.device, env.local_rank)
        backend = cls(cfg, device, env)
        backend.ds_config(cfg.data.batch_size)  # a bad train.deepspeed_config fails before any process group
        backend.info = init_process_group(device, collective_timeout(cfg.train.collective_timeout_s))
        return backend

    def ds_config(self, per_rank_batch: int) -> dict:
        generated = {
            "train_micro_batch_size_per_gpu": per_rank_batch,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": self.cfg.train.zero_stage},
            "fp16": {"enabled": False},
            "bf16": {"enabled": False},  # autocast in the step keeps fp32 master weights
            "gradient_clipping": 0.0,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }
        if not self.cfg.train.deepspeed_config:
            return generated
        return merge_deepspeed_config(generated, load_deepspeed_config(self.cfg.train.deepspeed_config))

    @property
    def partitioned_optimizer(self) -> bool:  # type: ignore[override]
        return self.cfg.train.zero_stage > 0

    def wrap_state(self, state: "TrainState", per_rank_batch: int) -> None:
        self.wrap(state.generator_side, state.discriminator, state.opt_G, state.opt_D, per_rank_batch)

    def wrap(self, generator: nn.Module, discriminator: nn.Module, opt_G: torch.optim.Optimizer,
             opt_D: torch.optim.Optimizer, per_rank_batch: int) -> None:
        """Build the two engines (from :meth:`ds_config`)."""
        import deepspeed

        self.generator_module = generator
        self.discriminator_module = discriminator
        config = self.ds_config(per_rank_batch)
        # A client torch optimizer: DeepSpeed's own "Adam" would JIT-build its CPU FusedAdam first.
        engine_G, _, _, _ = deepspeed.initialize(model=generator, optimizer=opt_G, config=config)
        engine_D, _, _, _ = deepspeed.initialize(model=discriminator, optimizer=opt_D, config=config)
        self.engines = {"G": engine_G, "D": engine_D}
        self.generator, self.discriminator = engine_G, engine_D
        self._opts = {"G": opt_G, "D": opt_D}

    def micro_batch(self, which: str, is_last: bool) -> ContextManager[None]:
        return contextlib.nullcontext()

    def backward(self, which: str, loss: torch.Tensor, n_micro: int) -> None:
        # The skip decision must be taken before backward: a ZeRO engine reduces and partitions
        # gradients inside backward, so there is nothing left to inspect or discard afterwards.
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        self._pending_finite = bool(finite.item())  # the one host sync of this backend
        if self._pending_finite:
            self.engines[which].backward(loss)

    def apply(self, which: str, loss_finite: torch.Tensor) -> torch.Tensor:
        if not self._pending_finite:
            return torch.ones((), device=self.device)
        self.engines[which].step()
        return torch.zeros((), device=self.device)

    def optimizer(self, which: str) -> torch.optim.Optimizer:
        return self._opts[which]


# Keys of the generated DeepSpeed config that follow from spade-dist settings; a user file may repeat
# them only with the same value (anything else would silently disagree with the config / the step).
OWNED_DEEPSPEED_KEYS: dict[str, str] = {
    "train_micro_batch_size_per_gpu": "data.batch_size / train.global_batch_size",
    "train_batch_size": "data.batch_size / train.global_batch_size",
    "gradient_accumulation_steps": "train.grad_accum (1 with deepspeed)",
    "zero_optimization.stage": "train.zero_stage",
    "fp16": "train.mixed_precision (autocast in the step, fp32 master weights)",
    "bf16": "train.mixed_precision (autocast in the step, fp32 master weights)",
    "amp": "train.mixed_precision",
    "optimizer": "optim.* (a torch Adam per network)",
    "scheduler": "optim.niter / optim.niter_decay (the project's lr schedule)",
}
# What a user file may tune: communication, ZeRO buckets / offload, logging and profiling.
TUNABLE_DEEPSPEED_KEYS = frozenset({
    "zero_optimization", "communication_data_type", "prescale_gradients", "gradient_predivide_factor",
    "gradient_clipping", "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "dump_state",
    "comms_logger", "flops_profiler", "tensorboard", "csv_monitor", "wandb", "comet", "monitor_config",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "seq_parallel_communication_data_type",
})


def load_deepspeed_config(path: str) -> dict:
    """Read ``train.deepspeed_config`` (a JSON object); errors name the key and the file."""
    from spade_dist.config import ConfigError

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"train.deepspeed_config: cannot read {path}: {exc.strerror or exc}") from exc
    try:
        user = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"train.deepspeed_config: {path}: invalid JSON: {exc}") from exc
    if not isinstance(user, dict):
        raise ConfigError(f"train.deepspeed_config: {path}: top level must be a JSON object")
    return user


def merge_deepspeed_config(generated: dict, user: dict, source: str = "train.deepspeed_config") -> dict:
    """The generated DeepSpeed config with ``user``'s tuning merged in.

    Unknown top-level keys, keys that spade-dist sets itself with a different value
    (:data:`OWNED_DEEPSPEED_KEYS`) and ``zero_optimization`` entries DeepSpeed does not know raise
    :class:`ConfigError` naming the key."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    from spade_dist.config import ConfigError

    merged = copy.deepcopy(generated)
    for key, value in user.items():
        if key in OWNED_DEEPSPEED_KEYS:
            if key not in generated or value != generated[key]:
                raise ConfigError(f"{source}: key '{key}' conflicts with the generated config "
                                  f"({generated.get(key, 'set by spade-dist')!r}); it follows from {OWNED_DEEPSPEED_KEYS[key]}")
            continue
        if key not in TUNABLE_DEEPSPEED_KEYS:
            raise ConfigError(f"{source}: unknown or unsupported key '{key}' (tunable: {sorted(TUNABLE_DEEPSPEED_KEYS)})")
        if key == "zero_optimization":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: 'zero_optimization' must be an object, got {value!r}")
            stage = generated["zero_optimization"]["stage"]
            if "stage" in value and value["stage"] != stage:
                raise ConfigError(f"{source}: key 'zero_optimization.stage' ({value['stage']!r}) conflicts with "
                                  f"the generated value {stage}; it follows from {OWNED_DEEPSPEED_KEYS['zero_optimization.stage']}")
            value = {**value, "stage": stage}
            try:
                DeepSpeedZeroConfig(**value)
            except ValidationError as exc:
                bad = ".".join(str(p) for p in exc.errors()[0]["loc"])
                raise ConfigError(f"{source}: key 'zero_optimization.{bad}': {exc.errors()[0]['msg']}") from exc
        merged[key] = value
    return merged


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """``requires_grad_(False)`` for the duration (D in the G step), restored afterwards."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


# train.backend -> its class (the config's Literal names the same keys: tests/test_config.py).
BACKENDS: dict[str, type[TrainBackend]] = {"ddp": DDPBackend, "deepspeed": DeepSpeedBackend}
