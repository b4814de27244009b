"""SPADE's gamma/beta maps computed once per uniform label region instead of once per pixel.

SPADE predicts the modulation maps from the label map alone:
``gb = conv_gb(relu(conv_shared(onehot(label))))`` (both k x k, 'same' padding). Label maps are
piecewise constant, and a k x k convolution of a constant patch is a constant. So:

* a pixel whose k x k window (radius r = k // 2) lies inside the image and holds one label code
  ("U1") has the activation ``A[code] = relu(sum over offsets of conv_shared's columns + bias)``;
* a pixel whose (4r+1)^2 window is inside the image and uniform ("U2") has every neighbour in U1
  with the same code, so its gamma/beta is ``G[code] = A[code] @ (conv_gb summed over offsets) + bias``.

Only the remaining pixels ("boundary": ~21% at 256^2 on the COCO-Stuff sample, most of them
along the one-pixel instance-edge lines) need the real convolution, done as an im2col matmul over
just those pixels. The backward pass uses the same split:

* conv_gb's weight gradient = boundary pixels' patches^T @ grad + per code (sum of grad over the
  code's U2 pixels) (x) A[code] on every offset;
* the gradient reaching the activation at a U1 pixel is sum over offsets of W_o^T grad(q - o);
  summed over a code's U1 pixels that is sum_o W_o^T R[code, o] with R[code, o] the sum of grad
  over the pixels whose neighbour at o is a U1 pixel of that code. A U2 pixel's every neighbour
  is U1 of its own code, so R[code, o] = (sum of grad over the code's U2 pixels) + the boundary
  pixels' share: k*k index sums over the boundary pixels only, instead of a dense transposed
  convolution; only non-U1 pixels get the activation gradient explicitly.

Layout and parallelism (profile in docs/PERFORMANCE.md, section 1a): the gamma/beta maps and
their gradient are kept channel-major (C x N*H*W; for batch 1 exactly the channels-first tensor,
for larger batches one copy of whole H*W rows), so no per-pixel transpose is needed either way.
With few codes (the usual case) the per-code maps and sums are products with 0/1 matrices built
once per layout, which BLAS runs on every core; with many codes they are index ops along the
contiguous pixel axis. The table gradient of the gather is one sparse product. No row-wise
``index_add`` along dim 0 is left: torch runs it as a sort + segment pass that cost several times
more on two threads than on one. The im2col patches of the boundary pixels are rows gathered from
small tables (per-code activations, the non-U1 pixels' activations, a zero row; in the backward
the boundary pixels' gradients and a zero row), never from a padded full-size map.

Distinct windows only: a non-U1 pixel's activation depends on nothing but its k x k label window
(and where the image edge cuts it), and a boundary pixel's gamma/beta on nothing but the k x k
window of activation rows it reads. Along a region border the same windows repeat (on the
COCO-Stuff sample at 256^2: 11,198 boundary pixels read 4,032 distinct patches, 7,349 non-U1
pixels have 1,243 distinct label windows), so the gather, the im2col product and their
backward products run once per distinct window: the forward copies each patch's result to its
pixels, the backward first sums the pixels' gradients per window (sparse 0/1 / count matrices
built with the layout) and then multiplies. Same products, summed in another order.

Exactness: the same products are summed, in a different order (per code sums first), so results
agree with the dense convolutions to float rounding (``tests/test_region_modulation.py``: fp64
1e-10 against the dense path, outputs and every weight gradient). The label map never needs a
gradient. Runs in fp32 (autocast disabled inside): its work is gathers, small matmuls and index
sums, not the big convolutions autocast exists for.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from spade_dist.models.onehot_conv import gather_table, shifted_indices, weight_from_table

# Largest num_codes + 1 for which the per-code maps and sums are one-hot matrix products: they cost
# 2 * (num_codes + 1) flops per summed value (an index op costs one add, but strided and, for
# row-wise index_add, badly parallel), and the 0/1 matrices take (num_codes + 1) floats per
# pixel (per border pixel and offset). Real label maps have ~10-30 codes per resolution, random
# block maps hundreds (those take the index ops).
ONEHOT_SUM_MAX_CODES = 64


@dataclass
class RegionLayout:
    """Where the label map of one resolution is uniform; shared by every SPADE layer there.

    Flat positions index the N*H*W pixels. No full-size activation or gradient map is ever
    padded or gathered from: a boundary pixel's neighbour is either U1 (its code's activation),
    a non-U1 pixel (its explicitly gathered activation) or outside the image (zero), so im2col
    patches index small row tables; likewise the gradient a non-U1 pixel needs (at q - o) lies
    on non-U2 pixels only (q's window is inside p = q - o's doubled window), i.e. on the boundary.
    """

    shape: tuple[int, int, int]  # N, H, W
    kernel_size: int
    class_counts: list[int]
    num_codes: int
    code: Tensor  # N*H*W int64: one code per combination of the groups' classes present (0..num_codes-1)
    code_columns: Tensor  # num_codes x C_in: which input channels each code sets (0/1)
    u2_key: Tensor  # N*H*W: code where U2, num_codes elsewhere
    boundary: Tensor  # flat positions not in U2 (gamma/beta convolved explicitly)
    # Boundary pixels whose k x k activation windows are equal have equal gamma/beta: the product
    # runs once per distinct window ("patch"), and the gradients are summed per patch first.
    patch_rows: Tensor  # patches x k*k rows of [code activations; distinct boundary1 activations; zero]
    patch_of_boundary: Tensor  # len(boundary): its patch
    patch_sum: Tensor  # sparse CSR patches x (len(boundary) + 1), 0/1: S @ [boundary grads; zero] sums per patch
    patch_u1_keys: Tensor  # k*k x patches: o * (num_codes + 1) + U1 code of the neighbour at o (num_codes: none)
    boundary1: Tensor  # flat positions not in U1 (activation not per code)
    # Non-U1 pixels with equal k x k label windows have equal activations: one row per distinct window.
    gather_rows: Tensor  # distinct windows x groups*k*k rows of the onehot_conv table
    gather_sum: Tensor  # sparse CSR table rows x distinct windows, fp32 0/1: S @ rows sums each window's row into the table rows it read
    # Sparse CSR (distinct windows * k*k) x (len(boundary) + 1), counts: row (window, o) sums the
    # gradient rows [boundary grads; zero] at q - o over the window's pixels q.
    window_grad_sum: Tensor
    # With few codes the per-code maps and sums run as matrix products with these 0/1 matrices
    # (BLAS uses every core; an index_select / index_add along the pixel axis is strided); None = index ops.
    u2_onehot: Optional[Tensor] = None  # N*H*W x num_codes+1 (fp32)
    patch_onehot: Optional[Tensor] = None  # patches x k*k*(num_codes+1) (fp32)


def _padded_base(flat: Tensor, h: int, w: int, r: int) -> Tensor:
    """Padded position of the top-left neighbour (offset (-r, -r)) of each flat position."""
    b, rest = flat.div(h * w, rounding_mode="floor"), flat.remainder(h * w)
    y, x = rest.div(w, rounding_mode="floor"), rest.remainder(w)
    return (b * (h + 2 * r) + y) * (w + 2 * r) + x


def _offsets(k: int, padded_width: int, device: torch.device, mirrored: bool) -> Tensor:
    """Padded-grid steps of the k*k offsets in (ky, kx) order from the top-left neighbour;
    ``mirrored`` walks them backwards (pixel q reading the gradient at q - o)."""
    ky, kx = torch.meshgrid(torch.arange(k, device=device), torch.arange(k, device=device), indexing="ij")
    if mirrored:
        ky, kx = (k - 1) - ky, (k - 1) - kx
    return (ky * padded_width + kx).reshape(-1)


def _channel_major(channels_first: Tensor) -> Tensor:
    """N x C x H x W -> C x N*H*W: a view for batch 1, else one copy of whole H*W rows."""
    n, c, h, w = channels_first.shape
    return channels_first.reshape(n, c, h * w).transpose(0, 1).reshape(c, n * h * w)


def _from_channel_major(channel_major: Tensor, n: int, h: int, w: int) -> Tensor:
    """C x N*H*W -> contiguous N x C x H x W (inverse of :func:`_channel_major`)."""
    c = channel_major.shape[0]
    return channel_major.view(c, n, h * w).transpose(0, 1).contiguous().view(n, c, h, w)


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
    wp = w + 2 * r
    # Distinct label windows of the non-U1 pixels (the activation depends on nothing else).
    windows = shifted_indices(indices, class_counts, kernel_size).index_select(0, boundary1)
    if boundary1.numel():
        gather_rows, window_of = torch.unique(windows, dim=0, return_inverse=True)
    else:
        gather_rows, window_of = windows, boundary1
    num_windows = gather_rows.shape[0]
    # Row of each padded position in the activation source [code rows; window rows; zero row].
    act_row = u1_code.reshape(-1).clone()
    act_row[boundary1] = num_codes + window_of
    act_row_padded = F.pad(act_row.view(n, h, w), (r, r, r, r), value=num_codes + num_windows)
    boundary_patches = _padded_base(boundary, h, w, r)[:, None] + _offsets(kernel_size, wp, device, False)[None, :]
    boundary_rows = act_row_padded.reshape(-1)[boundary_patches]
    if boundary.numel():
        patch_rows, patch_of_boundary = torch.unique(boundary_rows, dim=0, return_inverse=True)
    else:
        patch_rows, patch_of_boundary = boundary_rows, boundary
    # A neighbour's U1 code is its activation row when that row is a code row.
    offset_base = torch.arange(k2, device=device)[:, None] * (num_codes + 1)
    patch_u1_keys = patch_rows.clamp(max=num_codes).t() + offset_base
    # Row of each padded position in the gradient source [boundary rows; zero row] (U2 pixels are never read).
    grad_row = torch.full_like(flat, boundary.numel())
    grad_row[boundary] = torch.arange(boundary.numel(), device=device)
    grad_row_padded = F.pad(grad_row.view(n, h, w), (r, r, r, r), value=boundary.numel())
    boundary1_grad_patches = _padded_base(boundary1, h, w, r)[:, None] + _offsets(kernel_size, wp, device, True)[None, :]
    boundary1_grad_rows = grad_row_padded.reshape(-1)[boundary1_grad_patches]  # B1 x k*k
    u2_key = torch.where(u2.reshape(-1), flat, no_code)
    few_codes = num_codes + 1 <= ONEHOT_SUM_MAX_CODES
    grad_sources = boundary.numel() + 1
    return RegionLayout(
        shape=(n, h, w), kernel_size=kernel_size, class_counts=list(class_counts), num_codes=num_codes,
        code=flat, code_columns=code_columns,
        u2_key=u2_key,
        boundary=boundary,
        patch_rows=patch_rows,
        patch_of_boundary=patch_of_boundary,
        patch_sum=_sum_matrix(patch_of_boundary, torch.arange(boundary.numel(), device=device),
                              patch_rows.shape[0], grad_sources),
        patch_u1_keys=patch_u1_keys,
        boundary1=boundary1,
        gather_rows=gather_rows,
        gather_sum=_sum_matrix(gather_rows.reshape(-1),
                               torch.arange(num_windows, device=device).repeat_interleave(gather_rows.shape[1]),
                               sum(k2 * (count + 1) for count in class_counts), num_windows),
        window_grad_sum=_sum_matrix((window_of[:, None] * k2 + torch.arange(k2, device=device)).reshape(-1),
                                    boundary1_grad_rows.reshape(-1), num_windows * k2, grad_sources),
        u2_onehot=F.one_hot(u2_key, num_codes + 1).to(torch.float32) if few_codes else None,
        patch_onehot=_onehot_rows(patch_u1_keys.t(), k2 * (num_codes + 1)) if few_codes else None,
    )


def _sum_matrix(rows: Tensor, columns: Tensor, num_rows: int, num_columns: int) -> Tensor:
    """Sparse CSR ``num_rows x num_columns`` fp32 matrix with, at (i, j), how many k have
    ``(rows[k], columns[k]) == (i, j)``: ``S @ X`` sums X's rows ``columns[k]`` into rows ``rows[k]``
    (exact: products by small integers)."""
    values = torch.ones(rows.numel(), dtype=torch.float32, device=rows.device)
    coo = torch.sparse_coo_tensor(torch.stack([rows, columns]), values, (num_rows, num_columns),
                                  check_invariants=False).coalesce()  # indices built in range above
    with warnings.catch_warnings():  # torch flags sparse CSR as beta on every construction
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return coo.to_sparse_csr()


def _sparse_mm(matrix: Tensor, dense: Tensor) -> Tensor:
    """``matrix @ dense`` for a fp32 0/1 (or count) sparse CSR matrix, in ``dense``'s dtype."""
    return (matrix if dense.dtype == torch.float32 else matrix.to(dense.dtype)) @ dense


