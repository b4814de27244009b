"""The SPADE layer: param-free normalisation modulated by gamma/beta predicted from the label map.

Parameters and buffers are laid out exactly as in the official ``SPADE`` module
(``param_free_norm.*``, ``mlp_shared.0.*``, ``mlp_gamma.*``, ``mlp_beta.*``) so released
checkpoints load unchanged.

Two numerically equivalent forward paths:
- reference path (``fused=False``): the official order - resize the label map, ``mlp_shared``,
  then ``mlp_gamma`` and ``mlp_beta`` as two convolutions;
- fused path (``fused=True``): gamma and beta come from ONE convolution whose weight is the
  concatenation of both weights (the two read the same activation, so one pass over it is enough),
  and the label map may arrive pre-resized through a :class:`SegmapPyramid` shared by every SPADE
  layer of one generator forward, so each resolution is resized once instead of once per layer.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spade_dist.models.norms import make_param_free_norm, parse_spade_norm
from spade_dist.models.onehot_conv import NotOneHotError, onehot_conv2d, onehot_index, resize_index
from spade_dist.models.region_modulation import RegionLayout, build_region_layout, region_gamma_beta

# How a SPADE layer may compute gamma/beta (all exact up to float rounding): dense convolutions, the
# first convolution as a one-hot gather (onehot_conv.py), or per uniform label region (region_modulation.py).
SPEED_PATHS = ("dense", "gather", "region")

# Width of the hidden embedding of the label map; hard-coded in the official implementation.
SPADE_HIDDEN = 128


class SegmapPyramid:
    """The label map of one forward pass, resized (nearest) on demand and memoised per size.

    Lives only for one generator forward (created there, dropped after), so it never holds stale
    maps and there is no shared state between calls or processes.
    """

    def __init__(self, segmap: Tensor, onehot_channels: int = 0, region_modulation: bool = False) -> None:
        if segmap.dim() != 4:
            raise ValueError(f"label map must be N x C x H x W, got shape {tuple(segmap.shape)}")
        if not 0 <= onehot_channels <= segmap.shape[1]:
            raise ValueError(f"onehot_channels must be in [0, {segmap.shape[1]}], got {onehot_channels}")
        self.segmap = segmap
        self._by_size: dict[tuple[int, int], Tensor] = {}
        # Gather path (onehot_conv.py): the first `onehot_channels` channels are one one-hot group,
        # every remaining channel (the instance-edge map) a binary group of its own.
        self.onehot_channels = onehot_channels
        self.class_counts: list[int] = (
            [onehot_channels] + [1] * (segmap.shape[1] - onehot_channels) if onehot_channels else []
        )
        self._indices_by_size: dict[tuple[int, int], list[Tensor]] = {}
        self._full_indices: Optional[list[Tensor]] = None
        # Region path (region_modulation.py): gamma/beta per uniform label region; needs the gather.
        self.region_modulation = region_modulation
        self._layouts: dict[tuple[int, int, int], RegionLayout] = {}

    @property
    def gather(self) -> bool:
        """Whether SPADE layers compute ``mlp_shared``'s first conv as a gather.

        True when built with ``onehot_channels`` and the map really is one-hot there (binary in
        the other channels). A map that is not (e.g. soft labels) silently takes the dense path,
        so the generator stays correct for any input; the check costs one host sync per forward.
        """
        if self.onehot_channels == 0:
            return False
        if self._full_indices is None:
            bounds = [0]
            for count in self.class_counts:
                bounds.append(bounds[-1] + count)
            try:
                self._full_indices = [onehot_index(self.segmap[:, lo:hi]) for lo, hi in zip(bounds, bounds[1:])]
            except NotOneHotError:
                self.onehot_channels, self.class_counts = 0, []
                return False
        return True

    def indices_at(self, size: tuple[int, int]) -> list[Tensor]:
        """Per group, the N x H x W class-index map at ``size`` (computed once at full size)."""
        if not self.gather or self._full_indices is None:
            raise RuntimeError("indices_at needs a one-hot label map and onehot_channels > 0 (check .gather first)")
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
            layout = build_region_layout(self.indices_at(size), self.class_counts, kernel_size)
            self._layouts[key] = layout
        return layout

    def at(self, size: tuple[int, int]) -> Tensor:
        key = (int(size[0]), int(size[1]))
        cached = self._by_size.get(key)
        if cached is None:
            cached = resize_segmap(self.segmap, key)
            self._by_size[key] = cached
        return cached


def resize_segmap(segmap: Tensor, size: tuple[int, int], strided: bool = True) -> Tensor:
    """Nearest-neighbour resize, as the official code does (keeps one-hot maps one-hot).

    ``strided``: shrinking by whole factors is a strided slice: ``nearest`` reads source pixel
    floor(i * in / out) = i * factor, so the result is bitwise ``F.interpolate``'s, without the copy
    of the whole input that torch's CPU kernel makes first (~90 ms for a 184-channel 256^2 map).
    ``strided=False`` always calls ``F.interpolate``, as the official code does in every SPADE layer
    (the reference layout, ``model.fused_modulation=false``, keeps that cost)."""
    in_h, in_w = segmap.shape[2], segmap.shape[3]
    out_h, out_w = int(size[0]), int(size[1])
    if (in_h, in_w) == (out_h, out_w):
        return segmap  # nearest to the same size is the identity
    if strided and 0 < out_h <= in_h and 0 < out_w <= in_w and in_h % out_h == 0 and in_w % out_w == 0:
        return segmap[:, :, :: in_h // out_h, :: in_w // out_w].contiguous()
    return F.interpolate(segmap, size=(out_h, out_w), mode="nearest")


SegmapInput = Union[Tensor, SegmapPyramid]


class SPADE(nn.Module):
    """``norm(x) * (1 + gamma(m)) + beta(m)``.

    Args:
        config_text: ``spade{instance|batch|syncbatch}{k}x{k}`` (a ``spectral`` prefix is ignored
            here: it concerns the block's convolutions, not this layer).
        norm_nc: channels of the normalised activation.
        label_nc: channels of the semantic input (the official ``semantic_nc``).
        fused: use the single-convolution gamma/beta path (same parameters, same results).
    """

    def __init__(self, config_text: str, norm_nc: int, label_nc: int, fused: bool = True) -> None:
        super().__init__()
        spec = parse_spade_norm(config_text)
        self.fused = fused
        self.kernel_size = spec.kernel_size
        padding = spec.kernel_size // 2
        self.param_free_norm = make_param_free_norm(spec.param_free, norm_nc)
        self.mlp_shared = nn.Sequential(
            nn.Conv2d(label_nc, SPADE_HIDDEN, kernel_size=spec.kernel_size, padding=padding),
            nn.ReLU(),
        )
        self.mlp_gamma = nn.Conv2d(SPADE_HIDDEN, norm_nc, kernel_size=spec.kernel_size, padding=padding)
        self.mlp_beta = nn.Conv2d(SPADE_HIDDEN, norm_nc, kernel_size=spec.kernel_size, padding=padding)
        # Speed path of this layer ("dense" | "gather" | "region"), chosen per device and layer shape
        # by models/speed_paths.py; None = what the SegmapPyramid offers (region > gather > dense).
        # Not a parameter or buffer: every path computes the same function of the same weights.
        self.path: Optional[str] = None

    def forward(self, x: Tensor, segmap: SegmapInput) -> Tensor:
        return self.modulate(self.param_free_norm(x), segmap)

    def modulate(self, normalized: Tensor, segmap: SegmapInput, path: Optional[str] = None) -> Tensor:
        """``normalized * (1 + gamma(segmap)) + beta(segmap)`` by ``path`` (default: :attr:`path`).

        The gather and region paths need a :class:`SegmapPyramid` whose map is one-hot; otherwise
        the dense convolutions run (same result)."""
        size = (normalized.shape[2], normalized.shape[3])
        pyramid = self.fused and isinstance(segmap, SegmapPyramid)
        path = path or self.path or ("region" if pyramid and segmap.region_modulation else "gather")
        if path not in SPEED_PATHS:
            raise ValueError(f"unknown SPADE speed path {path!r}; expected one of {SPEED_PATHS}")
        if pyramid and path != "dense":
            fast = self._modulate_fast(normalized, segmap, path)
            if fast is not None:
                return fast
        seg = segmap.at(size) if isinstance(segmap, SegmapPyramid) else resize_segmap(segmap, size, strided=False)
        actv = self.mlp_shared(seg)
        if self.fused:
            return scale_shift(normalized, self._gamma_beta_fused(actv), plus_one=True)
        gamma, beta = self.mlp_gamma(actv), self.mlp_beta(actv)
        return normalized * (1 + gamma) + beta

    # Data-dependent shapes and host syncs (one-hot check, torch.unique, nonzero): under
    # torch.compile (train.compile) this part runs eager and the dense rest is compiled.
    @torch.compiler.disable
    def _modulate_fast(self, normalized: Tensor, segmap: SegmapPyramid, path: str) -> Optional[Tensor]:
        """The gather / region paths; None when the label map is not one-hot (dense path then)."""
        if not segmap.gather:
            return None
        size = (normalized.shape[2], normalized.shape[3])
        first = self.mlp_shared[0]
        if path == "region":
            # Both convolutions per uniform label region, exact convolution only near borders.
            weight, bias = self._gamma_beta_weights()
            channels = self.mlp_gamma.out_channels
            both = region_gamma_beta(segmap.region_layout_at(size, self.kernel_size), first.weight, first.bias,
                                     weight, bias, plus_one=channels)
            return scale_shift(normalized, both.to(normalized.dtype), plus_one=False)  # both holds 1 + gamma
        # One-hot label map: the first conv is a gather of weight columns (onehot_conv.py).
        actv = F.relu(onehot_conv2d(segmap.indices_at(size), segmap.class_counts, first.weight, first.bias))
        return scale_shift(normalized, self._gamma_beta_fused(actv), plus_one=True)

    def _gamma_beta_weights(self) -> tuple[Tensor, Tensor]:
        """mlp_gamma and mlp_beta stacked as one convolution with 2C outputs."""
        return (torch.cat([self.mlp_gamma.weight, self.mlp_beta.weight], dim=0),
                torch.cat([self.mlp_gamma.bias, self.mlp_beta.bias], dim=0))

    def _gamma_beta_fused(self, actv: Tensor) -> Tensor:
        """[gamma; beta] (2C channels) from one convolution.

        The concatenation is rebuilt every call from the live parameters, so gradients flow to
        mlp_gamma / mlp_beta and the state dict stays the official one.
        """
        weight, bias = self._gamma_beta_weights()
        return F.conv2d(actv, weight, bias, padding=self.kernel_size // 2)


class _ScaleShift(torch.autograd.Function):
    """``addcmul(beta, normalized, scale)`` for ``both`` = [gamma or scale; beta] on channels.

    The same forward as ``torch.addcmul(beta, normalized, 1 + gamma)`` over ``both.split``, with a
    backward that writes the gradient of ``both`` straight into one 2C-channel tensor: autograd's
    would form ``grad * (normalized * 1)`` (an extra pass over the map for addcmul's ``value``)
    and then concatenate the two halves' gradients (``split``'s backward, a copy of both). Values
    are bitwise the same (a product by 1 is exact)."""

    @staticmethod
    def forward(ctx, normalized: Tensor, both: Tensor, plus_one: bool) -> Tensor:  # type: ignore[override]
        channels = both.shape[1] // 2
        gamma, beta = both[:, :channels], both[:, channels:]
        scale = 1 + gamma if plus_one else gamma
        ctx.save_for_backward(normalized, scale)
        ctx.both_shape, ctx.both_dtype = both.shape, both.dtype
        return torch.addcmul(beta, normalized, scale)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        normalized, scale = ctx.saved_tensors
        grad_normalized = grad * scale if ctx.needs_input_grad[0] else None
        grad_both = None
        if ctx.needs_input_grad[1]:
            channels_last = not grad.is_contiguous() and grad.is_contiguous(memory_format=torch.channels_last)
            grad_both = torch.empty(ctx.both_shape, dtype=ctx.both_dtype, device=grad.device,
                                    memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            channels = ctx.both_shape[1] // 2
            torch.mul(grad, normalized, out=grad_both[:, :channels])
            grad_both[:, channels:].copy_(grad)
        return grad_normalized, grad_both, None


def scale_shift(normalized: Tensor, both: Tensor, plus_one: bool) -> Tensor:
    """SPADE's modulation ``normalized * (1 + gamma) + beta`` from ``both`` = [gamma; beta]
    (``plus_one``) or [1 + gamma; beta] (not), 2C channels, one multiply-add pass."""
    if both.dim() != 4 or both.shape[1] != 2 * normalized.shape[1]:
        raise ValueError(f"scale_shift: gamma/beta of shape {tuple(both.shape)} do not match the "
                         f"normalized activation {tuple(normalized.shape)}")
    return _ScaleShift.apply(normalized, both, plus_one)
