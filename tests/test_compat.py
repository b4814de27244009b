"""Official-checkpoint compatibility: key/shape parity with the released generators, eval-mode output
parity with an independent functional implementation, mismatch diagnosis, project file, spade-convert."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spade_dist.cli.convert import main as convert_main
from spade_dist.config import SpeedConfig, load_config
from spade_dist.models.compat import (
    CheckpointMismatchError,
    load_generator_file,
    load_official_generator,
    official_state_dict,
    save_generator_file,
    save_official_generator,
)
from spade_dist.models.factory import build_generator
from spade_dist.models.generator import SPADEGenerator
from tests.kit import blocky_labels, tiny_config
from tests.official_reference import official_forward, official_shapes, random_official_state_dict

REFERENCE_JSON = "official_generator_state_dicts.json"


def _semantics(n: int, label_nc: int, extra: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """One-hot of a blocky random label map (+ random binary extra channels, like the edge map)."""
    g = torch.Generator().manual_seed(seed)
    labels = blocky_labels(n, label_nc, h, w, g)
    onehot = torch.zeros(n, label_nc, h, w).scatter_(1, labels, 1.0)
    extras = (torch.rand(n, extra, h, w, generator=g) > 0.7).float()
    return torch.cat([onehot, extras], dim=1)


# --------------------------------------------------------------------------------------------
# Released checkpoints: parameter count, keys and shapes
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(reference_dir: Path) -> dict:
    return json.loads((reference_dir / REFERENCE_JSON).read_text())


@pytest.mark.parametrize("name", ["coco", "ade20k", "cityscapes"])
def test_official_state_dict_keys_and_shapes_match_released_generators(reference: dict, name: str) -> None:
    ref = reference[name]
    c = ref["config"]
    with torch.device("meta"):
        G = SPADEGenerator(semantic_nc=c["semantic_nc"], ngf=c["ngf"], crop_size=c["crop_size"],
                           aspect_ratio=c["aspect_ratio"], num_upsampling_layers=c["num_upsampling_layers"],
                           use_vae=c["use_vae"], z_dim=c["z_dim"], norm_G=c["norm_G"])
    ours = {k: list(v.shape) for k, v in official_state_dict(G).items()}
    want = ref["state_dict_shapes"]
    assert sorted(set(ours) - set(want)) == [] and sorted(set(want) - set(ours)) == []
    assert {k: ours[k] for k in want} == want
    if name == "coco":
        assert sum(p.numel() for p in G.parameters() if p.requires_grad) == 97_480_899


def test_reference_builder_rules_match_released_keys(reference: dict) -> None:
    """The test oracle's own key/shape rules agree with the released COCO and Cityscapes files."""
    for name in ("coco", "cityscapes"):
        c = reference[name]["config"]
        rules = official_shapes(c["semantic_nc"], c["ngf"], c["num_upsampling_layers"], c["crop_size"],
                                c["aspect_ratio"], c["use_vae"], c["z_dim"])
        assert rules == reference[name]["state_dict_shapes"]


def test_coco_generator_from_config_matches_official_count() -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "coco_stuff.yaml")
    with torch.device("meta"):
        G = build_generator(cfg, init=False)
    assert cfg.data.label_layout.semantic_nc == 184
    assert sum(p.numel() for p in G.parameters() if p.requires_grad) == 97_480_899


# --------------------------------------------------------------------------------------------
# Eval-mode output parity with the independent functional implementation
# --------------------------------------------------------------------------------------------

LABEL_NC = 5  # + dontcare + instance edge = 7 semantic channels

VARIANTS = [
    # mode, crop, aspect, use_vae
    pytest.param("normal", 64, 1.0, False, id="normal"),
    pytest.param("more", 128, 2.0, False, id="more-aspect2"),
    pytest.param("most", 128, 1.0, True, id="most-vae"),
]


