"""Convolutions of a one-hot label map as gathers of weight columns (SPADE's 'same', D's strided).

SPADE's ``mlp_shared`` convolution reads the one-hot label map (plus, optionally, a binary
instance-edge channel). With exactly one class channel set per pixel, the k x k convolution at a
pixel is the bias plus the sum of k*k weight columns, one per kernel offset, picked by the class
of the neighbour at that offset. Computing it densely multiplies ~label_nc x more zeros than
there are useful terms; docs/performance-history.md counts what that costs.

Here the k*k gathers run as ONE ``F.embedding_bag(mode="sum")`` over a table holding every
(offset, class) column: each output pixel is a "bag" of k*k row indices. The result comes out
pixel-major (N*H*W x C_out) and is copied to channels-first for the next convolution (a
mixed-layout input made that convolution's backward slower). The table is a reshaped view of the live convolution weight, so autograd
gives the conv weight its exact gradient (embedding_bag's backward is the scatter-add). The
label map itself never needs a gradient.

Channels that are not part of the one-hot group (the instance-edge channel) go through a tiny
dense convolution with their own weight slice, summed in.

Exactness: the dense convolution adds the same nonzero products (the others are exact zeros);
only the summation order differs, so results agree to float rounding (``tests/test_fast_path.py``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


class NotOneHotError(ValueError):
    """The label-map channels given to the gather path are not one-hot (0/1, at most one 1 per pixel)."""


def onehot_index(group: Tensor, check: bool = True) -> Tensor:
    """N x K x H x W one-hot-or-empty map -> N x H x W int64 class index, K where no class is set.

    One matrix product gives both the class index (sum of c * x_c) and the per-pixel total:
    exact in float for a 0/1 map, and much faster than strided argmax/sum over the channel dim.
    ``check`` proves the map is one-hot-or-empty with two cheap passes (see the comment below)
    and raises :class:`NotOneHotError` otherwise (one host synchronisation on a GPU).
    """
    if group.dim() != 4:
        raise ValueError(f"one-hot group must be N x K x H x W, got shape {tuple(group.shape)}")
    n, num_classes, h, w = group.shape
    weights = torch.stack([torch.arange(num_classes, dtype=group.dtype, device=group.device),
                           torch.ones(num_classes, dtype=group.dtype, device=group.device)])
    flat = group.reshape(n, num_classes, h * w)
    weighted, total = torch.matmul(weights, flat).unbind(dim=1)  # each N x HW
    index = weighted.long().clamp_(0, num_classes - 1)
    if check:
        # x >= 0, total in {0, 1} and x[index] == total  =>  one-hot or empty: the entry at the
        # index holds the whole (non-negative) total, so every other entry is 0.
        at_index = flat.gather(1, index.unsqueeze(1)).squeeze(1)
        ok = (group.amin() >= 0) & ((total == 0) | (total == 1)).all() & (at_index == total).all()
        if not bool(ok):
            raise NotOneHotError(
                f"the first {num_classes} channels of the label map are not one-hot (values must be 0/1 with at "
                "most one 1 per pixel); build the generator with onehot_channels=0 for dense label maps"
            )
    index = torch.where(total > 0, index, torch.full_like(index, num_classes))
    return index.view(n, h, w)


def resize_index(index: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest resize of an index map: picks the same source pixels as ``F.interpolate(nearest)``
    does on the one-hot map (small integers are exact in float32)."""
    if tuple(index.shape[1:]) == tuple(size):
        return index
    as_float = index.unsqueeze(1).to(torch.float32)
    return F.interpolate(as_float, size=size, mode="nearest").squeeze(1).long()


def padded_neighbours(positions: Tensor, shape: tuple[int, int, int], kernel_size: int) -> Tensor:
    """len(positions) x k*k: flat positions, in the N x (H+2r) x (W+2r) map padded by r = k // 2 on
    every side, of each listed pixel's (flat N*H*W index) k x k neighbours in (ky, kx) order."""
    n, h, w = shape
    r = kernel_size // 2
    wp = w + 2 * r
    b, rest = positions.div(h * w, rounding_mode="floor"), positions.remainder(h * w)
    top_left = (b * (h + 2 * r) + rest.div(w, rounding_mode="floor")) * wp + rest.remainder(w)
    steps = torch.arange(kernel_size, device=positions.device)
    return top_left[:, None] + (steps[:, None] * wp + steps[None, :]).reshape(1, -1)


