"""The FID feature extractor: torch-fidelity's ``inception-v3-compat`` loaded from a local file.

Where the weights come from, in order: an explicit path (``eval.inception_weights``), the env var
``SPADE_INCEPTION_WEIGHTS``, then - only when the user opted in with ``allow_download`` - torch-fidelity's
own download. Anything else fails *at start* with a message saying how to provide the file, so a
watcher never runs for hours before discovering it cannot score anything.

Every number we record names the sha256 of the weights file that produced it (real weights and test
weights give incomparable FIDs).

Tests cannot ship the real 92 MB weights, and a randomly initialised Inception gives degenerate
features (its BatchNorm running stats are 0/1 while the activations are not, so deep features
saturate and FID is ~0 for any pair of sets). :func:`make_test_inception_weights` therefore
calibrates the BN running statistics on a few real images, layer by layer in one forward pass in
training mode, which makes the features informative enough for "shifted set -> larger FID".
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from spade_dist.files import atomic_output, sha256_file

INCEPTION_ENV = "SPADE_INCEPTION_WEIGHTS"
FEATURE_LAYER = "2048"  # torch-fidelity's layer for FID and KID
EXTRACTOR_NAME = "inception-v3-compat"
TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
FID_PROTOCOLS = ("torch-fidelity", "pytorch-fid")  # eval.fid_protocol
INPUT_SIZE = 299  # InceptionV3's input side


class InceptionWeightsError(FileNotFoundError):
    """The Inception weights cannot be found; the message says how to provide them."""


def resolve_inception_weights(configured: str = "", allow_download: bool = False) -> Optional[Path]:
    """Return the weights file to use, or None meaning "let torch-fidelity download" (opt-in only).

    Raises :class:`InceptionWeightsError` naming what was tried when nothing usable is found.
    """
    candidates: list[tuple[str, str]] = []
    if configured:
        candidates.append(("eval.inception_weights", configured))
    env_value = os.environ.get(INCEPTION_ENV, "")
    if env_value:
        candidates.append((INCEPTION_ENV, env_value))
    for source, value in candidates:
        path = Path(value).expanduser()
        if not path.is_file():
            raise InceptionWeightsError(
                f"Inception weights file from {source} does not exist: {path}. Provide torch-fidelity's "
                f"{TORCH_FIDELITY_FILE} (or a converted InceptionV3 state dict) at that path."
            )
        return path
    # torch-fidelity's own cache location, filled by an earlier online download.
    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_FILE
    if hub_file.is_file():
        return hub_file
    if allow_download:
        return None
    raise InceptionWeightsError(
        "No Inception weights for FID: set eval.inception_weights (config) or the environment variable "
        f"{INCEPTION_ENV} to a local copy of torch-fidelity's {TORCH_FIDELITY_FILE}, place it at {hub_file}, "
        "or set eval.allow_download: true to let torch-fidelity download it (needs network)."
    )


def weights_identity(path: Optional[Path]) -> str:
    """sha256 of the weights file; for a download, torch-fidelity's file name (its content is fixed)."""
    return sha256_file(path) if path is not None else f"torch-fidelity:{TORCH_FIDELITY_FILE}"


def pytorch_fid_input(images_uint8: torch.Tensor) -> torch.Tensor:
    """What pytorch-fid's InceptionV3 feeds its first block: the image as torchvision's ``ToTensor``
    gives it (uint8 / 255), resized to 299 x 299 with ``F.interpolate(mode="bilinear",
    align_corners=False)`` (no antialiasing), then scaled to [-1, 1] with ``2 x - 1``."""
    x = images_uint8.float().div(255)
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
    return 2 * x - 1


