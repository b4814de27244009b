"""Norm strings of the official options (``norm_G``, ``norm_D`` ...) parsed without torch.

Config validation checks these strings where they are parsed; it must not import the model
modules (that would import torch whenever a YAML is loaded), so the parsers live here and
``spade_dist.models.norms`` builds the layers from their result.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

PARAM_FREE_NORMS = ("instance", "batch", "syncbatch")
_SPADE_NORM_RE = re.compile(r"^(?P<spectral>spectral)?spade(?P<kind>[a-z]+?)(?P<k>\d+)x(?P<k2>\d+)$")


@dataclass(frozen=True)
class SpadeNormSpec:
    spectral: bool  # spectral norm on the residual block's convolutions
    param_free: str  # instance | batch | syncbatch
    kernel_size: int  # kernel of the SPADE modulation convolutions

    @property
    def spade_config_str(self) -> str:
        """The string the official SPADE layer receives (block norm minus 'spectral')."""
        return f"spade{self.param_free}{self.kernel_size}x{self.kernel_size}"


def parse_spade_norm(norm_G: str) -> SpadeNormSpec:
    """Parse ``norm_G``; an unknown string or norm type raises ValueError naming it."""
    m = _SPADE_NORM_RE.match(norm_G)
    if not m:
        raise ValueError(
            f"unknown SPADE norm string '{norm_G}': expected [spectral]spade{{instance|batch|syncbatch}}KxK, "
            "e.g. 'spectralspadesyncbatch3x3'"
        )
    kind = m.group("kind")
    if kind not in PARAM_FREE_NORMS:
        raise ValueError(
            f"unknown param-free norm type '{kind}' in SPADE norm string '{norm_G}' "
            f"(known: {', '.join(PARAM_FREE_NORMS)})"
        )
    k, k2 = int(m.group("k")), int(m.group("k2"))
    if k != k2 or k % 2 == 0:
        raise ValueError(f"SPADE norm string '{norm_G}': kernel must be square and odd, got {k}x{k2}")
    return SpadeNormSpec(spectral=bool(m.group("spectral")), param_free=kind, kernel_size=k)


NONSPADE_NORMS = ("instance", "batch", "syncbatch", "none")
_SPECTRAL = "spectral"


def parse_nonspade_norm(norm_type: str) -> tuple[bool, str]:
    """``'spectralinstance'`` -> ``(True, 'instance')``; unknown names raise ValueError naming them.

    The official ``sync_batch`` spelling is accepted as an alias of ``syncbatch``; an empty rest
    after ``spectral`` means "spectral norm only" as in the official code.
    """
    spectral = norm_type.startswith(_SPECTRAL)
    sub = norm_type[len(_SPECTRAL):] if spectral else norm_type
    if sub == "sync_batch":
        sub = "syncbatch"
    if sub == "":
        sub = "none"
    if sub not in NONSPADE_NORMS:
        raise ValueError(
            f"unknown norm type '{norm_type}': expected [spectral]{{{'|'.join(NONSPADE_NORMS)}}}, "
            "e.g. 'spectralinstance'"
        )
    return spectral, sub
