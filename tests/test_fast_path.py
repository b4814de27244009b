"""The fast path computes what the reference mode computes (equality within tolerance, not speed).

Tolerances: float64 runs compare to 1e-10 (only summation order differs, so any real bug shows up
as an O(1) difference); the full-iteration check (the benchmark's two modes) runs one real iteration
in float64 and compares the updated parameters to 1e-9 relative.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spade_dist.label_layout import LabelLayout
from spade_dist.labels import encode_semantics
from spade_dist.models.fast.label_maps import ModulationPlan, resize_segmap
from spade_dist.models.fast.modulation import scale_shift
from spade_dist.models.fast.onehot_conv import (
    NotOneHotError,
    onehot_conv2d,
    onehot_index,
    onehot_strided_conv2d,
    resize_index,
)
from spade_dist.models.generator import SPADEGenerator
from spade_dist.models.spade import SPADE, resize_nearest
from tests.kit import blocky_labels, tiny_config

LABEL_NC = 6  # + dontcare + instance edge = 8 semantic channels
# The gather path everywhere (LABEL_NC + dontcare one-hot channels, then the instance edges).
GATHER = ModulationPlan(onehot_channels=LABEL_NC + 1, default="gather")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _semantics(n: int, h: int, w: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Blocky label map with don't-care pixels and instance edges, encoded like the training step."""
    g = torch.Generator().manual_seed(seed)
    label = blocky_labels(n, LABEL_NC, h, w, g)
    label[blocky_labels(n, 10, h, w, g) == 0] = 255  # about one block in ten is don't care
    instance = blocky_labels(n, 4, h, w, g)
    return encode_semantics(label, instance, LabelLayout(LABEL_NC, True, False), dtype=dtype)


