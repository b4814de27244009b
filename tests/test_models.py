"""Networks: SPADE layer (every norm type and kernel size, fused == reference path), blocks, generator
shapes for every variant, pix2pixHD, encoder, multiscale discriminator features, init, factory."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spade_dist.models import (
    SPADE,
    ConvEncoder,
    MultiscaleDiscriminator,
    Pix2PixHDGenerator,
    SPADEGenerator,
    SPADEResnetBlock,
    build_discriminator,
    build_encoder,
    build_generator,
    init_weights,
    reparameterize,
)
from spade_dist.models.fast.seam import DiscriminatorLabels, ModulationPlan
from spade_dist.models.norms import make_nonspade_norm_layer
from spade_dist.models.sync_bn import SyncBatchNorm2d
from tests.kit import tiny_config


def _seg(n: int, c: int, h: int, w: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n, 1, h, w), generator=g)
    return torch.zeros(n, c, h, w, dtype=dtype).scatter_(1, labels, 1.0)


def _randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial parameters and BN running stats (default init has zero-ish gamma/beta paths)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return module


# --------------------------------------------------------------------------------------------
# SPADE layer
# --------------------------------------------------------------------------------------------

NORM_CLASSES = {"instance": nn.InstanceNorm2d, "batch": nn.BatchNorm2d, "syncbatch": SyncBatchNorm2d}


@pytest.mark.parametrize("kind", ["instance", "batch", "syncbatch"])
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_spade_layer_every_norm_and_kernel(kind: str, k: int, train: bool) -> None:
    C, label_nc = 6, 4
    layer = _randomize(SPADE(f"spade{kind}{k}x{k}", C, label_nc)).double().train(train)
    assert type(layer.param_free_norm) is NORM_CLASSES[kind]
    assert layer.mlp_shared[0].weight.shape == (128, label_nc, k, k)
    assert layer.mlp_gamma.weight.shape == (C, 128, k, k) and layer.mlp_beta.weight.shape == (C, 128, k, k)
    keys = set(layer.state_dict())
    assert {"mlp_shared.0.weight", "mlp_shared.0.bias", "mlp_gamma.weight", "mlp_gamma.bias",
            "mlp_beta.weight", "mlp_beta.bias"} <= keys
    assert ("param_free_norm.running_mean" in keys) == (kind != "instance")

    x = torch.randn(3, C, 8, 8, dtype=torch.float64) * 2 + 1
    seg = _seg(3, label_nc, 16, 16, dtype=torch.float64)
    # Hand-written expectation: param-free norm, nearest resize, shared conv + relu, gamma/beta convs.
    if kind == "instance" or train:
        normalized = (x - x.mean(dim=(2, 3) if kind == "instance" else (0, 2, 3), keepdim=True))
        var = x.var(dim=(2, 3) if kind == "instance" else (0, 2, 3), unbiased=False, keepdim=True)
        normalized = normalized / torch.sqrt(var + 1e-5)
    else:
        pf = layer.param_free_norm
        normalized = (x - pf.running_mean.view(1, -1, 1, 1)) / torch.sqrt(pf.running_var.view(1, -1, 1, 1) + 1e-5)
    seg_small = seg[:, :, ::2, ::2]  # nearest 16 -> 8 picks every second pixel
    actv = F.relu(F.conv2d(seg_small, layer.mlp_shared[0].weight, layer.mlp_shared[0].bias, padding=k // 2))
    gamma = F.conv2d(actv, layer.mlp_gamma.weight, layer.mlp_gamma.bias, padding=k // 2)
    beta = F.conv2d(actv, layer.mlp_beta.weight, layer.mlp_beta.bias, padding=k // 2)
    expected = normalized * (1 + gamma) + beta

    fused = SPADE(f"spade{kind}{k}x{k}", C, label_nc).double().train(train)
    fused.load_state_dict(layer.state_dict())
    out_ref = layer(x, seg)
    out_fused = fused(x, ModulationPlan().label_maps(seg))  # the fused dense path
    assert out_ref.shape == x.shape
    assert (out_ref - expected).abs().max() < 1e-10
    assert (out_fused - out_ref).abs().max() < 1e-10
    assert set(fused.state_dict()) == keys


def test_spade_fused_gradients_equal_reference() -> None:
    ref = _randomize(SPADE("spadebatch3x3", 5, 3)).double()
    fused = SPADE("spadebatch3x3", 5, 3).double()
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    seg = _seg(2, 3, 8, 8, dtype=torch.float64)
    ref(x, seg).square().sum().backward()
    fused(x, ModulationPlan().label_maps(seg)).square().sum().backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters()):
        assert (a.grad - b.grad).abs().max() < 1e-10, n


@pytest.mark.parametrize("bad,named", [("spadegroup3x3", "group"), ("spadeinstance3x5", "3x5"),
                                       ("resnetinstance", "resnetinstance")])
def test_spade_unknown_norm_is_a_value_error_naming_it(bad: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        SPADE(bad, 4, 3)


def test_segmap_pyramid_resizes_once_per_size() -> None:
    seg = _seg(1, 3, 16, 16)
    pyr = ModulationPlan().label_maps(seg)
    a, b = pyr.at((4, 4)), pyr.at((4, 4))
    assert a is b and torch.equal(a, F.interpolate(seg, size=(4, 4), mode="nearest"))
    assert pyr.at((16, 16)) is seg


# --------------------------------------------------------------------------------------------
# Blocks and generators
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spectral", [True, False])
def test_spade_resnet_block_keys_and_shortcut(spectral: bool) -> None:
    norm = ("spectral" if spectral else "") + "spadebatch3x3"
    learned = SPADEResnetBlock(8, 4, norm, semantic_nc=3)
    keys = set(learned.state_dict())
    w = "weight_orig" if spectral else "weight"
    assert {f"conv_0.{w}", f"conv_1.{w}", f"conv_s.{w}", "norm_s.mlp_gamma.weight"} <= keys
    assert ("conv_0.weight_u" in keys) == spectral and "conv_s.bias" not in keys
    assert learned.conv_0.weight.shape == (4, 8, 3, 3)  # middle width = min(fin, fout)
    plain = SPADEResnetBlock(4, 4, norm, semantic_nc=3)
    assert not any(k.startswith(("conv_s", "norm_s")) for k in plain.state_dict())
    x, seg = torch.randn(2, 8, 4, 4), _seg(2, 3, 8, 8)
    assert learned(x, seg).shape == (2, 4, 4, 4)


@pytest.mark.parametrize("mode,crop", [("normal", 64), ("more", 128), ("most", 256)])
@pytest.mark.parametrize("aspect", [1.0, 2.0])
@pytest.mark.parametrize("use_vae", [False, True], ids=["seg", "vae"])
def test_generator_shapes(mode: str, crop: int, aspect: float, use_vae: bool) -> None:
    G = SPADEGenerator(semantic_nc=4, ngf=4, crop_size=crop, aspect_ratio=aspect, num_upsampling_layers=mode,
                       use_vae=use_vae, z_dim=8).eval()  # eval: BN running stats, so batch 1 is fine
    h = round(crop / aspect)
    assert (G.sh, G.sw) == (round((crop // 2 ** {"normal": 5, "more": 6, "most": 7}[mode]) / aspect),
                            crop // 2 ** {"normal": 5, "more": 6, "most": 7}[mode])
    with torch.no_grad():
        out = G(_seg(1, 4, h, crop), z=torch.randn(1, 8) if use_vae else None)
    assert out.shape == (1, 3, h, crop)
    assert out.abs().max() <= 1.0
    assert hasattr(G, "up_4") == (mode == "most")
    assert isinstance(G.fc, nn.Linear) == use_vae


def test_generator_vae_z_from_normal_when_none_and_z_changes_output() -> None:
    G = SPADEGenerator(semantic_nc=4, ngf=4, crop_size=64, use_vae=True, z_dim=8).eval()
    seg = _seg(2, 4, 64, 64)
    torch.manual_seed(0)
    a = G(seg)
    torch.manual_seed(0)
    b = G(seg)
    c = G(seg)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="z must have shape"):
        G(seg, z=torch.randn(2, 9))


def test_generator_fused_equals_reference_path_float64() -> None:
    ref = SPADEGenerator(semantic_nc=5, ngf=4, crop_size=32)  # no modulation plan: the official layers
    _randomize(ref).double().eval()
    fused = SPADEGenerator(semantic_nc=5, ngf=4, crop_size=32, modulation=ModulationPlan()).double().eval()
    fused.load_state_dict(ref.state_dict())
    seg = _seg(2, 5, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert (fused(seg) - ref(seg)).abs().max() < 1e-10


def test_generator_rejects_wrong_semantic_channels() -> None:
    G = SPADEGenerator(semantic_nc=4, ngf=4, crop_size=64)
    with pytest.raises(ValueError, match="semantic"):
        G(torch.zeros(1, 5, 64, 64))


def test_pix2pixhd_generator_shapes_and_norm_keys() -> None:
    G = Pix2PixHDGenerator(semantic_nc=4, ngf=4, n_downsample=2, n_blocks=2, norm="spectralinstance")
    with torch.no_grad():
        out = G(_seg(2, 4, 32, 32))
    assert out.shape == (2, 3, 32, 32) and out.abs().max() <= 1.0
    keys = set(G.state_dict())
    assert "model.1.0.weight_orig" in keys and "model.1.0.bias" not in keys  # bias dropped before the norm
    assert isinstance(G.model[1][1], nn.InstanceNorm2d)
    assert G.model[-2].weight.shape == (3, 4, 7, 7)


# --------------------------------------------------------------------------------------------
# Non-SPADE norms, discriminator, encoder
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm,spectral,norm_cls", [
    ("spectralinstance", True, nn.InstanceNorm2d), ("instance", False, nn.InstanceNorm2d),
    ("batch", False, nn.BatchNorm2d), ("spectralsyncbatch", True, SyncBatchNorm2d),
    ("spectralnone", True, None), ("none", False, None), ("spectral", True, None),
])
def test_nonspade_norm_layer(norm: str, spectral: bool, norm_cls) -> None:
    layer = make_nonspade_norm_layer(norm)(nn.Conv2d(3, 5, 3))
    conv = layer[0] if norm_cls is not None else layer
    assert hasattr(conv, "weight_orig") == spectral
    if norm_cls is None:
        assert isinstance(layer, nn.Conv2d) and layer.bias is not None
    else:
        assert type(layer[1]) is norm_cls and conv.bias is None
    assert layer(torch.randn(2, 3, 6, 6)).shape == (2, 5, 4, 4)


def test_nonspade_norm_unknown_names_it() -> None:
    with pytest.raises(ValueError, match="spectralgroup"):
        make_nonspade_norm_layer("spectralgroup")


@pytest.mark.parametrize("num_D,n_layers", [(2, 4), (3, 3)])
def test_discriminator_returns_per_scale_intermediate_features(num_D: int, n_layers: int) -> None:
    D = MultiscaleDiscriminator(input_nc=4 + 3, ndf=4, n_layers_D=n_layers, num_D=num_D)
    out = D(_seg(2, 4, 64, 64), torch.randn(2, 3, 64, 64))
    assert len(out) == num_D
    size = 64
    for scale, feats in enumerate(out):
        assert len(feats) == n_layers + 1
        # Expected spatial sizes: stride-2 convs, the last normed conv and the head have stride 1
        # (k=4, pad=2 -> +1 pixel each).
        s = size
        widths = [min(4 * 2 ** i, 512) for i in range(n_layers)] + [1]
        for i, f in enumerate(feats):
            s = s // 2 + 1 if i < n_layers - 1 else s + 1
            assert f.shape == (2, widths[i], s, s), (scale, i, f.shape)
        size = (size - 1) // 2 + 1  # avg-pool 3, stride 2, pad 1
    d0 = D.discriminator_0
    # Official key layout: discriminator_0.model1.0.0.weight_orig (conv inside the norm wrapper).
    assert "model1.0.0.weight_orig" in d0.state_dict() and isinstance(d0.model1[0][1], nn.InstanceNorm2d)
    assert not hasattr(d0.model0[0], "weight_orig")  # first and last convs have no norm (official)


def test_discriminator_without_feature_matching_and_bad_channels() -> None:
    D = MultiscaleDiscriminator(input_nc=7, ndf=4, n_layers_D=2, num_D=2, get_intermediate_features=False)
    out = D(_seg(1, 4, 32, 32), torch.randn(1, 3, 32, 32))
    assert [len(o) for o in out] == [1, 1] and out[0][0].shape[1] == 1
    with pytest.raises(ValueError, match="input channels"):
        D(_seg(1, 5, 32, 32), torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("label_input", ["present", "gather"])
@pytest.mark.parametrize("copies", [1, 2])
def test_discriminator_label_inputs_equal_dense(label_input: str, copies: int) -> None:
    """Only the label channels present in the batch reach D's first convolutions (and at full
    resolution the one-hot part as a gather): same outputs and weight gradients as feeding every
    channel (fp64), zero gradient on the absent columns; also with fake and real sharing the maps."""
    torch.manual_seed(0)
    full = MultiscaleDiscriminator(input_nc=9 + 3, ndf=4, n_layers_D=3, num_D=3).double()
    fast = MultiscaleDiscriminator(input_nc=9 + 3, ndf=4, n_layers_D=3, num_D=3,
                                   label_input=DiscriminatorLabels(label_input, 8)).double()
    fast.load_state_dict(full.state_dict())
    labels = torch.tensor([0, 3, 5, 8]).repeat_interleave(2 * 25 * 13 // 4 + 1)[: 2 * 25 * 13].reshape(2, 1, 25, 13)
    semantics = torch.zeros(2, 9, 25, 13, dtype=torch.float64).scatter_(1, labels, 1.0)  # 8 = no class
    semantics[:, 8] = (torch.rand(2, 25, 13) < 0.2).double()  # instance-edge channel: not one-hot
    image = torch.randn(2 * copies, 3, 25, 13, dtype=torch.float64)
    seen = []
    fast.discriminator_0.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    out_full = full(semantics.repeat(copies, 1, 1, 1), image)
    out_fast = fast(semantics, image)
    assert seen == [1 + 3 if label_input == "gather" else 3 + 1 + 3]  # edge (+ present labels) + RGB
    upstream = [[torch.randn_like(f) for f in scale] for scale in out_full]
    def loss(out):
        return sum((f * u).sum() for scale, us in zip(out, upstream) for f, u in zip(scale, us))
    for a, b in zip([f for s in out_full for f in s], [f for s in out_fast for f in s]):
        assert (a - b).abs().max().item() < 1e-10
    grads_full = torch.autograd.grad(loss(out_full), list(full.parameters()))
    grads_fast = torch.autograd.grad(loss(out_fast), list(fast.parameters()))
    for (name, _), a, b in zip(full.named_parameters(), grads_full, grads_fast):
        assert (a - b).abs().max().item() < 1e-10, name
    first = [name for name, _ in fast.named_parameters()].index("discriminator_0.model0.0.weight")
    absent = [1, 2, 4, 6, 7]
    assert grads_fast[first][:, absent].abs().max().item() == 0.0
    # Semantics that need a gradient see every channel (an absent channel's gradient is not zero).
    sem_a, sem_b = semantics.repeat(copies, 1, 1, 1).requires_grad_(True), semantics.clone().requires_grad_(True)
    ga = torch.autograd.grad(loss(full(sem_a, image)), sem_a)[0]
    gb = torch.autograd.grad(loss(fast(sem_b, image)), sem_b)[0]
    assert (ga.view(copies, *gb.shape).sum(0) - gb).abs().max().item() < 1e-10 and ga[:, absent].abs().max().item() > 0


def test_discriminator_gather_falls_back_for_soft_label_maps() -> None:
    full = MultiscaleDiscriminator(input_nc=5 + 3, ndf=4, n_layers_D=2, num_D=2).double()
    fast = MultiscaleDiscriminator(input_nc=5 + 3, ndf=4, n_layers_D=2, num_D=2,
                                   label_input=DiscriminatorLabels("gather", 5)).double()
    fast.load_state_dict(full.state_dict())
    full.eval(), fast.eval()
    soft = torch.softmax(torch.randn(2, 5, 16, 16, dtype=torch.float64), dim=1)
    image = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for a, b in zip([f for s in full(soft, image) for f in s], [f for s in fast(soft, image) for f in s]):
        assert (a - b).abs().max().item() < 1e-10


@pytest.mark.parametrize("present_labels", [False, True])
def test_discriminator_shares_label_maps_between_image_halves(present_labels: bool) -> None:
    D = MultiscaleDiscriminator(input_nc=4 + 3, ndf=4, n_layers_D=2, num_D=2,
                                label_input=DiscriminatorLabels("gather", 4) if present_labels else None)
    D = D.double().eval()  # eval: no power iteration between the calls
    semantics, images = _seg(2, 4, 32, 32, dtype=torch.float64), torch.randn(4, 3, 32, 32, dtype=torch.float64)
    shared, repeated = D(semantics, images), D(torch.cat([semantics, semantics]), images)
    for a, b in zip([f for s in shared for f in s], [f for s in repeated for f in s]):
        assert (a - b).abs().max().item() < 1e-12
    with pytest.raises(ValueError, match="3 images cannot share 2 label maps"):
        D(semantics, images[:3])


def test_discriminator_label_input_follows_config() -> None:
    assert build_discriminator(tiny_config()).label_input == DiscriminatorLabels("gather", 10)  # tiny: 10 classes
    assert build_discriminator(tiny_config("speed.discriminator_labels=present")).label_input.mode == "present"
    assert build_discriminator(tiny_config("speed.discriminator_labels=dense")).label_input is None
    with pytest.raises(ValueError, match="label input"):
        DiscriminatorLabels("sparse", 4)


def test_discriminator_downsample_is_avg_pool_without_padding_counts() -> None:
    x = torch.ones(1, 1, 5, 5)
    assert torch.equal(MultiscaleDiscriminator.downsample(x), torch.ones(1, 1, 3, 3))


def test_encoder_shapes_and_reparameterize() -> None:
    E = ConvEncoder(ndf=4, crop_size=256, z_dim=8)
    mu, logvar = E(torch.randn(2, 3, 64, 64))  # resized to 256 inside, as the official encoder
    assert mu.shape == (2, 8) and logvar.shape == (2, 8)
    assert hasattr(E, "layer6") and E.fc_mu.in_features == 4 * 8 * 4 * 4
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    z = reparameterize(mu, logvar, generator=g1)
    eps = torch.randn(mu.shape, generator=g2)
    assert torch.allclose(z, mu + eps * torch.exp(0.5 * logvar))
    z.sum().backward()
    assert E.fc_mu.weight.grad is not None and E.fc_var.weight.grad is not None


# --------------------------------------------------------------------------------------------
# Init and factory
# --------------------------------------------------------------------------------------------


def test_official_init_reaches_spectral_weights_and_zeroes_biases() -> None:
    torch.manual_seed(0)
    block = SPADEResnetBlock(8, 8, "spectralspadebatch3x3", semantic_nc=3)
    init_weights(block, "normal", 0.02)
    assert abs(block.conv_0.weight_orig.std().item() - 0.02) < 0.005
    assert torch.count_nonzero(block.conv_0.bias) == 0 and torch.count_nonzero(block.norm_0.mlp_gamma.bias) == 0
    bn = init_weights(nn.Sequential(nn.BatchNorm2d(4)), "xavier", 0.02)[0]
    assert not torch.equal(bn.weight, torch.ones(4)) and torch.count_nonzero(bn.bias) == 0
    with pytest.raises(ValueError, match="bogus"):
        init_weights(block, "bogus")


# The tiny preset with 5 classes + don't care + instance edges (semantic_nc 7), at 64 px.
SEMANTIC_7 = ("data.label_nc=5", "data.contain_dontcare_label=true", "data.no_instance=false", "data.crop_size=64",
              "data.load_size=64")


def test_factory_builds_from_config() -> None:
    cfg = tiny_config(*SEMANTIC_7)
    G, D = build_generator(cfg), build_discriminator(cfg)
    assert isinstance(G, SPADEGenerator) and G.semantic_nc == 7 == cfg.data.label_layout.semantic_nc
    assert G.modulation == ModulationPlan(onehot_channels=6, default="region")  # 5 classes + don't care
    assert D.discriminator_0.model0[0].in_channels == 7 + 3
    assert len(list(D.children())) == cfg.model.num_D
    E = build_encoder(tiny_config(*SEMANTIC_7, "model.use_vae=true"))
    assert E.fc_mu.out_features == 256
    P = build_generator(tiny_config(*SEMANTIC_7, "model.netG=pix2pixhd", "model.resnet_n_downsample=2",
                                    "model.resnet_n_blocks=1"))
    assert isinstance(P, Pix2PixHDGenerator)
    with torch.no_grad():
        assert P(_seg(1, 7, 32, 32)).shape == (1, 3, 32, 32)


def test_config_rejects_unknown_discriminator_norm_naming_the_key() -> None:
    from spade_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"model\.norm_D.*spectralgroup"):
        load_config(None, ["model.norm_D=spectralgroup"])


def test_plain_networks_reach_the_speed_paths_only_through_the_seam() -> None:
    """The official-looking network files import only ``models/fast/seam.py`` of the fast package, and
    the label channel counts (semantic_nc, the one-hot group) are derived in one place."""
    import ast
    import re
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "spade_dist"
    for name in ("generator", "discriminator", "blocks", "spade", "encoder"):
        tree = ast.parse((package / "models" / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        fast = {m for m in imported if m.startswith("spade_dist.models.fast")}
        assert fast <= {"spade_dist.models.fast.seam"}, (name, fast)
    formula = re.compile(r"label_nc\s*\+\s*int\(")
    places = [str(p.relative_to(package)) for p in package.rglob("*.py") if formula.search(p.read_text())]
    assert places == ["label_layout.py"], places
