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
    boundary_act_rows: Tensor  # len(boundary) x k*k rows of [code activations; boundary1 activations; zero]
    boundary_u1_keys: Tensor  # k*k x len(boundary): o * (num_codes + 1) + U1 code of neighbour p + o (num_codes: none)
    boundary1: Tensor  # flat positions not in U1 (activation gathered explicitly)
    boundary1_grad_rows: Tensor  # len(boundary1) x k*k rows of [boundary pixels' grads; zero] at q - o
    gather_rows: Tensor  # len(boundary1) x groups*k*k rows of the onehot_conv table
    gather_sum: Tensor  # sparse CSR table rows x len(boundary1), fp32 0/1: S @ rows sums each pixel's row into the table rows it read
    # With few codes the per-code maps and sums run as matrix products with these 0/1 matrices
    # (BLAS uses every core; an index_select / index_add along the pixel axis is strided); None = index ops.
    u2_onehot: Optional[Tensor] = None  # N*H*W x num_codes+1 (fp32)
    boundary_onehot: Optional[Tensor] = None  # len(boundary) x k*k*(num_codes+1) (fp32)


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
    boundary_patches = _padded_base(boundary, h, w, r)[:, None] + _offsets(kernel_size, wp, device, False)[None, :]
    boundary1_grad_patches = _padded_base(boundary1, h, w, r)[:, None] + _offsets(kernel_size, wp, device, True)[None, :]
    # Row of each padded position in the activation source [code rows; boundary1 rows; zero row].
    act_row = u1_code.reshape(-1).clone()
    act_row[boundary1] = num_codes + torch.arange(boundary1.numel(), device=device)
    act_row_padded = F.pad(act_row.view(n, h, w), (r, r, r, r), value=num_codes + boundary1.numel())
    # Row of each padded position in the gradient source [boundary rows; zero row] (U2 pixels are never read).
    grad_row = torch.full_like(flat, boundary.numel())
    grad_row[boundary] = torch.arange(boundary.numel(), device=device)
    grad_row_padded = F.pad(grad_row.view(n, h, w), (r, r, r, r), value=boundary.numel())
    u1_code_padded = F.pad(u1_code, (r, r, r, r), value=num_codes)
    offset_base = torch.arange(k2, device=device)[:, None] * (num_codes + 1)
    boundary_u1_keys = u1_code_padded.reshape(-1)[boundary_patches].t() + offset_base
    gather_rows = shifted_indices(indices, class_counts, kernel_size).index_select(0, boundary1)
    u2_key = torch.where(u2.reshape(-1), flat, no_code)
    few_codes = num_codes + 1 <= ONEHOT_SUM_MAX_CODES
    return RegionLayout(
        shape=(n, h, w), kernel_size=kernel_size, class_counts=list(class_counts), num_codes=num_codes,
        code=flat, code_columns=code_columns,
        u2_key=u2_key,
        boundary=boundary,
        boundary_act_rows=act_row_padded.reshape(-1)[boundary_patches],
        boundary_u1_keys=boundary_u1_keys,
        boundary1=boundary1,
        boundary1_grad_rows=grad_row_padded.reshape(-1)[boundary1_grad_patches],
        gather_rows=gather_rows,
        gather_sum=_row_sum_matrix(gather_rows, sum(k2 * (count + 1) for count in class_counts)),
        u2_onehot=F.one_hot(u2_key, num_codes + 1).to(torch.float32) if few_codes else None,
        boundary_onehot=_onehot_rows(boundary_u1_keys.t(), k2 * (num_codes + 1)) if few_codes else None,
    )


def _row_sum_matrix(rows: Tensor, num_rows: int) -> Tensor:
    """Sparse CSR ``num_rows x len(rows)`` fp32 matrix S with S[rows[q, j], q] = 1 (a pixel's rows are
    distinct: one table block per offset), so ``S @ X`` adds each row of X into the table rows it
    read in the forward gather. One sparse product replaces one row-wise ``index_add`` per column
    (each a sort and segment pass in torch on CPU that scaled badly to two threads); exact, as
    the products are by 1.0."""
    flat = rows.reshape(-1)
    order = torch.argsort(flat, stable=True)
    crow = F.pad(torch.bincount(flat, minlength=num_rows).cumsum(0), (1, 0))
    columns = order.div(rows.shape[1], rounding_mode="floor")
    values = torch.ones(flat.numel(), dtype=torch.float32, device=rows.device)
    with warnings.catch_warnings():  # torch flags sparse CSR as beta on every construction
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(crow, columns, values, (num_rows, rows.shape[0]), check_invariants=False)


def _onehot_rows(keys: Tensor, width: int) -> Tensor:
    """rows x width fp32 matrix with a 1 at each of a row's keys (a row's keys are distinct)."""
    out = torch.zeros(keys.shape[0], width, dtype=torch.float32, device=keys.device)
    return out.scatter_(1, keys, 1.0)


