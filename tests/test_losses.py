"""GAN / feature-matching / KLD / VGG losses against hand-computed values (official semantics)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from spade_dist.config import LossConfig
from spade_dist.losses import (
    VGG19,
    VGG_WEIGHTS_ENV,
    GANLoss,
    MissingVGGWeightsError,
    VGGLoss,
    build_vgg_loss,
    feature_matching_loss,
    kld_loss,
    save_random_vgg19_weights,
)

# D logits used throughout; sum = 1.0
PRED = torch.tensor([[[[-2.0, -0.5], [0.5, 3.0]]]])


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


# (mode, target_is_real, for_discriminator) -> value worked out by hand from PRED
HAND_COMPUTED = {
    # hinge D real: mean(max(0, 1 - p)) = (3 + 1.5 + 0.5 + 0) / 4
    ("hinge", True, True): 1.25,
    # hinge D fake: mean(max(0, 1 + p)) = (0 + 0.5 + 1.5 + 4) / 4
    ("hinge", False, True): 1.5,
    # hinge G: -mean(p)
    ("hinge", True, False): -0.25,
    # ls: mean((p - t)^2), t = 1 real / 0 fake
    ("ls", True, True): (9 + 2.25 + 0.25 + 4) / 4,
    ("ls", False, True): (4 + 0.25 + 0.25 + 9) / 4,
    ("ls", True, False): (9 + 2.25 + 0.25 + 4) / 4,
    # original: BCE with logits = mean(softplus(-p)) for real, mean(softplus(p)) for fake
    ("original", True, True): (softplus(2) + softplus(0.5) + softplus(-0.5) + softplus(-3)) / 4,
    ("original", False, True): (softplus(-2) + softplus(-0.5) + softplus(0.5) + softplus(3)) / 4,
    ("original", True, False): (softplus(2) + softplus(0.5) + softplus(-0.5) + softplus(-3)) / 4,
    # w: -mean(p) real, mean(p) fake, the same for G and D
    ("w", True, True): -0.25,
    ("w", False, True): 0.25,
    ("w", True, False): -0.25,
}


@pytest.mark.parametrize("key", sorted(HAND_COMPUTED), ids=lambda k: f"{k[0]}-{'real' if k[1] else 'fake'}-{'D' if k[2] else 'G'}")
def test_gan_loss_hand_computed(key: tuple[str, bool, bool]) -> None:
    mode, target_is_real, for_discriminator = key
    loss = GANLoss(mode)(PRED, target_is_real, for_discriminator=for_discriminator)
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(HAND_COMPUTED[key], abs=1e-6)


def test_gan_loss_multiscale_uses_last_output_and_averages_scales() -> None:
    feature = torch.full((1, 4, 2, 2), 100.0)  # intermediate features must not influence the GAN loss
    scale_0 = [feature, PRED]
    scale_1 = [feature, torch.ones(1, 1, 1, 1)]  # hinge D real: max(0, 1 - 1) = 0
    loss = GANLoss("hinge")([scale_0, scale_1], True, for_discriminator=True)
    assert loss.item() == pytest.approx((1.25 + 0.0) / 2)
    # a scale may also be the prediction tensor itself
    loss_g = GANLoss("ls")([PRED, torch.zeros(1, 1, 1, 1)], True, for_discriminator=False)
    assert loss_g.item() == pytest.approx((3.875 + 1.0) / 2)


def test_gan_loss_gradient_and_errors() -> None:
    pred = PRED.clone().requires_grad_(True)
    GANLoss("hinge")(pred, False, for_discriminator=True).backward()
    # d/dp mean(relu(1 + p)): 1/4 where 1 + p > 0, else 0
    assert torch.equal(pred.grad, torch.tensor([[[[0.0, 0.25], [0.25, 0.25]]]]))
    with pytest.raises(ValueError, match="gan_mode.*'lsgan'"):
        GANLoss("lsgan")
    with pytest.raises(ValueError, match="aim for real"):
        GANLoss("hinge")(PRED, False, for_discriminator=False)


def test_feature_matching_hand_made_features() -> None:
    fake = [
        [torch.zeros(1, 2), torch.tensor([[1.0, 3.0]]), torch.full((1, 1), 50.0)],
        [torch.tensor([[2.0]]), torch.full((1, 1), -50.0)],
    ]
    real = [
        [torch.ones(1, 2), torch.zeros(1, 2), torch.zeros(1, 1)],
        [torch.zeros(1, 1), torch.zeros(1, 1)],
    ]
    for feats in fake + real:
        for f in feats:
            f.requires_grad_(True)
    # L1 terms: scale 0 -> 1 and 2, scale 1 -> 2; final predictions excluded; x lambda 10 / num_D 2
    loss = feature_matching_loss(fake, real, lambda_feat=10.0)
    assert loss.item() == pytest.approx((1 + 2 + 2) * 10.0 / 2)
    loss.backward()
    assert all(f.grad is None for feats in real for f in feats), "real features must be detached"
    assert fake[0][0].grad is not None and fake[0][-1].grad is None
    with pytest.raises(ValueError, match="scales"):
        feature_matching_loss(fake, real[:1], 10.0)


def test_kld_matches_formula() -> None:
    mu = torch.tensor([[0.5, -1.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    # -0.5 * [(1 + 0 - 0.25 - 1) + (1 + ln2 - 1 - 2)] = 1.125 - ln2 / 2
    assert kld_loss(mu, logvar).item() == pytest.approx(1.125 - math.log(2.0) / 2, abs=1e-6)
    assert kld_loss(torch.zeros(3, 8), torch.zeros(3, 8)).item() == 0.0
    gen = torch.Generator().manual_seed(1)
    mu, logvar = torch.randn(4, 16, generator=gen), torch.randn(4, 16, generator=gen)
    expected = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum()
    assert torch.allclose(kld_loss(mu, logvar), expected)


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_vgg19_weights(tmp_path_factory.mktemp("vgg") / "vgg19_random.pth", seed=3)


def test_vgg19_is_torchvision_architecture(vgg_weights: Path) -> None:
    from torchvision.models.vgg import cfgs, make_layers

    reference = make_layers(cfgs["E"], batch_norm=False)
    state = torch.load(vgg_weights, weights_only=True)
    reference.load_state_dict({k[len("features."):]: v for k, v in state.items()}, strict=False)
    ours = VGG19.from_file(vgg_weights)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    features = ours(x)
    relu_indices = (1, 6, 11, 20, 29)  # relu1_1 .. relu5_1 in torchvision's `features`
    h = x
    expected = []
    with torch.no_grad():
        for index, layer in enumerate(reference[:30]):
            h = layer(h)
            if index in relu_indices:
                expected.append(h.clone())
    assert [f.shape[1] for f in features] == [64, 128, 256, 512, 512]
    for got, want in zip(features, expected):
        assert torch.allclose(got, want, atol=1e-6)


def test_vgg_loss_shape_positivity_and_gradient(vgg_weights: Path) -> None:
    loss_fn = VGGLoss.from_file(vgg_weights)
    gen = torch.Generator().manual_seed(0)
    fake = (torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1).requires_grad_(True)
    real = (torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1).requires_grad_(True)
    loss = loss_fn(fake, real)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert real.grad is None, "the target side must not receive gradients"
    assert all(p.grad is None and not p.requires_grad for p in loss_fn.parameters())
    assert loss_fn(real.detach(), real.detach()).item() == 0.0
    loss_fn.train()
    assert not loss_fn.vgg.training, "VGG stays a fixed feature extractor"


def test_vgg_weights_from_environment(vgg_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VGG_WEIGHTS_ENV, str(vgg_weights))
    assert isinstance(VGGLoss.from_file(""), VGGLoss)


def test_build_vgg_loss_from_config(vgg_weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VGG_WEIGHTS_ENV, raising=False)
    assert build_vgg_loss(LossConfig(no_vgg_loss=True)) is None
    assert isinstance(build_vgg_loss(LossConfig(vgg_weights=str(vgg_weights))), VGGLoss)
    with pytest.raises(MissingVGGWeightsError, match="loss.vgg_weights"):
        build_vgg_loss(LossConfig())


def test_missing_vgg_weights_error_says_how_to_provide_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(VGG_WEIGHTS_ENV, raising=False)
    with pytest.raises(MissingVGGWeightsError) as info:
        VGGLoss.from_file(None)
    message = str(info.value)
    for needle in ("loss.vgg_weights", VGG_WEIGHTS_ENV, "torchvision.models.vgg19(weights='IMAGENET1K_V1').state_dict()",
                   "loss.no_vgg_loss"):
        assert needle in message
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        VGG19.from_file(missing)


def test_wrong_vgg_file_names_file_and_keys(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 5, 5)}, bad)
    with pytest.raises(ValueError, match=r"bad\.pth.*missing keys.*features\.2\.weight.*wrong shapes.*features\.0\.weight"):
        VGG19.from_file(bad)
