"""One GAN iteration with the official NVlabs/SPADE semantics. Knows nothing of files, Slurm or metrics.

Order (official ``train.py``): on iterations where ``step % D_steps_per_G == 0`` a generator step,
then always a discriminator step on the same batch, whose fake is a fresh ``no_grad`` forward of
the (just updated) generator - exactly as ``Pix2PixModel.compute_discriminator_loss`` does.

- G loss = GAN (G side of ``gan_mode``) + feature matching (``lambda_feat``, unless
  ``no_ganFeat_loss``) + VGG (``lambda_vgg``, unless ``no_vgg_loss``) + KLD (``lambda_kld``, VAE).
  D is frozen (``requires_grad_(False)``) and called as its bare module, so no gradient of D is
  produced or all-reduced in the G step.
- D loss = D_Fake + D_real. Fake and real go through D as one concatenated batch, as the official
  ``discriminate`` does (one spectral-norm power iteration per call, like the original).
- The G step's D pass (``speed.g_step_real_pass``): ``joint`` is the official one pass over
  cat(fake, real). ``separate`` (default) judges the fake images with a graph and then the real ones
  under ``no_grad`` in eval mode, which skips their backward: D is frozen there and the real
  features enter the losses detached, so nothing flows through them. Exact when D judges each
  image on its own (no batch statistics, no dropout: the default instance norm); eval mode only
  keeps the second call from running the spectral-norm power iteration again, so both halves see
  the same normalized weights as in the joint pass. Without feature matching the real images are
  not judged at all. A D with batch statistics always takes the joint pass, and so does a compiled
  one (``SpeedConfig.separate_real_pass``).
- ``speed.activation_checkpointing: all`` (``LossSet.checkpointed``): the G step's graph-carrying
  loss networks (VGG19 on the fake, D on the fake or on cat(fake, real)) are recomputed in the
  backward instead of keeping their activations, exactly (``models/fast/checkpointing.py``).
- Every loss is a mean over the per-rank batch, so DDP's gradient average over ranks equals the
  gradient of the global-batch mean (the distributed-step test checks this to 1e-8). KLD is the
  official per-batch sum (as with the official DataParallel, its scale is per-rank).
- Mixed precision: forward and losses under autocast (bf16 or fp16); fp16 uses the backend's
  per-network GradScalers. A non-finite loss or gradient skips that network's update and counts it.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
from torch import nn

from spade_dist.config import Config
from spade_dist.labels import encode_semantics
from spade_dist.losses import GANLoss, VGGLoss, feature_matching_loss, kld_loss
from spade_dist.models.fast.checkpointing import run_discriminator_checkpointed
from spade_dist.train.backends import TrainBackend, frozen


@dataclass
class LossSet:
    """The criteria and weights of one run (built once, reused every step)."""

    gan: GANLoss
    vgg: Optional[VGGLoss]
    lambda_feat: float
    lambda_vgg: float
    lambda_kld: float
    feature_matching: bool
    # speed.activation_checkpointing=all: the G step's VGG slices and D recomputed in the backward.
    checkpointed: bool = False

    @classmethod
    def from_config(cls, cfg: Config, vgg: Optional[VGGLoss]) -> "LossSet":
        if not cfg.loss.no_vgg_loss and vgg is None:
            raise ValueError("loss.no_vgg_loss is false but no VGG loss module was given")
        return cls(
            gan=GANLoss(cfg.loss.gan_mode),
            vgg=None if cfg.loss.no_vgg_loss else vgg,
            lambda_feat=cfg.loss.lambda_feat,
            lambda_vgg=cfg.loss.lambda_vgg,
            lambda_kld=cfg.loss.lambda_kld,
            feature_matching=not cfg.loss.no_ganFeat_loss,
            checkpointed=cfg.speed.activation_checkpointing == "all",
        )


@dataclass
class MicroBatch:
    """Generator input and target of one micro-batch, already on the device."""

    semantics: torch.Tensor
    real: torch.Tensor


@dataclass
class StepResult:
    """Detached device tensors (reading them syncs; the loop does so only on logging steps)."""

    losses: dict[str, torch.Tensor]
    skipped_G: torch.Tensor  # 0-d, 1.0 when the G update was skipped (non-finite)
    skipped_D: torch.Tensor
    ran_G: bool


# A test hook: called with (network, loss) before backward; returning a tensor replaces the loss.
LossHook = Callable[[str, torch.Tensor], Optional[torch.Tensor]]


def prepare_batch(batch: dict[str, Any], cfg: Config, device: torch.device, dtype: torch.dtype = torch.float32) -> MicroBatch:
    """Loader batch (uint8 image, int64 label/instance) -> one-hot semantics and an image in [-1, 1]."""
    for key in ("image", "label"):
        if key not in batch:
            raise KeyError(f"batch is missing '{key}' (docs/FORMATS.md: image, label, instance, key)")
    image = batch["image"].to(device, non_blocking=True)
    real = image.to(dtype).div_(127.5).sub_(1.0)
    label = batch["label"].to(device, non_blocking=True)
    instance = batch.get("instance")
    semantics = encode_semantics(
        label, None if instance is None else instance.to(device, non_blocking=True), cfg.data.label_layout, dtype=dtype,
    )
    if cfg.speed.channels_last:
        semantics = semantics.contiguous(memory_format=torch.channels_last)
        real = real.contiguous(memory_format=torch.channels_last)
    return MicroBatch(semantics, real)


def autocast_context(mixed_precision: str, device: torch.device) -> ContextManager[Any]:
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _split_pred(pred: Sequence[Sequence[torch.Tensor]], n_fake: int) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """D output on cat([fake, real]) -> (fake part, real part), per scale and feature."""
    fake = [[t[:n_fake] for t in scale] for scale in pred]
    real = [[t[n_fake:] for t in scale] for scale in pred]
    return fake, real


def _discriminate(d: Callable[..., Any], semantics: torch.Tensor, fake: torch.Tensor, real: torch.Tensor):
    # One pass of D over cat(fake, real), both judged with the batch's label maps (D shares them).
    return _split_pred(d(semantics, torch.cat([fake, real], dim=0)), fake.shape[0])


def judges_images_independently(discriminator: nn.Module) -> bool:
    """Whether D's output for an image depends on nothing but that image and its label map, in
    train and eval mode alike (no batch norm, no instance norm with running statistics, no dropout)."""
    for m in discriminator.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
            return False
        if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
            return False
    return True


@contextlib.contextmanager
def _graph_free_eval(module: nn.Module):
    """``no_grad`` and eval mode for the duration; every submodule's own mode restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        for m, training in modes:
            m.training = training


