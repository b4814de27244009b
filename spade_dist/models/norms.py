"""Normalisation factories: parse SPADE norm strings, build the param-free norm of a SPADE layer,
and the non-SPADE norm wrapper used by the discriminator, the encoder and the pix2pixHD generator.

``norm_G`` strings follow the official code: an optional ``spectral`` prefix (spectral norm on the
residual block convolutions), then ``spade`` + param-free norm type + kernel size, e.g.
``spectralspadesyncbatch3x3`` or ``spadeinstance5x5``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from torch import nn

from spade_dist.models.sync_bn import SyncBatchNorm2d

PARAM_FREE_NORMS = ("instance", "batch", "syncbatch")
_SPADE_NORM_RE = re.compile(r"^(?P<spectral>spectral)?spade(?P<kind>[a-z]+?)(?P<k>\d+)x(?P<k2>\d+)$")


@dataclass(frozen=True)
class SpadeNormSpec:
    spectral: bool  # spectral norm on the residual block's convolutions
    param_free: str  # instance | batch | syncbatch
    kernel_size: int  # kernel of the SPADE modulation convolutions

    @property
    def spade_config_str(self) -> str:
        """The string the official SPADE layer receives (block norm minus 'spectral')."""
        return f"spade{self.param_free}{self.kernel_size}x{self.kernel_size}"


def parse_spade_norm(norm_G: str) -> SpadeNormSpec:
    """Parse ``norm_G``; an unknown string or norm type raises ValueError naming it."""
    m = _SPADE_NORM_RE.match(norm_G)
    if not m:
        raise ValueError(
            f"unknown SPADE norm string '{norm_G}': expected [spectral]spade{{instance|batch|syncbatch}}KxK, "
            "e.g. 'spectralspadesyncbatch3x3'"
        )
    kind = m.group("kind")
    if kind not in PARAM_FREE_NORMS:
        raise ValueError(
            f"unknown param-free norm type '{kind}' in SPADE norm string '{norm_G}' "
            f"(known: {', '.join(PARAM_FREE_NORMS)})"
        )
    k, k2 = int(m.group("k")), int(m.group("k2"))
    if k != k2 or k % 2 == 0:
        raise ValueError(f"SPADE norm string '{norm_G}': kernel must be square and odd, got {k}x{k2}")
    return SpadeNormSpec(spectral=bool(m.group("spectral")), param_free=kind, kernel_size=k)


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

NONSPADE_NORMS = ("instance", "batch", "syncbatch", "none")
_SPECTRAL = "spectral"


def parse_nonspade_norm(norm_type: str) -> tuple[bool, str]:
    """``'spectralinstance'`` -> ``(True, 'instance')``; unknown names raise ValueError naming them.

    The official ``sync_batch`` spelling is accepted as an alias of ``syncbatch``; an empty rest
    after ``spectral`` means "spectral norm only" as in the official code.
    """
    spectral = norm_type.startswith(_SPECTRAL)
    sub = norm_type[len(_SPECTRAL):] if spectral else norm_type
    if sub == "sync_batch":
        sub = "syncbatch"
    if sub == "":
        sub = "none"
    if sub not in NONSPADE_NORMS:
        raise ValueError(
            f"unknown norm type '{norm_type}': expected [spectral]{{{'|'.join(NONSPADE_NORMS)}}}, "
            "e.g. 'spectralinstance'"
        )
    return spectral, sub


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
