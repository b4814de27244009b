"""Every preset in configs/ builds its generator: output size and parameter count at the preset's full
size (on the meta device, no memory), plus a real forward of the 'most' preset at a small width."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spade_dist.config import load_config
from spade_dist.models.factory import build_generator
from spade_dist.resources import preset_names

# preset: (output height, width), num_upsampling_layers, generator parameters (docs/REPRODUCE.md table)
EXPECTED = {
    "coco_stuff": ((256, 256), "normal", 97_480_899),  # the released COCO generator: 97.48 M
    "ade20k": ((256, 256), "normal", 96_492_483),
    "cityscapes": ((256, 512), "more", 93_048_003),
    "custom": ((256, 256), "normal", 97_420_995),
    "coco_stuff_512": ((512, 512), "more", 97_480_899),
    "ade20k_512": ((512, 512), "more", 96_492_483),
    "cityscapes_1024x512": ((512, 1024), "most", 93_570_659),
    # Smoke tests and CI (the test kit's base): ngf 8, most of it the SPADE layers' 128-wide MLPs.
    "tiny": ((32, 32), "normal", 4_419_643),
}
# The data-dependent speed paths cannot run on meta tensors; the reference layout has the same parameters.
REFERENCE_LAYOUT = ["speed.fused_modulation=false", "speed.onehot_gather=false", "speed.region_modulation=false"]


def test_every_preset_file_is_listed(repo_root: Path) -> None:
    on_disk = {p.stem for p in (repo_root / "configs").glob("*.yaml")} - {"base", "quickstart"}
    assert on_disk == set(EXPECTED) == set(preset_names()) - {"quickstart"}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_preset_output_size_and_parameters(repo_root: Path, preset: str) -> None:
    size, upsampling, params = EXPECTED[preset]
    cfg = load_config(repo_root / "configs" / f"{preset}.yaml", REFERENCE_LAYOUT)
    assert cfg.model.num_upsampling_layers == upsampling
    assert (round(cfg.data.crop_size / cfg.data.aspect_ratio), cfg.data.crop_size) == size
    with torch.device("meta"):
        G = build_generator(cfg, init=False).eval()
        with torch.no_grad():
            out = G(torch.zeros(1, cfg.data.label_layout.semantic_nc, *size))
    assert tuple(out.shape) == (1, 3, *size)
    assert sum(p.numel() for p in G.parameters()) == params


def test_most_upsampling_runs_for_real(repo_root: Path) -> None:
    cfg = load_config(repo_root / "configs" / "cityscapes_1024x512.yaml", ["model.ngf=4", "data.crop_size=256"])
    G = build_generator(cfg).eval()
    assert hasattr(G, "up_4")
    label = torch.zeros(1, cfg.data.label_layout.semantic_nc, 128, 256)
    label[:, 3, :64] = 1
    label[:, 7, 64:] = 1
    with torch.no_grad():
        out = G(label)
    assert out.shape == (1, 3, 128, 256) and torch.isfinite(out).all()
