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
stay the same. Tests: ``tests/test_activation_checkpointing.py`` (float64, 1 process and 2 gloo
ranks, DDP and DeepSpeed).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.utils.checkpoint import checkpoint


def _has_spectral_norm(module: nn.Module) -> bool:
    return any(isinstance(hook, SpectralNorm) for hook in module._forward_pre_hooks.values())


@contextlib.contextmanager
def _recomputing(block: nn.Module) -> Iterator[None]:
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


def run_checkpointed(block: nn.Module, x: Tensor, *args: object) -> Tensor:
    """``block(x, *args)`` with its activations recomputed in the backward (module docstring)."""
    first_call = True

    def forward(inp: Tensor) -> Tensor:
        nonlocal first_call
        if first_call:
            first_call = False
            return block(inp, *args)
        with _recomputing(block):
            return block(inp, *args)

    return checkpoint(forward, x, use_reentrant=False, preserve_rng_state=True)
