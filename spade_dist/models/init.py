"""Official weight initialisation (``BaseNetwork.init_weights``: ``init_type`` / ``init_variance``).

Conv / ConvTranspose / Linear weights get the chosen init and zero bias; affine BatchNorm weights
get N(1, gain) and zero bias. A spectral-normalised layer is initialised through ``weight_orig``:
in the official code ``m.weight.data`` shares storage with ``weight_orig`` before the first
forward, so that is the tensor its init really changes.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import init

INIT_TYPES = ("xavier", "normal", "kaiming", "orthogonal", "xavier_uniform", "none")
_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def _weight_of(m: nn.Module) -> torch.Tensor | None:
    w = getattr(m, "weight_orig", None)
    if isinstance(w, torch.Tensor):
        return w
    w = m._parameters.get("weight")
    return w


@torch.no_grad()
def init_weights(module: nn.Module, init_type: str = "xavier", gain: float = 0.02) -> nn.Module:
    """Initialise ``module`` in place like the official code; returns it. Unknown type -> ValueError."""
    if init_type not in INIT_TYPES:
        raise ValueError(f"unknown init_type '{init_type}' (known: {', '.join(INIT_TYPES)})")
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.weight is not None:
                init.normal_(m.weight, 1.0, gain)
            if m.bias is not None:
                init.constant_(m.bias, 0.0)
        elif isinstance(m, _LAYER_TYPES):
            weight = _weight_of(m)
            if weight is None:
                continue
            if init_type == "normal":
                init.normal_(weight, 0.0, gain)
            elif init_type == "xavier":
                init.xavier_normal_(weight, gain=gain)
            elif init_type == "xavier_uniform":
                init.xavier_uniform_(weight, gain=1.0)
            elif init_type == "kaiming":
                init.kaiming_normal_(weight, a=0, mode="fan_in")
            elif init_type == "orthogonal":
                init.orthogonal_(weight, gain=gain)
            else:  # "none": PyTorch's own default init
                if hasattr(m, "weight_orig"):
                    # reset_parameters() would write into the derived `weight`; init weight_orig the same way
                    init.kaiming_uniform_(weight, a=5 ** 0.5)
                else:
                    m.reset_parameters()
            if m.bias is not None:
                init.constant_(m.bias, 0.0)
    return module
