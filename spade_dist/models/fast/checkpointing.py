"""Activation checkpointing of the generator's residual blocks, exact.

``run_checkpointed(block, x, seg)`` is ``block(x, seg)`` whose inner activations are not kept for
the backward: autograd keeps the block's input and runs the block's forward again when the
gradient reaches it (``torch.utils.checkpoint``, non-reentrant, RNG state restored). A plain
recomputation would not be the same step:

- a BatchNorm (and the gloo / NCCL synchronized one) in training mode updates its running
  statistics on every forward, so the recomputation would update them a second time;
- a spectral-normed convolution in training mode runs one power iteration per forward, so the
  recomputation would advance u / v again and normalise by a different sigma.

The recomputation therefore runs with the block's spectral-normed modules in eval mode (torch's
hook then uses the u / v the first forward left, i.e. the same normalised weight, bitwise) and puts
every BatchNorm buffer back afterwards (the batch statistics, which the forward uses, are the same
since the input is). A synchronized BN issues its all-gather again inside the recomputation; every
rank recomputes the same blocks in the same backward order, so the ranks' sequences of collectives
stay the same.

With ``spade_layers`` (``speed.activation_checkpointing: generator_spade``, given by the generator
for its full-resolution block) each SPADE layer inside the block is checkpointed as well, the same
way: a recomputed block then holds one SPADE layer's intermediates at a time instead of all of them.
The block (a plain network, laid out as the official code) calls its layers itself, so for the
duration of the block's forward each layer's ``forward`` is replaced on that instance by the
checkpointed call and put back afterwards. Which blocks are checkpointed, and which nested, is the
generator's choice (``models/generator.py``).

With ``all`` the G step's loss networks are checkpointed too (``train/step.py``): each VGG19 slice
(``run_checkpointed``; no norm, nothing random) and the discriminator on the fake images
(:func:`run_discriminator_checkpointed`: its spectral-normed convolutions and any BN handled as
above, its stages nested like the SPADE layers).

Under ``torch.compile`` (``speed.compile``) :func:`run_checkpointed` is excluded from compilation
(``torch.compiler.disable``): dynamo breaks the generator's graph at each checkpointed block, runs
the block and its recomputation eagerly as above, and compiles the rest of the generator (and the
discriminator). Tracing the checkpoint instead (dynamo's ``tag_activation_checkpoint`` region,
functionalized, whose recomputation would be pure) does not happen with these blocks: the
spectral-norm power iteration (``F.normalize(..., out=u)``) breaks dynamo's graph inside the region,
and dynamo then runs ``torch.utils.checkpoint`` eagerly around separately compiled frames, without
this module's recomputation context: BN statistics updated twice, and with ``spade_layers`` a
compiled first forward whose saved tensors the eager recomputation does not match (checkpoint's
metadata check fails). The eager region is exact by the same argument as without compile.
With ``all`` the G step's VGG19 slices and its discriminator on the fake take the same eager path
(they go through :func:`run_checkpointed`), so compile then speeds up only what lies outside them.

Tests: ``tests/test_activation_checkpointing.py`` (float64, 1 process and 2 gloo ranks, DDP and
DeepSpeed); with ``speed.compile``: ``tests/test_compile.py`` (float64, against the compiled and
the eager step without checkpointing).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.utils.checkpoint import checkpoint


def _has_spectral_norm(module: nn.Module) -> bool:
    return any(isinstance(hook, SpectralNorm) for hook in module._forward_pre_hooks.values())


@contextlib.contextmanager
def _recomputing(block: "nn.Module | _Call") -> Iterator[None]:
    """The recomputation's context: no second power iteration, BN buffers as the first forward left them."""
    spectral = [m for m in block.modules() if m.training and _has_spectral_norm(m)]
    norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
    for m in spectral:
        m.training = False
    try:
        yield
    finally:
        for m in spectral:
            m.training = True
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for live, kept in zip((m.running_mean, m.running_var, m.num_batches_tracked), buffers):
                    live.copy_(kept)


def _spade_layers(block: nn.Module) -> list[nn.Module]:
    # SPADE layers by their parts (importing models/spade.py here would be circular: it imports the seam).
    return [m for m in block.modules() if hasattr(m, "param_free_norm") and hasattr(m, "mlp_shared")]


@contextlib.contextmanager
def _layers_checkpointed(layers: Sequence[nn.Module]) -> Iterator[None]:
    """For the duration, each of ``layers`` (modules inside a checkpointed block, called through their
    ``forward``) runs through :func:`run_checkpointed` itself: the block then keeps each layer's
    input and output, not its intermediates, and when the block is recomputed in the backward, each
    of those layers is recomputed once more, one at a time."""
    for layer in layers:
        plain = type(layer).forward.__get__(layer)
        layer.forward = functools.partial(run_checkpointed, _Call(layer, plain))
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


class _Call:
    """``module``'s plain forward as a callable that :func:`run_checkpointed` can recompute (its
    modules are ``module``'s: the recomputation context finds the BN buffers there)."""

    def __init__(self, module: nn.Module, forward: Callable[..., Tensor]) -> None:
        self.module = module
        self.forward = forward

    def __call__(self, *args: object) -> Tensor:
        return self.forward(*args)

    def modules(self) -> Iterator[nn.Module]:
        return self.module.modules()


@torch.compiler.disable  # eager under speed.compile: the recomputation context is eager-only (module docstring)
def run_checkpointed(block: nn.Module | _Call, x: Tensor, *args: object, spade_layers: bool = False,
                     inner: Sequence[nn.Module] = ()) -> Any:
    """``block(x, *args)`` with its activations recomputed in the backward (module docstring);
    ``spade_layers``: each SPADE layer inside the block checkpointed as well (nested); ``inner``:
    these modules inside the block as well (the discriminator's stages, :func:`run_discriminator_checkpointed`)."""
    first_call = True
    nested = [*(_spade_layers(block) if spade_layers else ()), *inner]

    def forward(inp: Tensor) -> Any:
        nonlocal first_call
        # The inner layers are checkpointed in the first forward too: the recomputation must save
        # the same tensors as the forward it replays (torch.utils.checkpoint checks their number).
        layers = _layers_checkpointed(nested) if nested else contextlib.nullcontext()
        if first_call:
            first_call = False
            with layers:
                return block(inp, *args)
        with _recomputing(block), layers:
            return block(inp, *args)

    return checkpoint(forward, x, use_reentrant=False, preserve_rng_state=True)


def run_discriminator_checkpointed(discriminator: nn.Module, semantics: Tensor, image: Tensor) -> Any:
    """``discriminator(semantics, image)`` with its activations recomputed in the backward: autograd
    keeps ``image`` (and the label map, alive anyway) instead of D's input (the label channels
    joined to the image at full resolution and at every scale) and its intermediates. Each stage of
    each scale (``model0``, ``model1``, ...) is checkpointed inside it as well, so the recomputation
    holds one stage's intermediates at a time next to the stages' outputs (which feature matching
    keeps anyway). The spectral-normed convolutions run their power iteration in the first forward
    only (:func:`_recomputing`)."""
    stages = [stage for scale in discriminator.children() for stage in scale.children()]
    return run_checkpointed(_Call(discriminator, lambda img: discriminator(semantics, img)), image, inner=stages)