def _judge(d: nn.Module, checkpointed: bool) -> Callable[..., Any]:
    """D as the G step calls it for a graph; ``checkpointed``: recomputed in the backward."""
    return functools.partial(run_discriminator_checkpointed, d) if checkpointed else d


def _discriminate_separately(d: nn.Module, semantics: torch.Tensor, fake: torch.Tensor, real: torch.Tensor,
                             need_real: bool, checkpointed: bool = False):
    # The G step's D pass without the real half's graph (speed.g_step_real_pass = separate).
    pred_fake = _judge(d, checkpointed)(semantics, fake)
    if not need_real:
        return pred_fake, None
    with _graph_free_eval(d):  # the fake pass ran the power iteration; this one reuses its u, v
        pred_real = d(semantics, real)
    return pred_fake, pred_real


def _sum_terms(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    total = None
    for value in terms.values():
        total = value if total is None else total + value
    assert total is not None
    return total


def generator_losses(backend: TrainBackend, losses: LossSet, mb: MicroBatch,
                     separate_real_pass: bool = False) -> dict[str, torch.Tensor]:
    """Official ``compute_generator_loss`` terms for one micro-batch (D frozen by the caller).

    ``separate_real_pass``: D judges the real images without a graph (module docstring); the
    caller checks that D judges images independently."""
    fake, mu, logvar = backend.generator(mb.semantics, mb.real if mu_needed(backend) else None)
    if separate_real_pass:
        pred_fake, pred_real = _discriminate_separately(backend.discriminator_module, mb.semantics, fake, mb.real,
                                                        need_real=losses.feature_matching, checkpointed=losses.checkpointed)
    else:
        pred_fake, pred_real = _discriminate(_judge(backend.discriminator_module, losses.checkpointed), mb.semantics,
                                             fake, mb.real)
    terms: dict[str, torch.Tensor] = {}
    if mu is not None:
        terms["KLD"] = kld_loss(mu.float(), logvar.float()) * losses.lambda_kld
    terms["GAN"] = losses.gan(pred_fake, True, for_discriminator=False)
    if losses.feature_matching:
        assert pred_real is not None
        terms["GAN_Feat"] = feature_matching_loss(pred_fake, pred_real, losses.lambda_feat)
    if losses.vgg is not None:
        terms["VGG"] = losses.vgg(fake, mb.real, losses.checkpointed) * losses.lambda_vgg
    return terms


def mu_needed(backend: TrainBackend) -> bool:
    return getattr(backend.generator_module, "netE", None) is not None


def discriminator_losses(backend: TrainBackend, losses: LossSet, mb: MicroBatch) -> dict[str, torch.Tensor]:
    """Official ``compute_discriminator_loss``: fresh no-grad fake, D on cat(fake, real)."""
    with torch.no_grad():
        fake, _, _ = backend.generator(mb.semantics, mb.real if mu_needed(backend) else None)
    fake = fake.detach()
    pred_fake, pred_real = _discriminate(backend.discriminator, mb.semantics, fake, mb.real)
    return {
        "D_Fake": losses.gan(pred_fake, False, for_discriminator=True),
        "D_real": losses.gan(pred_real, True, for_discriminator=True),
    }


def _optimize(which: str, backend: TrainBackend, micro: Sequence[MicroBatch], compute: Callable[[MicroBatch], dict[str, torch.Tensor]],
              mixed_precision: str, loss_hook: Optional[LossHook]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Accumulate over micro-batches, then apply (or skip) one update of network ``which``."""
    logged: dict[str, torch.Tensor] = {}
    finite = torch.ones((), dtype=torch.bool, device=backend.device)
    n = len(micro)
    for i, mb in enumerate(micro):
        with backend.micro_batch(which, is_last=i == n - 1):
            with autocast_context(mixed_precision, backend.device):
                terms = compute(mb)
                loss = _sum_terms(terms).float()
            if loss_hook is not None:
                replaced = loss_hook(which, loss)
                loss = loss if replaced is None else replaced
            finite = finite & torch.isfinite(loss.detach())
            backend.backward(which, loss, n)
        for name, value in terms.items():
            value = value.detach().float() / n
            logged[name] = logged[name] + value if name in logged else value
    return logged, backend.apply(which, finite)


def train_step(backend: TrainBackend, losses: LossSet, micro: Sequence[MicroBatch], step: int, cfg: Config,
               loss_hook: Optional[LossHook] = None) -> StepResult:
    """One official iteration (G step when due, then D step) over ``micro`` (grad accumulation)."""
    if not micro:
        raise ValueError("train_step needs at least one micro-batch")
    mp = cfg.train.mixed_precision
    all_losses: dict[str, torch.Tensor] = {}
    zero = torch.zeros((), device=backend.device)
    skipped_G = zero
    run_G = step % cfg.optim.D_steps_per_G == 0
    if run_G:
        separate = cfg.speed.separate_real_pass and judges_images_independently(backend.discriminator_module)
        with frozen(backend.discriminator_module):
            g_terms, skipped_G = _optimize("G", backend, micro, lambda mb: generator_losses(backend, losses, mb, separate),
                                           mp, loss_hook)
        all_losses.update(g_terms)
    d_terms, skipped_D = _optimize("D", backend, micro, lambda mb: discriminator_losses(backend, losses, mb), mp, loss_hook)
    all_losses.update(d_terms)
    return StepResult(losses=all_losses, skipped_G=skipped_G, skipped_D=skipped_D, ran_G=run_G)
