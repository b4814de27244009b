"""How the label map reaches the discriminator's first convolutions (``speed.discriminator_labels``).

The official input is cat(every semantic channel, image), and D's first convolution at full
resolution reads all of it (its most expensive layer, run in every D call of a step). Both modes
here are exact and use the same parameters:

- ``present``: only the semantic channels that are non-zero somewhere in the batch, and the first
  convolution of every scale uses the matching columns of its weight. A channel that is zero
  everywhere contributes exactly zero to every output (pooling keeps it zero), and the weight
  gradient of its columns is exactly zero, which is what ``index_select``'s backward writes.
- ``gather``: as ``present``, and at full resolution the one-hot channels' part of the first
  convolution is a gather of weight columns (``onehot_conv.onehot_strided_conv2d``), computed
  once per label map even when several images share it; it falls back to ``present`` when those
  channels are not one-hot. Its cost does not grow with the number of classes in the batch.

Semantics that require a gradient take the official input (the gradient of a zero channel is not zero).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spade_dist.config import SpeedConfig
from spade_dist.label_layout import LabelLayout
from spade_dist.models.fast.onehot_conv import NotOneHotError, onehot_index, onehot_strided_conv2d

# (a scale's first convolution, its input) -> the convolution's output.
FirstConv = Callable[[nn.Conv2d, Tensor], Tensor]


@dataclass(frozen=True)
class DiscriminatorLabels:
    """``mode`` present / gather; ``onehot_channels``: the label map's leading one-hot group
    (``LabelLayout.onehot_channels``), read as a class index by ``gather``."""

    mode: Literal["present", "gather"]
    onehot_channels: int

    def __post_init__(self) -> None:
        if self.mode not in ("present", "gather"):
            raise ValueError(f"discriminator label input must be present or gather, got {self.mode!r}")
        if self.onehot_channels <= 0:
            raise ValueError(f"discriminator label input: onehot_channels must be > 0, got {self.onehot_channels}")

    @classmethod
    def from_config(cls, speed: SpeedConfig, labels: LabelLayout) -> Optional["DiscriminatorLabels"]:
        """The label input ``speed.discriminator_labels`` names; None = ``dense``, the official input."""
        if speed.discriminator_labels == "dense":
            return None
        return cls(speed.discriminator_labels, labels.onehot_channels)

    def join(self, semantics: Tensor, image: Tensor, copies: int) -> Optional["JoinedInput"]:
        """D's input for one call (the present label channels, repeated ``copies`` times, then
        ``image``); None: take the official input (semantics that need a gradient)."""
        if semantics.requires_grad:
            return None
        if self.onehot_channels > semantics.shape[1]:
            raise ValueError(f"discriminator label input: {self.onehot_channels} one-hot channels do not fit "
                             f"{semantics.shape[1]} semantic channels")
        index = self._label_index(semantics) if self.mode == "gather" else None
        channels = present_channels(semantics, image.shape[1])
        kept = semantics.index_select(1, channels[: -image.shape[1]])
        x = torch.cat([kept.repeat(copies, 1, 1, 1) if copies > 1 else kept, image], dim=1)
        return JoinedInput(x, channels, index, self.onehot_channels, copies)

    def _label_index(self, semantics: Tensor) -> Optional[Tensor]:
        """The class index of the one-hot channels, None when they are not one-hot."""
        try:
            return onehot_index(semantics[:, : self.onehot_channels])
        except NotOneHotError:
            return None


class JoinedInput:
    """D's input of one call: ``x`` at full resolution (downsampled for the next scales) and, per
    scale, what its first convolution reads (:meth:`scale`)."""

    def __init__(self, x: Tensor, channels: Tensor, index: Optional[Tensor], onehot_channels: int, copies: int) -> None:
        self.x = x
        self.channels = channels  # which of the first convolution's input channels x holds, in order
        self.index = index  # the one-hot channels' class index (gather), None: they are in x
        self.onehot_channels, self.copies = onehot_channels, copies

    def scale(self, i: int, x: Tensor) -> tuple[Tensor, FirstConv]:
        """Scale ``i``'s input (``x``: :attr:`x` downsampled ``i`` times) and its first convolution."""
        if i > 0 or self.index is None:
            def conv_present(conv: nn.Conv2d, x: Tensor) -> Tensor:
                return F.conv2d(x, conv.weight.index_select(1, self.channels), conv.bias, conv.stride, conv.padding)
            return x, conv_present
        # Full resolution, gather: the one-hot channels' part of the convolution as a gather (once per
        # label map, repeated for the images that share it); x's other channels through the convolution.
        rest = self.channels[self.channels >= self.onehot_channels]
        index, onehot, copies = self.index, self.onehot_channels, self.copies

        def conv_gather(conv: nn.Conv2d, x: Tensor) -> Tensor:
            part = onehot_strided_conv2d(index, onehot, conv.weight[:, :onehot], conv.stride[0], conv.padding[0])
            out = F.conv2d(x, conv.weight.index_select(1, rest), conv.bias, conv.stride, conv.padding)
            return out + (part.repeat(copies, 1, 1, 1) if copies > 1 else part)
        return x[:, x.shape[1] - rest.numel():], conv_gather


def present_channels(semantics: Tensor, image_channels: int) -> Tensor:
    """Indices of the semantic channels that are non-zero (or NaN) somewhere in the batch, then
    the ``image_channels`` image channels that follow them in D's input."""
    present = semantics.detach().flatten(2).any(dim=2).any(dim=0)
    semantic = torch.nonzero(present).squeeze(1)
    image = torch.arange(semantics.shape[1], semantics.shape[1] + image_channels, device=semantic.device)
    return torch.cat([semantic, image])
