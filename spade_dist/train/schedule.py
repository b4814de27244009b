"""Optimizers and the official learning-rate schedule (NVlabs/SPADE pix2pix_model / trainer).

- TTUR (default): G gets ``lr / 2`` and D ``lr * 2``, and Adam's betas are forced to (0, 0.9) - the
  official ``create_optimizers`` ignores beta1/beta2 in that case. With ``no_TTUR`` both use ``lr``
  and (beta1, beta2).
- The lr is constant for ``niter`` epochs, then falls linearly to 0 over ``niter_decay`` epochs. The
  official trainer subtracts ``lr / niter_decay`` at the end of every epoch ``> niter`` (1-based),
  so during 0-based epoch ``e`` the factor is ``1 - max(0, e - niter) / niter_decay``.

The schedule is a pure function of the epoch: :class:`EpochLinearDecay` only remembers the epoch
and the base lr, so a resumed run (any world size) lands on exactly the same lr.
"""
from __future__ import annotations

from typing import Iterable

import torch

from spade_dist.config import OptimConfig


def lr_and_betas(optim: OptimConfig) -> tuple[float, float, tuple[float, float]]:
    """(lr_G, lr_D, betas) as the official create_optimizers chooses them."""
    if optim.no_TTUR:
        return optim.lr, optim.lr, (float(optim.beta1), float(optim.beta2))
    return optim.lr / 2, optim.lr * 2, (0.0, 0.9)


def decay_factor(epoch: int, niter: int, niter_decay: int) -> float:
    """Multiplier of the base lr during 0-based ``epoch``."""
    decayed_epochs = max(0, epoch - niter)
    if decayed_epochs == 0:
        return 1.0
    if niter_decay <= 0:
        return 1.0  # the official code never decays without niter_decay
    return max(0.0, 1.0 - decayed_epochs / niter_decay)


def make_adam(params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float], fused: bool) -> torch.optim.Adam:
    """Adam; ``fused`` lets the step skip itself on device (``found_inf``) without a host sync."""
    return torch.optim.Adam(list(params), lr=lr, betas=betas, fused=fused or None)


class EpochLinearDecay:
    """Sets ``optimizer``'s lr to ``base_lr * decay_factor(epoch)``; checkpointable."""

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, niter: int, niter_decay: int) -> None:
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.niter = niter
        self.niter_decay = niter_decay
        self.epoch = 0
        self.set_epoch(0)

    def current_lr(self) -> float:
        return self.base_lr * decay_factor(self.epoch, self.niter, self.niter_decay)

    def set_epoch(self, epoch: int) -> float:
        self.epoch = epoch
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "base_lr": self.base_lr, "niter": self.niter, "niter_decay": self.niter_decay}

    def load_state_dict(self, state: dict) -> None:
        self.base_lr = float(state["base_lr"])
        self.niter = int(state["niter"])
        self.niter_decay = int(state["niter_decay"])
        self.set_epoch(int(state["epoch"]))