class _RegionGammaBeta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layout: RegionLayout, shared_weight: Tensor, shared_bias: Tensor,  # type: ignore[override]
                gb_weight: Tensor, gb_bias: Tensor) -> Tensor:
        n, h, w = layout.shape
        k = layout.kernel_size
        hidden, c2 = shared_weight.shape[0], gb_weight.shape[0]
        # Per code: the activation of a uniform window and the gamma/beta of a uniform window of those.
        code_act = F.relu(layout.code_columns.to(shared_weight.dtype) @ shared_weight.sum(dim=(2, 3)).t() + shared_bias)  # codes x hidden
        code_gb = torch.addmm(gb_bias, code_act, gb_weight.sum(dim=(2, 3)).t())  # codes x 2C
        # The activation where it is not per code: the exact gather of the non-U1 pixels.
        act_source = [code_act]
        if layout.boundary1.numel():
            table = gather_table(shared_weight, layout.class_counts)
            act_source.append(F.relu(F.embedding_bag(layout.gather_rows, table, mode="sum") + shared_bias))
        act_source.append(code_act.new_zeros(1, hidden))
        source = torch.cat(act_source)  # [codes; boundary1; zero] x hidden
        # gamma/beta channel-major (2C x N*H*W): the U2 pixels' per-code values, then the boundary
        # pixels' im2col product, computed transposed (2C x boundary) to fit.
        if layout.u2_onehot is not None:  # zero column for non-U2 pixels, overwritten below
            out = F.pad(code_gb.t(), (0, 1)) @ layout.u2_onehot.to(code_gb.dtype).t()
        else:
            out = code_gb.t().contiguous().index_select(1, layout.code)
        if layout.boundary.numel():
            patches = source.index_select(0, layout.boundary_act_rows.reshape(-1)).view(-1, k * k * hidden)
            weight_matrix = gb_weight.permute(2, 3, 1, 0).reshape(k * k * hidden, c2)
            out.index_copy_(1, layout.boundary, torch.addmm(gb_bias[:, None], weight_matrix.t(), patches.t()))
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
            grad_boundary = grad.index_select(1, layout.boundary)  # 2C x boundary
            patches = source.index_select(0, layout.boundary_act_rows.reshape(-1)).view(-1, k * k * hidden)
            from_patches = grad_boundary @ patches  # 2C x (k*k*hidden)
            grad_gb_weight += from_patches.view(c2, k, k, hidden).permute(0, 3, 1, 2)
            if layout.boundary_onehot is not None:
                sums = grad_boundary @ layout.boundary_onehot.to(grad.dtype)
            else:
                for keys in layout.boundary_u1_keys:
                    sums.index_add_(1, keys, grad_boundary)
            grad_rows = torch.cat([grad_boundary.t(), grad_rows])  # [boundary; zero] x 2C
        per_offset = sums.view(c2, k * k, num_codes + 1)[:, :, :num_codes] + per_code[:, None, :]  # 2C x k*k x codes
        # Gradient at the activation: dact(q) = sum_o W_o^T grad(q - o); rows of W ordered (ky, kx, j).
        transposed_weight = gb_weight.permute(2, 3, 0, 1).reshape(k * k * c2, hidden)
        code_grad_pre = (per_offset.permute(2, 1, 0).reshape(num_codes, k * k * c2) @ transposed_weight) * (code_act > 0)
        grad_shared_bias = code_grad_pre.sum(dim=0)
        grad_shared_weight = (code_grad_pre.t() @ layout.code_columns.to(code_grad_pre.dtype))[:, :, None, None].expand(hidden, c_in, k, k).clone()
        # Non-U1 pixels one by one: their grad patch (mirrored offsets) times the weight, the ReLU
        # mask, then the onehot_conv table's sum over each offset's class (one sparse product).
        if layout.boundary1.numel():
            grad_patches = grad_rows.index_select(0, layout.boundary1_grad_rows.reshape(-1)).view(-1, k * k * c2)
            boundary1_act = source[num_codes:num_codes + layout.boundary1.numel()]
            grad_pre = (grad_patches @ transposed_weight) * (boundary1_act > 0)  # boundary1 x hidden
            grad_shared_bias += grad_pre.sum(dim=0)
            gather_sum = layout.gather_sum if grad_pre.dtype == torch.float32 else layout.gather_sum.to(grad_pre.dtype)
            grad_shared_weight += weight_from_table(gather_sum @ grad_pre, layout.class_counts, k)
        return None, grad_shared_weight, grad_shared_bias, grad_gb_weight, grad_gb_bias


def region_gamma_beta(layout: RegionLayout, shared_weight: Tensor, shared_bias: Tensor,
                      gb_weight: Tensor, gb_bias: Tensor) -> Tensor:
    """Same as ``conv2d(relu(conv2d(onehot_map, shared_weight, shared_bias, padding=r)), gb_weight,
    gb_bias, padding=r)`` for the one-hot map described by ``layout``; N x C_gb x H x W, fp32."""
    if shared_weight.shape[2] != layout.kernel_size or gb_weight.shape[2] != layout.kernel_size:
        raise ValueError(f"kernel sizes {tuple(shared_weight.shape[2:])} / {tuple(gb_weight.shape[2:])} do not match "
                         f"the layout's {layout.kernel_size}")
    if shared_weight.shape[1] != sum(layout.class_counts):
        raise ValueError(f"mlp_shared has {shared_weight.shape[1]} input channels but the label groups have "
                         f"{sum(layout.class_counts)}")
    with torch.autocast(device_type=shared_weight.device.type, enabled=False):
        dtype = torch.promote_types(shared_weight.dtype, torch.float32)
        return _RegionGammaBeta.apply(layout, shared_weight.to(dtype), shared_bias.to(dtype),
                                      gb_weight.to(dtype), gb_bias.to(dtype))
