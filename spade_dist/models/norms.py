"""Normalisation factories: parse SPADE norm strings, build the param-free norm of a SPADE layer,
and the non-SPADE norm wrapper used by the discriminator, the encoder and the pix2pixHD generator.

``norm_G`` strings follow the official code: an optional ``spectral`` prefix (spectral norm on the
residual block convolutions), then ``spade`` + param-free norm type + kernel size, e.g.
``spectralspadesyncbatch3x3`` or ``spadeinstance5x5``.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from spade_dist.models.sync_bn import SyncBatchNorm2d
from spade_dist.norm_strings import (
    NONSPADE_NORMS,
    PARAM_FREE_NORMS,
    SpadeNormSpec,
    parse_nonspade_norm,
    parse_spade_norm,
)

__all__ = ["NONSPADE_NORMS", "PARAM_FREE_NORMS", "SpadeNormSpec", "parse_nonspade_norm", "parse_spade_norm",
           "make_param_free_norm", "make_nonspade_norm_layer"]

def make_param_free_norm(kind: str, num_features: int) -> nn.Module:
    """The normalisation inside a SPADE layer, without affine parameters (official semantics)."""
    if kind == "instance":
        return nn.InstanceNorm2d(num_features, affine=False)
    if kind == "batch":
        return nn.BatchNorm2d(num_features, affine=False)
    if kind == "syncbatch":
        return SyncBatchNorm2d(num_features, affine=False)
    raise ValueError(f"unknown param-free norm type '{kind}' (known: {', '.join(PARAM_FREE_NORMS)})")


# --------------------------------------------------------------------------------------------
# Non-SPADE norms (discriminator, encoder, pix2pixHD generator)
# --------------------------------------------------------------------------------------------

def make_nonspade_norm_layer(norm_type: str) -> Callable[[nn.Module], nn.Module]:
    """Return ``wrap(layer)`` that adds the norm named by ``norm_type`` after a conv layer.

    Official ``get_nonspade_norm_layer`` semantics, so state-dict keys line up: with the
    ``spectral`` prefix the layer gets ``torch.nn.utils.spectral_norm``; when a norm follows, the
    conv's bias is dropped (a norm right after it cancels it) and the result is
    ``nn.Sequential(layer, norm)`` (keys ``0.weight_orig``, ``1.running_mean`` ...). Instance norm is
    affine-free, batch norms are affine. The string is validated eagerly, not on first use.
    """
    spectral, sub = parse_nonspade_norm(norm_type)

    def wrap(layer: nn.Module) -> nn.Module:
        if spectral:
            layer = nn.utils.spectral_norm(layer)
        if sub == "none":
            return layer
        if getattr(layer, "bias", None) is not None:
            delattr(layer, "bias")
            layer.register_parameter("bias", None)
        channels = getattr(layer, "out_channels", None) or layer.weight.size(0)
        if sub == "instance":
            norm: nn.Module = nn.InstanceNorm2d(channels, affine=False)
        elif sub == "batch":
            norm = nn.BatchNorm2d(channels, affine=True)
        else:
            norm = SyncBatchNorm2d(channels, affine=True)
        return nn.Sequential(layer, norm)

    return wrap
