"""``spade-serve``: an interactive GauGAN canvas in the browser for any generator checkpoint (docs/SERVE.md)."""
from spade_dist.serve.model import ModelSpec
from spade_dist.serve.server import ServeError, ServeOptions, serve

__all__ = ["ModelSpec", "ServeError", "ServeOptions", "serve"]
