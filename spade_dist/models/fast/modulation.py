"""SPADE's modulation on the speed paths: ``normalized * (1 + gamma) + beta`` from a label map.

The official layer (``models/spade.py``) resizes the label map, runs ``mlp_shared``, then
``mlp_gamma`` and ``mlp_beta`` as two convolutions, and applies them out of place. Here, with the
same parameters (the state dict stays the official one):

- ``dense``: gamma and beta from ONE convolution whose weight is ``cat([mlp_gamma.weight,
  mlp_beta.weight])`` (both read the same activation, so one pass over it is enough), the
  concatenation rebuilt from the live parameters on every call so gradients reach both;
- ``gather``: ``mlp_shared``'s convolution of the one-hot label map as a gather of weight columns
  (``onehot_conv.py``), then as ``dense``;
- ``region``: both convolutions once per uniform label region, the exact convolution only near
  region borders (``region_modulation.py``);

and the modulation itself is one ``addcmul`` whose backward writes the gradient of the 2C-channel
[gamma; beta] tensor directly (:func:`scale_shift`). Every path computes the same function; they
differ in summation order only (``tests/test_fast_path.py``, ``tests/test_region_modulation.py``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from spade_dist.config import SPADE_PATHS
from spade_dist.models.fast.onehot_conv import onehot_conv2d
from spade_dist.models.fast.region_modulation import region_gamma_beta

if TYPE_CHECKING:
    from spade_dist.models.fast.label_maps import LabelMaps
    from spade_dist.models.spade import SPADE


def modulate(layer: "SPADE", normalized: Tensor, labels: "LabelMaps", path: str) -> Tensor:
    """``layer``'s modulation of ``normalized`` by ``path``. The gather and region paths need a
    one-hot label map; for any other (soft labels) the dense path runs: the same function."""
    if path not in SPADE_PATHS:
        raise ValueError(f"unknown SPADE speed path {path!r}; expected one of {SPADE_PATHS}")
    if path != "dense":
        out = _modulate_onehot(layer, normalized, labels, path)
        if out is not None:
            return out
    actv = layer.mlp_shared(labels.at((normalized.shape[2], normalized.shape[3])))
    return scale_shift(normalized, gamma_beta(layer, actv), plus_one=True)


# Data-dependent shapes and host syncs (one-hot check, torch.unique, nonzero): under torch.compile
# (speed.compile) this part runs eager and the dense rest is compiled.
@torch.compiler.disable
def _modulate_onehot(layer: "SPADE", normalized: Tensor, labels: "LabelMaps", path: str) -> Optional[Tensor]:
    """The gather / region paths; None when the label map is not one-hot."""
    size = (normalized.shape[2], normalized.shape[3])
    indices = labels.indices_at(size)
    if indices is None:
        return None
    first = layer.mlp_shared[0]
    if path == "region":
        weight, bias = gamma_beta_weights(layer)
        both = region_gamma_beta(labels.region_layout_at(size, layer.kernel_size), first.weight, first.bias,
                                 weight, bias, plus_one=layer.mlp_gamma.out_channels)
        return scale_shift(normalized, both.to(normalized.dtype), plus_one=False)  # both holds 1 + gamma
    actv = F.relu(onehot_conv2d(indices, labels.class_counts, first.weight, first.bias))
    return scale_shift(normalized, gamma_beta(layer, actv), plus_one=True)


def gamma_beta_weights(layer: "SPADE") -> tuple[Tensor, Tensor]:
    """``mlp_gamma`` and ``mlp_beta`` stacked as one convolution with 2C outputs (rebuilt from the live
    parameters on every call, so their gradients and the official state dict are unchanged)."""
    return (torch.cat([layer.mlp_gamma.weight, layer.mlp_beta.weight], dim=0),
            torch.cat([layer.mlp_gamma.bias, layer.mlp_beta.bias], dim=0))


def gamma_beta(layer: "SPADE", actv: Tensor) -> Tensor:
    """[gamma; beta] (2C channels) from one convolution of ``mlp_shared``'s activation."""
    weight, bias = gamma_beta_weights(layer)
    return F.conv2d(actv, weight, bias, padding=layer.kernel_size // 2)


class _ScaleShift(torch.autograd.Function):
    """``addcmul(beta, normalized, scale)`` for ``both`` = [gamma or scale; beta] on channels.

    The same forward as ``torch.addcmul(beta, normalized, 1 + gamma)`` over ``both.split``, with a
    backward that writes the gradient of ``both`` straight into one 2C-channel tensor: autograd's
    would form ``grad * (normalized * 1)`` (an extra pass over the map for addcmul's ``value``)
    and then concatenate the two halves' gradients (``split``'s backward, a copy of both). Values
    are bitwise the same (a product by 1 is exact)."""

    @staticmethod
    def forward(ctx, normalized: Tensor, both: Tensor, plus_one: bool) -> Tensor:  # type: ignore[override]
        channels = both.shape[1] // 2
        gamma, beta = both[:, :channels], both[:, channels:]
        scale = 1 + gamma if plus_one else gamma
        ctx.save_for_backward(normalized, scale)
        ctx.both_shape, ctx.both_dtype = both.shape, both.dtype
        return torch.addcmul(beta, normalized, scale)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        normalized, scale = ctx.saved_tensors
        grad_normalized = grad * scale if ctx.needs_input_grad[0] else None
        grad_both = None
        if ctx.needs_input_grad[1]:
            channels_last = not grad.is_contiguous() and grad.is_contiguous(memory_format=torch.channels_last)
            grad_both = torch.empty(ctx.both_shape, dtype=ctx.both_dtype, device=grad.device,
                                    memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            channels = ctx.both_shape[1] // 2
            torch.mul(grad, normalized, out=grad_both[:, :channels])
            grad_both[:, channels:].copy_(grad)
        return grad_normalized, grad_both, None


def scale_shift(normalized: Tensor, both: Tensor, plus_one: bool) -> Tensor:
    """SPADE's modulation ``normalized * (1 + gamma) + beta`` from ``both`` = [gamma; beta]
    (``plus_one``) or [1 + gamma; beta] (not), 2C channels, one multiply-add pass."""
    if both.dim() != 4 or both.shape[1] != 2 * normalized.shape[1]:
        raise ValueError(f"scale_shift: gamma/beta of shape {tuple(both.shape)} do not match the "
                         f"normalized activation {tuple(normalized.shape)}")
    return _ScaleShift.apply(normalized, both, plus_one)
