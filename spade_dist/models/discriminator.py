"""Multiscale PatchGAN discriminator with intermediate features (for feature matching).

``D(semantics, image)`` concatenates the two on channels (official input layout: semantic channels
first, then RGB) and returns ``[[f_1, ..., f_n, pred] for each scale]``: scale 0 sees full
resolution, each next scale a 3x3 stride-2 average-pooled input (``count_include_pad=False``).
Submodule names (``discriminator_0.model0.0.weight_orig`` ...) match the official ones.

``present_labels`` (``model.discriminator_present_labels``, on by default): the input keeps only the
semantic channels that are non-zero somewhere in the batch, and the first convolution of every
scale uses the matching columns of its weight. A one-hot label map of COCO-Stuff has 184 channels
of which an image uses ~10, so this removes most of D's most expensive layer (188 -> ~14 input
channels at full resolution, in every D call of a training step) and the copies / pooling of the
zero channels. It is exact: a channel that is zero everywhere contributes exactly zero to every
output (pooling keeps it zero), and the weight gradient of its columns is exactly zero, which is
what ``index_select``'s backward writes. Semantics that require a gradient are never compacted
(the gradient of a zero input channel is not zero).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

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

    def forward(self, x: Tensor, input_channels: Optional[Tensor] = None) -> list[Tensor]:
        """``input_channels``: which of the first convolution's input channels ``x`` holds (in that
        order); None: all of them."""
        features = []
        for i, stage in enumerate(self.children()):
            if i == 0 and input_channels is not None:
                conv, activation = stage
                x = activation(F.conv2d(x, conv.weight.index_select(1, input_channels), conv.bias,
                                        conv.stride, conv.padding))
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
        present_labels: bool = False,
    ) -> None:
        super().__init__()
        if num_D < 1 or n_layers_D < 1:
            raise ValueError(f"num_D and n_layers_D must be >= 1, got num_D={num_D}, n_layers_D={n_layers_D}")
        self.input_nc = input_nc
        self.get_intermediate_features = get_intermediate_features
        self.present_labels = present_labels
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
            present_labels=m.discriminator_present_labels,
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
        input_channels = None
        if self.present_labels and not semantics.requires_grad:
            input_channels = present_channels(semantics, image.shape[1])
            semantics = semantics.index_select(1, input_channels[: -image.shape[1]])
        if image.shape[0] != semantics.shape[0]:
            semantics = semantics.repeat(image.shape[0] // semantics.shape[0], 1, 1, 1)
        x = torch.cat([semantics, image], dim=1)
        results: list[list[Tensor]] = []
        for i, d in enumerate(self.children()):
            if i > 0:
                x = self.downsample(x)
            features = d(x, input_channels)
            results.append(features if self.get_intermediate_features else [features[-1]])
        return results


def present_channels(semantics: Tensor, image_channels: int) -> Tensor:
    """Indices of the semantic channels that are non-zero (or NaN) somewhere in the batch, then
    the ``image_channels`` image channels that follow them in D's input."""
    present = semantics.detach().flatten(2).any(dim=2).any(dim=0)
    semantic = torch.nonzero(present).squeeze(1)
    image = torch.arange(semantics.shape[1], semantics.shape[1] + image_channels, device=semantic.device)
    return torch.cat([semantic, image])
