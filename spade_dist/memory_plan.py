"""Which per-GPU batch, accumulation and memory setting fit a GPU: the planner behind ``spade-config --plan``.

Peak training memory is linear in the per-GPU batch, ``fixed + per_sample * batch``, measured per
architecture by ``bench/memory.py`` (exact live-tensor accounting of one full iteration) and kept in
:data:`MEASURED` (fp32) and :data:`MEASURED_BF16` (the step's bf16 autocast) in
``spade_dist/memory_table.py``. The rows are the reference computation's (the official layers):
exact bytes, the same for every label map; device-independent in fp32, CPU autocast's op lists in
bf16 (CUDA's autocast keeps some outputs in fp32 that CPU's keeps in bf16: docs/PERFORMANCE.md
section 7). The plan keeps the configured ``train.mixed_precision`` and says when bf16 would be
needed to fit. The speed
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
from spade_dist.memory_table import MEASURED, MEASURED_BF16, TABLE_SOURCE

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
# train.mixed_precision -> the table that measured it. fp16 autocast casts to a 2-byte type by the
# same op lists as bf16 (its GradScaler adds a few scalars): planned from the bf16 rows.
TABLE_OF = {"no": "fp32", "bf16": "bf16", "fp16": "bf16"}


def _measured(cfg: Config, mixed_precision: str) -> Optional[dict[str, MemoryModel]]:
    row = (MEASURED if TABLE_OF[mixed_precision] == "fp32" else MEASURED_BF16).get(architecture_key(cfg))
    return None if row is None else {setting: MemoryModel(*row[setting]) for setting in SETTINGS if setting in row}


def memory_models(cfg: Config, mixed_precision: Optional[str] = None) -> dict[str, MemoryModel]:
    """The measured models of ``cfg``'s architecture in ``mixed_precision`` (default: the configured
    ``train.mixed_precision``), by ``speed.activation_checkpointing`` value (those measured, in
    :data:`SETTINGS` order). ConfigError when this architecture was not measured in that precision."""
    mixed_precision = mixed_precision or cfg.train.mixed_precision
    models = _measured(cfg, mixed_precision)
    if models is None:
        raise ConfigError(
            f"no {TABLE_OF[mixed_precision]} memory measurement for this architecture (crop {cfg.data.crop_size}, "
            f"{cfg.model.num_upsampling_layers}, semantic_nc {cfg.data.label_layout.semantic_nc}, "
            f"ngf {cfg.model.ngf}); measure it with bench/memory.py (docs/PERFORMANCE.md) and plan from its linear_model")
    return models


@dataclass(frozen=True)
class Plan:
    per_gpu_batch: int  # data.batch_size
    grad_accum: int  # train.grad_accum
    activation_checkpointing: str  # speed.activation_checkpointing
    mixed_precision: str  # train.mixed_precision
    peak_bytes: float
    budget_bytes: float

    def overrides(self) -> str:
        return (f"data.batch_size={self.per_gpu_batch} train.grad_accum={self.grad_accum} "
                f"speed.activation_checkpointing={self.activation_checkpointing} "
                f"train.mixed_precision={self.mixed_precision}")


def _fit(models: dict[str, MemoryModel], share: int, budget: float, mixed_precision: str) -> Optional[Plan]:
    """The largest micro-batch dividing ``share`` first, then the least checkpointing that fits it."""
    for micro in range(share, 0, -1):
        if share % micro:
            continue
        for setting, model in models.items():
            if model.peak(micro) <= budget:
                return Plan(micro, share // micro, setting, mixed_precision, model.peak(micro), budget)
    return None


def _check(gpu_memory_gib: float, gpus: int, global_batch: int, margin: float) -> tuple[float, int]:
    """The usable bytes per GPU and the per-GPU samples per update; ConfigError for impossible values."""
    if gpus < 1 or gpu_memory_gib <= 0 or global_batch < 1 or not 0 <= margin < 1:
        raise ConfigError(f"plan: need gpus >= 1, gpu memory > 0, global batch >= 1 and 0 <= margin < 1 "
                          f"(got {gpus}, {gpu_memory_gib}, {global_batch}, {margin})")
    return gpu_memory_gib * GIB * (1 - margin), max(1, -(-global_batch // gpus))  # ceil


def plan(cfg: Config, gpu_memory_gib: float, gpus: int, global_batch: int = PAPER_GLOBAL_BATCH,
         margin: float = DEFAULT_MARGIN) -> Optional[Plan]:
    """The setting that runs ``global_batch`` on ``gpus`` GPUs of ``gpu_memory_gib`` each, keeping
    ``margin`` free: the configured precision (``train.mixed_precision``) with the largest per-GPU
    micro-batch first (BN statistics over as many samples as possible), then the least checkpointing
    that fits (each level costs step time); bf16 only when nothing fits in fp32 (it changes the
    numerics). None when not even a batch of 1 fits."""
    budget, share = _check(gpu_memory_gib, gpus, global_batch, margin)
    configured = cfg.train.mixed_precision
    best = _fit(memory_models(cfg), share, budget, configured)
    if best is None and configured == "no" and (bf16 := _measured(cfg, "bf16")) is not None:
        best = _fit(bf16, share, budget, "bf16")
    return best


def bf16_alternative(cfg: Config, gpu_memory_gib: float, gpus: int, global_batch: int = PAPER_GLOBAL_BATCH,
                     margin: float = DEFAULT_MARGIN) -> Optional[Plan]:
    """For an fp32 configuration whose plan needs gradient accumulation (or does not fit): the bf16
    plan when it fits a larger per-GPU micro-batch, else None."""
    if cfg.train.mixed_precision != "no" or (bf16 := _measured(cfg, "bf16")) is None:
        return None
    budget, share = _check(gpu_memory_gib, gpus, global_batch, margin)
    fp32, alternative = _fit(memory_models(cfg), share, budget, "no"), _fit(bf16, share, budget, "bf16")
    if alternative is None or (fp32 is not None and fp32.per_gpu_batch >= alternative.per_gpu_batch):
        return None
    return alternative


def describe(cfg: Config, gpu_memory_gib: float, gpus: int, global_batch: int = PAPER_GLOBAL_BATCH,
             margin: float = DEFAULT_MARGIN) -> tuple[str, bool]:
    """The plan as text, and whether the configured setting fits (``data.batch_size`` at
    ``speed.activation_checkpointing`` and ``train.mixed_precision``)."""
    budget, _ = _check(gpu_memory_gib, gpus, global_batch, margin)
    configured_precision = cfg.train.mixed_precision
    tables = {configured_precision: memory_models(cfg)}
    if configured_precision == "no" and (bf16 := _measured(cfg, "bf16")) is not None:
        tables["bf16"] = bf16
    lines = [f"memory plan: {gpus} x {gpu_memory_gib:g} GiB, global batch {global_batch}, "
             f"{margin:.0%} kept free ({budget / GIB:.1f} GiB usable per GPU); from {TABLE_SOURCE}"]
    for precision, models in tables.items():
        for setting, model in models.items():
            lines.append(f"  {TABLE_OF[precision]}, activation_checkpointing={setting}: {model.fixed / GIB:.2f} GiB + "
                         f"{model.per_sample / GIB:.2f} GiB per sample; largest batch {model.max_batch(budget)}")
    best = plan(cfg, gpu_memory_gib, gpus, global_batch, margin)
    if best is None:
        lines.append("  plan: not even a batch of 1 fits; use more memory per GPU")
    else:
        needs_bf16 = best.mixed_precision != configured_precision
        lines.append(f"  plan: {best.overrides()} (peak {best.peak_bytes / GIB:.1f} GiB)"
                     + ("; bf16 is needed to fit: not even a batch of 1 fits in fp32" if needs_bf16 else ""))
    alternative = bf16_alternative(cfg, gpu_memory_gib, gpus, global_batch, margin)
    if alternative is not None and best is not None and alternative.mixed_precision != best.mixed_precision:
        lines.append(f"  bf16 would fit a larger micro-batch: {alternative.overrides()} "
                     f"(peak {alternative.peak_bytes / GIB:.1f} GiB)")
    if configured_precision == "fp16":
        lines.append("  fp16: planned from the bf16 rows (the same 2-byte autocast)")
    configured_model = tables[configured_precision].get(cfg.speed.activation_checkpointing)
    if configured_model is None:
        lines.append(f"  configured: speed.activation_checkpointing={cfg.speed.activation_checkpointing} was not measured")
        return "\n".join(lines), True
    configured = configured_model.peak(cfg.data.batch_size)
    fits = configured <= budget
    lines.append(f"  configured: data.batch_size={cfg.data.batch_size} "
                 f"speed.activation_checkpointing={cfg.speed.activation_checkpointing} "
                 f"train.mixed_precision={configured_precision}: "
                 f"{configured / GIB:.1f} GiB, " + ("fits" if fits else "WILL NOT FIT"))
    return "\n".join(lines), fits
