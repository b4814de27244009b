"""Which per-GPU batch, accumulation and memory setting fit a GPU: the planner behind ``spade-config --plan``.

Peak training memory is linear in the per-GPU batch, ``fixed + per_sample * batch``, measured per
architecture by ``bench/memory.py`` (exact live-tensor accounting of one full iteration) and kept in
:data:`MEASURED` (``spade_dist/memory_table.py``). The rows are the reference computation's (fp32,
the official layers): exact, device-independent bytes, the same for every label map. The speed
paths keep fewer bytes per sample and a few more fixed ones (the fused layouts keep the
concatenated gamma/beta weights for the backward; docs/PERFORMANCE.md section 7). A CUDA run adds
the allocator's rounding and cache, cuDNN workspaces and the CUDA context: :data:`DEFAULT_MARGIN` of
the GPU's memory is kept free for them.

Imports no torch: ``spade-config`` runs at every Slurm start.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from spade_dist.config import Config, ConfigError
from spade_dist.memory_table import MEASURED, TABLE_SOURCE

GIB = 2**30
DEFAULT_MARGIN = 0.15  # of the GPU's memory, for what exact tensor accounting does not see (module docstring)
PAPER_GLOBAL_BATCH = 32  # the paper: batch 32 on 8 GPUs


@dataclass(frozen=True)
class MemoryModel:
    """Peak bytes of one training iteration = ``fixed + per_sample * batch``."""

    fixed: float
    per_sample: float

    def peak(self, batch: int) -> float:
        return self.fixed + self.per_sample * batch

    def max_batch(self, budget: float) -> int:
        return max(0, int((budget - self.fixed) // self.per_sample))


def architecture_key(cfg: Config) -> tuple:
    """What the memory of an iteration depends on besides the batch (the table's row key)."""
    m, d = cfg.model, cfg.data
    return (d.crop_size, d.aspect_ratio, m.num_upsampling_layers, d.label_layout.semantic_nc, m.ngf, m.ndf,
            m.n_layers_D, m.num_D, m.use_vae, m.netG, cfg.loss.no_vgg_loss)


SETTINGS = ("off", "generator", "generator_spade", "all")  # speed.activation_checkpointing, least memory saved first


def memory_models(cfg: Config) -> dict[str, MemoryModel]:
    """The measured models of ``cfg``'s architecture, by ``speed.activation_checkpointing`` value
    (those measured, in :data:`SETTINGS` order). ConfigError when this architecture was not measured."""
    row = MEASURED.get(architecture_key(cfg))
    if row is None:
        raise ConfigError(
            f"no memory measurement for this architecture (crop {cfg.data.crop_size}, "
            f"{cfg.model.num_upsampling_layers}, semantic_nc {cfg.data.label_layout.semantic_nc}, "
            f"ngf {cfg.model.ngf}); measure it with bench/memory.py (docs/PERFORMANCE.md) and plan from its linear_model")
    return {setting: MemoryModel(*row[setting]) for setting in SETTINGS if setting in row}


@dataclass(frozen=True)
class Plan:
    per_gpu_batch: int  # data.batch_size
    grad_accum: int  # train.grad_accum
    activation_checkpointing: str  # speed.activation_checkpointing
    peak_bytes: float
    budget_bytes: float

    def overrides(self) -> str:
        return (f"data.batch_size={self.per_gpu_batch} train.grad_accum={self.grad_accum} "
                f"speed.activation_checkpointing={self.activation_checkpointing} train.mixed_precision=no")


def plan(cfg: Config, gpu_memory_gib: float, gpus: int, global_batch: int = PAPER_GLOBAL_BATCH,
         margin: float = DEFAULT_MARGIN) -> Optional[Plan]:
    """The setting that runs ``global_batch`` on ``gpus`` GPUs of ``gpu_memory_gib`` each, keeping
    ``margin`` free: the largest per-GPU micro-batch first (BN statistics over as many samples as
    possible), then the least checkpointing that fits (each level costs step time). None when not
    even a batch of 1 fits."""
    if gpus < 1 or gpu_memory_gib <= 0 or global_batch < 1 or not 0 <= margin < 1:
        raise ConfigError(f"plan: need gpus >= 1, gpu memory > 0, global batch >= 1 and 0 <= margin < 1 "
                          f"(got {gpus}, {gpu_memory_gib}, {global_batch}, {margin})")
    budget = gpu_memory_gib * GIB * (1 - margin)
    share = max(1, -(-global_batch // gpus))  # per-GPU samples per update (ceil)
    models = memory_models(cfg)
    for micro in range(share, 0, -1):
        if share % micro:
            continue
        for setting, model in models.items():
            if model.peak(micro) <= budget:
                return Plan(micro, share // micro, setting, model.peak(micro), budget)
    return None


def describe(cfg: Config, gpu_memory_gib: float, gpus: int, global_batch: int = PAPER_GLOBAL_BATCH,
             margin: float = DEFAULT_MARGIN) -> tuple[str, bool]:
    """The plan as text, and whether the configured setting fits (``data.batch_size`` at
    ``speed.activation_checkpointing``)."""
    models = memory_models(cfg)
    budget = gpu_memory_gib * GIB * (1 - margin)
    lines = [f"memory plan: {gpus} x {gpu_memory_gib:g} GiB, global batch {global_batch}, "
             f"{margin:.0%} kept free ({budget / GIB:.1f} GiB usable per GPU); fp32, from {TABLE_SOURCE}"]
    for setting, model in models.items():
        lines.append(f"  activation_checkpointing={setting}: {model.fixed / GIB:.2f} GiB + "
                     f"{model.per_sample / GIB:.2f} GiB per sample; largest batch {model.max_batch(budget)}")
    best = plan(cfg, gpu_memory_gib, gpus, global_batch, margin)
    if best is None:
        lines.append("  plan: not even a batch of 1 fits; use more memory per GPU")
    else:
        lines.append(f"  plan: {best.overrides()} (peak {best.peak_bytes / GIB:.1f} GiB)")
    configured_model = models.get(cfg.speed.activation_checkpointing)
    if configured_model is None:
        lines.append(f"  configured: speed.activation_checkpointing={cfg.speed.activation_checkpointing} was not measured")
        return "\n".join(lines), True
    configured = configured_model.peak(cfg.data.batch_size)
    fits = configured <= budget
    lines.append(f"  configured: data.batch_size={cfg.data.batch_size} "
                 f"speed.activation_checkpointing={cfg.speed.activation_checkpointing}: "
                 f"{configured / GIB:.1f} GiB, " + ("fits" if fits else "WILL NOT FIT"))
    return "\n".join(lines), fits