def _onehot_rows(keys: Tensor, width: int) -> Tensor:
    """rows x width fp32 matrix with a 1 at each of a row's keys (a row's keys are distinct)."""
    out = torch.zeros(keys.shape[0], width, dtype=torch.float32, device=keys.device)
    return out.scatter_(1, keys, 1.0)


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
        # gamma/beta channel-major (2C x N*H*W): the U2 pixels' per-code values, then the boundary
        # pixels' im2col product, once per distinct patch, computed transposed (2C x patches) to fit.
        if layout.u2_onehot is not None:  # zero column for non-U2 pixels, overwritten below
            out = F.pad(code_gb.t(), (0, 1)) @ layout.u2_onehot.to(code_gb.dtype).t()
        else:
            out = code_gb.t().contiguous().index_select(1, layout.code)
        if layout.boundary.numel():
            patches = source.index_select(0, layout.patch_rows.reshape(-1)).view(-1, k * k * hidden)
            weight_matrix = gb_weight.permute(2, 3, 1, 0).reshape(k * k * hidden, c2)
            per_patch = torch.addmm(gb_bias[:, None], weight_matrix.t(), patches.t())  # 2C x patches
            per_patch[:plus_one] += 1.0
            out.index_copy_(1, layout.boundary, per_patch.index_select(1, layout.patch_of_boundary))
        ctx.layout = layout
        ctx.save_for_backward(shared_weight, gb_weight, code_act, source)
        return _from_channel_major(out, n, h, w)

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
        grad = _channel_major(grad_out.to(gb_weight.dtype).contiguous())  # 2C x N*H*W
        grad_gb_bias = grad.sum(dim=1)

        # conv_gb weight: U2 pixels through their code's sum, boundary pixels through their patches.
        if layout.u2_onehot is not None:
            per_code = (grad @ layout.u2_onehot.to(grad.dtype))[:, :num_codes]  # 2C x codes
        else:
            per_code = grad.new_zeros(c2, num_codes + 1).index_add_(1, layout.u2_key, grad)[:, :num_codes]
        grad_gb_weight = (per_code @ code_act)[:, :, None, None].expand(c2, hidden, k, k).clone()
        # U1 pixels, summed per code: R[code, o] = sum of grad(p) over p whose neighbour p + o is U1
        # of that code = the code's U2 sum (every neighbour of a U2 pixel is U1 of its code) + the
        # boundary pixels whose neighbour at o is.
        sums = grad.new_zeros(c2, k * k * (num_codes + 1))  # column o * (num_codes + 1) + code
        grad_rows = grad.new_zeros(1, c2)
        if layout.boundary.numel():
            grad_rows = torch.cat([grad.index_select(1, layout.boundary).t(), grad_rows])  # [boundary; zero] x 2C
            grad_patch = _sparse_mm(layout.patch_sum, grad_rows).t()  # 2C x patches: summed per distinct patch
            patches = source.index_select(0, layout.patch_rows.reshape(-1)).view(-1, k * k * hidden)
            from_patches = grad_patch @ patches  # 2C x (k*k*hidden)
            grad_gb_weight += from_patches.view(c2, k, k, hidden).permute(0, 3, 1, 2)
            if layout.patch_onehot is not None:
                sums = grad_patch @ layout.patch_onehot.to(grad.dtype)
            else:
                grad_patch = grad_patch.contiguous()
                for keys in layout.patch_u1_keys:
                    sums.index_add_(1, keys, grad_patch)
        per_offset = sums.view(c2, k * k, num_codes + 1)[:, :, :num_codes] + per_code[:, None, :]  # 2C x k*k x codes
        # Gradient at the activation: dact(q) = sum_o W_o^T grad(q - o); rows of W ordered (ky, kx, j).
        transposed_weight = gb_weight.permute(2, 3, 0, 1).reshape(k * k * c2, hidden)
        code_grad_pre = (per_offset.permute(2, 1, 0).reshape(num_codes, k * k * c2) @ transposed_weight) * (code_act > 0)
        grad_shared_bias = code_grad_pre.sum(dim=0)
        grad_shared_weight = (code_grad_pre.t() @ layout.code_columns.to(code_grad_pre.dtype))[:, :, None, None].expand(hidden, c_in, k, k).clone()
        # Non-U1 pixels per distinct window (equal activations): the grad patches (mirrored offsets)
        # summed over the window's pixels, times the weight, the ReLU mask, then the onehot_conv
        # table's sum over each offset's class (one sparse product).
        num_windows = layout.gather_rows.shape[0]
        if num_windows:
            grad_patches = _sparse_mm(layout.window_grad_sum, grad_rows).view(num_windows, k * k * c2)
            window_act = source[num_codes:num_codes + num_windows]
            grad_pre = (grad_patches @ transposed_weight) * (window_act > 0)  # windows x hidden
            grad_shared_bias += grad_pre.sum(dim=0)
            grad_shared_weight += weight_from_table(_sparse_mm(layout.gather_sum, grad_pre), layout.class_counts, k)
        return None, grad_shared_weight, grad_shared_bias, grad_gb_weight, grad_gb_bias, None


def region_gamma_beta(layout: RegionLayout, shared_weight: Tensor, shared_bias: Tensor,
                      gb_weight: Tensor, gb_bias: Tensor, plus_one: int = 0) -> Tensor:
    """Same as ``conv2d(relu(conv2d(onehot_map, shared_weight, shared_bias, padding=r)), gb_weight,
    gb_bias, padding=r)`` for the one-hot map described by ``layout``; N x C_gb x H x W, fp32.

    With ``plus_one`` = C the first C output channels are ``1 + gamma`` (SPADE's scale), added to
    the per-code and per-patch values before they are spread over the pixels: the same roundings
    as adding 1 to every pixel afterwards, without that extra pass over the map."""
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
