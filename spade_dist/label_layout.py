"""The channel layout of the generator's label input, computed in one place (no torch: the config uses it).

The official channel order (``Pix2PixModel.preprocess_input``; ``spade_dist.labels`` encodes it):
one-hot over ``label_nc`` classes, then one "don't care" channel (id 255) when
``contain_dontcare_label``, then the instance-edge channel when ``no_instance`` is false. The first
two form one one-hot group (exactly one channel set per pixel), which the exact gather paths of
``spade_dist.models.fast`` read as a class index; the edge channel is binary on its own.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LabelLayout:
    """``label_nc`` / ``contain_dontcare_label`` / ``no_instance`` and the channel counts they give."""

    label_nc: int
    contain_dontcare_label: bool
    no_instance: bool

    def __post_init__(self) -> None:
        if self.label_nc <= 0:
            raise ValueError(f"label_nc must be > 0, got {self.label_nc}")

    @property
    def onehot_channels(self) -> int:
        """The leading one-hot group: the classes and, with ``contain_dontcare_label``, the don't-care channel."""
        return self.label_nc + int(self.contain_dontcare_label)

    @property
    def edge_channels(self) -> int:
        """1 with the instance-edge channel (last), else 0."""
        return int(not self.no_instance)

    @property
    def semantic_nc(self) -> int:
        """All input channels of the generator (the official ``semantic_nc``)."""
        return self.onehot_channels + self.edge_channels
