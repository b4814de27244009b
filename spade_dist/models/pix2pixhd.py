"""pix2pixHD global generator (``netG: pix2pixhd``), the baseline the paper compares against.

Official ``Pix2PixHDGenerator`` layout: reflection pad + 7x7 conv, ``n_downsample`` stride-2 convs,
``n_blocks`` ResnetBlocks, as many stride-2 transposed convs back up, reflection pad + 7x7 conv to
3 channels, tanh. Every conv except the last is wrapped by the non-SPADE norm (default
``spectralinstance``: spectral norm + affine-free instance norm, conv bias dropped). The official
option default is ``instance``, but its norm helper only binds the sub-norm under the ``spectral``
prefix, so official runs of this generator use ``spectralinstance``; that is our default.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from torch import Tensor, nn

from spade_dist.models.blocks import ResnetBlock
from spade_dist.models.norms import make_nonspade_norm_layer

if TYPE_CHECKING:
    from spade_dist.config import Config


class Pix2PixHDGenerator(nn.Module):
    """``G(semantics, z=None) -> image`` in [-1, 1]; ``z`` is accepted for interface parity and ignored."""

    def __init__(
        self,
        semantic_nc: int,
        ngf: int = 64,
        n_downsample: int = 4,
        n_blocks: int = 9,
        kernel_size: int = 3,
        initial_kernel_size: int = 7,
        norm: str = "spectralinstance",
        output_nc: int = 3,
    ) -> None:
        super().__init__()
        self.semantic_nc = semantic_nc
        norm_layer = make_nonspade_norm_layer(norm)
        activation = nn.ReLU(False)
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(initial_kernel_size // 2),
            norm_layer(nn.Conv2d(semantic_nc, ngf, kernel_size=initial_kernel_size, padding=0)),
            activation,
        ]
        mult = 1
        for _ in range(n_downsample):
            layers += [norm_layer(nn.Conv2d(ngf * mult, ngf * mult * 2, kernel_size=3, stride=2, padding=1)), activation]
            mult *= 2
        for _ in range(n_blocks):
            layers.append(ResnetBlock(ngf * mult, norm_layer=norm_layer, activation=activation, kernel_size=kernel_size))
        for _ in range(n_downsample):
            layers += [
                norm_layer(nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, kernel_size=3, stride=2, padding=1, output_padding=1)),
                activation,
            ]
            mult //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf * mult, output_nc, kernel_size=7, padding=0), nn.Tanh()]
        self.model = nn.Sequential(*layers)
        self._build_kwargs = {
            "semantic_nc": semantic_nc, "ngf": ngf, "n_downsample": n_downsample, "n_blocks": n_blocks,
            "kernel_size": kernel_size, "initial_kernel_size": initial_kernel_size, "norm": norm,
            "output_nc": output_nc,
        }

    @classmethod
    def from_config(cls, cfg: "Config") -> "Pix2PixHDGenerator":
        m = cfg.model
        return cls(
            semantic_nc=cfg.data.label_layout.semantic_nc,
            ngf=m.ngf,
            n_downsample=m.resnet_n_downsample,
            n_blocks=m.resnet_n_blocks,
            kernel_size=m.resnet_kernel_size,
            initial_kernel_size=m.resnet_initial_kernel_size,
            norm=m.pix2pixhd_norm_G,
        )

    def build_kwargs(self) -> dict:
        return dict(self._build_kwargs)

    def forward(self, semantics: Tensor, z: Optional[Tensor] = None) -> Tensor:
        if semantics.dim() != 4 or semantics.shape[1] != self.semantic_nc:
            raise ValueError(
                f"pix2pixHD generator expects N x {self.semantic_nc} x H x W semantics, got {tuple(semantics.shape)}"
            )
        return self.model(semantics)
