"""Test-only fault injection (``train.health.debug_fault``): the faults the health monitor must notice.

Never set in a real run; the tests (tests/test_health.py) inject each fault into a tiny run from step
``train.health.debug_fault_step`` on and check that the policy acts once and the run finishes. A
rewind spends the fault: the replayed steps run without it, as after a transient fault.

- ``nan``: every G and D loss becomes NaN (a non-finite streak).
- ``lr_jump``: both learning rates x ``LR_JUMP`` (a loss spike or worse).
- ``grad_scale``: every G and D loss x ``GRAD_SCALE`` (gradient norms explode; Adam's steps barely change).
- ``d_saturate``: D's predictions forced to -5 for fakes and +5 for reals (hinge D loss exactly 0).
- ``g_constant``: the generator and its EMA copy output zeros (collapse).
- ``perturb_rank1``: rank 1 adds ``PERTURBATION`` to one discriminator weight once (cross-rank drift).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

LR_JUMP = 1000.0
GRAD_SCALE = 1e4
PERTURBATION = 1e-3
SATURATED_LOGIT = 5.0


def _saturate_predictions(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
    semantics, image = inputs[0], inputs[1]
    n = semantics.shape[0]
    if image.shape[0] != 2 * n:  # a pass over one half only (fake or real): left as it is
        return output
    for scale in output:
        pred = scale[-1]
        sign = torch.ones_like(pred)
        sign[:n] = -1.0  # the first half is the fake one (step._discriminate: cat(fake, real))
        scale[-1] = pred * 0.0 + SATURATED_LOGIT * sign
    return output


def _constant_output(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
    return output * 0.0


class FaultInjector:
    """Applies ``train.health.debug_fault`` to a run's state; :meth:`before_step` each step."""

    def __init__(self, fault: str, start_step: int, state: Any, rank: int) -> None:
        self.fault, self.start, self.state, self.rank = fault, start_step, state, rank
        self._armed = False
        self._spent = False  # after a rewind the fault does not come back (a transient fault)
        self._hooks: list[Any] = []
        self._base_lrs: list[float] = []

    @property
    def active(self) -> bool:
        return self.fault != "none"

    def spend(self) -> None:
        """The run rewound past the fault: remove it for good (restored state keeps its own lrs)."""
        self._spent, self._armed = True, False
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def loss_hook(self, which: str, loss: torch.Tensor) -> Optional[torch.Tensor]:
        """``train_step``'s loss hook: NaN or scaled losses once the ``nan`` / ``grad_scale`` fault is armed."""
        if self._armed and self.fault == "nan":
            return loss * float("nan")
        if self._armed and self.fault == "grad_scale":
            return loss * GRAD_SCALE
        return None

    @torch.no_grad()
    def before_step(self, step: int) -> None:
        if not self.active or step < self.start or self._spent:
            return
        state = self.state
        if self.fault == "lr_jump":
            optimizers = [state.opt_G, state.opt_D]
            if not self._armed:
                self._base_lrs = [g["lr"] for opt in optimizers for g in opt.param_groups]
            groups = [g for opt in optimizers for g in opt.param_groups]
            for group, base in zip(groups, self._base_lrs):  # again each step: an epoch start resets them
                group["lr"] = base * LR_JUMP
        if self._armed:
            return
        self._armed = True
        if self.fault == "d_saturate":
            self._hooks.append(state.discriminator.register_forward_hook(_saturate_predictions))
        elif self.fault == "g_constant":
            self._hooks += [state.generator.register_forward_hook(_constant_output),
                            state.ema.model.register_forward_hook(_constant_output)]
        elif self.fault == "perturb_rank1" and self.rank == 1:
            next(state.discriminator.parameters()).view(-1)[0] += PERTURBATION
