"""TrainState: everything a run needs to continue - models, EMA, optimizers, schedules, scalers, counters.

The checkpoint manager saves ``state.state_dict()`` and restores with ``state.load_state_dict()``;
both contain only tensors, numbers and strings, keyed by stable names:

    {"generator": netG.state_dict(), "encoder": netE.state_dict() | absent, "discriminator": ...,
     "ema": {...}, "opt_G": ..., "opt_D": ..., "sched_G": ..., "sched_D": ..., "scaler_G": ...,
     "scaler_D": ..., "step": int, "epoch": int, "nonfinite_skips": int}

Model state dicts are those of the bare networks (official key layout), never of DDP/DeepSpeed
wrappers. With the deepspeed backend the optimizer entries are those of the torch optimizer the
engine steps (ZeRO 1/2 partitions: resharding them is the checkpoint module's business).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from spade_dist.config import Config, ConfigError
from spade_dist.models import build_discriminator, build_encoder, build_generator, reparameterize
from spade_dist.models.compat import GeneratorInit, init_generator_from_file
from spade_dist.train.ema import EMAGenerator
from spade_dist.train.schedule import EpochLinearDecay, lr_and_betas, make_adam


class GeneratorSide(nn.Module):
    """netG and, with the VAE, netE: what the official ``optimizer_G`` trains, as one module.

    One module means one DDP wrapper / one DeepSpeed engine for the G side. ``forward`` returns
    ``(fake, mu, logvar)``; mu/logvar are None without the VAE or without a real image.
    """

    def __init__(self, netG: nn.Module, netE: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.netG = netG
        self.netE = netE

    def forward(self, semantics: torch.Tensor, real: Optional[torch.Tensor] = None):
        if self.netE is not None and real is not None:
            mu, logvar = self.netE(real)
            z = reparameterize(mu, logvar)
            return self.netG(semantics, z), mu, logvar
        return self.netG(semantics), None, None


@dataclass
class TrainState:
    """Mutable training state of one rank. ``step`` counts optimizer iterations (G+D)."""

    cfg: Config
    generator_side: GeneratorSide
    discriminator: nn.Module
    ema: EMAGenerator
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    sched_G: EpochLinearDecay
    sched_D: EpochLinearDecay
    scaler_G: Optional[torch.amp.GradScaler]
    scaler_D: Optional[torch.amp.GradScaler]
    step: int = 0
    epoch: int = 0
    # Times the run was resumed from one of its checkpoints (requeue, torchrun restart, elastic
    # membership change): kept in the checkpoint, exported as spade_run_restarts.
    restarts: int = 0
    # Device tensor so counting a skip never forces a host sync; read it with `nonfinite_skips`.
    nonfinite_skips_t: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    # The health monitor's record (spade_dist/train/health.py): per signal the last step it was checked
    # clean, the highest output diversity so far, the count of events. Saved in every checkpoint.
    health: dict[str, Any] = field(default_factory=dict)
    # train.init_generator: where G started (None = official init); not part of the saved state.
    init_from: Optional[GeneratorInit] = None

    @property
    def generator(self) -> nn.Module:
        return self.generator_side.netG

    @property
    def encoder(self) -> Optional[nn.Module]:
        return self.generator_side.netE

    @property
    def ema_generator(self) -> nn.Module:
        return self.ema.model

    @property
    def nonfinite_skips(self) -> int:
        return int(self.nonfinite_skips_t.item())

    def set_epoch(self, epoch: int) -> None:
        """Start-of-epoch bookkeeping: epoch counter and the lr schedule."""
        self.epoch = epoch
        self.sched_G.set_epoch(epoch)
        self.sched_D.set_epoch(epoch)

    def lrs(self) -> tuple[float, float]:
        return self.opt_G.param_groups[0]["lr"], self.opt_D.param_groups[0]["lr"]

    def compile(self, mode: str) -> None:
        """``torch.compile`` the trained networks in place (``nn.Module.compile``).

        In place rather than ``torch.compile(module)``: the wrapper it returns prefixes every
        state-dict key with ``_orig_mod.``; compiling the module's call keeps the parameters, DDP /
        DeepSpeed wrapping and checkpoints exactly as in eager mode. Call after the EMA copy exists
        (a deep copy of a compiled module would carry the compiled call along)."""
        self.generator_side.compile(mode=mode)
        self.discriminator.compile(mode=mode)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "generator": self.generator.state_dict(),
            "discriminator": self.discriminator.state_dict(),
            "ema": self.ema.state_dict(),
            "opt_G": self.opt_G.state_dict(),
            "opt_D": self.opt_D.state_dict(),
            "sched_G": self.sched_G.state_dict(),
            "sched_D": self.sched_D.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "nonfinite_skips": self.nonfinite_skips,
            "restarts": self.restarts,
            "health": dict(self.health),
        }
        if self.encoder is not None:
            out["encoder"] = self.encoder.state_dict()
        if self.scaler_G is not None and self.scaler_D is not None:
            out["scaler_G"] = self.scaler_G.state_dict()
            out["scaler_D"] = self.scaler_D.state_dict()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in ("generator", "discriminator", "ema", "opt_G", "opt_D", "step", "epoch") if k not in state]
        if missing:
            raise KeyError(f"train state is missing {missing}")
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        if self.encoder is not None:
            if "encoder" not in state:
                raise KeyError("model.use_vae is true but the train state has no 'encoder'")
            self.encoder.load_state_dict(state["encoder"])
        self.ema.load_state_dict(state["ema"])
        self.opt_G.load_state_dict(state["opt_G"])
        self.opt_D.load_state_dict(state["opt_D"])
        if self.scaler_G is not None and "scaler_G" in state:
            self.scaler_G.load_state_dict(state["scaler_G"])
            self.scaler_D.load_state_dict(state["scaler_D"])
        self.step = int(state["step"])
        self.nonfinite_skips_t.fill_(int(state.get("nonfinite_skips", 0)))
        self.restarts = int(state.get("restarts", 0))  # absent in checkpoints of older versions
        self.health = dict(state.get("health", {}))  # absent in checkpoints of older versions
        self.set_epoch(int(state["epoch"]))
        if "sched_G" in state:
            self.sched_G.load_state_dict(state["sched_G"])
            self.sched_D.load_state_dict(state["sched_D"])


def build_train_state(cfg: Config, device: torch.device, fused_adam: bool,
                      dtype: torch.dtype = torch.float32) -> TrainState:
    """Networks (official init), EMA copy, TTUR Adam pair, schedules and fp16 scalers, on ``device``.

    Every rank must call this with the same ``train.seed`` set beforehand so initial weights agree
    (DDP also broadcasts rank 0's at wrap time; DeepSpeed does not).
    """
    netG = build_generator(cfg).to(device=device, dtype=dtype)
    netE = build_encoder(cfg).to(device=device, dtype=dtype) if cfg.model.use_vae else None
    netD = build_discriminator(cfg).to(device=device, dtype=dtype)
    init_from = init_generator(netG, netE, cfg) if cfg.train.init_generator else None
    side = GeneratorSide(netG, netE)
    if cfg.speed.channels_last:
        side.to(memory_format=torch.channels_last)
        netD.to(memory_format=torch.channels_last)
    lr_G, lr_D, betas = lr_and_betas(cfg.optim)
    opt_G = make_adam(side.parameters(), lr_G, betas, fused=fused_adam)
    opt_D = make_adam(netD.parameters(), lr_D, betas, fused=fused_adam)
    fp16 = cfg.train.mixed_precision == "fp16"
    return TrainState(
        cfg=cfg,
        generator_side=side,
        discriminator=netD,
        ema=EMAGenerator(netG, cfg.train.ema_decay, cfg.train.ema_start_step),
        opt_G=opt_G,
        opt_D=opt_D,
        sched_G=EpochLinearDecay(opt_G, lr_G, cfg.optim.niter, cfg.optim.niter_decay),
        sched_D=EpochLinearDecay(opt_D, lr_D, cfg.optim.niter, cfg.optim.niter_decay),
        scaler_G=torch.amp.GradScaler(device.type) if fp16 else None,
        scaler_D=torch.amp.GradScaler(device.type) if fp16 else None,
        nonfinite_skips_t=torch.zeros((), device=device),
        init_from=init_from,
    )


def init_generator(netG: nn.Module, netE: Optional[nn.Module], cfg: Config) -> GeneratorInit:
    """``train.init_generator``: G (and E) from the file, before the EMA copy and the optimizers exist."""
    try:
        return init_generator_from_file(netG, netE, cfg, cfg.train.init_generator, cfg.train.init_generator_sha256)
    except (FileNotFoundError, ValueError) as exc:  # CheckpointMismatchError is a ValueError
        raise ConfigError(f"train.init_generator: {exc}") from exc  # the messages name the file
