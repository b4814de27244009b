"""The SPADE layer: param-free normalisation modulated by gamma/beta predicted from the label map.

Parameters and buffers are laid out exactly as in the official ``SPADE`` module
(``param_free_norm.*``, ``mlp_shared.0.*``, ``mlp_gamma.*``, ``mlp_beta.*``) so released
checkpoints load unchanged.

Two numerically equivalent forward paths:
- reference path (``fused=False``): the official order - resize the label map, ``mlp_shared``,
  then ``mlp_gamma`` and ``mlp_beta`` as two convolutions;
- fused path (``fused=True``): gamma and beta come from ONE convolution whose weight is the
  concatenation of both weights (the two read the same activation, so one pass over it is enough),
  and the label map may arrive pre-resized through a :class:`SegmapPyramid` shared by every SPADE
  layer of one generator forward, so each resolution is resized once instead of once per layer.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spade_dist.models.norms import make_param_free_norm, parse_spade_norm

# Width of the hidden embedding of the label map; hard-coded in the official implementation.
SPADE_HIDDEN = 128


class SegmapPyramid:
    """The label map of one forward pass, resized (nearest) on demand and memoised per size.

    Lives only for one generator forward (created there, dropped after), so it never holds stale
    maps and there is no shared state between calls or processes.
    """

    def __init__(self, segmap: Tensor) -> None:
        if segmap.dim() != 4:
            raise ValueError(f"label map must be N x C x H x W, got shape {tuple(segmap.shape)}")
        self.segmap = segmap
        self._by_size: dict[tuple[int, int], Tensor] = {}

    def at(self, size: tuple[int, int]) -> Tensor:
        key = (int(size[0]), int(size[1]))
        cached = self._by_size.get(key)
        if cached is None:
            cached = resize_segmap(self.segmap, key)
            self._by_size[key] = cached
        return cached


def resize_segmap(segmap: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize, as the official code does (keeps one-hot maps one-hot)."""
    if tuple(segmap.shape[2:]) == tuple(size):
        return segmap  # nearest to the same size is the identity
    return F.interpolate(segmap, size=size, mode="nearest")


SegmapInput = Union[Tensor, SegmapPyramid]


class SPADE(nn.Module):
    """``norm(x) * (1 + gamma(m)) + beta(m)``.

    Args:
        config_text: ``spade{instance|batch|syncbatch}{k}x{k}`` (a ``spectral`` prefix is ignored
            here: it concerns the block's convolutions, not this layer).
        norm_nc: channels of the normalised activation.
        label_nc: channels of the semantic input (the official ``semantic_nc``).
        fused: use the single-convolution gamma/beta path (same parameters, same results).
    """

    def __init__(self, config_text: str, norm_nc: int, label_nc: int, fused: bool = True) -> None:
        super().__init__()
        spec = parse_spade_norm(config_text)
        self.fused = fused
        self.kernel_size = spec.kernel_size
        padding = spec.kernel_size // 2
        self.param_free_norm = make_param_free_norm(spec.param_free, norm_nc)
        self.mlp_shared = nn.Sequential(
            nn.Conv2d(label_nc, SPADE_HIDDEN, kernel_size=spec.kernel_size, padding=padding),
            nn.ReLU(),
        )
        self.mlp_gamma = nn.Conv2d(SPADE_HIDDEN, norm_nc, kernel_size=spec.kernel_size, padding=padding)
        self.mlp_beta = nn.Conv2d(SPADE_HIDDEN, norm_nc, kernel_size=spec.kernel_size, padding=padding)

    def forward(self, x: Tensor, segmap: SegmapInput) -> Tensor:
        normalized = self.param_free_norm(x)
        size = (x.shape[2], x.shape[3])
        seg = segmap.at(size) if isinstance(segmap, SegmapPyramid) else resize_segmap(segmap, size)
        actv = self.mlp_shared(seg)
        if self.fused:
            gamma, beta = self._gamma_beta_fused(actv)
        else:
            gamma, beta = self.mlp_gamma(actv), self.mlp_beta(actv)
        return normalized * (1 + gamma) + beta

    def _gamma_beta_fused(self, actv: Tensor) -> tuple[Tensor, Tensor]:
        # The concatenation is rebuilt every call from the live parameters, so gradients flow to
        # mlp_gamma / mlp_beta and the state dict stays the official one.
        weight = torch.cat([self.mlp_gamma.weight, self.mlp_beta.weight], dim=0)
        bias = torch.cat([self.mlp_gamma.bias, self.mlp_beta.bias], dim=0)
        both = F.conv2d(actv, weight, bias, padding=self.kernel_size // 2)
        return both.split(self.mlp_gamma.out_channels, dim=1)
