"""SPADE's gamma/beta maps computed once per uniform label region instead of once per pixel.

SPADE predicts the modulation maps from the label map alone:
``gb = conv_gb(relu(conv_shared(onehot(label))))`` (both k x k, 'same' padding). Label maps are
piecewise constant, and a k x k convolution of a constant patch is a constant. So:

* a pixel whose k x k window (radius r = k // 2) lies inside the image and holds one label code
  ("U1") has the activation ``A[code] = relu(sum over offsets of conv_shared's columns + bias)``;
* a pixel whose (4r+1)^2 window is inside the image and uniform ("U2") has every neighbour in U1
  with the same code, so its gamma/beta is ``G[code] = A[code] @ (conv_gb summed over offsets) + bias``.

Only the remaining pixels ("boundary": a small share of a real label map, most of them along the
one-pixel instance-edge lines; docs/MODELS.md has the counts) need the real convolution. Their neighbours' activations
take few distinct values: a U1 neighbour has its code's ``A[code]``, and a non-U1 pixel's
activation depends on nothing but its k x k label window (and where the image edge cuts it),
and along a border the same windows repeat (far fewer distinct windows than non-U1 pixels). So
the activations form a small source table
[per-code rows; one row per distinct window; zero row for outside the image], the product
table ``T = source @ W`` holds every (row, offset) product (rows x k*k*2C: one matmul over the
distinct rows instead of an im2col product over every boundary pixel), and a boundary pixel's
gamma/beta is the bias plus, per offset, one row of T (an ``embedding_bag`` sum). The backward
pass uses the same split:

* ``dT[row, o]`` = sum of grad over the pixels that read ``row`` at offset o: the boundary
  pixels through a sparse count matrix built with the layout, plus, for a code's row, the sum
  of grad over the code's U2 pixels at every offset (a U2 pixel's every neighbour is U1 of its
  own code);
* conv_gb's weight gradient = ``dT^T @ source``; the activation gradient of each source row =
  ``sum_o W_o^T dT[row, o]`` (one matmul), through the ReLU; mlp_shared's gradient from the code
  rows through their one-hot columns and from the window rows through the gather table (one
  sparse product). No dense transposed convolution, no per-pixel activation gradient.

Layout and parallelism (profile in docs/performance-history.md, section 1a): the gamma/beta maps and
their gradient are channel-major per image (N x C x H*W, the channels-first tensor itself, written
and read image by image), so neither a per-pixel transpose nor a batch-transposing copy is needed.
The per-code map is one ``gather`` along the pixel axis per image (it uses every core; a
product with a 0/1 matrix or ``index_select`` were slower at 2 threads). The per-code sums of the
backward are, with few codes (the usual case), products with a 0/1 matrix built once per layout,
which BLAS runs on every core; with many codes ``index_add_`` along the contiguous pixel axis. Every sum over pixels into rows is a sparse product: no row-wise
``index_add`` along dim 0, which torch runs as a sort + segment pass that cost several times
more on two threads than on one. No full-size activation or gradient map is built or padded.

Exactness: the same products are summed, in a different order (per code and per row first), so results
agree with the dense convolutions to float rounding (``tests/test_region_modulation.py``: fp64
1e-10 against the dense path, outputs and every weight gradient). The label map never needs a
gradient. Runs in fp32 (autocast disabled inside): its work is gathers, small matmuls and index
sums, not the big convolutions autocast exists for.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from spade_dist.models.fast.onehot_conv import gather_table, padded_neighbours, shifted_indices, weight_from_table

# Largest num_codes + 1 for which the backward's per-code sums are one-hot matrix products: they cost
# 2 * (num_codes + 1) flops per summed value (an index op costs one add, but strided and, for
# row-wise index_add, badly parallel), and the 0/1 matrix takes (num_codes + 1) floats per
# pixel. Real label maps have few codes per resolution, random block maps hundreds (those take the
# index ops).
ONEHOT_SUM_MAX_CODES = 64


@dataclass
class RegionLayout:
    """Where the label map of one resolution is uniform; shared by every SPADE layer there.

    Flat positions index the N*H*W pixels. A boundary pixel's neighbour is either U1 (its code's
    activation row), a non-U1 pixel (its window's row) or outside the image (the zero row), so
    every boundary pixel reads k*k rows of the small source table and nothing full-size is padded
    or gathered from.
    """

    shape: tuple[int, int, int]  # N, H, W
    kernel_size: int
    class_counts: list[int]
    num_codes: int
    code: Tensor  # N*H*W int64: one code per combination of the groups' classes present (0..num_codes-1)
    code_columns: Tensor  # num_codes x C_in: which input channels each code sets (0/1)
    u2_key: Tensor  # N*H*W: code where U2, num_codes elsewhere
    boundary: Tensor  # flat positions not in U2 (gamma/beta convolved explicitly)
    boundary1: Tensor  # flat positions not in U1 (activation not per code)
    # Non-U1 pixels with equal k x k label windows have equal activations: one row per distinct window.
    gather_rows: Tensor  # distinct windows x groups*k*k rows of the onehot_conv table
    gather_sum: Tensor  # sparse CSR table rows x distinct windows, fp32 0/1: S @ rows sums each window's row into the table rows it read
    # The activation source has rows [codes; distinct windows; zero]. A boundary pixel's gamma/beta is
    # the bias plus, per offset o, row (source row of its neighbour at o, o) of the product table
    # T = source @ W (rows x k*k*2C).
    table_index: Tensor  # len(boundary) x k*k: source row * k*k + o
    table_grad_sum: Tensor  # sparse CSR (source rows * k*k) x len(boundary), counts: S @ grad sums dL/dT
    # With few codes the backward's per-code sums run as matrix products with this 0/1 matrix (BLAS
    # uses every core; an index_add along the pixel axis is strided); None = index_add.
    u2_onehot: Optional[Tensor] = None  # N*H*W x num_codes+1 (fp32)
    # Per image, built once and read by every SPADE layer at this resolution in both passes: its
    # pixels' slice of the N*H*W positions, its slice of ``boundary`` (sorted) and those boundary
    # pixels' positions within the image. gamma/beta are written and read image by image, straight
    # in the N x 2C x H*W layout.
    per_image: list[tuple[slice, slice, Tensor]] = field(default_factory=list)

def _uniform(code: Tensor, radius: int) -> Tensor:
    """N x H x W bool: the (2*radius+1)^2 window is inside the image and holds one code."""
    padded = F.pad(code.unsqueeze(1).to(torch.float32), (radius,) * 4, value=-1.0)  # codes < 2^24: exact
    size = 2 * radius + 1
    high = F.max_pool2d(padded, size, stride=1)
    low = -F.max_pool2d(-padded, size, stride=1)
    return (high == low).squeeze(1)


def build_region_layout(indices: list[Tensor], class_counts: list[int], kernel_size: int) -> RegionLayout:
    """Layout for per-group N x H x W class-index maps (``onehot_conv.onehot_index`` format:
    value K_i = no class in group i)."""
    n, h, w = indices[0].shape
    device = indices[0].device
    code = torch.zeros_like(indices[0])
    stride = 1
    column_rows = []
    for index, count in zip(indices, class_counts):
        code += index * stride
        stride *= count + 1
    # Only the codes present get per-code rows (a handful per image, not the product of the
    # groups' sizes). One host sync on a GPU, once per resolution and forward.
    present, compact = torch.unique(code, return_inverse=True)
    code, num_codes = compact, present.numel()
    codes = present
    for count in class_counts:  # decompose each code back into its groups' classes
        cls = codes.remainder(count + 1)
        column_rows.append(F.one_hot(cls, count + 1)[:, :count])
        codes = codes.div(count + 1, rounding_mode="floor")
    code_columns = torch.cat(column_rows, dim=1).to(torch.float32)
    r = kernel_size // 2
    u1 = _uniform(code, r)
    u2 = _uniform(code, 2 * r)
    flat = code.reshape(-1)
    no_code = torch.full_like(flat, num_codes)
    u1_code = torch.where(u1.reshape(-1), flat, no_code).view(n, h, w)
    boundary = (~u2).reshape(-1).nonzero().squeeze(1)
    boundary1 = (~u1).reshape(-1).nonzero().squeeze(1)
    # Neighbour tables, built once here and shared by every SPADE layer at this resolution in both passes.
    k2 = kernel_size * kernel_size
    # Distinct label windows of the non-U1 pixels (the activation depends on nothing else).
    windows = shifted_indices(indices, class_counts, kernel_size, positions=boundary1)
    if boundary1.numel():
        gather_rows, window_of = torch.unique(windows, dim=0, return_inverse=True)
    else:
        gather_rows, window_of = windows, boundary1
    num_windows = gather_rows.shape[0]
    # Row of each padded position in the activation source [code rows; window rows; zero row].
    act_row = u1_code.reshape(-1).clone()
    act_row[boundary1] = num_codes + window_of
    act_row_padded = F.pad(act_row.view(n, h, w), (r, r, r, r), value=num_codes + num_windows)
    boundary_patches = padded_neighbours(boundary, (n, h, w), kernel_size)
    table_index = act_row_padded.reshape(-1)[boundary_patches] * k2 + torch.arange(k2, device=device)
    source_rows = num_codes + num_windows + 1
    u2_key = torch.where(u2.reshape(-1), flat, no_code)
    return RegionLayout(
        shape=(n, h, w), kernel_size=kernel_size, class_counts=list(class_counts), num_codes=num_codes,
        code=flat, code_columns=code_columns,
        u2_key=u2_key,
        boundary=boundary,
        boundary1=boundary1,
        gather_rows=gather_rows,
        gather_sum=_sum_matrix(gather_rows.reshape(-1),
                               torch.arange(num_windows, device=device).repeat_interleave(gather_rows.shape[1]),
                               sum(k2 * (count + 1) for count in class_counts), num_windows),
        table_index=table_index,
        table_grad_sum=_sum_matrix(table_index.reshape(-1),
                                   torch.arange(boundary.numel(), device=device).repeat_interleave(k2),
                                   source_rows * k2, boundary.numel()),
        u2_onehot=(F.one_hot(u2_key, num_codes + 1).to(torch.float32)
                   if num_codes + 1 <= ONEHOT_SUM_MAX_CODES else None),
        per_image=_per_image(boundary, n, h * w),
    )


def _per_image(boundary: Tensor, n: int, pixels: int) -> list[tuple[slice, slice, Tensor]]:
    """RegionLayout.per_image for sorted flat ``boundary`` positions of ``n`` images of ``pixels`` each."""
    splits = torch.searchsorted(boundary, torch.arange(n + 1, device=boundary.device) * pixels).tolist()
    return [(slice(i * pixels, (i + 1) * pixels), slice(splits[i], splits[i + 1]),
             boundary[splits[i]:splits[i + 1]] - i * pixels) for i in range(n)]


def _sum_matrix(rows: Tensor, columns: Tensor, num_rows: int, num_columns: int) -> Tensor:
    """Sparse CSR ``num_rows x num_columns`` fp32 matrix with a 1 at each ``(rows[k], columns[k])``
    (the pairs are distinct): ``S @ X`` sums X's rows ``columns[k]`` into rows ``rows[k]``, exact
    (products by 1.0). Built directly in CSR order: one stable sort of ``rows``."""
    order = torch.argsort(rows, stable=True)
    crow = F.pad(torch.bincount(rows, minlength=num_rows).cumsum(0), (1, 0))
    values = torch.ones(rows.numel(), dtype=torch.float32, device=rows.device)
    with warnings.catch_warnings():  # torch flags sparse CSR as beta on every construction
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(crow, columns[order], values, (num_rows, num_columns), check_invariants=False)


def _sparse_mm(matrix: Tensor, dense: Tensor) -> Tensor:
    """``matrix @ dense`` for a fp32 0/1 (or count) sparse CSR matrix, in ``dense``'s dtype."""
    return (matrix if dense.dtype == torch.float32 else matrix.to(dense.dtype)) @ dense


class _RegionGammaBeta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layout: RegionLayout, shared_weight: Tensor, shared_bias: Tensor,  # type: ignore[override]
                gb_weight: Tensor, gb_bias: Tensor, plus_one: int) -> Tensor:
        n, h, w = layout.shape
        k = layout.kernel_size
        hidden, c2 = shared_weight.shape[0], gb_weight.shape[0]
        # Per code: the activation of a uniform window and the gamma/beta of a uniform window of those.
        code_act = F.relu(layout.code_columns.to(shared_weight.dtype) @ shared_weight.sum(dim=(2, 3)).t() + shared_bias)  # codes x hidden
        code_gb = torch.addmm(gb_bias, code_act, gb_weight.sum(dim=(2, 3)).t())  # codes x 2C
        code_gb[:, :plus_one] += 1.0  # the same rounding as adding 1 to each pixel's value later
        # The activation where it is not per code: the exact gather, once per distinct label window.
        act_source = [code_act]
        if layout.gather_rows.numel():
            table = gather_table(shared_weight, layout.class_counts)
            act_source.append(F.relu(F.embedding_bag(layout.gather_rows, table, mode="sum") + shared_bias))
        act_source.append(code_act.new_zeros(1, hidden))
        source = torch.cat(act_source)  # [codes; windows; zero] x hidden
        # gamma/beta as N x 2C x H*W, each image's 2C x H*W channel-major: the U2 pixels' per-code
        # values, then the boundary pixels' values: per offset one row of the product table
        # T = source @ W, summed.
        code_gb_t = code_gb.t().contiguous()
        out = code_gb.new_empty(n, c2, h * w)
        for i, (pixels, _, _) in enumerate(layout.per_image):  # boundary pixels' values are overwritten below
            torch.gather(code_gb_t, 1, layout.code[pixels].expand(c2, -1), out=out[i])
        if layout.boundary.numel():
            products = source @ gb_weight.permute(1, 2, 3, 0).reshape(hidden, k * k * c2)  # T: rows x (o, 2C)
            boundary_gb = F.embedding_bag(layout.table_index, products.view(-1, c2), mode="sum")
            # In place and T freed before the copies below: at full resolution these boundary x 2C
            # tensors can set the training iteration's peak (docs/PERFORMANCE.md section 7); same values.
            boundary_gb += gb_bias
            del products
            boundary_gb[:, :plus_one] += 1.0
            for i, (_, rows, positions) in enumerate(layout.per_image):
                out[i].index_copy_(1, positions, boundary_gb[rows].t().contiguous())  # a strided source is slower
        ctx.layout = layout
        ctx.save_for_backward(shared_weight, gb_weight, code_act, source)
        return out.view(n, c2, h, w)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        # A backward called inside an autocast region would run these products in bf16/fp16 (and the
        # sparse CSR product has no bf16 kernel on CPU): the gradients are computed in fp32 like the forward.
        with torch.autocast(device_type=grad_out.device.type, enabled=False):
            return _RegionGammaBeta._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: Tensor):
        layout: RegionLayout = ctx.layout
        shared_weight, gb_weight, code_act, source = ctx.saved_tensors
        k = layout.kernel_size
        hidden, c_in, c2 = shared_weight.shape[0], shared_weight.shape[1], gb_weight.shape[0]
        num_codes = layout.num_codes
        n = layout.shape[0]
        grad = grad_out.to(gb_weight.dtype).contiguous().view(n, c2, -1)  # per image 2C x H*W
        grad_gb_bias = grad.sum(dim=(0, 2))

        # dT (rows x k*k x 2C): per source row and offset, the gradient of the pixels that read that
        # row at that offset. Boundary pixels through the sparse count matrix; a U2 pixel reads its
        # code's row at every offset (all its neighbours are U1 of its code).
        per_code = grad.new_zeros(c2, num_codes + 1)
        if layout.u2_onehot is not None:
            u2_onehot = layout.u2_onehot.to(grad.dtype)
            for i, (pixels, _, _) in enumerate(layout.per_image):
                per_code.addmm_(grad[i], u2_onehot[pixels])
        else:
            for i, (pixels, _, _) in enumerate(layout.per_image):
                per_code.index_add_(1, layout.u2_key[pixels], grad[i])
        per_code = per_code[:, :num_codes]  # 2C x codes
        rows = source.shape[0] - 1  # the zero row reads nothing back
        if layout.boundary.numel():
            parts = [grad[i].index_select(1, positions) for i, (_, _, positions) in enumerate(layout.per_image)]
            grad_boundary = (parts[0] if n == 1 else torch.cat(parts, dim=1)).t().contiguous()  # boundary x 2C
            grad_table = _sparse_mm(layout.table_grad_sum, grad_boundary).view(rows + 1, k * k, c2)[:rows]
        else:
            grad_table = grad.new_zeros(rows, k * k, c2)
        grad_table[:num_codes] += per_code.t()[:, None, :]
        grad_table = grad_table.reshape(rows, k * k * c2)
        used = source[:rows]
        # conv_gb's weight: sum over rows of dT[row, o] (x) source[row]; rows of W ordered (ky, kx, c).
        grad_gb_weight = (grad_table.t() @ used).view(k, k, c2, hidden).permute(2, 3, 0, 1).contiguous()
        # The activation gradient per row: sum_o W_o^T dT[row, o], through the ReLU.
        transposed_weight = gb_weight.permute(2, 3, 0, 1).reshape(k * k * c2, hidden)
        grad_pre = (grad_table @ transposed_weight) * (used > 0)  # [codes; windows] x hidden
        grad_shared_bias = grad_pre.sum(dim=0)
        # mlp_shared's weight: codes through their columns (every offset), windows through the
        # onehot_conv table's sum over each offset's class (one sparse product).
        grad_shared_weight = ((grad_pre[:num_codes].t() @ layout.code_columns.to(grad_pre.dtype))[:, :, None, None]
                              .expand(hidden, c_in, k, k).clone())
        if rows > num_codes:
            grad_shared_weight += weight_from_table(_sparse_mm(layout.gather_sum, grad_pre[num_codes:]),
                                                    layout.class_counts, k)
        return None, grad_shared_weight, grad_shared_bias, grad_gb_weight, grad_gb_bias, None