def shifted_indices(indices: list[Tensor], class_counts: list[int], kernel_size: int,
                    positions: Optional[Tensor] = None) -> Tensor:
    """(N*H*W) x (groups*k*k) row indices into the (group, offset, class) table; with
    ``positions`` (flat N*H*W indices) only those pixels' rows, len(positions) x (groups*k*k).

    Table rows per group and offset: one per class plus a zero row (empty pixel and padding).
    """
    n, h, w = indices[0].shape
    k, pad = kernel_size, kernel_size // 2
    neighbours = None if positions is None else padded_neighbours(positions, (n, h, w), k)
    columns = []
    base = 0
    for index, count in zip(indices, class_counts):
        rows = count + 1
        padded = F.pad(index, (pad, pad, pad, pad), value=count)
        offset_base = base + torch.arange(k * k, device=index.device) * rows
        if neighbours is not None:
            columns.append(padded.reshape(-1)[neighbours] + offset_base)
        else:
            columns.append(torch.stack([padded[:, ky:ky + h, kx:kx + w] for ky in range(k) for kx in range(k)], dim=-1)
                           .reshape(n * h * w, k * k) + offset_base)
        base += k * k * rows
    return torch.cat(columns, dim=1)


def gather_table(weight: Tensor, class_counts: list[int]) -> Tensor:
    """The (group, offset, class) table of weight columns that :func:`shifted_indices` rows index:
    per group and offset one row per class plus a zero row (empty pixel and padding)."""
    c_out, _, k, _ = weight.shape
    tables, start = [], 0
    for count in class_counts:
        table = weight[:, start:start + count].permute(2, 3, 1, 0).reshape(k * k, count, c_out)
        tables.append(F.pad(table, (0, 0, 0, 1)).reshape(k * k * (count + 1), c_out))
        start += count
    return torch.cat(tables)


def weight_from_table(table: Tensor, class_counts: list[int], kernel_size: int) -> Tensor:
    """Inverse of :func:`gather_table`: (rows x C_out) -> C_out x sum(K_i) x k x k, zero rows
    dropped (e.g. a weight gradient accumulated row-wise into the table)."""
    k = kernel_size
    parts, start = [], 0
    for count in class_counts:
        rows = k * k * (count + 1)
        block = table[start:start + rows].view(k, k, count + 1, table.shape[1])[:, :, :count]
        parts.append(block.permute(3, 2, 0, 1))
        start += rows
    return torch.cat(parts, dim=1)


