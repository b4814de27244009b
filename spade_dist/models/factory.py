"""Build the networks from a :class:`~spade_dist.config.Config`, with the official weight init.

``semantic_nc`` comes from ``cfg.data`` (label_nc + dontcare + instance); the discriminator sees
``semantic_nc + 3`` channels (label map and RGB image).
"""
from __future__ import annotations

from torch import nn

from spade_dist.config import Config
from spade_dist.models.discriminator import MultiscaleDiscriminator
from spade_dist.models.encoder import ConvEncoder
from spade_dist.models.generator import SPADEGenerator
from spade_dist.models.init import init_weights
from spade_dist.models.pix2pixhd import Pix2PixHDGenerator


def build_generator(cfg: Config, init: bool = True) -> nn.Module:
    """SPADEGenerator (``netG: spade``) or Pix2PixHDGenerator (``netG: pix2pixhd``)."""
    if cfg.model.netG == "spade":
        net: nn.Module = SPADEGenerator.from_config(cfg)
    elif cfg.model.netG == "pix2pixhd":
        net = Pix2PixHDGenerator.from_config(cfg)
    else:
        raise ValueError(f"model.netG: unknown generator '{cfg.model.netG}' (known: spade, pix2pixhd)")
    return init_weights(net, cfg.model.init_type, cfg.model.init_variance) if init else net


def build_discriminator(cfg: Config, init: bool = True) -> MultiscaleDiscriminator:
    net = MultiscaleDiscriminator.from_config(cfg)
    return init_weights(net, cfg.model.init_type, cfg.model.init_variance) if init else net


def build_encoder(cfg: Config, init: bool = True) -> ConvEncoder:
    net = ConvEncoder.from_config(cfg)
    return init_weights(net, cfg.model.init_type, cfg.model.init_variance) if init else net
