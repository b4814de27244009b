"""The modulation plan of a generator and the label map of one of its forwards, as the SPADE layers read them.

:class:`ModulationPlan` is chosen once (from the config, then per layer shape by ``choice.py`` in
a training run) and never changes: a new choice is a new plan. :class:`LabelMaps` lives for one
generator forward (made there, dropped after), so its caches never hold stale maps: each
resolution of the label map is resized once and shared by every SPADE layer there, and so are its
class-index maps (gather path) and region layouts (region path).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch.nn.functional as F
from torch import Tensor

from spade_dist.config import SPADE_PATHS, SpeedConfig
from spade_dist.label_layout import LabelLayout
from spade_dist.models.fast import modulation
from spade_dist.models.fast.onehot_conv import NotOneHotError, onehot_index, resize_index
from spade_dist.models.fast.region_modulation import RegionLayout, build_region_layout

if TYPE_CHECKING:
    from spade_dist.models.spade import SPADE


def shape_key(channels: int, height: int, width: int) -> str:
    """A SPADE layer's shape as plans and timings name it: ``"CxHxW"`` (channels of the modulated
    activation, its resolution)."""
    return f"{channels}x{height}x{width}"


@dataclass(frozen=True)
class ModulationPlan:
    """How every SPADE layer of one generator computes and applies gamma/beta (``models/fast``).

    ``onehot_channels``: the label map's leading one-hot group (``LabelLayout.onehot_channels``;
    each later channel, the instance edges, is a binary group of its own); 0 = no gather or region
    path. ``paths``: per layer shape (:func:`shape_key`) the path every layer of that shape takes;
    other shapes take ``default``. ``in_place``: the residual blocks' leaky ReLUs and sums overwrite
    tensors autograd did not save (bitwise the out-of-place results).
    """

    onehot_channels: int = 0
    default: str = "dense"
    paths: dict[str, str] = field(default_factory=dict)
    in_place: bool = True

    def __post_init__(self) -> None:
        for path in (self.default, *self.paths.values()):
            if path not in SPADE_PATHS:
                raise ValueError(f"unknown SPADE speed path {path!r}; expected one of {SPADE_PATHS}")
            if path != "dense" and self.onehot_channels <= 0:
                raise ValueError(f"the {path} path needs the label map's one-hot channels (onehot_channels > 0)")

    @classmethod
    def from_config(cls, speed: SpeedConfig, labels: LabelLayout) -> Optional["ModulationPlan"]:
        """The plan the switches give before any measurement: every layer on the most specialised
        allowed path (what ``auto`` means outside training). None: ``fused_modulation`` is off,
        the generator runs the official layer."""
        if not speed.fused_modulation:
            return None
        allowed = speed.spade_paths
        return cls(onehot_channels=labels.onehot_channels if allowed != ("dense",) else 0, default=allowed[-1])

    def with_paths(self, paths: dict[str, str]) -> "ModulationPlan":
        """This plan with ``paths`` per layer shape (a measured choice)."""
        return dataclasses.replace(self, paths=dict(paths))

    def path_for(self, key: str) -> str:
        return self.paths.get(key, self.default)

    def label_maps(self, semantics: Tensor) -> "LabelMaps":
        return LabelMaps(semantics, self)


class LabelMaps:
    """The label map of one generator forward, resized (nearest) on demand and memoised per size."""

    def __init__(self, semantics: Tensor, plan: ModulationPlan) -> None:
        if semantics.dim() != 4:
            raise ValueError(f"label map must be N x C x H x W, got shape {tuple(semantics.shape)}")
        if plan.onehot_channels > semantics.shape[1]:
            raise ValueError(f"the plan's {plan.onehot_channels} one-hot channels exceed the label map's "
                             f"{semantics.shape[1]} channels")
        self.semantics = semantics
        self.plan = plan
        # Gather path (onehot_conv.py): the first `onehot_channels` channels are one one-hot group,
        # every remaining channel (the instance-edge map) a binary group of its own.
        self.class_counts: list[int] = (
            [plan.onehot_channels] + [1] * (semantics.shape[1] - plan.onehot_channels) if plan.onehot_channels else []
        )
        self._by_size: dict[tuple[int, int], Tensor] = {}
        self._full_indices: Optional[list[Tensor]] = None
        self._onehot: Optional[bool] = None  # unknown until a gather or region layer asks
        self._indices_by_size: dict[tuple[int, int], list[Tensor]] = {}
        self._layouts: dict[tuple[int, int, int], RegionLayout] = {}

    @property
    def in_place(self) -> bool:
        return self.plan.in_place

    def modulate(self, layer: "SPADE", normalized: Tensor) -> Tensor:
        """``layer``'s ``normalized * (1 + gamma) + beta`` on the path the plan gives its shape."""
        key = shape_key(normalized.shape[1], normalized.shape[2], normalized.shape[3])
        return modulation.modulate(layer, normalized, self, self.plan.path_for(key))

    def at(self, size: tuple[int, int]) -> Tensor:
        """The label map at ``size`` (bitwise ``F.interpolate(mode="nearest")``), resized once."""
        key = (int(size[0]), int(size[1]))
        cached = self._by_size.get(key)
        if cached is None:
            cached = resize_segmap(self.semantics, key)
            self._by_size[key] = cached
        return cached

    def indices_at(self, size: tuple[int, int]) -> Optional[list[Tensor]]:
        """Per group, the N x H x W class-index map at ``size`` (computed once at full size); None when
        the map is not one-hot in its groups (then no gather or region path can run). The check
        costs one host sync per forward, made only when a layer asks."""
        if self._onehot is None:
            self._onehot = self._index_full_map()
        if not self._onehot:
            return None
        assert self._full_indices is not None
        key = (int(size[0]), int(size[1]))
        cached = self._indices_by_size.get(key)
        if cached is None:
            cached = [resize_index(index, key) for index in self._full_indices]
            self._indices_by_size[key] = cached
        return cached

    def region_layout_at(self, size: tuple[int, int], kernel_size: int) -> RegionLayout:
        """Where the label map is uniform at ``size`` (built once, shared by the SPADE layers there)."""
        key = (int(size[0]), int(size[1]), int(kernel_size))
        layout = self._layouts.get(key)
        if layout is None:
            indices = self.indices_at(size)
            if indices is None:
                raise ValueError("the region path needs a one-hot label map (check indices_at first)")
            layout = build_region_layout(indices, self.class_counts, kernel_size)
            self._layouts[key] = layout
        return layout

    def _index_full_map(self) -> bool:
        if not self.class_counts:
            return False
        bounds = [0]
        for count in self.class_counts:
            bounds.append(bounds[-1] + count)
        try:
            self._full_indices = [onehot_index(self.semantics[:, lo:hi]) for lo, hi in zip(bounds, bounds[1:])]
        except NotOneHotError:
            return False
        return True


def resize_segmap(segmap: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize, bitwise ``F.interpolate(mode="nearest")`` (keeps one-hot maps one-hot).

    A shrink by whole factors is a strided slice: ``nearest`` reads source pixel
    floor(i * in / out) = i * factor, so the result is ``F.interpolate``'s, without the copy of the
    whole input that torch's CPU kernel makes first."""
    in_h, in_w = segmap.shape[2], segmap.shape[3]
    out_h, out_w = int(size[0]), int(size[1])
    if (in_h, in_w) == (out_h, out_w):
        return segmap  # nearest to the same size is the identity
    if 0 < out_h <= in_h and 0 < out_w <= in_w and in_h % out_h == 0 and in_w % out_w == 0:
        return segmap[:, :, :: in_h // out_h, :: in_w // out_w].contiguous()
    return F.interpolate(segmap, size=(out_h, out_w), mode="nearest")