class _OneHotConv(torch.autograd.Function):
    """Gather forward (embedding_bag), scatter-add weight gradient (index_add over wide rows).

    The weight gradient w.r.t. class c at offset o is the sum of grad_out over the pixels whose
    neighbour at o has class c. Shifting grad_out by -o instead makes the grouping key the pixel's
    OWN class for every offset, so all k*k offsets go into one index_add of (k*k*C_out)-wide rows
    keyed by the index map - contiguous rows, unlike embedding_bag's own backward (slow on CPU).
    """

    @staticmethod
    def forward(ctx, weight: Tensor, bias: Optional[Tensor], class_counts: list[int], *indices: Tensor) -> Tensor:  # type: ignore[override]
        c_out, _, k, _ = weight.shape
        n, h, w = indices[0].shape
        out = F.embedding_bag(shifted_indices(list(indices), class_counts, k), gather_table(weight, class_counts), mode="sum")
        if bias is not None:
            out.add_(bias)  # row-broadcast on the pixel-major result: one cheap pass
        ctx.save_for_backward(*indices)
        ctx.class_counts = class_counts
        ctx.weight_shape = weight.shape
        ctx.weight_dtype = weight.dtype
        ctx.has_bias = bias is not None
        # Back to channels-first: the next (channels-first) convolution's backward was slower on a
        # mixed-layout input than this copy costs (docs/performance-history.md, run 2).
        return out.reshape(n, h, w, c_out).permute(0, 3, 1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        indices = ctx.saved_tensors
        c_out, _, k, _ = ctx.weight_shape
        n, h, w = indices[0].shape
        pad = k // 2
        # Accumulate in the weight's dtype (fp32 under autocast): thousands of terms per class.
        grad_out = grad_out.to(ctx.weight_dtype)
        g = F.pad(grad_out.permute(0, 2, 3, 1), (0, 0, pad, pad, pad, pad))  # N x H+2p x W+2p x C
        # Offset (ky, kx) reads the neighbour at (ky - p, kx - p), so the gradient collected at pixel
        # q for that offset is grad_out at q - (ky - p, kx - p): padded rows starting at 2p - ky.
        shifted = [g[:, 2 * pad - ky:2 * pad - ky + h, 2 * pad - kx:2 * pad - kx + w] for ky in range(k) for kx in range(k)]
        rows = torch.stack(shifted, dim=3).reshape(n * h * w, k * k * c_out)
        parts = []
        for index, count in zip(indices, ctx.class_counts):
            acc = rows.new_zeros(count + 1, k * k * c_out).index_add_(0, index.reshape(-1), rows)
            parts.append(acc[:count].view(count, k, k, c_out).permute(3, 0, 1, 2))
        grad_weight = torch.cat(parts, dim=1)
        grad_bias = grad_out.sum(dim=(0, 2, 3)) if ctx.has_bias else None
        return (grad_weight, grad_bias, None) + (None,) * len(indices)


def onehot_conv2d(indices: list[Tensor], class_counts: list[int], weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Same result as ``F.conv2d(cat([one_hot(i, K_i) for each group], 1), weight, bias, padding=k // 2)``.

    Args:
        indices: per one-hot group, an N x H x W int64 class index from :func:`onehot_index`
            (value K_i = no class). A binary channel (instance edges) is a group with K = 1.
        class_counts: K_i per group; their sum must be the weight's input channels.
        weight: C_out x sum(K_i) x k x k convolution weight (odd k).
        bias: C_out bias or None.
    Returns N x C_out x H x W (contiguous, channels-first).
    """
    c_out, c_in, kh, kw = weight.shape
    if kh != kw or kh % 2 != 1:
        raise ValueError(f"onehot_conv2d needs an odd square kernel, got {kh}x{kw}")
    if len(indices) != len(class_counts) or not indices:
        raise ValueError(f"need one index map per class count, got {len(indices)} maps and counts {class_counts}")
    if sum(class_counts) != c_in:
        raise ValueError(f"class counts {class_counts} sum to {sum(class_counts)} but the weight has {c_in} input channels")
    for index in indices:
        if index.dim() != 3 or index.shape != indices[0].shape:
            raise ValueError(f"index maps must all be N x H x W of one shape, got {[tuple(i.shape) for i in indices]}")
    return _OneHotConv.apply(weight, bias, list(class_counts), *indices)


def onehot_strided_conv2d(index: Tensor, num_classes: int, weight: Tensor, stride: int, padding: int) -> Tensor:
    """Same result as ``F.conv2d(one_hot(index, num_classes), weight, stride=stride, padding=padding)``
    (no bias) for any square kernel and stride: the discriminator's first convolution (4 x 4,
    stride 2) reads the one-hot label map at full resolution.

    One ``embedding_bag`` over the (offset, class) table of :func:`gather_table`, one bag of k*k
    rows per output pixel; autograd differentiates the table (a view of the live weight), so the
    weight gets its exact gradient through embedding_bag's backward. ``index``: N x H x W int64 class
    index from :func:`onehot_index` (``num_classes`` = no class, as zero padding). Returns N x C_out
    x H_out x W_out, contiguous.
    """
    c_out, c_in, k, kw = weight.shape
    if k != kw or c_in != num_classes:
        raise ValueError(f"onehot_strided_conv2d needs a square kernel over {num_classes} classes, "
                         f"got weight {tuple(weight.shape)}")
    n, h, w = index.shape
    h_out, w_out = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    padded = F.pad(index, (padding, padding, padding, padding), value=num_classes)
    span_h, span_w = stride * (h_out - 1) + 1, stride * (w_out - 1) + 1
    rows = torch.stack([padded[:, ky:ky + span_h:stride, kx:kx + span_w:stride] for ky in range(k) for kx in range(k)],
                       dim=-1).reshape(n * h_out * w_out, k * k)
    rows = rows + torch.arange(k * k, device=index.device) * (num_classes + 1)
    out = F.embedding_bag(rows, gather_table(weight, [num_classes]), mode="sum")
    return out.reshape(n, h_out, w_out, c_out).permute(0, 3, 1, 2).contiguous()
