"""The one seam between the plain GauGAN networks and their speed paths.

``models/{generator,blocks,spade,discriminator}.py`` and ``losses.py`` import this module and nothing else of
``models/fast``. What crosses it:

- a generator holds a :class:`ModulationPlan` (None: the official layer, as the NVlabs code runs)
  and makes one :class:`LabelMaps` per forward from it; the residual blocks and SPADE layers receive
  it where the official code passes the label map, and a SPADE layer given one calls
  ``labels.modulate(self, normalized)`` instead of its own convolutions. Nothing else is set on the
  layers, so a block can be run (or recomputed) on its own with the same ``LabelMaps``;
- a generator built with ``activation_checkpointing`` (``generator`` / ``generator_spade`` / ``all``) runs
  each residual block through :func:`run_checkpointed` (``checkpointing.py``) while gradients are
  on: the block (and its SPADE layers) recomputed in the backward, exactly (no second
  BN-statistics update or power iteration);
- a discriminator holds a :class:`DiscriminatorLabels` (None: the official input) and asks it for
  its full-resolution input and how each scale's first convolution reads that input.

The other speed settings reach the networks from outside without changing their code: the
spectral-norm backward (``spectral_norm.py``, applied by ``models/factory.py``), channels-last and
``torch.compile`` (``train/state.py``), and the per-layer-shape choice of ``auto`` (``choice.py``,
which makes a new plan and gives it to the generator).
"""
from __future__ import annotations

from typing import Union

from torch import Tensor

from spade_dist.models.fast.checkpointing import run_checkpointed
from spade_dist.models.fast.discriminator_labels import DiscriminatorLabels, FirstConv
from spade_dist.models.fast.label_maps import LabelMaps, ModulationPlan

__all__ = ["DiscriminatorLabels", "FirstConv", "LabelMaps", "ModulationPlan", "SegmapInput", "in_place",
           "run_checkpointed"]

# What the residual blocks and SPADE layers receive as their label map.
SegmapInput = Union[Tensor, LabelMaps]


def in_place(segmap: SegmapInput) -> bool:
    """Whether a block may overwrite the activations autograd does not keep (leaky ReLU, residual
    sum): on the speed paths when the plan says so; the official layer keeps its out-of-place ops."""
    return isinstance(segmap, LabelMaps) and segmap.in_place
