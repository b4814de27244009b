"""Gradient norms for the training log and the exporter, read on logging steps only."""
from __future__ import annotations

from typing import Any, Mapping

from torch.nn.utils import get_total_norm


class GradNormTracker:
    """Total gradient L2 norm per network, captured right before each optimizer step.

    The backends zero the gradients right after stepping, so the loop cannot read them afterwards;
    an optimizer step pre-hook sees them all-reduced (DDP) and unscaled (fp16). The hook only
    computes when armed (the loop arms it before a logging step), so other steps pay nothing, and it
    keeps a device tensor: :meth:`collect` does the one host read on the logging step. Under
    DeepSpeed ZeRO 1/2 the client optimizer only holds this rank's gradient partition: do not
    arm it there (its norm would not be the network's).
    """

    def __init__(self, optimizers: Mapping[str, Any]) -> None:
        self._armed = False
        self._norms: dict[str, Any] = {}
        self._handles = [opt.register_step_pre_hook(self._hook(name)) for name, opt in optimizers.items()]

    def _hook(self, name: str):
        def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
            if not self._armed:
                return
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if grads:
                self._norms[name] = get_total_norm(grads)
        return hook

    def arm(self) -> None:
        """Capture the norms of the next optimizer steps (until :meth:`collect`)."""
        self._armed = True

    def collect(self) -> dict[str, float]:
        """``{net: norm}`` of the steps since :meth:`arm` (the last one per network); disarms."""
        out = {name: float(norm) for name, norm in self._norms.items()}
        self._norms.clear()
        self._armed = False
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
