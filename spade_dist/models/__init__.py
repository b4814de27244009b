"""GauGAN / SPADE networks. See docs/MODELS.md for the layout and the official-compatibility rules."""
from spade_dist.models.blocks import ResnetBlock, SPADEResnetBlock
from spade_dist.models.discriminator import MultiscaleDiscriminator, NLayerDiscriminator
from spade_dist.models.encoder import ConvEncoder, reparameterize
from spade_dist.models.factory import build_discriminator, build_encoder, build_generator
from spade_dist.models.generator import SPADEGenerator
from spade_dist.models.init import init_weights
from spade_dist.models.pix2pixhd import Pix2PixHDGenerator
from spade_dist.models.spade import SPADE

__all__ = [
    "SPADE", "SPADEResnetBlock", "ResnetBlock", "SPADEGenerator", "Pix2PixHDGenerator",
    "ConvEncoder", "reparameterize", "MultiscaleDiscriminator", "NLayerDiscriminator", "init_weights",
    "build_generator", "build_discriminator", "build_encoder",
]
