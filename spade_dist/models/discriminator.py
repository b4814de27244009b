"""Multiscale PatchGAN discriminator with intermediate features (for feature matching).

``D(semantics, image)`` concatenates the two on channels (official input layout: semantic channels
first, then RGB) and returns ``[[f_1, ..., f_n, pred] for each scale]``: scale 0 sees full
resolution, each next scale a 3x3 stride-2 average-pooled input (``count_include_pad=False``).
Submodule names (``discriminator_0.model0.0.weight_orig`` ...) match the official ones.

How the label map reaches the first convolutions is the discriminator's ``label_input``
(``models/fast/seam.py``; None = every semantic channel, the official input): a speed setting with
the same parameters and the same outputs.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spade_dist.models.fast.seam import DiscriminatorLabels, FirstConv
from spade_dist.models.norms import make_nonspade_norm_layer

if TYPE_CHECKING:
    from spade_dist.config import Config

_KERNEL = 4
_MAX_WIDTH = 512


class NLayerDiscriminator(nn.Module):
    """PatchGAN: conv(stride 2) + lrelu, (n_layers - 1) normed convs, a final conv to one channel."""

    def __init__(self, input_nc: int, ndf: int = 64, n_layers: int = 4, norm_D: str = "spectralinstance") -> None:
        super().__init__()
        pad = int(math.ceil((_KERNEL - 1.0) / 2))
        norm_layer = make_nonspade_norm_layer(norm_D)
        nf = ndf
        groups: list[list[nn.Module]] = [
            [nn.Conv2d(input_nc, nf, kernel_size=_KERNEL, stride=2, padding=pad), nn.LeakyReLU(0.2, False)]
        ]
        for n in range(1, n_layers):
            nf_prev, nf = nf, min(nf * 2, _MAX_WIDTH)
            # As in the current official code (and pix2pixHD): the last of these convs has stride 1.
            stride = 1 if n == n_layers - 1 else 2
            groups.append([norm_layer(nn.Conv2d(nf_prev, nf, kernel_size=_KERNEL, stride=stride, padding=pad)),
                           nn.LeakyReLU(0.2, False)])
        groups.append([nn.Conv2d(nf, 1, kernel_size=_KERNEL, stride=1, padding=pad)])
        for i, group in enumerate(groups):
            self.add_module(f"model{i}", nn.Sequential(*group))

    def forward(self, x: Tensor, first_conv: Optional[FirstConv] = None) -> list[Tensor]:
        """``first_conv(conv, x)``: the first convolution's output, when the label input computes it
        (``MultiscaleDiscriminator.label_input``); None: the convolution itself."""
        features = []
        for i, stage in enumerate(self.children()):
            if i == 0 and first_conv is not None:
                conv, activation = stage
                x = activation(first_conv(conv, x))
            else:
                x = stage(x)
            features.append(x)
        return features


class MultiscaleDiscriminator(nn.Module):
    def __init__(
        self,
        input_nc: int,
        ndf: int = 64,
        n_layers_D: int = 4,
        num_D: int = 2,
        norm_D: str = "spectralinstance",
        get_intermediate_features: bool = True,
        label_input: Optional[DiscriminatorLabels] = None,
    ) -> None:
        super().__init__()
        if num_D < 1 or n_layers_D < 1:
            raise ValueError(f"num_D and n_layers_D must be >= 1, got num_D={num_D}, n_layers_D={n_layers_D}")
        self.input_nc = input_nc
        self.get_intermediate_features = get_intermediate_features
        self.label_input = label_input
        for i in range(num_D):
            self.add_module(f"discriminator_{i}", NLayerDiscriminator(input_nc, ndf, n_layers_D, norm_D))

    @classmethod
    def from_config(cls, cfg: "Config", label_input: Optional[DiscriminatorLabels] = None) -> "MultiscaleDiscriminator":
        m = cfg.model
        return cls(
            input_nc=cfg.data.label_layout.semantic_nc + 3,
            ndf=m.ndf,
            n_layers_D=m.n_layers_D,
            num_D=m.num_D,
            norm_D=m.norm_D,
            get_intermediate_features=not cfg.loss.no_ganFeat_loss,
            label_input=label_input,
        )

    @staticmethod
    def downsample(x: Tensor) -> Tensor:
        return F.avg_pool2d(x, kernel_size=3, stride=2, padding=1, count_include_pad=False)

    def forward(self, semantics: Tensor, image: Tensor) -> list[list[Tensor]]:
        """``semantics`` holds one label map per image, or is shared: with ``image.shape[0]`` = k x
        ``semantics.shape[0]``, image i is judged with label map i mod ``semantics.shape[0]`` (the
        G step's fake and real halves of a batch pass the batch's maps once, not a copy of them)."""
        if semantics.shape[1] + image.shape[1] != self.input_nc:
            raise ValueError(
                f"discriminator expects {self.input_nc} input channels (semantic_nc + 3), got "
                f"{semantics.shape[1]} semantic + {image.shape[1]} image channels"
            )
        if semantics.shape[0] == 0 or image.shape[0] % semantics.shape[0]:
            raise ValueError(f"discriminator: {image.shape[0]} images cannot share {semantics.shape[0]} label maps "
                             "(the image batch must be a multiple of the label-map batch)")
        copies = image.shape[0] // semantics.shape[0]
        joined = self.label_input.join(semantics, image, copies) if self.label_input is not None else None
        if joined is None:
            x = torch.cat([semantics.repeat(copies, 1, 1, 1) if copies > 1 else semantics, image], dim=1)
        else:
            x = joined.x
        results: list[list[Tensor]] = []
        for i, d in enumerate(self.children()):
            if i > 0:
                x = self.downsample(x)
            features = d(x) if joined is None else d(*joined.scale(i, x))
            results.append(features if self.get_intermediate_features else [features[-1]])
        return results