def region_gamma_beta(layout: RegionLayout, shared_weight: Tensor, shared_bias: Tensor,
                      gb_weight: Tensor, gb_bias: Tensor, plus_one: int = 0) -> Tensor:
    """Same as ``conv2d(relu(conv2d(onehot_map, shared_weight, shared_bias, padding=r)), gb_weight,
    gb_bias, padding=r)`` for the one-hot map described by ``layout``; N x C_gb x H x W, fp32.

    With ``plus_one`` = C the first C output channels are ``1 + gamma`` (SPADE's scale), added to
    the per-code values and to the boundary pixels' values before they are written into the map:
    the same roundings as adding 1 to every pixel afterwards, without that extra pass over the map."""
    if shared_weight.shape[2] != layout.kernel_size or gb_weight.shape[2] != layout.kernel_size:
        raise ValueError(f"kernel sizes {tuple(shared_weight.shape[2:])} / {tuple(gb_weight.shape[2:])} do not match "
                         f"the layout's {layout.kernel_size}")
    if shared_weight.shape[1] != sum(layout.class_counts):
        raise ValueError(f"mlp_shared has {shared_weight.shape[1]} input channels but the label groups have "
                         f"{sum(layout.class_counts)}")
    with torch.autocast(device_type=shared_weight.device.type, enabled=False):
        dtype = torch.promote_types(shared_weight.dtype, torch.float32)
        return _RegionGammaBeta.apply(layout, shared_weight.to(dtype), shared_bias.to(dtype),
                                      gb_weight.to(dtype), gb_bias.to(dtype), plus_one)
