"""SPADE's gamma/beta per uniform label region (models/fast/region_modulation.py) equals the dense
convolutions: outputs and every weight gradient, float64, 1e-10 (only summation order differs)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spade_dist.models.fast import region_modulation
from spade_dist.models.fast.label_maps import ModulationPlan
from spade_dist.models.fast.onehot_conv import onehot_index
from spade_dist.models.fast.region_modulation import build_region_layout, region_gamma_beta
from spade_dist.models.generator import SPADEGenerator
from spade_dist.models.spade import SPADE
from tests.test_fast_path import (
    LABEL_NC,
    _one_thread,  # noqa: F401  (autouse fixture: one torch thread)
    _semantics,
    assert_same_outputs_and_gradients,
)


def _regions(n: int, h: int, w: int, block: int, seed: int = 0) -> torch.Tensor:
    """One-hot map of ``block``-pixel regions (LABEL_NC + 1 classes, some pixels with no class)
    plus a sparse binary edge channel: uniform interiors, borders, and edge lines through them."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, LABEL_NC + 1, (n, 1, -(-h // block), -(-w // block)), generator=g).float()
    label = F.interpolate(coarse, scale_factor=block, mode="nearest")[:, 0, :h, :w].long()
    label[0, 2:4, 5:8] = LABEL_NC + 1  # pixels with no class set
    onehot = F.one_hot(label, LABEL_NC + 2)[..., :LABEL_NC + 1].permute(0, 3, 1, 2)
    edges = torch.zeros(n, 1, h, w)
    edges[:, :, h // 2, :] = 1.0  # an instance border crossing the map
    return torch.cat([onehot.double(), edges.double()], dim=1)


def _dense(seg, shared_w, shared_b, gb_w, gb_b):
    k = shared_w.shape[-1]
    return F.conv2d(F.relu(F.conv2d(seg, shared_w, shared_b, padding=k // 2)), gb_w, gb_b, padding=k // 2)


@pytest.mark.parametrize("onehot_sums", [True, False], ids=["onehot-matmul-sums", "index-sums"])
@pytest.mark.parametrize("kernel,block,size", [(3, 8, (20, 28)), (5, 10, (30, 24)), (3, 1, (9, 7)), (3, 40, (16, 16))])
def test_region_gamma_beta_equals_dense_convolutions(kernel: int, block: int, size: tuple[int, int], onehot_sums: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # Both ways of forming the backward's per-code sums: one-hot matrix products (few codes, the
    # usual case) and index_add (many codes).
    monkeypatch.setattr(region_modulation, "ONEHOT_SUM_MAX_CODES", 10_000 if onehot_sums else 0)
    torch.manual_seed(0)
    h, w = size
    seg = _regions(2, h, w, block)
    layout = build_region_layout([onehot_index(seg[:, :LABEL_NC + 1]), onehot_index(seg[:, LABEL_NC + 1:])],
                                 [LABEL_NC + 1, 1], kernel)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    params = [torch.randn(7, LABEL_NC + 2, kernel, kernel, **f64), torch.randn(7, **f64),
              torch.randn(10, 7, kernel, kernel, **f64), torch.randn(10, **f64)]
    upstream = torch.randn(2, 10, h, w, dtype=torch.float64)

    assert (layout.u2_onehot is not None) == onehot_sums
    dense = _dense(seg, *params)
    region = region_gamma_beta(layout, *params)
    assert region.shape == dense.shape and region.is_contiguous()
    assert (region - dense).abs().max().item() < 1e-10
    grads_dense = torch.autograd.grad((dense * upstream).sum(), params)
    grads_region = torch.autograd.grad((region * upstream).sum(), params)
    for name, a, b in zip(("shared.weight", "shared.bias", "gb.weight", "gb.bias"), grads_dense, grads_region):
        assert (a - b).abs().max().item() < 1e-10, name
        assert a.abs().max().item() > 1e-3, name  # not a comparison of zeros
    # SPADE's scale 1 + gamma folded in (first 4 of the 10 channels): bitwise the same as adding 1 afterwards.
    shifted = region_gamma_beta(layout, *params, plus_one=4)
    assert torch.equal(shifted[:, :4], 1 + region[:, :4]) and torch.equal(shifted[:, 4:], region[:, 4:])
    grads_shifted = torch.autograd.grad((shifted * upstream).sum(), params)
    assert all(torch.equal(a, b) for a, b in zip(grads_region, grads_shifted))
    pixels = 2 * h * w
    if block >= 8:  # the per-code shortcut really carried part of the map
        assert layout.boundary.numel() < pixels and layout.boundary1.numel() < pixels


def test_region_layout_counts_only_present_codes_and_marks_borders() -> None:
    seg = _regions(1, 16, 16, block=16)  # one class everywhere, plus the edge row and the empty pixels
    layout = build_region_layout([onehot_index(seg[:, :LABEL_NC + 1]), onehot_index(seg[:, LABEL_NC + 1:])],
                                 [LABEL_NC + 1, 1], 3)
    assert layout.num_codes == 3  # the class, the class on the edge row, the empty pixels
    assert layout.code_columns.shape == (3, LABEL_NC + 2)
    u2 = torch.ones(16 * 16, dtype=torch.bool)
    u2[layout.boundary] = False
    u2 = u2.view(16, 16)
    assert not u2[:2].any() and not u2[-2:].any() and not u2[:, :2].any()  # image borders (radius 2)
    assert not u2[6:11].any()  # within 2 px of the edge row 8
    assert u2[3, 10] and u2[12, 5]


def test_spade_and_generator_region_path_equal_reference() -> None:
    torch.manual_seed(0)
    ref = SPADE("spadebatch3x3", 6, LABEL_NC + 2).double()
    fast = SPADE("spadebatch3x3", 6, LABEL_NC + 2).double()
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 32, 32, dtype=torch.float64)
    seg = _regions(2, 32, 32, block=8)
    region = ModulationPlan(onehot_channels=LABEL_NC + 1, default="region")
    labels = region.label_maps(seg)
    out_ref, out_fast = ref(x, seg), fast(x, labels)
    assert labels._layouts  # really took the region path
    assert (out_ref - out_fast).abs().max().item() < 1e-10

    kwargs = dict(semantic_nc=LABEL_NC + 2, ngf=4, crop_size=64, norm_G="spectralspadebatch3x3")
    torch.manual_seed(0)
    ref_g = SPADEGenerator(**kwargs).double()  # no modulation plan: the official layers
    fast_g = SPADEGenerator(modulation=region, **kwargs).double()
    fast_g.load_state_dict(ref_g.state_dict())
    for seg in (_semantics(2, 64, 64), _regions(2, 64, 64, block=16)):
        assert_same_outputs_and_gradients(ref_g, fast_g, seg)


def test_region_gamma_beta_rejects_mismatched_weights() -> None:
    seg = _regions(1, 8, 8, block=4)
    layout = build_region_layout([onehot_index(seg[:, :LABEL_NC + 1]), onehot_index(seg[:, LABEL_NC + 1:])],
                                 [LABEL_NC + 1, 1], 3)
    with pytest.raises(ValueError, match="input channels"):
        region_gamma_beta(layout, torch.randn(7, LABEL_NC, 3, 3), torch.randn(7), torch.randn(4, 7, 3, 3), torch.randn(4))
    with pytest.raises(ValueError, match="kernel sizes"):
        region_gamma_beta(layout, torch.randn(7, LABEL_NC + 2, 5, 5), torch.randn(7), torch.randn(4, 7, 5, 5), torch.randn(4))


def test_backward_inside_bf16_autocast_computes_in_fp32() -> None:
    """A training step's backward may run inside the step's autocast region: the region path's
    gradients stay fp32 (the same as outside autocast), with no bf16 kernel needed."""
    torch.manual_seed(0)
    seg = _regions(1, 16, 20, 4).float()
    layout = build_region_layout([onehot_index(seg[:, :LABEL_NC + 1]), onehot_index(seg[:, LABEL_NC + 1:])],
                                 [LABEL_NC + 1, 1], 3)
    params = [torch.randn(5, LABEL_NC + 2, 3, 3, requires_grad=True), torch.randn(5, requires_grad=True),
              torch.randn(6, 5, 3, 3, requires_grad=True), torch.randn(6, requires_grad=True)]
    upstream = torch.randn(1, 6, 16, 20)
    plain = torch.autograd.grad((region_gamma_beta(layout, *params) * upstream).sum(), params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = region_gamma_beta(layout, *params)
        in_autocast = torch.autograd.grad((out * upstream).sum(), params)
    assert out.dtype == torch.float32
    for a, b in zip(plain, in_autocast):
        assert b.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-5, atol=1e-5)
