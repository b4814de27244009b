"""Tiny official-format checkpoints shared by the spade-generate and spade-serve tests."""
from __future__ import annotations

from pathlib import Path

import torch

from spade_dist.models import build_encoder, build_generator
from spade_dist.models.compat import save_official_generator
from tests.kit import tiny_config

# On top of configs/tiny.yaml (--preset tiny). The official encoder layout needs crop_size 256 (load
# 286 as the official custom_dataset.py). To keep the generator cheap on CPU: 4 classes and aspect
# ratio 4 (256 x 64 output).
OFFICIAL_VAE_OPTIONS = ["data.label_nc=4", "data.aspect_ratio=4.0", "data.load_size=286", "data.crop_size=256",
                        "model.use_vae=true", "model.z_dim=16"]


def write_official_vae(out: Path, seed: int) -> tuple[Path, Path]:
    """``out/G.pth`` + ``out/E.pth``: a VAE generator and its encoder in the official layout, built with
    configs/tiny.yaml + :data:`OFFICIAL_VAE_OPTIONS`."""
    cfg = tiny_config(*OFFICIAL_VAE_OPTIONS)
    torch.manual_seed(seed)
    save_official_generator(build_generator(cfg), out / "G.pth")
    torch.save(build_encoder(cfg).state_dict(), out / "E.pth")
    return out / "G.pth", out / "E.pth"
