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
  over the pixels whose neighbour at o is a U1 pixel of that code: k*k ``index_add`` passes
  instead of a dense transposed convolution; only non-U1 pixels get it explicitly.

Exactness: the same products are summed, in a different order (per code sums first), so results
agree with the dense convolutions to float rounding (``tests/test_region_modulation.py``: fp64
1e-10 against the dense path, outputs and every weight gradient). The label map never needs a
gradient. Runs in fp32 (autocast disabled inside): its work is gathers, small matmuls and index
sums, not the big convolutions autocast exists for.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from spade_dist.models.onehot_conv import gather_table, shifted_indices, weight_from_table


@dataclass
class RegionLayout:
    """Where the label map of one resolution is uniform; shared by every SPADE layer there.

    Flat positions index the N*H*W pixels; "padded" positions index the N*(H+2r)*(W+2r) grid
    of a map padded by r on each side (where neighbours outside the image read zeros).
    """

    shape: tuple[int, int, int]  # N, H, W
    kernel_size: int
    class_counts: list[int]
    num_codes: int
    code: Tensor  # N*H*W int64: one code per combination of the groups' classes present (0..num_codes-1)
    code_columns: Tensor  # num_codes x C_in: which input channels each code sets (0/1)
    u1_code_padded: Tensor  # N x H+2r x W+2r: code where U1, num_codes elsewhere / outside
    u2_key: Tensor  # N*H*W: code where U2, num_codes elsewhere
    boundary: Tensor  # flat positions not in U2 (gamma/beta convolved explicitly)
    boundary_patches: Tensor  # len(boundary) x k*k padded positions of their neighbours p + o
    boundary1: Tensor  # flat positions not in U1 (activation gathered explicitly)
    boundary1_padded: Tensor  # padded positions of the boundary1 pixels themselves
    boundary1_grad_patches: Tensor  # len(boundary1) x k*k padded positions q - o (mirrored offsets)
    gather_rows: Tensor  # len(boundary1) x groups*k*k rows of the onehot_conv table

    @property
    def radius(self) -> int:
        return self.kernel_size // 2


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


def _to_channels_first(pixel_major: Tensor, n: int, h: int, w: int) -> Tensor:
    """(N*H*W) x C -> N x C x H x W, one 2-D transpose per sample (~5x faster on CPU than the
    equivalent 4-D permute copy, measured at 256^2 x 256 channels)."""
    c = pixel_major.shape[1]
    out = pixel_major.new_empty(n, c, h * w)
    for i, rows in enumerate(pixel_major.view(n, h * w, c)):
        out[i].copy_(rows.t())
    return out.view(n, c, h, w)


def _to_pixel_major(channels_first: Tensor) -> Tensor:
    """N x C x H x W -> N x H x W x C (contiguous), per-sample 2-D transposes as above."""
    n, c, h, w = channels_first.shape
    out = channels_first.new_empty(n, h * w, c)
    for i, plane in enumerate(channels_first.reshape(n, c, h * w)):
        out[i].copy_(plane.t())
    return out.view(n, h, w, c)


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
    wp = w + 2 * r
    base1 = _padded_base(boundary1, h, w, r)
    return RegionLayout(
        shape=(n, h, w), kernel_size=kernel_size, class_counts=list(class_counts), num_codes=num_codes,
        code=flat, code_columns=code_columns,
        u1_code_padded=F.pad(u1_code, (r, r, r, r), value=num_codes),
        u2_key=torch.where(u2.reshape(-1), flat, no_code),
        boundary=boundary,
        boundary_patches=_padded_base(boundary, h, w, r)[:, None] + _offsets(kernel_size, wp, device, False)[None, :],
        boundary1=boundary1,
        boundary1_padded=base1 + r * wp + r,
        boundary1_grad_patches=base1[:, None] + _offsets(kernel_size, wp, device, True)[None, :],
        gather_rows=shifted_indices(indices, class_counts, kernel_size).index_select(0, boundary1),
    )