@pytest.mark.parametrize("mode,crop,aspect,use_vae", VARIANTS)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference-path"])
def test_loaded_official_generator_reproduces_official_eval_output(mode, crop, aspect, use_vae, fused) -> None:
    ngf, z_dim = 8, 16
    semantic_nc = LABEL_NC + 2
    shapes = official_shapes(semantic_nc, ngf, mode, crop, aspect, use_vae, z_dim)
    sd = random_official_state_dict(shapes, seed=1)
    G = load_official_generator(sd, label_nc=LABEL_NC, contain_dontcare_label=True, no_instance=False, ngf=ngf,
                                crop_size=crop, aspect_ratio=aspect, num_upsampling_layers=mode, use_vae=use_vae,
                                z_dim=z_dim, speed=SpeedConfig(fused_modulation=fused))
    G.eval()
    h, w = round(crop / aspect), crop
    seg = _semantics(2, LABEL_NC, 2, h, w)
    z = torch.randn(2, z_dim, generator=torch.Generator().manual_seed(3)) if use_vae else None
    with torch.no_grad():
        ours = G(seg, z=z)
        ref = official_forward(sd, seg, ngf, mode, crop, aspect, use_vae, z)
    assert ours.shape == (2, 3, h, w)
    # The comparison must be meaningful: outputs spread out, not saturated by tanh.
    assert ref.std() > 0.05 and (ref.abs() < 0.98).float().mean() > 0.5
    assert (ours - ref).abs().max().item() <= 1e-5
    # Eval used the stored u/v: nothing was updated by the forward.
    sd_after = G.state_dict()
    assert torch.equal(sd_after["head_0.conv_0.weight_u"], sd["head_0.conv_0.weight_u"])


def test_spectral_norm_uses_stored_u_v_not_a_fresh_estimate() -> None:
    """Changing only the stored u/v changes the output: they are really read (guards the oracle too)."""
    semantic_nc, ngf = LABEL_NC + 2, 8
    shapes = official_shapes(semantic_nc, ngf, "normal", 64)
    sd = random_official_state_dict(shapes, seed=2)
    seg = _semantics(1, LABEL_NC, 2, 64, 64)
    G = load_official_generator(sd, label_nc=LABEL_NC, ngf=ngf, crop_size=64)
    sd2 = dict(sd)
    sd2["head_0.conv_0.weight_u"] = F.normalize(sd["head_0.conv_0.weight_u"] + 0.5, dim=0)
    G2 = load_official_generator(sd2, label_nc=LABEL_NC, ngf=ngf, crop_size=64)
    with torch.no_grad():
        a, b = G(seg), G2(seg)
        b_ref = official_forward(sd2, seg, ngf, "normal", 64)
    assert (a - b).abs().max() > 1e-3
    assert (b - b_ref).abs().max() <= 1e-5


def test_official_state_dict_round_trips(tmp_path: Path) -> None:
    semantic_nc, ngf = LABEL_NC + 2, 8
    sd = random_official_state_dict(official_shapes(semantic_nc, ngf, "normal", 64), seed=4)
    G = load_official_generator(sd, label_nc=LABEL_NC, ngf=ngf, crop_size=64)
    out = official_state_dict(G)
    assert set(out) == set(sd)
    assert all(torch.equal(out[k], sd[k]) for k in sd)
    # Through a file, with a DDP-style "module." prefix, loaded with weights_only.
    path = tmp_path / "latest_net_G.pth"
    torch.save({f"module.{k}": v for k, v in out.items()}, path)
    G2 = load_official_generator(path, label_nc=LABEL_NC, ngf=ngf, crop_size=64)
    save_official_generator(G2, tmp_path / "again.pth")
    again = torch.load(tmp_path / "again.pth", weights_only=True)
    assert all(torch.equal(again[k], sd[k]) for k in sd)


# --------------------------------------------------------------------------------------------
# Mismatch diagnosis
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_coco_like_sd() -> dict:
    """A coco-shaped (184 semantic channels) official state dict at ngf 4."""
    return random_official_state_dict(official_shapes(184, 4, "normal", 64), seed=5)


def test_mismatch_names_label_nc(tiny_coco_like_sd: dict) -> None:
    with pytest.raises(CheckpointMismatchError) as info:
        load_official_generator(tiny_coco_like_sd, label_nc=150, ngf=4, crop_size=64)
    msg = str(info.value)
    assert "fc.weight" in msg and "head_0.norm_0.mlp_shared.0.weight" in msg
    assert "label_nc" in msg and "182" in msg  # the label_nc that would fit
    assert info.value.shape_mismatch and not info.value.missing


def test_mismatch_by_one_channel_points_at_dontcare_or_instance(tiny_coco_like_sd: dict) -> None:
    with pytest.raises(CheckpointMismatchError) as info:
        load_official_generator(tiny_coco_like_sd, label_nc=182, no_instance=True, ngf=4, crop_size=64)
    assert "no_instance" in str(info.value) and "contain_dontcare_label" in str(info.value)


def test_mismatch_names_ngf(tiny_coco_like_sd: dict) -> None:
    with pytest.raises(CheckpointMismatchError, match=r"ngf=4"):
        load_official_generator(tiny_coco_like_sd, ngf=8, crop_size=64)


