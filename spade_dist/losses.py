"""GauGAN losses with the official NVlabs/SPADE semantics (models/networks/loss.py, pix2pix_model.py).

- :class:`GANLoss` — ``hinge`` (default), ``ls``, ``original`` (BCE with logits), ``w`` (WGAN), for D
  and G. Accepts the multiscale discriminator output (a list with one list of features per scale):
  only the last element of each scale (the patch prediction) counts, averaged over scales.
- :func:`feature_matching_loss` — L1 between D's intermediate features of fake and real (real
  detached), every feature except the final prediction, ``lambda_feat / num_D`` per term.
- :class:`VGG19` / :class:`VGGLoss` — perceptual loss on relu1_1 .. relu5_1 with weights
  1/32, 1/16, 1/8, 1/4, 1. The network is torchvision's VGG19 ``features`` architecture; its weights
  come from a local file only (no download at run time, see :func:`resolve_vgg_weights`).
- :func:`kld_loss` — the VAE's KL divergence, summed (the caller multiplies by ``lambda_kld``).

Differences from the official code are deliberate and numerically neutral: losses are 0-d tensors
(the official multiscale path returns shape ``[1]``), and the VGG features of the target image are
computed under ``no_grad`` (the official code detaches them afterwards, so gradients are identical).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from spade_dist.config import GAN_MODES
from spade_dist.models.fast.seam import run_checkpointed
from spade_dist.weights_file import load_weights

if TYPE_CHECKING:
    from spade_dist.config import LossConfig

VGG_WEIGHTS_ENV = "SPADE_VGG19_WEIGHTS"
VGG_LAYER_WEIGHTS = (1.0 / 32, 1.0 / 16, 1.0 / 8, 1.0 / 4, 1.0)
# torchvision VGG19 `features` indices: slice k ends right after relu{k}_1 (layers [start, end)).
_VGG_SLICE_BOUNDS = ((0, 2), (2, 7), (7, 12), (12, 21), (21, 30))
_VGG_USED_LAYERS = 30

DiscriminatorOutput = Union[torch.Tensor, Sequence[Union[torch.Tensor, Sequence[torch.Tensor]]]]


class MissingVGGWeightsError(FileNotFoundError):
    """The VGG perceptual loss is enabled but no usable local weights file was given."""


# ------------------------------------------------------------------------------------------------
# Adversarial losses
# ------------------------------------------------------------------------------------------------


class GANLoss(nn.Module):
    """Adversarial loss ``gan_mode`` in {hinge, ls, original, w}; call as ``loss(pred, real?, for_D?)``.

    ``pred`` is a tensor of D logits, or the multiscale discriminator's list (per scale: a list of
    intermediate features whose last element is the prediction, or the prediction itself).
    """

    def __init__(self, gan_mode: str = "hinge", target_real_label: float = 1.0, target_fake_label: float = 0.0):
        super().__init__()
        if gan_mode not in GAN_MODES:
            raise ValueError(f"loss.gan_mode: unknown GAN loss {gan_mode!r}; expected one of {list(GAN_MODES)}")
        self.gan_mode = gan_mode
        self.target_real_label = target_real_label
        self.target_fake_label = target_fake_label

    def single_scale(self, pred: torch.Tensor, target_is_real: bool, for_discriminator: bool = True) -> torch.Tensor:
        """Loss of one prediction tensor (mean over all of its elements)."""
        if self.gan_mode in ("original", "ls"):
            target_value = self.target_real_label if target_is_real else self.target_fake_label
            target = torch.full_like(pred, target_value)
            if self.gan_mode == "original":
                return F.binary_cross_entropy_with_logits(pred, target)
            return F.mse_loss(pred, target)
        if self.gan_mode == "hinge":
            if for_discriminator:
                # D: mean(relu(1 - pred)) on real, mean(relu(1 + pred)) on fake.
                margin = pred - 1 if target_is_real else -pred - 1
                return -torch.mean(torch.clamp(margin, max=0.0))
            if not target_is_real:
                raise ValueError("the generator's hinge loss must aim for real (target_is_real=True)")
            return -torch.mean(pred)
        # "w": the critic's raw score.
        return -pred.mean() if target_is_real else pred.mean()

    def forward(self, pred: DiscriminatorOutput, target_is_real: bool, for_discriminator: bool = True) -> torch.Tensor:
        if isinstance(pred, torch.Tensor):
            return self.single_scale(pred, target_is_real, for_discriminator)
        if len(pred) == 0:
            raise ValueError("GANLoss: empty discriminator output list")
        total = None
        for scale_output in pred:
            prediction = scale_output if isinstance(scale_output, torch.Tensor) else scale_output[-1]
            term = self.single_scale(prediction, target_is_real, for_discriminator)
            total = term if total is None else total + term
        return total / len(pred)


def feature_matching_loss(
    pred_fake: Sequence[Sequence[torch.Tensor]],
    pred_real: Sequence[Sequence[torch.Tensor]],
    lambda_feat: float,
) -> torch.Tensor:
    """Discriminator feature matching: sum over scales and intermediate layers of L1(fake, real),
    each term weighted ``lambda_feat / num_D``; the final prediction of each scale is excluded and
    real features are detached (only G learns from this loss)."""
    if len(pred_fake) != len(pred_real) or len(pred_fake) == 0:
        raise ValueError(
            f"feature_matching_loss: need the same non-zero number of scales, got {len(pred_fake)} fake "
            f"and {len(pred_real)} real"
        )
    num_d = len(pred_fake)
    total = None
    for scale, (fake_feats, real_feats) in enumerate(zip(pred_fake, pred_real)):
        if isinstance(fake_feats, torch.Tensor) or len(fake_feats) != len(real_feats):
            raise ValueError(
                f"feature_matching_loss: scale {scale} must be a list of features of equal length for fake and real"
            )
        for fake, real in zip(fake_feats[:-1], real_feats[:-1]):
            term = F.l1_loss(fake, real.detach()) * (lambda_feat / num_d)
            total = term if total is None else total + term
    if total is None:  # discriminators without intermediate features: nothing to match
        return pred_fake[0][-1].new_zeros(())
    return total


def kld_loss(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) summed over batch and dims, as the official KLDLoss.

    The caller multiplies by ``lambda_kld`` (0.05 by default)."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


# ------------------------------------------------------------------------------------------------
# VGG19 perceptual loss
# ------------------------------------------------------------------------------------------------


def _vgg19_feature_layers() -> nn.Sequential:
    """torchvision's VGG19 ``features`` (config "E", no batch norm) up to relu5_1.

    torchvision's own layer builder, without ``torchvision.models.vgg19()``'s 120 M-parameter
    classifier (unused by the loss, never allocated); the layer indices are torchvision's, so its
    ``state_dict()`` keys ``features.{i}.weight`` map one to one.
    """
    from torchvision.models import vgg

    return nn.Sequential(*list(vgg.make_layers(vgg.cfgs["E"], batch_norm=False))[:_VGG_USED_LAYERS])


def resolve_vgg_weights(path: Optional[Union[str, Path]] = None) -> Path:
    """The VGG19 weights file to use: ``path`` (``loss.vgg_weights``), else ``$SPADE_VGG19_WEIGHTS``.

    Raises :class:`MissingVGGWeightsError` explaining how to provide the file when neither names an
    existing file.
    """
    how_to = (
        "The VGG perceptual loss needs local ImageNet VGG19 weights (torchvision layout). Provide them with "
        f"the config key loss.vgg_weights=/path/vgg19.pth or the environment variable {VGG_WEIGHTS_ENV}. "
        "Produce the file once on a machine with internet access: python -c \"import torch, torchvision; "
        "torch.save(torchvision.models.vgg19(weights='IMAGENET1K_V1').state_dict(), 'vgg19.pth')\". "
        "Or disable the loss with loss.no_vgg_loss=true."
    )
    if path:
        source = "loss.vgg_weights"
    else:
        path = os.environ.get(VGG_WEIGHTS_ENV, "")
        source = VGG_WEIGHTS_ENV
    if not path:
        raise MissingVGGWeightsError(f"no VGG19 weights file given. {how_to}")
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise MissingVGGWeightsError(f"VGG19 weights file not found: {resolved} (from {source}). {how_to}")
    return resolved


class VGG19(nn.Module):
    """Frozen VGG19 returning [relu1_1, relu2_1, relu3_1, relu4_1, relu5_1] for an N x 3 x H x W input.

    Inputs are fed as they come (the official code passes [-1, 1] images without ImageNet mean/std
    normalisation; we match it so that loss magnitudes and lambda_vgg mean the same thing).
    """

    def __init__(self) -> None:
        super().__init__()
        features = _vgg19_feature_layers()
        self.slices = nn.ModuleList(
            nn.Sequential(*[features[i] for i in range(start, end)]) for start, end in _VGG_SLICE_BOUNDS
        )
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VGG19":
        # A fixed feature extractor: stays in eval mode even inside a module put in train mode.
        return super().train(False)

    def load_torchvision_state_dict(self, state: dict, source: str = "<state dict>") -> None:
        """Load ``features.{i}.weight/bias`` (a torchvision vgg19 state dict; extra keys ignored).

        A ``features``-only dict with keys ``{i}.weight`` is accepted too."""
        if not isinstance(state, dict):
            raise ValueError(f"{source}: expected a state dict (mapping), got {type(state).__name__}")
        prefix = "features." if any(str(k).startswith("features.") for k in state) else ""
        own: dict[str, torch.Tensor] = {}
        for slice_index, (start, end) in enumerate(_VGG_SLICE_BOUNDS):
            for layer in range(start, end):
                if isinstance(self.slices[slice_index][layer - start], nn.Conv2d):
                    for name in ("weight", "bias"):
                        own[f"{prefix}{layer}.{name}"] = getattr(self.slices[slice_index][layer - start], name)
        missing = [k for k in own if k not in state]
        wrong_shape = [
            f"{k}: file {tuple(state[k].shape)} vs VGG19 {tuple(v.shape)}"
            for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)
        ]
        if missing or wrong_shape:
            raise ValueError(
                f"{source}: not a torchvision VGG19 state dict; missing keys {missing[:6]}"
                f"{' ...' if len(missing) > 6 else ''}; wrong shapes {wrong_shape[:6]}"
            )
        with torch.no_grad():
            for key, param in own.items():
                param.copy_(state[key])

    @classmethod
    def from_file(cls, path: Optional[Union[str, Path]] = None) -> "VGG19":
        """Build and load from ``path`` or ``$SPADE_VGG19_WEIGHTS`` (see :func:`resolve_vgg_weights`)."""
        resolved = resolve_vgg_weights(path)
        state = load_weights(resolved)  # WeightsFileError (a ValueError) names the file and the problem
        model = cls()
        model.load_torchvision_state_dict(state, str(resolved))
        return model

    def forward(self, x: torch.Tensor, checkpointed: bool = False) -> list[torch.Tensor]:
        """``checkpointed`` (with gradients on): each slice recomputed in the backward, so autograd
        keeps the slices' inputs and outputs (the loss keeps the outputs anyway), not their insides."""
        outputs = []
        for block in self.slices:
            x = run_checkpointed(block, x) if checkpointed and torch.is_grad_enabled() else block(x)
            outputs.append(x)
        return outputs


