"""Residual blocks: SPADEResnetBlock (GauGAN) and the pix2pixHD ResnetBlock.

SPADEResnetBlock follows the official order of operations: shortcut first (learned 1x1 conv after a
SPADE norm when fin != fout), then norm -> leaky_relu(0.2) -> conv twice, summed. With label maps
of a modulation plan that allows it (``models/fast/seam.py``) the activations and the residual sum
run in place. Spectral norm (``spectral`` prefix of ``norm_G``) wraps conv_0 / conv_1 / conv_s
with ``torch.nn.utils.spectral_norm`` so the state dict holds ``weight_orig`` / ``weight_u`` /
``weight_v`` exactly like the released checkpoints.
"""
from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from spade_dist.models.fast.seam import SegmapInput, in_place
from spade_dist.models.norms import parse_spade_norm
from spade_dist.models.spade import SPADE

LEAKY_SLOPE = 0.2


class SPADEResnetBlock(nn.Module):
    """Args: fin/fout channels, ``norm_G`` string, ``semantic_nc`` label channels."""

    def __init__(self, fin: int, fout: int, norm_G: str, semantic_nc: int) -> None:
        super().__init__()
        spec = parse_spade_norm(norm_G)
        self.learned_shortcut = fin != fout
        fmiddle = min(fin, fout)
        self.conv_0 = nn.Conv2d(fin, fmiddle, kernel_size=3, padding=1)
        self.conv_1 = nn.Conv2d(fmiddle, fout, kernel_size=3, padding=1)
        if self.learned_shortcut:
            self.conv_s = nn.Conv2d(fin, fout, kernel_size=1, bias=False)
        if spec.spectral:
            self.conv_0 = nn.utils.spectral_norm(self.conv_0)
            self.conv_1 = nn.utils.spectral_norm(self.conv_1)
            if self.learned_shortcut:
                self.conv_s = nn.utils.spectral_norm(self.conv_s)
        config_text = spec.spade_config_str
        self.norm_0 = SPADE(config_text, fin, semantic_nc)
        self.norm_1 = SPADE(config_text, fmiddle, semantic_nc)
        if self.learned_shortcut:
            self.norm_s = SPADE(config_text, fin, semantic_nc)

    def forward(self, x: Tensor, seg: SegmapInput) -> Tensor:
        # In place where the plan allows: the activation overwrites SPADE's fresh output and the sum
        # conv_1's output; autograd saved neither (leaky_relu_ keeps its result, whose sign is its
        # input's), so values and gradients are bitwise the out-of-place ones, with two fewer
        # full-size maps allocated per block.
        overwrite = in_place(seg)
        actvn = F.leaky_relu_ if overwrite else F.leaky_relu
        x_s = self.shortcut(x, seg)
        dx = self.conv_0(actvn(self.norm_0(x, seg), LEAKY_SLOPE))
        dx = self.conv_1(actvn(self.norm_1(dx, seg), LEAKY_SLOPE))
        return dx.add_(x_s) if overwrite else x_s + dx

    def shortcut(self, x: Tensor, seg: SegmapInput) -> Tensor:
        return self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x


class ResnetBlock(nn.Module):
    """pix2pixHD block: reflection pad, normed conv, activation, reflection pad, normed conv; + x."""

    def __init__(
        self,
        dim: int,
        norm_layer: Callable[[nn.Module], nn.Module],
        activation: nn.Module | None = None,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        pad = (kernel_size - 1) // 2
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(pad),
            norm_layer(nn.Conv2d(dim, dim, kernel_size=kernel_size)),
            activation if activation is not None else nn.ReLU(False),
            nn.ReflectionPad2d(pad),
            norm_layer(nn.Conv2d(dim, dim, kernel_size=kernel_size)),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv_block(x)