def test_mismatch_names_num_upsampling_layers(tiny_coco_like_sd: dict) -> None:
    with pytest.raises(CheckpointMismatchError) as info:
        load_official_generator(tiny_coco_like_sd, ngf=4, crop_size=128, num_upsampling_layers="most")
    assert "up_4" in str(info.value) and "num_upsampling_layers" in str(info.value)
    assert any(k.startswith("up_4.") for k in info.value.missing)
    most = random_official_state_dict(official_shapes(184, 4, "most", 128), seed=6)
    with pytest.raises(CheckpointMismatchError, match=r"'most'"):
        load_official_generator(most, ngf=4, crop_size=128)


def test_mismatch_names_use_vae(tiny_coco_like_sd: dict) -> None:
    with pytest.raises(CheckpointMismatchError, match=r"use_vae=False"):
        load_official_generator(tiny_coco_like_sd, ngf=4, crop_size=64, use_vae=True)


def test_bad_checkpoint_path_and_content(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_official_generator(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        load_official_generator(bad)


# --------------------------------------------------------------------------------------------
# Project file and the spade-convert CLI
# --------------------------------------------------------------------------------------------

# On top of configs/tiny.yaml (--preset tiny): 5 classes + don't care + instance edges, 64 px.
OPTIONS = ["model.ngf=4", "data.crop_size=64", "data.load_size=64", "data.label_nc=5",
           "data.contain_dontcare_label=true", "data.no_instance=false", "model.init_type=normal"]


def test_generator_file_round_trip_and_config_check(tmp_path: Path) -> None:
    cfg = tiny_config(*OPTIONS)
    G = build_generator(cfg)
    path = tmp_path / "g.pt"
    save_generator_file(G, cfg, path)
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "spade-dist-generator" and payload["version"] == 1
    G2, cfg2 = load_generator_file(path)
    assert cfg2 == cfg
    seg = _semantics(1, 5, 2, 64, 64)
    G.eval()
    with torch.no_grad():
        assert torch.equal(G(seg), G2(seg))
    other = tiny_config(*OPTIONS, "model.ngf=8")
    with pytest.raises(ValueError, match="ngf"):
        save_generator_file(G, other, tmp_path / "h.pt")


def test_spade_convert_cli_round_trip(tmp_path: Path, capsys) -> None:
    cfg = tiny_config(*OPTIONS)
    G = build_generator(cfg).eval()
    ours = tmp_path / "ours.pt"
    save_generator_file(G, cfg, ours)
    official = tmp_path / "latest_net_G.pth"
    assert convert_main(["to-official", "--checkpoint", str(ours), "--out", str(official)]) == 0
    back = tmp_path / "back.pt"
    argv = ["from-official", "--checkpoint", str(official), "--out", str(back), "--preset", "tiny", *OPTIONS]
    assert convert_main(argv) == 0
    G2, _ = load_generator_file(back)
    seg = _semantics(1, 5, 2, 64, 64)
    with torch.no_grad():
        assert torch.equal(G(seg), G2(seg))
    # A wrong preset fails with the diagnosis, not a traceback (overrides also via the --set alias).
    bad = ["from-official", "--checkpoint", str(official), "--out", str(tmp_path / "x.pt"), "--preset", "coco_stuff",
           "--set", "model.ngf=4", "--set", "data.crop_size=64", "--set", "data.load_size=64"]
    assert convert_main(bad) == 2
    assert "label_nc" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_pix2pixhd_generator_file_round_trip_and_no_official_format(tmp_path: Path) -> None:
    cfg = tiny_config(*OPTIONS, "model.netG=pix2pixhd", "model.resnet_n_downsample=2", "model.resnet_n_blocks=1")
    G = build_generator(cfg).eval()
    save_generator_file(G, cfg, tmp_path / "p.pt")
    G2, _ = load_generator_file(tmp_path / "p.pt")
    seg = _semantics(1, 5, 2, 32, 32)
    with torch.no_grad():
        assert torch.equal(G(seg), G2(seg))
    with pytest.raises(TypeError, match="Pix2PixHDGenerator"):
        official_state_dict(G2)
    assert convert_main(["to-official", "--checkpoint", str(tmp_path / "p.pt"), "--out", str(tmp_path / "o.pth")]) == 2


def test_project_file_loader_rejects_other_files(tmp_path: Path) -> None:
    torch.save({"format": "something-else"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a spade-dist generator file"):
        load_generator_file(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_generator_file(tmp_path / "missing.pt")
