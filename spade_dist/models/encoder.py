"""ConvEncoder for the VAE variant: image -> (mu, logvar), plus the reparameterisation trick.

Official layout: the input is resized (bilinear) to 256x256, then five (six when crop_size >= 256)
stride-2 3x3 convs with the non-SPADE norm ``norm_E`` (default spectralinstance) and leaky_relu 0.2,
flattened 4x4 features, and two Linear heads. As in the official code the width is ``ngf``
(the official ``--nef`` option exists but is unused); the heads output ``z_dim`` (the official code
hard-codes 256, the default z_dim).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spade_dist.models.norms import make_nonspade_norm_layer

if TYPE_CHECKING:
    from spade_dist.config import Config

ENCODER_INPUT_SIZE = 256
_FINAL_SPATIAL = 4


class ConvEncoder(nn.Module):
    def __init__(self, ndf: int = 64, crop_size: int = 256, norm_E: str = "spectralinstance", z_dim: int = 256) -> None:
        super().__init__()
        norm_layer = make_nonspade_norm_layer(norm_E)
        self.crop_size = crop_size
        widths = [3, ndf, ndf * 2, ndf * 4, ndf * 8, ndf * 8]
        for i in range(5):
            self.add_module(f"layer{i + 1}", norm_layer(nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1)))
        # Six stride-2 layers take 256 -> 4; the official code uses five below crop 256 and then
        # still expects 4x4, i.e. it only works at 256 input; we keep the same rule.
        self.has_layer6 = crop_size >= 256
        if self.has_layer6:
            self.layer6 = norm_layer(nn.Conv2d(ndf * 8, ndf * 8, 3, stride=2, padding=1))
        flat = ndf * 8 * _FINAL_SPATIAL * _FINAL_SPATIAL
        self.fc_mu = nn.Linear(flat, z_dim)
        self.fc_var = nn.Linear(flat, z_dim)

    @classmethod
    def from_config(cls, cfg: "Config") -> "ConvEncoder":
        return cls(ndf=cfg.model.ngf, crop_size=cfg.data.crop_size, norm_E=cfg.model.norm_E, z_dim=cfg.model.z_dim)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"encoder expects N x 3 x H x W images, got {tuple(image.shape)}")
        x = image
        if x.shape[2] != ENCODER_INPUT_SIZE or x.shape[3] != ENCODER_INPUT_SIZE:
            x = F.interpolate(x, size=(ENCODER_INPUT_SIZE, ENCODER_INPUT_SIZE), mode="bilinear", align_corners=False)
        layers = [self.layer1, self.layer2, self.layer3, self.layer4, self.layer5]
        if self.has_layer6:
            layers.append(self.layer6)
        x = layers[0](x)
        for layer in layers[1:]:
            x = layer(F.leaky_relu(x, 0.2))
        x = F.leaky_relu(x, 0.2)
        x = x.reshape(x.shape[0], -1)
        if x.shape[1] != self.fc_mu.in_features:
            raise ValueError(
                f"encoder features flatten to {x.shape[1]} values, heads expect {self.fc_mu.in_features}: "
                f"crop_size {self.crop_size} < 256 is not supported by the official encoder layout"
            )
        return self.fc_mu(x), self.fc_var(x)


def reparameterize(mu: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """z = mu + eps * exp(logvar / 2), eps ~ N(0, 1): differentiable in mu and logvar."""
    std = torch.exp(0.5 * logvar)
    eps = torch.randn(std.shape, dtype=std.dtype, device=std.device, generator=generator)
    return eps * std + mu