class PytorchFidProtocol(nn.Module):
    """torch-fidelity's FID Inception fed pytorch-fid's input (:func:`pytorch_fid_input`).

    Both packages port the same TF Inception graph (2015-12-05) and differ in the front end:
    torch-fidelity resizes like TF1 and normalises with (x - 128) / 128, pytorch-fid resizes with
    PyTorch's bilinear interpolation and normalises with 2 x / 255 - 1 (the protocol behind the SPADE
    paper's FIDs). torch-fidelity's ``forward`` accepts only uint8 and always runs its own front end,
    so a pre-hook on its first convolution replaces that front end's output with pytorch-fid's input:
    the same weights and layers, without a second copy of the network code.
    """

    def __init__(self, extractor: FeatureExtractorInceptionV3) -> None:
        super().__init__()
        self.extractor = extractor

    def forward(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = pytorch_fid_input(images_uint8)
        handle = self.extractor.Conv2d_1a_3x3.register_forward_pre_hook(lambda _module, _args: (x,))
        try:
            # Only its shape matters: torch-fidelity's front end runs on it (already 299 px, so no
            # resize work) and the hook then discards that output for x.
            front_end_input = torch.zeros((x.shape[0], 3, INPUT_SIZE, INPUT_SIZE), dtype=torch.uint8, device=x.device)
            return self.extractor(front_end_input)
        finally:
            handle.remove()


def build_inception(weights_path: Optional[Path], device: Union[str, torch.device] = "cpu",
                    protocol: str = "torch-fidelity") -> nn.Module:
    """The FID Inception returning the 2048-d pool features; uint8 N x 3 x H x W in, float32 out.

    ``protocol`` (``eval.fid_protocol``) chooses the resize to 299 and the input scaling:
    ``torch-fidelity`` (TF1-style) or ``pytorch-fid`` (:class:`PytorchFidProtocol`).
    """
    if protocol not in FID_PROTOCOLS:
        raise ValueError(f"unknown FID protocol {protocol!r} (known: {', '.join(FID_PROTOCOLS)})")
    extractor = FeatureExtractorInceptionV3(
        EXTRACTOR_NAME, [FEATURE_LAYER],
        feature_extractor_weights_path=str(weights_path) if weights_path is not None else None,
    )
    net: nn.Module = PytorchFidProtocol(extractor) if protocol == "pytorch-fid" else extractor
    return net.to(device).eval()


@torch.no_grad()
def extract_features(extractor: nn.Module, images_uint8: torch.Tensor) -> torch.Tensor:
    """Features (N x 2048, float32, on CPU) of uint8 images N x 3 x H x W (any size: resized to 299)."""
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or images_uint8.shape[1] != 3:
        raise ValueError(f"expected uint8 N x 3 x H x W images, got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    device = next(extractor.parameters()).device
    (features,) = extractor(images_uint8.to(device))
    return features.float().cpu()


class _UnloadedInception(FeatureExtractorInceptionV3):
    """The same architecture, left at PyTorch's default random init (for building test weights)."""

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # noqa: D401
        if state_dict:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        return None  # empty dict: keep the random init


def make_test_inception_weights(path: Union[str, Path], images_uint8: Union[torch.Tensor, Iterable[torch.Tensor]],
                                seed: int = 0) -> Path:
    """Write an InceptionV3 state dict for tests: random init + BN running stats calibrated on ``images``.

    ``images_uint8``: uint8 N x 3 x H x W (or an iterable of such batches; each batch is used for one
    calibration pass and the running statistics are averaged over all passes). A handful of real
    photos is enough. Different seeds give different weights (and a different sha256).
    """
    path = Path(path)
    batches = [images_uint8] if torch.is_tensor(images_uint8) else list(images_uint8)
    if not batches or any(b.dtype != torch.uint8 or b.dim() != 4 or b.shape[0] < 2 for b in batches):
        raise ValueError("make_test_inception_weights needs uint8 N x 3 x H x W batches with N >= 2")
    with tempfile.TemporaryDirectory() as tmp:
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _UnloadedInception(EXTRACTOR_NAME, [FEATURE_LAYER], feature_extractor_weights_path=str(empty))
    # Calibrate: BN layers in training mode with a cumulative average (momentum None), all else eval.
    bn_layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bn_layers:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for bn in bn_layers:
        bn.momentum = 0.1
        bn.eval()
    with atomic_output(path) as handle:
        torch.save(model.state_dict(), handle)
    return path