class VGGLoss(nn.Module):
    """Perceptual loss sum_k w_k * L1(VGG_k(x), VGG_k(y)), w = 1/32 .. 1; ``y`` is the target.

    The caller multiplies by ``lambda_vgg`` (10 by default)."""

    def __init__(self, vgg: VGG19) -> None:
        super().__init__()
        self.vgg = vgg

    @classmethod
    def from_file(cls, path: Optional[Union[str, Path]] = None) -> "VGGLoss":
        return cls(VGG19.from_file(path))

    def forward(self, x: torch.Tensor, y: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
        """``checkpointed``: ``x``'s VGG slices recomputed in the backward (:meth:`VGG19.forward`)."""
        x_features = self.vgg(x, checkpointed)
        with torch.no_grad():
            y_features = self.vgg(y)
        total = None
        for weight, fx, fy in zip(VGG_LAYER_WEIGHTS, x_features, y_features):
            term = weight * F.l1_loss(fx, fy)
            total = term if total is None else total + term
        return total


def build_vgg_loss(loss_cfg: "LossConfig") -> Optional[VGGLoss]:
    """The perceptual loss the config asks for: None when ``loss.no_vgg_loss``, else loaded from
    ``loss.vgg_weights`` / ``$SPADE_VGG19_WEIGHTS`` (a missing file fails here, at start-up, not mid-run)."""
    if loss_cfg.no_vgg_loss:
        return None
    return VGGLoss.from_file(loss_cfg.vgg_weights or None)


def save_random_vgg19_weights(path: Union[str, Path], seed: int = 0) -> Path:
    """Write a randomly initialised VGG19 weights file in torchvision's key layout (for tests).

    Only the layers the loss uses (``features.0`` .. ``features.28``, ~52 MB) are written; the init
    is torchvision's (Kaiming normal, fan_out, zero bias) so activations stay finite through 13 convs.
    """
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for index, layer in enumerate(_vgg19_feature_layers()):
        if isinstance(layer, nn.Conv2d):
            out_c, _, kh, kw = layer.weight.shape
            std = (2.0 / (out_c * kh * kw)) ** 0.5
            state[f"features.{index}.weight"] = torch.randn(layer.weight.shape, generator=generator) * std
            state[f"features.{index}.bias"] = torch.zeros(out_c)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path
