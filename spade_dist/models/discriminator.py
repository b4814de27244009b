"""Multiscale PatchGAN discriminator with intermediate features (for feature matching).

``D(semantics, image)`` concatenates the two on channels (official input layout: semantic channels
first, then RGB) and returns ``[[f_1, ..., f_n, pred] for each scale]``: scale 0 sees full
resolution, each next scale a 3x3 stride-2 average-pooled input (``count_include_pad=False``).
Submodule names (``discriminator_0.model0.0.weight_orig`` ...) match the official ones.

How the label map reaches D (``model.discriminator_labels``; all three exact, same parameters):

- ``dense``: every semantic channel, as the official code (184 channels for COCO-Stuff, of which
  an image uses ~10; D's first convolution at full resolution is its most expensive layer).
- ``present``: only the semantic channels that are non-zero somewhere in the batch, and the
  first convolution of every scale uses the matching columns of its weight. A channel that is
  zero everywhere contributes exactly zero to every output (pooling keeps it zero), and the weight
  gradient of its columns is exactly zero, which is what ``index_select``'s backward writes.
- ``gather`` (default): as ``present``, and at full resolution the one-hot channels' part of the
  first convolution is a gather of weight columns (``onehot_conv.onehot_strided_conv2d``), computed
  once per label map even when fake and real images share it; it falls back to ``present`` when
  those channels are not one-hot. Its cost does not grow with the number of classes in the batch.

Semantics that require a gradient always take ``dense`` (the gradient of a zero input channel
is not zero).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spade_dist.models.norms import make_nonspade_norm_layer
from spade_dist.models.onehot_conv import NotOneHotError, onehot_index, onehot_strided_conv2d

if TYPE_CHECKING:
    from spade_dist.config import Config

_KERNEL = 4
_MAX_WIDTH = 512
LABEL_INPUTS = ("dense", "present", "gather")


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

    def forward(self, x: Tensor, input_channels: Optional[Tensor] = None,
                label_part: Optional[Tensor] = None) -> list[Tensor]:
        """``input_channels``: which of the first convolution's input channels ``x`` holds (in that
        order); None: all of them. ``label_part``: the first convolution's output from the
        channels before ``x``'s (a one-hot label map's gather), added to that of ``x``."""
        features = []
        for i, stage in enumerate(self.children()):
            if i == 0 and input_channels is not None:
                conv, activation = stage
                out = F.conv2d(x, conv.weight.index_select(1, input_channels), conv.bias, conv.stride, conv.padding)
                x = activation(out if label_part is None else out + label_part)
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
        label_input: str = "dense",
        onehot_channels: int = 0,
    ) -> None:
        super().__init__()
        if num_D < 1 or n_layers_D < 1:
            raise ValueError(f"num_D and n_layers_D must be >= 1, got num_D={num_D}, n_layers_D={n_layers_D}")
        self.input_nc = input_nc
        self.get_intermediate_features = get_intermediate_features
        if label_input not in LABEL_INPUTS:
            raise ValueError(f"discriminator label input must be one of {LABEL_INPUTS}, got {label_input!r}")
        if not 0 <= onehot_channels <= input_nc - 3:
            raise ValueError(f"onehot_channels must be in [0, {input_nc - 3}], got {onehot_channels}")
        self.label_input = label_input
        self.onehot_channels = onehot_channels  # the leading one-hot group of the semantic channels
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
            label_input=m.discriminator_labels,
            onehot_channels=cfg.data.label_nc + int(cfg.data.contain_dontcare_label),
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
        input_channels = label_part = None
        if self.label_input != "dense" and not semantics.requires_grad:
            index = self._label_index(semantics) if self.label_input == "gather" else None
            input_channels = present_channels(semantics, image.shape[1])
            semantics = semantics.index_select(1, input_channels[: -image.shape[1]])
            if index is not None:
                label_part, scale0_channels = self._gather_first_conv(index, input_channels, copies)
        x = torch.cat([semantics.repeat(copies, 1, 1, 1) if copies > 1 else semantics, image], dim=1)
        results: list[list[Tensor]] = []
        for i, d in enumerate(self.children()):
            if i > 0:
                x = self.downsample(x)
            if i == 0 and label_part is not None:
                # The one-hot channels are in label_part; x's other channels go through the conv.
                features = d(x[:, x.shape[1] - scale0_channels.numel():], scale0_channels, label_part)
            else:
                features = d(x, input_channels)
            results.append(features if self.get_intermediate_features else [features[-1]])
        return results

    def _label_index(self, semantics: Tensor) -> Optional[Tensor]:
        """The class index of the one-hot channels, None when there are none or they are not one-hot."""
        if self.onehot_channels == 0:
            return None
        try:
            return onehot_index(semantics[:, : self.onehot_channels])
        except NotOneHotError:
            return None

    def _gather_first_conv(self, index: Tensor, input_channels: Tensor, copies: int) -> tuple[Tensor, Tensor]:
        """Scale 0's first convolution over the one-hot channels (once per label map, repeated for
        the images that share it), and the input channels left for the dense convolution."""
        conv = self.discriminator_0.model0[0]
        part = onehot_strided_conv2d(index, self.onehot_channels, conv.weight[:, : self.onehot_channels],
                                     conv.stride[0], conv.padding[0])
        rest = input_channels[input_channels >= self.onehot_channels]
        return (part.repeat(copies, 1, 1, 1) if copies > 1 else part), rest


def present_channels(semantics: Tensor, image_channels: int) -> Tensor:
    """Indices of the semantic channels that are non-zero (or NaN) somewhere in the batch, then
    the ``image_channels`` image channels that follow them in D's input."""
    present = semantics.detach().flatten(2).any(dim=2).any(dim=0)
    semantic = torch.nonzero(present).squeeze(1)
    image = torch.arange(semantics.shape[1], semantics.shape[1] + image_channels, device=semantic.device)
    return torch.cat([semantic, image])
