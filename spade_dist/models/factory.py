"""Build the networks from a :class:`~spade_dist.config.Config`, with the official weight init.

``semantic_nc`` comes from ``cfg.data`` (label_nc + dontcare + instance); the discriminator sees
``semantic_nc + 3`` channels (label map and RGB image).
"""
from __future__ import annotations

from typing import TypeVar

from torch import nn

from spade_dist.config import Config
from spade_dist.models.discriminator import MultiscaleDiscriminator
from spade_dist.models.encoder import ConvEncoder
from spade_dist.models.generator import SPADEGenerator
from spade_dist.models.init import init_weights
from spade_dist.models.pix2pixhd import Pix2PixHDGenerator
from spade_dist.models.spectral_norm import use_fast_spectral_norm

NetT = TypeVar("NetT", bound=nn.Module)


def build_generator(cfg: Config, init: bool = True) -> nn.Module:
    """SPADEGenerator (``netG: spade``) or Pix2PixHDGenerator (``netG: pix2pixhd``)."""
    if cfg.model.netG == "spade":
        net: nn.Module = SPADEGenerator.from_config(cfg)
    elif cfg.model.netG == "pix2pixhd":
        net = Pix2PixHDGenerator.from_config(cfg)
    else:
        raise ValueError(f"model.netG: unknown generator '{cfg.model.netG}' (known: spade, pix2pixhd)")
    return _finish(net, cfg, init)


def build_discriminator(cfg: Config, init: bool = True) -> MultiscaleDiscriminator:
    return _finish(MultiscaleDiscriminator.from_config(cfg), cfg, init)


def build_encoder(cfg: Config, init: bool = True) -> ConvEncoder:
    return _finish(ConvEncoder.from_config(cfg), cfg, init)


def _finish(net: NetT, cfg: Config, init: bool) -> NetT:
    """The official weight init (unless ``init`` is false, e.g. before loading weights) and the
    spectral-norm backward the config asks for (``model.fast_spectral_norm``)."""
    if cfg.model.fast_spectral_norm:
        use_fast_spectral_norm(net)
    if init:
        init_weights(net, cfg.model.init_type, cfg.model.init_variance)
    return net
