"""Build the networks from a :class:`~spade_dist.config.Config`, with the official weight init.

The architecture comes from ``cfg.model`` and ``cfg.data.label_layout`` (the discriminator sees
``semantic_nc + 3`` channels: label map and RGB image); how the networks run from ``cfg.speed``
(``models/fast``): the generator's modulation plan, the discriminator's label input and the
spectral-norm backward.
"""
from __future__ import annotations

from typing import TypeVar

from torch import nn

from spade_dist.config import Config
from spade_dist.models.discriminator import MultiscaleDiscriminator
from spade_dist.models.encoder import ConvEncoder
from spade_dist.models.fast.seam import DiscriminatorLabels, ModulationPlan
from spade_dist.models.fast.spectral_norm import use_fast_spectral_norm
from spade_dist.models.generator import SPADEGenerator
from spade_dist.models.init import init_weights
from spade_dist.models.pix2pixhd import Pix2PixHDGenerator

NetT = TypeVar("NetT", bound=nn.Module)


def build_generator(cfg: Config, init: bool = True) -> nn.Module:
    """SPADEGenerator (``netG: spade``) or Pix2PixHDGenerator (``netG: pix2pixhd``)."""
    if cfg.model.netG == "spade":
        net: nn.Module = SPADEGenerator.from_config(cfg, ModulationPlan.from_config(cfg.speed, cfg.data.label_layout))
    elif cfg.model.netG == "pix2pixhd":
        net = Pix2PixHDGenerator.from_config(cfg)
    else:
        raise ValueError(f"model.netG: unknown generator '{cfg.model.netG}' (known: spade, pix2pixhd)")
    return _finish(net, cfg, init)


def build_discriminator(cfg: Config, init: bool = True) -> MultiscaleDiscriminator:
    label_input = DiscriminatorLabels.from_config(cfg.speed, cfg.data.label_layout)
    return _finish(MultiscaleDiscriminator.from_config(cfg, label_input), cfg, init)


def build_encoder(cfg: Config, init: bool = True) -> ConvEncoder:
    return _finish(ConvEncoder.from_config(cfg), cfg, init)


def _finish(net: NetT, cfg: Config, init: bool) -> NetT:
    """The official weight init (unless ``init`` is false, e.g. before loading weights) and the
    spectral-norm backward the config asks for (``speed.fast_spectral_norm``)."""
    if cfg.speed.fast_spectral_norm:
        use_fast_spectral_norm(net)
    if init:
        init_weights(net, cfg.model.init_type, cfg.model.init_variance)
    return net
