"""Synchronized BatchNorm that works on every backend.

On CUDA tensors this is exactly ``torch.nn.SyncBatchNorm`` (NCCL). PyTorch's implementation refuses
CPU tensors, so for CPU / gloo we compute the same statistics ourselves: each rank contributes
(count, mean, M2) per channel, one differentiable all-gather (functional collectives) brings every rank's triple, and the
triples are combined with the parallel-variance formula (Chan et al.) - numerically stable, unlike
``E[x^2] - E[x]^2``. Autograd flows through the gather, so input gradients include the cross-rank
terms, as in the CUDA kernel. Normalisation uses the biased variance; running_var the unbiased one.

Outside training, in a single process or a group of one rank, it is plain BatchNorm. The state dict
keys are those of ``nn.BatchNorm2d`` (running_mean, running_var, num_batches_tracked), so official
checkpoints load unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import all_gather_single_autograd

from spade_dist.distributed import DistInfo, syncbn_group


def _group_size(group: Optional[dist.ProcessGroup]) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class SyncBatchNorm2d(nn.SyncBatchNorm):
    """``nn.SyncBatchNorm`` with a gloo/CPU path. ``process_group`` None means the whole world."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's name
        if input.dim() != 4:
            raise ValueError(f"SyncBatchNorm2d expects N x C x H x W input, got shape {tuple(input.shape)}")
        distributed = self.training and _group_size(self.process_group) > 1
        if input.is_cuda:
            return super().forward(input)
        if not distributed:
            # Plain BN. nn.SyncBatchNorm.forward itself raises on CPU whenever a process group is
            # initialised, even one of a single rank (e.g. a 1-process torchrun launch).
            return nn.modules.batchnorm._BatchNorm.forward(self, input)
        return self._forward_gathered(input)

    def _forward_gathered(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        dims = (0, 2, 3)
        # Statistics in at least float32 even under autocast (BN is an fp32 op in AMP).
        xs = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        local_count = xs.numel() // channels
        local_mean = xs.mean(dim=dims)
        local_m2 = ((xs - local_mean.view(1, -1, 1, 1)) ** 2).sum(dim=dims)
        count = torch.full((1,), float(local_count), dtype=xs.dtype, device=xs.device)
        packed = torch.cat([count, local_mean, local_m2])
        group = self.process_group or dist.group.WORLD
        gathered = all_gather_single_autograd(packed.unsqueeze(0), gather_dim=0, group=group)
        counts = gathered[:, :1]  # world x 1
        means = gathered[:, 1 : 1 + channels]
        m2s = gathered[:, 1 + channels :]
        total = counts.sum()
        mean = (counts * means).sum(dim=0) / total
        m2 = m2s.sum(dim=0) + (counts * (means - mean) ** 2).sum(dim=0)
        var_biased = m2 / total

        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (
                    1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                )
                unbiased = var_biased * (total / (total - 1)) if total > 1 else var_biased
                self.running_mean.mul_(1 - momentum).add_(mean.detach().to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.detach().to(self.running_var.dtype), alpha=momentum)

        shape = (1, channels, 1, 1)
        out = (xs - mean.view(shape)) * torch.rsqrt(var_biased.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)


def set_sync_bn_group(module: nn.Module, group: Optional[dist.ProcessGroup]) -> int:
    """Point every SyncBatchNorm2d inside ``module`` at ``group``; return how many were changed."""
    changed = 0
    for m in module.modules():
        if isinstance(m, SyncBatchNorm2d):
            m.process_group = group
            changed += 1
    return changed


def attach_syncbn_group(module: nn.Module, kind: str, info: DistInfo) -> int:
    """Point every SyncBatchNorm2d of ``module`` at the configured group of this launch's world.

    Returns how many ranks the statistics are reduced over. Called at every (re)start, so after an
    elastic resize the groups are those of the new world.
    """
    group = syncbn_group(kind, info)
    set_sync_bn_group(module, group)
    return info.world_size if group is None else dist.get_world_size(group)


def plain_batch_norm_reference(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Param-free batch norm over the whole batch (for tests and documentation)."""
    return F.batch_norm(x, None, None, training=True, eps=eps)
