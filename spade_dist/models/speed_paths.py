"""Choose each SPADE layer's speed path by measurement: ``model.onehot_gather`` / ``region_modulation: auto``.

The gather and region paths (onehot_conv.py, region_modulation.py) replace dense convolutions with
gathers, ``index_add_`` and per-region work. On a CPU they win by a wide margin (docs/PERFORMANCE.md);
on a GPU, cuDNN's dense convolutions may be faster for some or all layers. Like
``cudnn.benchmark``, ``auto`` times the candidates on the first real batch and keeps the faster:

- per device type and per layer shape (channels, resolution): layers of the same shape share one
  measurement;
- forward + backward of the modulation only (``SPADE.modulate``): the part that differs between
  paths; the normalisation before it is the same for all and has side effects (running stats,
  SyncBN collectives), so it is not run. Gradients come from ``torch.autograd.grad`` and are
  not accumulated into the parameters;
- the caller runs it under the training step's autocast (train/loop.py, bench/variants.py), so
  bf16 / fp16 runs time what they will run;
- the generator's forward that captures each layer's input runs in eval mode (no spectral-norm
  power iteration, no batch statistics) and without gradients, so the measurement leaves the
  training state untouched;
- rank 0 measures, the choice is broadcast: every rank runs the same paths (same roundings);
- the plan is written to the run directory (``speed_paths.json``, ``plan_path``); a resumed run on the same device type reads
  it back instead of measuring again, so the computation does not change mid-run.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from spade_dist.files import write_json_atomic
from spade_dist.models.spade import SPEED_PATHS, SPADE, SegmapPyramid

# Timing repetitions per candidate after one warm-up run; the minimum is kept (least disturbed).
DEFAULT_REPEATS = 3

# (layer shape key, path, run) -> seconds. Tests inject a fake to force either choice.
Timer = Callable[[str, str, Callable[[], None]], float]


@dataclass
class SpeedPlan:
    """The path of every SPADE layer (by module name) for one device type."""

    device_type: str
    layers: dict[str, str]
    # Per layer shape key: seconds per candidate (empty when nothing had to be measured).
    timings: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for path in self.layers.values():
            counts[path] = counts.get(path, 0) + 1
        return ", ".join(f"{n} x {p}" for p, n in sorted(counts.items())) or "no SPADE layers"


def candidates(onehot_gather: str, region_modulation: str) -> tuple[str, ...]:
    """The paths allowed by the two switches (``on`` / ``off`` / ``auto``), fastest-to-try last."""
    if onehot_gather == "off":
        if region_modulation == "on":
            raise ValueError("model.region_modulation=on needs model.onehot_gather on or auto")
        return ("dense",)
    if region_modulation == "on":
        return ("region",)
    base = ("dense", "gather") if onehot_gather == "auto" else ("gather",)
    return base + (("region",) if region_modulation == "auto" else ())


def spade_layers(generator: nn.Module) -> dict[str, SPADE]:
    return {name: m for name, m in generator.named_modules() if isinstance(m, SPADE)}


def apply_plan(generators: list[nn.Module], plan: SpeedPlan) -> None:
    """Set every SPADE layer's path in each of ``generators`` (the live one and the EMA copy)."""
    for generator in generators:
        layers = spade_layers(generator)
        if set(layers) != set(plan.layers):
            raise ValueError(f"speed plan names layers {sorted(plan.layers)[:3]}..., the generator has {sorted(layers)[:3]}...")
        for name, layer in layers.items():
            layer.path = plan.layers[name]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_clock_timer(device: torch.device, repeats: int = DEFAULT_REPEATS) -> Timer:
    """The real timer: one warm-up, then the minimum of ``repeats`` synchronized runs."""

    def time_it(_key: str, _path: str, run: Callable[[], None]) -> float:
        run()
        _synchronize(device)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            _synchronize(device)
            best = min(best, time.perf_counter() - start)
        return best

    return time_it