@pytest.mark.parametrize("kernel", [3, 5])
def test_onehot_conv_equals_dense_conv_forward_and_weight_gradient(kernel: int) -> None:
    seg = _semantics(2, 16, 12)
    groups = [LABEL_NC + 1, 1]
    indices = [onehot_index(seg[:, :LABEL_NC + 1]), onehot_index(seg[:, LABEL_NC + 1:])]
    weight = torch.randn(7, seg.shape[1], kernel, kernel, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 7, 16, 12, dtype=torch.float64)

    dense = F.conv2d(seg, weight, bias, padding=kernel // 2)
    gw_dense, gb_dense = torch.autograd.grad((dense * upstream).sum(), (weight, bias))
    fast = onehot_conv2d(indices, groups, weight, bias)
    gw_fast, gb_fast = torch.autograd.grad((fast * upstream).sum(), (weight, bias))

    assert fast.shape == dense.shape
    assert (fast - dense).abs().max().item() < 1e-10
    assert (gw_fast - gw_dense).abs().max().item() < 1e-10
    assert (gb_fast - gb_dense).abs().max().item() < 1e-10
    assert gw_dense.abs().max().item() > 1e-3  # the comparison is not between two zeros


@pytest.mark.parametrize("kernel,stride,padding", [(4, 2, 2), (3, 1, 1), (3, 2, 0), (5, 3, 2)])
def test_onehot_strided_conv_equals_dense_conv_forward_and_weight_gradient(kernel: int, stride: int, padding: int) -> None:
    seg = _semantics(2, 17, 12)[:, :LABEL_NC]  # without the don't-care channel: those pixels have no class
    index = onehot_index(seg)
    assert (index == LABEL_NC).any()
    weight = torch.randn(6, LABEL_NC, kernel, kernel, dtype=torch.float64, requires_grad=True)
    dense = F.conv2d(seg, weight, stride=stride, padding=padding)
    fast = onehot_strided_conv2d(index, LABEL_NC, weight, stride, padding)
    assert fast.shape == dense.shape and fast.is_contiguous()
    assert (fast - dense).abs().max().item() < 1e-10
    upstream = torch.randn_like(dense)
    gw_dense = torch.autograd.grad((dense * upstream).sum(), weight)[0]
    gw_fast = torch.autograd.grad((fast * upstream).sum(), weight)[0]
    assert (gw_fast - gw_dense).abs().max().item() < 1e-10 and gw_dense.abs().max().item() > 1e-3
    with pytest.raises(ValueError, match="square kernel over"):
        onehot_strided_conv2d(index, LABEL_NC - 1, weight, stride, padding)


def test_onehot_index_rejects_maps_that_are_not_onehot_and_resizes_like_the_label_map() -> None:
    seg = _semantics(1, 16, 16)
    group = seg[:, :LABEL_NC + 1]
    index = onehot_index(group)
    assert torch.equal(index, group.argmax(dim=1))
    empty = group.clone()
    empty[:, :, 0, 0] = 0
    assert onehot_index(empty)[0, 0, 0].item() == LABEL_NC + 1  # an empty pixel reads the zero row
    for bad in (group * 0.5, group + group.roll(1, dims=1), -group):
        with pytest.raises(NotOneHotError, match="not one-hot"):
            onehot_index(bad)
    small = F.interpolate(group, size=(5, 7), mode="nearest")
    assert torch.equal(resize_index(index, (5, 7)), small.argmax(dim=1))


def test_spade_fast_path_equals_reference_path() -> None:
    torch.manual_seed(0)
    ref = SPADE("spadebatch3x3", 6, LABEL_NC + 2).double()
    fast = SPADE("spadebatch3x3", 6, LABEL_NC + 2).double()
    fast.load_state_dict(ref.state_dict())  # the same, official, parameter layout
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    seg = _semantics(2, 32, 32)
    upstream = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    labels = GATHER.label_maps(seg)
    out_ref, out_fast = ref(x, seg), fast(x, labels)
    assert labels.indices_at((8, 8)) is not None  # really took the gather path
    assert (out_ref - out_fast).abs().max().item() < 1e-10
    grads_ref = torch.autograd.grad((out_ref * upstream).sum(), list(ref.parameters()))
    grads_fast = torch.autograd.grad((out_fast * upstream).sum(), list(fast.parameters()))
    for (name, _), a, b in zip(ref.named_parameters(), grads_ref, grads_fast):
        assert (a - b).abs().max().item() < 1e-10, name


def _generators(use_vae: bool = False) -> tuple[SPADEGenerator, SPADEGenerator]:
    kwargs = dict(semantic_nc=LABEL_NC + 2, ngf=4, crop_size=64, norm_G="spectralspadebatch3x3", use_vae=use_vae, z_dim=8)
    torch.manual_seed(0)
    ref = SPADEGenerator(**kwargs).double()  # no modulation plan: the official layers
    fast = SPADEGenerator(modulation=GATHER, **kwargs).double()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def assert_same_outputs_and_gradients(ref: torch.nn.Module, fast: torch.nn.Module, seg: torch.Tensor) -> None:
    """Both generators (same weights) give the same image and parameter gradients (fp64, 1e-10)."""
    out_ref, out_fast = ref(seg), fast(seg)
    assert (out_ref - out_fast).abs().max().item() < 1e-10
    upstream = torch.randn_like(out_ref)
    grads_ref = torch.autograd.grad((out_ref * upstream).sum(), list(ref.parameters()))
    grads_fast = torch.autograd.grad((out_fast * upstream).sum(), list(fast.parameters()))
    for (name, _), a, b in zip(ref.named_parameters(), grads_ref, grads_fast):
        assert (a - b).abs().max().item() < 1e-10, name
    assert set(fast.build_kwargs()) == set(ref.build_kwargs())  # speed settings: checkpoint files unchanged


def test_generator_fast_path_outputs_and_gradients_equal_reference() -> None:
    ref, fast = _generators()
    assert_same_outputs_and_gradients(ref, fast, _semantics(2, 64, 64))


def test_generator_fast_path_falls_back_to_dense_for_soft_label_maps() -> None:
    ref, fast = _generators()
    soft = torch.softmax(torch.randn(1, LABEL_NC + 2, 64, 64, dtype=torch.float64), dim=1)
    assert (ref(soft) - fast(soft)).abs().max().item() < 1e-10


def test_full_training_iteration_fast_equals_reference(tmp_path: Path) -> None:
    """The benchmark's two modes, one real iteration each (G + D steps, VGG loss): same update."""
    from bench.train_step import COCO_SAMPLE, REFERENCE_OVERRIDES, Mode, coco_sample_batch
    from spade_dist.losses import VGGLoss, save_random_vgg19_weights
    from spade_dist.train.step import prepare_batch

    common = ["data.crop_size=64", "data.load_size=64", "model.ngf=4", "model.ndf=4"]
    ref_cfg = tiny_config(*common, *REFERENCE_OVERRIDES, base="coco_stuff")
    fast_cfg = tiny_config(*common, base="coco_stuff")
    assert fast_cfg.speed.fused_modulation and fast_cfg.speed.onehot_gather == fast_cfg.speed.region_modulation == "auto"
    # float64: Adam's first step is ~lr * sign(grad), so in fp32 a gradient that is zero up to
    # rounding (e.g. a bias followed by batch norm) could flip sign between modes; fp64 keeps the
    # comparison about the computation, not about rounding.
    f64 = torch.float64
    vgg = VGGLoss.from_file(save_random_vgg19_weights(tmp_path / "vgg19.pth", seed=0)).double()
    ref = Mode("reference", ref_cfg, vgg, host_sync_logging=True, seed=0, dtype=f64)
    fast = Mode("fast", fast_cfg, vgg, host_sync_logging=False, seed=0, dtype=f64)
    raw = coco_sample_batch(ref_cfg, 1, COCO_SAMPLE)  # real label map: region path with uniform regions
    losses = ref.iteration(prepare_batch(raw, ref_cfg, torch.device("cpu"), f64))
    assert set(losses) == {"GAN", "GAN_Feat", "VGG", "D_Fake", "D_real"}
    fast.iteration(prepare_batch(raw, fast_cfg, torch.device("cpu"), f64))
    moved = 0.0
    start = Mode("start", ref_cfg, vgg, host_sync_logging=False, seed=0, dtype=f64)
    for net in ("generator", "discriminator"):
        a = getattr(ref.state, net).state_dict()
        b = getattr(fast.state, net).state_dict()
        s = getattr(start.state, net).state_dict()
        for key, value in a.items():
            if torch.is_floating_point(value):
                scale = max(value.abs().max().item(), 1.0)  # updates are ~lr = 2e-4: 1e-9 is far below one
                assert (value - b[key]).abs().max().item() <= 1e-9 * scale, f"{net}.{key}"
                moved = max(moved, (value - s[key]).abs().max().item())
    assert moved > 1e-5  # the iteration really updated the networks


@pytest.mark.parametrize("size", [(8, 8), (4, 16), (16, 8), (5, 7), (64, 32), (32, 32), (12, 24)])
def test_resize_segmap_is_bitwise_nearest_interpolate(size: tuple[int, int]) -> None:
    seg = _semantics(2, 32, 32, dtype=torch.float32)
    for resize in (resize_segmap, resize_nearest):  # the speed paths' strided shrink, the official resize
        out = resize(seg, size)
        assert out.is_contiguous() and torch.equal(out, F.interpolate(seg, size=size, mode="nearest"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("plus_one", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_scale_shift_is_bitwise_addcmul_over_split(dtype: torch.dtype, plus_one: bool, channels_last: bool) -> None:
    """SPADE's modulation Function: the output and both input gradients are bitwise those of
    ``addcmul(beta, normalized, 1 + gamma)`` over ``both.split`` (autograd's own backward)."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    normalized = torch.randn(2, 5, 6, 7, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    both = torch.randn(2, 10, 6, 7, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
    upstream = torch.randn(2, 5, 6, 7, dtype=dtype).contiguous(memory_format=fmt)
    gamma, beta = both.split(5, dim=1)
    expected = torch.addcmul(beta, normalized, 1 + gamma if plus_one else gamma)
    actual = scale_shift(normalized, both, plus_one=plus_one)
    assert torch.equal(actual, expected)
    grads_expected = torch.autograd.grad(expected, [normalized, both], upstream)
    grads_actual = torch.autograd.grad(actual, [normalized, both], upstream)
    for a, b in zip(grads_actual, grads_expected):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert grads_actual[1].is_contiguous(memory_format=fmt)
    with pytest.raises(ValueError, match="do not match"):
        scale_shift(normalized, both[:, :8], plus_one=plus_one)


@pytest.mark.parametrize("fin,fout", [(6, 6), (6, 4)])
def test_resnet_block_in_place_ops_are_bitwise_the_out_of_place_ones(fin: int, fout: int) -> None:
    """A plan's label maps let the block run its leaky ReLUs and residual sum in place: same output
    and gradients (input and every parameter), bitwise."""
    from spade_dist.models.blocks import SPADEResnetBlock

    torch.manual_seed(0)
    block = SPADEResnetBlock(fin, fout, "spectralspadebatch3x3", LABEL_NC + 2).double()
    x = torch.randn(2, fin, 8, 8, dtype=torch.float64, requires_grad=True)
    seg = _semantics(2, 32, 32)
    upstream = torch.randn(2, fout, 8, 8, dtype=torch.float64)
    start = {k: v.clone() for k, v in block.state_dict().items()}  # spectral-norm u/v, BN statistics
    results = []
    for in_place in (True, False):
        block.load_state_dict(start)
        # The SPADE layers take the same path either way: only the block's own ops differ.
        out = block(x, dataclasses.replace(GATHER, in_place=in_place).label_maps(seg))
        results.append((out, torch.autograd.grad(out, [x, *block.parameters()], upstream)))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
