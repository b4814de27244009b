"""``torch.nn.utils.spectral_norm`` with a cheaper backward pass for the weight division.

The official networks wrap most convolutions in ``torch.nn.utils.spectral_norm`` (state-dict keys
``weight_orig`` / ``weight_u`` / ``weight_v``), which computes ``W / sigma`` with
``sigma = u^T W v`` on every forward. Autograd then differentiates the division and the
``dot(u, mv(W, v))`` op by op: several passes over a weight-sized tensor (``g / sigma``,
``-g * W / sigma^2`` and its sum, the ``mv`` backward's outer product, the sum of the two), on
every spectral-normed layer of the generator. For ``u`` and ``v`` held constant (they are updated
under ``no_grad``, as in torch) the gradient is

    dL/dW = g / sigma - (<g, W> / sigma^2) * u v^T

which is one dot product and one rank-1 update. The forward is the same ops as torch's, in the
same order, so the normalized weight is bitwise identical (and so the official checkpoints'
outputs); the gradient agrees to float rounding (``tests/test_spectral_norm.py``).

The networks are built with torch's ``spectral_norm``; :func:`use_fast_spectral_norm`
(``speed.fast_spectral_norm``, applied by ``models/factory.py``) gives each such module a
:class:`FastSpectralNorm` forward pre-hook made from the same settings, in the place of torch's
(the hook slot ``torch.nn.utils.remove_spectral_norm`` also manages, so removing it still works).
Parameters, buffers, torch's state-dict hooks and so the state dict stay torch's. A hook with
``dim != 0`` (none here: every spectral-normed layer is a convolution) keeps torch's computation.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.utils.spectral_norm import SpectralNorm


class _DivideBySigma(torch.autograd.Function):
    """``W / (u^T W_mat v)`` (``W_mat`` = W as rows x -1) with u, v constants."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, u: Tensor, v: Tensor) -> Tensor:  # type: ignore[override]
        weight_mat = weight.reshape(weight.shape[0], -1)
        sigma = torch.dot(u, torch.mv(weight_mat, v))
        ctx.save_for_backward(weight, u, v, sigma)
        return weight / sigma

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        weight, u, v, sigma = ctx.saved_tensors
        rows = weight.shape[0]
        grad_mat = grad.reshape(rows, -1)
        coeff = torch.dot(grad_mat.reshape(-1), weight.reshape(-1)).div(sigma * sigma).neg()
        # (g / sigma) + (coeff * u) v^T as one K=1 product: no host sync for the scalars on a GPU.
        grad_weight = torch.addmm(grad_mat / sigma, (u * coeff)[:, None], v[None, :])
        return grad_weight.view_as(weight), None, None


class FastSpectralNorm(SpectralNorm):
    """torch's ``SpectralNorm`` forward pre-hook (same settings, power iteration and buffers) whose
    weight division has the closed-form backward above."""

    @classmethod
    def like(cls, hook: SpectralNorm) -> "FastSpectralNorm":
        """A new hook with ``hook``'s parameter name, power iterations, dim and eps."""
        return cls(hook.name, hook.n_power_iterations, hook.dim, hook.eps)

    def compute_weight(self, module: nn.Module, do_power_iteration: bool) -> Tensor:
        if self.dim != 0:
            return super().compute_weight(module, do_power_iteration)
        weight = getattr(module, self.name + "_orig")
        u = getattr(module, self.name + "_u")
        v = getattr(module, self.name + "_v")
        if do_power_iteration:
            # As torch does: update u and v in place (they are buffers that DataParallel-style
            # replicas share), then use clones so an earlier forward's backward still sees its own.
            with torch.no_grad():
                weight_mat = weight.reshape(weight.shape[0], -1)
                for _ in range(self.n_power_iterations):
                    v = F.normalize(torch.mv(weight_mat.t(), u), dim=0, eps=self.eps, out=v)
                    u = F.normalize(torch.mv(weight_mat, v), dim=0, eps=self.eps, out=u)
                if self.n_power_iterations > 0:
                    u = u.clone(memory_format=torch.contiguous_format)
                    v = v.clone(memory_format=torch.contiguous_format)
        return _DivideBySigma.apply(weight, u, v)


def use_fast_spectral_norm(net: nn.Module) -> int:
    """Give every module of ``net`` that ``torch.nn.utils.spectral_norm`` wrapped a
    :class:`FastSpectralNorm` forward pre-hook in the place of torch's. Returns how many."""
    replaced = 0
    for module in net.modules():
        hooks = module._forward_pre_hooks
        for key, hook in list(hooks.items()):
            if type(hook) is SpectralNorm:
                hooks[key] = FastSpectralNorm.like(hook)
                replaced += 1
    return replaced
