"""SPADEGenerator (GauGAN), laid out key-for-key like the official generator.

Resolution plan: the first feature map is ``(sh, sw) = (round(sw / aspect_ratio), crop // 2**k)``
with k = 5 / 6 / 7 for ``num_upsampling_layers`` normal / more / most; every ``up`` is a nearest
x2 upsampling. Without the VAE the network starts deterministically from the label map resized
(nearest) to (sh, sw) through a 3x3 conv ``fc``; with the VAE ``fc`` is a Linear from z.

How the SPADE layers compute their modulation is the generator's :class:`ModulationPlan`
(``models/fast/seam.py``; None = the official layers): a speed setting, not part of the
architecture (not in ``build_kwargs``, not in the state dict); so is ``activation_checkpointing``
(``speed.activation_checkpointing``: ``generator`` recomputes the residual blocks at >= 1/8 of the
output resolution in the backward instead of keeping their activations, ``generator_spade`` also
each SPADE layer inside the full-resolution block, ``all`` every block, with those SPADE layers;
the same results, ``models/fast/checkpointing.py``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spade_dist.models.blocks import LEAKY_SLOPE, SPADEResnetBlock
from spade_dist.models.fast.seam import LabelMaps, ModulationPlan, SegmapInput, in_place, run_checkpointed
from spade_dist.models.spade import resize_nearest

if TYPE_CHECKING:
    from spade_dist.config import Config

UPSAMPLING_LAYERS = {"normal": 5, "more": 6, "most": 7}
ACTIVATION_CHECKPOINTING = ("off", "generator", "generator_spade", "all")  # speed.activation_checkpointing
# generator / generator_spade recompute the residual blocks whose input is at least 1/8 of the
# output's width (all: every block). A block's activation bytes scale with its pixels times its
# channels: from one resolution to the next the pixels quadruple and the channels halve, so the
# blocks below 1/8 (head_0 and the middle blocks, 1024 channels at ngf 64) hold a few percent of the
# bytes but, with their wide convolutions, a large share of the generator's forward FLOPs, which a
# recomputation would repeat (docs/PERFORMANCE.md section 7 has the measurements).
RECOMPUTED_FROM_FRACTION = 8


def latent_size(crop_size: int, aspect_ratio: float, num_upsampling_layers: str) -> tuple[int, int]:
    """(sh, sw) of the first feature map, as the official ``compute_latent_vector_size``."""
    if num_upsampling_layers not in UPSAMPLING_LAYERS:
        raise ValueError(
            f"num_upsampling_layers '{num_upsampling_layers}' not recognised (known: {', '.join(UPSAMPLING_LAYERS)})"
        )
    sw = crop_size // (2 ** UPSAMPLING_LAYERS[num_upsampling_layers])
    sh = round(sw / aspect_ratio)
    if sw < 1 or sh < 1:
        raise ValueError(
            f"crop_size {crop_size} with aspect_ratio {aspect_ratio} and num_upsampling_layers "
            f"'{num_upsampling_layers}' gives an empty latent map ({sh}x{sw}); use a larger crop_size"
        )
    return sh, sw


class SPADEGenerator(nn.Module):
    """``G(semantics, z=None) -> image`` in [-1, 1], N x 3 x H x W."""

    def __init__(
        self,
        semantic_nc: int,
        ngf: int = 64,
        crop_size: int = 256,
        aspect_ratio: float = 1.0,
        num_upsampling_layers: str = "normal",
        use_vae: bool = False,
        z_dim: int = 256,
        norm_G: str = "spectralspadesyncbatch3x3",
        modulation: Optional[ModulationPlan] = None,
        activation_checkpointing: str = "off",
    ) -> None:
        super().__init__()
        self.semantic_nc = semantic_nc
        self.ngf = ngf
        self.crop_size = crop_size
        self.aspect_ratio = aspect_ratio
        self.num_upsampling_layers = num_upsampling_layers
        self.use_vae = use_vae
        self.z_dim = z_dim
        self.norm_G = norm_G
        if activation_checkpointing not in ACTIVATION_CHECKPOINTING:
            raise ValueError(f"activation_checkpointing '{activation_checkpointing}' not recognised "
                             f"(known: {', '.join(ACTIVATION_CHECKPOINTING)})")
        self.activation_checkpointing = activation_checkpointing
        self.use_modulation(modulation)
        self.sh, self.sw = latent_size(crop_size, aspect_ratio, num_upsampling_layers)
        self.output_width = self.sw * 2 ** UPSAMPLING_LAYERS[num_upsampling_layers]
        nf = ngf

        def block(fin: int, fout: int) -> SPADEResnetBlock:
            return SPADEResnetBlock(fin, fout, norm_G, semantic_nc)

        if use_vae:
            self.fc: nn.Module = nn.Linear(z_dim, 16 * nf * self.sh * self.sw)
        else:
            self.fc = nn.Conv2d(semantic_nc, 16 * nf, kernel_size=3, padding=1)
        self.head_0 = block(16 * nf, 16 * nf)
        self.G_middle_0 = block(16 * nf, 16 * nf)
        self.G_middle_1 = block(16 * nf, 16 * nf)
        self.up_0 = block(16 * nf, 8 * nf)
        self.up_1 = block(8 * nf, 4 * nf)
        self.up_2 = block(4 * nf, 2 * nf)
        self.up_3 = block(2 * nf, 1 * nf)
        final_nc = nf
        if num_upsampling_layers == "most":
            self.up_4 = block(1 * nf, nf // 2)
            final_nc = nf // 2
        self.conv_img = nn.Conv2d(final_nc, 3, kernel_size=3, padding=1)

    @classmethod
    def from_config(cls, cfg: "Config", modulation: Optional[ModulationPlan] = None) -> "SPADEGenerator":
        m, d = cfg.model, cfg.data
        return cls(
            semantic_nc=d.label_layout.semantic_nc,
            ngf=m.ngf,
            crop_size=d.crop_size,
            aspect_ratio=d.aspect_ratio,
            num_upsampling_layers=m.num_upsampling_layers,
            use_vae=m.use_vae,
            z_dim=m.z_dim,
            norm_G=m.norm_G,
            modulation=modulation,
            activation_checkpointing=cfg.speed.activation_checkpointing,
        )

    @property
    def modulation(self) -> Optional[ModulationPlan]:
        """The SPADE layers' modulation plan (None: the official layers)."""
        return self._modulation

    def use_modulation(self, plan: Optional[ModulationPlan]) -> None:
        """Run the SPADE layers by ``plan`` from the next forward on (plans are immutable: a new
        choice is a new plan)."""
        if plan is not None and plan.onehot_channels > self.semantic_nc:
            raise ValueError(f"modulation plan: {plan.onehot_channels} one-hot channels exceed "
                             f"semantic_nc={self.semantic_nc}")
        self._modulation = plan

    def build_kwargs(self) -> dict:
        """The constructor arguments that rebuild this architecture (used by checkpoint files)."""
        return {
            "semantic_nc": self.semantic_nc, "ngf": self.ngf, "crop_size": self.crop_size,
            "aspect_ratio": self.aspect_ratio, "num_upsampling_layers": self.num_upsampling_layers,
            "use_vae": self.use_vae, "z_dim": self.z_dim, "norm_G": self.norm_G,
        }

    @staticmethod
    def _up(x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest")

    def forward(self, semantics: Tensor, z: Optional[Tensor] = None) -> Tensor:
        if semantics.dim() != 4 or semantics.shape[1] != self.semantic_nc:
            raise ValueError(
                f"generator expects semantics of shape N x {self.semantic_nc} x H x W "
                f"(semantic_nc = label_nc + dontcare + instance), got {tuple(semantics.shape)}"
            )
        seg: SegmapInput = semantics if self.modulation is None else self.modulation.label_maps(semantics)
        if self.use_vae:
            if z is None:
                z = torch.randn(semantics.shape[0], self.z_dim, dtype=semantics.dtype, device=semantics.device)
            elif z.shape != (semantics.shape[0], self.z_dim):
                raise ValueError(f"z must have shape ({semantics.shape[0]}, {self.z_dim}), got {tuple(z.shape)}")
            x = self.fc(z).view(-1, 16 * self.ngf, self.sh, self.sw)
        else:
            start = (seg.at((self.sh, self.sw)) if isinstance(seg, LabelMaps)
                     else resize_nearest(semantics, (self.sh, self.sw)))
            x = self.fc(start)

        # Recompute blocks in the backward instead of keeping their activations (only where a
        # backward will come: the D step's and the EMA copy's no-grad forwards run plainly): those at
        # >= 1/8 of the output width, with all every block. generator_spade / all nest the SPADE
        # layers of the full-resolution block (all: + the losses' nets, train/step.py): the G step's
        # peak is in that block's recomputation; a lower block's recomputation, after it, holds a
        # quarter of its pixels or less and stays below that peak without nesting.
        setting = self.activation_checkpointing
        checkpointed = setting != "off" and torch.is_grad_enabled()
        every_block = setting == "all"
        nested = setting in ("generator_spade", "all")

        def block(module: SPADEResnetBlock, x: Tensor) -> Tensor:
            width = x.shape[3]
            if not checkpointed or (not every_block and width * RECOMPUTED_FROM_FRACTION < self.output_width):
                return module(x, seg)
            return run_checkpointed(module, x, seg, spade_layers=nested and width >= self.output_width)

        x = block(self.head_0, x)
        x = self._up(x)
        x = block(self.G_middle_0, x)
        if self.num_upsampling_layers in ("more", "most"):
            x = self._up(x)
        x = block(self.G_middle_1, x)
        for name in ("up_0", "up_1", "up_2", "up_3") + (("up_4",) if self.num_upsampling_layers == "most" else ()):
            x = self._up(x)
            x = block(getattr(self, name), x)
        # The last block's output (a fresh sum) is read by nothing else: in place where the plan allows.
        x = self.conv_img(F.leaky_relu_(x, LEAKY_SLOPE) if in_place(seg) else F.leaky_relu(x, LEAKY_SLOPE))
        return torch.tanh(x)