def _capture_inputs(generator: nn.Module, semantics: Tensor) -> dict[str, tuple[Tensor, SegmapPyramid]]:
    """Each SPADE layer's (input activation, label pyramid) for ``semantics``, without side effects."""
    captured: dict[str, tuple[Tensor, SegmapPyramid]] = {}
    handles = []
    for name, layer in spade_layers(generator).items():
        def hook(_module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            x, segmap = args
            if isinstance(segmap, SegmapPyramid):
                captured[name] = (x.detach(), segmap)
        handles.append(layer.register_forward_pre_hook(hook))
    was_training = generator.training
    try:
        generator.eval()
        with torch.no_grad():
            generator(semantics)
    finally:
        generator.train(was_training)
        for h in handles:
            h.remove()
    return captured


def measure(generator: nn.Module, semantics: Tensor, allowed: tuple[str, ...], timer: Timer) -> SpeedPlan:
    """Time the ``allowed`` paths per SPADE layer shape on ``semantics`` and keep the fastest."""
    layers = spade_layers(generator)
    if len(allowed) == 1 or not layers:
        return SpeedPlan(semantics.device.type, {name: allowed[0] for name in layers})
    captured = _capture_inputs(generator, semantics)
    plan = SpeedPlan(semantics.device.type, {})
    for name, layer in layers.items():
        if name not in captured:  # no fused pyramid (fused_modulation off): only dense exists
            plan.layers[name] = "dense"
            continue
        x, pyramid = captured[name]
        key = f"{layer.mlp_gamma.out_channels}x{x.shape[2]}x{x.shape[3]}"
        if key not in plan.timings:
            params = [p for p in layer.parameters() if p.requires_grad]
            seconds: dict[str, float] = {}
            for path in allowed:
                def run(path: str = path) -> None:
                    normalized = x.clone().requires_grad_(True)
                    out = layer.modulate(normalized, pyramid, path)
                    torch.autograd.grad(out.float().sum(), [normalized, *params], allow_unused=True)
                seconds[path] = timer(key, path, run)
            plan.timings[key] = seconds
        timings = plan.timings[key]
        plan.layers[name] = min(allowed, key=lambda p: timings[p])
    return plan


def _broadcast(plan: Optional[SpeedPlan]) -> SpeedPlan:
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        assert plan is not None
        return plan
    box = [asdict(plan) if plan is not None else None]
    dist.broadcast_object_list(box, src=0)
    return SpeedPlan(**box[0])


def load_plan(path: Path) -> Optional[SpeedPlan]:
    """The recorded plan, or None when there is none (or it is not a plan: then it is re-measured)."""
    try:
        raw = json.loads(path.read_text())
        plan = SpeedPlan(device_type=str(raw["device_type"]), layers=dict(raw["layers"]), timings=dict(raw.get("timings", {})))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not all(p in SPEED_PATHS for p in plan.layers.values()):
        return None
    return plan


def save_plan(path: Path, plan: SpeedPlan) -> None:
    write_json_atomic(path, asdict(plan), sort_keys=True)


def choose_speed_paths(generators: list[nn.Module], semantics: Tensor, onehot_gather: str, region_modulation: str,
                       plan_path: Optional[Path], is_main: bool, timer: Optional[Timer] = None,
                       deterministic: bool = False) -> tuple[SpeedPlan, str]:
    """Decide (rank 0), broadcast, apply to ``generators`` and record. Call on every rank.

    ``generators[0]`` is the one measured (the live generator); the same plan goes to the others.
    ``deterministic`` (``train.deterministic``): no timing, whose noise would make two runs of one
    config round differently; ``auto`` then takes the most specialised allowed path (region >
    gather > dense), as outside training. Returns the plan and where it came from ("measured",
    "forced", "deterministic" or "recorded")."""
    allowed = candidates(onehot_gather, region_modulation)
    if deterministic and len(allowed) > 1:
        allowed = allowed[-1:]
        source = "deterministic"
    else:
        source = "forced" if len(allowed) == 1 else "measured"
    plan: Optional[SpeedPlan] = None
    if is_main:
        path = plan_path
        recorded = load_plan(path) if path is not None and len(allowed) > 1 else None
        names = set(spade_layers(generators[0]))
        if (recorded is not None and recorded.device_type == semantics.device.type and set(recorded.layers) == names
                and all(p in allowed for p in recorded.layers.values())):
            plan, source = recorded, "recorded"
        else:
            plan = measure(generators[0], semantics, allowed, timer or wall_clock_timer(semantics.device))
            if path is not None:
                save_plan(path, plan)
    plan = _broadcast(plan)
    apply_plan(generators, plan)
    return plan, source