class _RegionGammaBeta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, layout: RegionLayout, shared_weight: Tensor, shared_bias: Tensor,  # type: ignore[override]
                gb_weight: Tensor, gb_bias: Tensor) -> Tensor:
        n, h, w = layout.shape
        r, k = layout.radius, layout.kernel_size
        hidden, c2 = shared_weight.shape[0], gb_weight.shape[0]
        # Per code: the activation of a uniform window and the gamma/beta of a uniform window of those.
        code_act = F.relu(layout.code_columns.to(shared_weight.dtype) @ shared_weight.sum(dim=(2, 3)).t() + shared_bias)  # codes x hidden
        code_gb = torch.addmm(gb_bias, code_act, gb_weight.sum(dim=(2, 3)).t())  # codes x 2C
        # Activation map, pixel-major and zero padded: the per-code value, then the exact gather
        # at the pixels whose window is not uniform.
        act = F.embedding(layout.code, code_act)
        if layout.boundary1.numel():
            table = gather_table(shared_weight, layout.class_counts)
            act[layout.boundary1] = F.relu(F.embedding_bag(layout.gather_rows, table, mode="sum") + shared_bias)
        act_padded = F.pad(act.view(n, h, w, hidden), (0, 0, r, r, r, r)).view(-1, hidden)
        out = F.embedding(layout.code, code_gb)
        if layout.boundary.numel():
            patches = act_padded.index_select(0, layout.boundary_patches.reshape(-1)).view(-1, k * k * hidden)
            weight_matrix = gb_weight.permute(2, 3, 1, 0).reshape(k * k * hidden, c2)
            out.index_copy_(0, layout.boundary, torch.addmm(gb_bias, patches, weight_matrix))
        ctx.layout = layout
        ctx.save_for_backward(shared_weight, gb_weight, code_act, act_padded)
        return _to_channels_first(out, n, h, w)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        layout: RegionLayout = ctx.layout
        shared_weight, gb_weight, code_act, act_padded = ctx.saved_tensors
        n, h, w = layout.shape
        r, k = layout.radius, layout.kernel_size
        hidden, c_in, c2 = shared_weight.shape[0], shared_weight.shape[1], gb_weight.shape[0]
        num_codes = layout.num_codes
        grad = _to_pixel_major(grad_out.to(gb_weight.dtype))  # N x H x W x 2C
        grad_flat = grad.view(-1, c2)
        grad_gb_bias = grad_flat.sum(dim=0)

        # conv_gb weight: U2 pixels through their code's sum, boundary pixels through their patches.
        per_code = grad_flat.new_zeros(num_codes + 1, c2).index_add_(0, layout.u2_key, grad_flat)[:num_codes]
        grad_gb_weight = (per_code.t() @ code_act)[:, :, None, None].expand(c2, hidden, k, k).clone()
        if layout.boundary.numel():
            patches = act_padded.index_select(0, layout.boundary_patches.reshape(-1)).view(-1, k * k * hidden)
            from_patches = grad_flat.index_select(0, layout.boundary).t() @ patches  # 2C x (k*k*hidden)
            grad_gb_weight += from_patches.view(c2, k, k, hidden).permute(0, 3, 1, 2)

        # Gradient at the activation: dact(q) = sum_o W_o^T grad(q - o).
        transposed_weight = gb_weight.permute(2, 3, 0, 1).reshape(k * k * c2, hidden)  # row (ky, kx, j)
        # U1 pixels, summed per code: R[code, o] = sum of grad(p) over p whose neighbour p + o is U1 of code.
        sums = []
        for ky in range(k):
            for kx in range(k):
                key = layout.u1_code_padded[:, ky:ky + h, kx:kx + w].reshape(-1)
                sums.append(grad_flat.new_zeros(num_codes + 1, c2).index_add_(0, key, grad_flat)[:num_codes])
        code_grad_pre = (torch.stack(sums, dim=1).view(num_codes, k * k * c2) @ transposed_weight) * (code_act > 0)
        grad_shared_bias = code_grad_pre.sum(dim=0)
        grad_shared_weight = (code_grad_pre.t() @ layout.code_columns.to(code_grad_pre.dtype))[:, :, None, None].expand(hidden, c_in, k, k).clone()
        # Non-U1 pixels one by one: their grad patch (mirrored offsets) times the weight, the ReLU
        # mask, then the onehot_conv table's scatter-add over each offset's class.
        if layout.boundary1.numel():
            grad_padded = F.pad(grad, (0, 0, r, r, r, r)).view(-1, c2)
            grad_patches = grad_padded.index_select(0, layout.boundary1_grad_patches.reshape(-1))
            grad_act = grad_patches.view(-1, k * k * c2) @ transposed_weight
            grad_pre = grad_act * (act_padded.index_select(0, layout.boundary1_padded) > 0)
            grad_shared_bias += grad_pre.sum(dim=0)
            table_grad = grad_pre.new_zeros(sum(k * k * (count + 1) for count in layout.class_counts), hidden)
            for column in range(layout.gather_rows.shape[1]):
                table_grad.index_add_(0, layout.gather_rows[:, column], grad_pre)
            grad_shared_weight += weight_from_table(table_grad, layout.class_counts, k)
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
