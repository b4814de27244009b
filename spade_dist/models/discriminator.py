"""Multiscale PatchGAN discriminator with intermediate features (for feature matching).

``D(semantics, image)`` concatenates the two on channels (official input layout: semantic channels
first, then RGB) and returns ``[[f_1, ..., f_n, pred] for each scale]``: scale 0 sees full
resolution, each next scale a 3x3 stride-2 average-pooled input (``count_include_pad=False``).
Submodule names (``discriminator_0.model0.0.weight_orig`` ...) match the official ones.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for stage in self.children():
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
    ) -> None:
        super().__init__()
        if num_D < 1 or n_layers_D < 1:
            raise ValueError(f"num_D and n_layers_D must be >= 1, got num_D={num_D}, n_layers_D={n_layers_D}")
        self.input_nc = input_nc
        self.get_intermediate_features = get_intermediate_features
        for i in range(num_D):
            self.add_module(f"discriminator_{i}", NLayerDiscriminator(input_nc, ndf, n_layers_D, norm_D))

    @classmethod
    def from_config(cls, cfg: "Config") -> "MultiscaleDiscriminator":
        m = cfg.model
        return cls(
            input_nc=cfg.data.semantic_nc + 3,
            ndf=m.ndf,
            n_layers_D=m.n_layers_D,
            num_D=m.num_D,
            norm_D=m.norm_D,
            get_intermediate_features=not cfg.loss.no_ganFeat_loss,
        )

    @staticmethod
    def downsample(x: Tensor) -> Tensor:
        return F.avg_pool2d(x, kernel_size=3, stride=2, padding=1, count_include_pad=False)

    def forward(self, semantics: Tensor, image: Tensor) -> list[list[Tensor]]:
        x = torch.cat([semantics, image], dim=1)
        if x.shape[1] != self.input_nc:
            raise ValueError(
                f"discriminator expects {self.input_nc} input channels (semantic_nc + 3), got "
                f"{semantics.shape[1]} semantic + {image.shape[1]} image channels"
            )
        results: list[list[Tensor]] = []
        for i, d in enumerate(self.children()):
            if i > 0:
                x = self.downsample(x)
            features = d(x)
            results.append(features if self.get_intermediate_features else [features[-1]])
        return results
