"""Tiny official-format checkpoints shared by the spade-generate and spade-serve tests."""
from __future__ import annotations

from pathlib import Path

import torch

from spade_dist.config import load_config
from spade_dist.models import build_encoder, build_generator
from spade_dist.models.compat import save_official_generator

# The official encoder layout needs crop_size 256. To keep the generator cheap on CPU: 4 classes
# (custom preset) and aspect ratio 4 (256 x 64 output).
OFFICIAL_VAE_OPTIONS = ["data.label_nc=4", "data.aspect_ratio=4.0", "model.ngf=8", "model.use_vae=true",
                        "model.z_dim=16"]


def write_official_vae(repo_root: Path, out: Path, seed: int) -> tuple[Path, Path]:
    """``out/G.pth`` + ``out/E.pth``: a VAE generator and its encoder in the official layout, built with
    configs/custom.yaml + :data:`OFFICIAL_VAE_OPTIONS`."""
    cfg = load_config(repo_root / "configs" / "custom.yaml", OFFICIAL_VAE_OPTIONS)
    torch.manual_seed(seed)
    save_official_generator(build_generator(cfg), out / "G.pth")
    torch.save(build_encoder(cfg).state_dict(), out / "E.pth")
    return out / "G.pth", out / "E.pth"
