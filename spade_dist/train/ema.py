"""Exponential moving average of the generator, used for samples and evaluation.

Before ``start_step`` the EMA copy simply follows the live weights (an average over the first,
random steps is worthless). Afterwards ``ema = decay * ema + (1 - decay) * live`` for floating-point
parameters; buffers (BatchNorm running stats, spectral-norm vectors, counters) are copied, because
averaging them has no meaning and the EMA model must normalise like the live one.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMAGenerator:
    """Holds ``model``: an eval-mode, grad-free copy of the generator, updated by :meth:`update`."""

    def __init__(self, generator: nn.Module, decay: float, start_step: int = 0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.start_step = start_step
        self.model = copy.deepcopy(generator).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, generator: nn.Module, step: int) -> None:
        """Fold the live ``generator`` (unwrapped) into the average after optimizer step ``step``."""
        ema_params = list(self.model.parameters())
        live_params = [p.detach() for p in generator.parameters()]
        if len(ema_params) != len(live_params):
            raise RuntimeError("EMA generator and live generator have different parameter lists")
        if step < self.start_step or self.decay == 0.0:
            torch._foreach_copy_(ema_params, live_params)
        else:
            torch._foreach_lerp_(ema_params, live_params, 1.0 - self.decay)
        for ema_buf, live_buf in zip(self.model.buffers(), generator.buffers()):
            ema_buf.copy_(live_buf)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "decay": self.decay, "start_step": self.start_step}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.decay = float(state["decay"])
        self.start_step = int(state["start_step"])
