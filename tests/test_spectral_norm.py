"""The closed-form spectral-norm backward (models/fast/spectral_norm.py) against torch's own hook."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm

from spade_dist.models.factory import build_discriminator, build_generator
from spade_dist.models.fast.spectral_norm import FastSpectralNorm, use_fast_spectral_norm
from tests.kit import tiny_config


def _pair(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    reference = nn.utils.spectral_norm(layer.double())
    fast = copy.deepcopy(reference)
    assert use_fast_spectral_norm(fast) == 1
    return reference, fast


def test_same_weight_u_v_and_gradients_over_two_training_forwards() -> None:
    for layer in (nn.Conv2d(6, 5, 3, padding=1), nn.Conv2d(4, 7, 1, bias=False), nn.Linear(9, 3)):
        reference, fast = _pair(layer)
        x = torch.randn(2, *((6, 8, 8) if isinstance(layer, nn.Conv2d) and layer.in_channels == 6 else
                             (4, 8, 8) if isinstance(layer, nn.Conv2d) else (9,)), dtype=torch.float64)
        # Two forwards before one backward (the GAN pattern: u, v change in between).
        loss_ref = (reference(x) ** 2).sum() + reference(x * 0.5).sin().sum()
        loss_fast = (fast(x) ** 2).sum() + fast(x * 0.5).sin().sum()
        assert torch.equal(loss_ref, loss_fast)  # the forward is torch's ops in torch's order
        loss_ref.backward()
        loss_fast.backward()
        for name in ("weight_u", "weight_v"):
            assert torch.equal(getattr(reference, name), getattr(fast, name)), name
        torch.testing.assert_close(fast.weight_orig.grad, reference.weight_orig.grad, rtol=1e-10, atol=1e-12)
        if reference.bias is not None:
            torch.testing.assert_close(fast.bias.grad, reference.bias.grad, rtol=1e-10, atol=1e-12)


def test_eval_forward_and_state_dict_are_torchs() -> None:
    reference, fast = _pair(nn.Conv2d(3, 4, 3))
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    reference.eval(), fast.eval()
    assert torch.equal(reference(x), fast(x))
    assert list(fast.state_dict()) == list(reference.state_dict()) == ["bias", "weight_orig", "weight_u", "weight_v"]
    fresh = nn.utils.spectral_norm(nn.Conv2d(3, 4, 3).double())
    use_fast_spectral_norm(fresh)
    fresh.load_state_dict(reference.state_dict())
    fresh.eval()
    assert torch.equal(fresh(x), reference(x))


def test_config_switch_reaches_every_spectral_normed_layer() -> None:
    def hooks(net: nn.Module) -> list[type]:
        return [type(h) for m in net.modules() for h in m._forward_pre_hooks.values() if isinstance(h, SpectralNorm)]

    on, off = tiny_config(), tiny_config("speed.fast_spectral_norm=false")
    for build in (build_generator, build_discriminator):
        fast_hooks, torch_hooks = hooks(build(on)), hooks(build(off))
        assert fast_hooks and set(fast_hooks) == {FastSpectralNorm}, build.__name__
        assert len(torch_hooks) == len(fast_hooks) and set(torch_hooks) == {SpectralNorm}, build.__name__
