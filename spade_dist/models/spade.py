"""The SPADE layer: param-free normalisation modulated by gamma/beta predicted from the label map.

Parameters and buffers are laid out exactly as in the official ``SPADE`` module
(``param_free_norm.*``, ``mlp_shared.0.*``, ``mlp_gamma.*``, ``mlp_beta.*``) so released
checkpoints load unchanged. The forward is the official one; given the label maps of a generator
running a modulation plan (``models/fast/seam.py``) instead of a plain label map, the layer lets
them compute the same function on the plan's speed path.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from spade_dist.models.fast.seam import LabelMaps, SegmapInput
from spade_dist.models.norms import make_param_free_norm, parse_spade_norm

# Width of the hidden embedding of the label map; hard-coded in the official implementation.
SPADE_HIDDEN = 128


def resize_nearest(segmap: Tensor, size: tuple[int, int]) -> Tensor:
    """The official resize of the label map (``F.interpolate``, nearest), skipped when the size matches."""
    if (segmap.shape[2], segmap.shape[3]) == (int(size[0]), int(size[1])):
        return segmap  # nearest to the same size is the identity
    return F.interpolate(segmap, size=(int(size[0]), int(size[1])), mode="nearest")


class SPADE(nn.Module):
    """``norm(x) * (1 + gamma(m)) + beta(m)``.

    Args:
        config_text: ``spade{instance|batch|syncbatch}{k}x{k}`` (a ``spectral`` prefix is ignored
            here: it concerns the block's convolutions, not this layer).
        norm_nc: channels of the normalised activation.
        label_nc: channels of the semantic input (the official ``semantic_nc``).
    """

    def __init__(self, config_text: str, norm_nc: int, label_nc: int) -> None:
        super().__init__()
        spec = parse_spade_norm(config_text)
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
        if isinstance(segmap, LabelMaps):  # a modulation plan's speed path: the same function
            return segmap.modulate(self, normalized)
        segmap = resize_nearest(segmap, (x.shape[2], x.shape[3]))
        actv = self.mlp_shared(segmap)
        gamma = self.mlp_gamma(actv)
        beta = self.mlp_beta(actv)
        return normalized * (1 + gamma) + beta
