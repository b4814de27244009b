"""Choose each SPADE layer shape's speed path by measurement: ``speed.onehot_gather`` / ``region_modulation: auto``.

The gather and region paths (onehot_conv.py, region_modulation.py) replace dense convolutions with
gathers, ``index_add_`` and per-region work. On a CPU they win by a wide margin (docs/PERFORMANCE.md);
on a GPU, cuDNN's dense convolutions may be faster for some or all layers. Like
``cudnn.benchmark``, ``auto`` times the candidates on the first real batch and keeps the faster:

- per device type and per layer shape (channels, resolution): layers of the same shape share one
  measurement and one path;
- forward + backward of the modulation only (``modulation.modulate``): the part that differs
  between paths; the normalisation before it is the same for all and has side effects (running
  stats, SyncBN collectives), so it is not run. Gradients come from ``torch.autograd.grad`` and
  are not accumulated into the parameters;
- under the training step's autocast (the ``autocast`` given to :class:`SpeedPathChoice`), so
  bf16 / fp16 runs time what they will run;
- the generator's forward that captures each layer's input runs in eval mode (no spectral-norm
  power iteration, no batch statistics) and without gradients, so the measurement leaves the
  training state untouched;
- rank 0 measures, the choice is broadcast: every rank runs the same paths (same roundings);
- the plan is written to the run directory (``speed_paths.json``); a resumed run on the same
  device type reads it back instead of measuring again, so the computation does not change mid-run.

The chosen plan reaches the generators as a new :class:`~spade_dist.models.fast.label_maps.ModulationPlan`
(``SPADEGenerator.use_modulation``): nothing is set on the layers.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from spade_dist.config import SPADE_PATHS, SpeedConfig
from spade_dist.files import write_json_atomic
from spade_dist.logs import PROGRESS_LOGGER
from spade_dist.models.fast import modulation
from spade_dist.models.fast.label_maps import LabelMaps, shape_key
from spade_dist.models.spade import SPADE

# Timing repetitions per candidate after one warm-up run; the minimum is kept (least disturbed).
DEFAULT_REPEATS = 3

# (layer shape key, path, run) -> seconds. Tests inject a fake to force either choice.
Timer = Callable[[str, str, Callable[[], None]], float]

# The training loop's progress lines (``[spade-train] ...``): the choice is part of a run's start.
log = logging.getLogger(PROGRESS_LOGGER)


@dataclass
class SpeedPlan:
    """The chosen path per SPADE layer shape (``paths``) for one device type, and what that means
    per layer (``layers``, by module name: the log and the record show it)."""

    device_type: str
    paths: dict[str, str]
    layers: dict[str, str]
    # Per layer shape key: seconds per candidate (empty when nothing had to be measured).
    timings: dict[str, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for path in self.layers.values():
            counts[path] = counts.get(path, 0) + 1
        return ", ".join(f"{n} x {p}" for p, n in sorted(counts.items())) or "no SPADE layers"


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


def spade_layers(generator: nn.Module) -> dict[str, SPADE]:
    return {name: m for name, m in generator.named_modules() if isinstance(m, SPADE)}


def layer_inputs(generator: nn.Module, semantics: Tensor) -> dict[str, tuple[Tensor, LabelMaps]]:
    """Each SPADE layer's (input activation, label maps) for ``semantics``, by module name, without
    side effects (eval mode, no gradients). Empty when the generator runs the official layer."""
    captured: dict[str, tuple[Tensor, LabelMaps]] = {}
    handles = []
    for name, layer in spade_layers(generator).items():
        def hook(_module: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            x, labels = args
            if isinstance(labels, LabelMaps):
                captured[name] = (x.detach(), labels)
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
    """Time the ``allowed`` paths per SPADE layer shape on ``semantics`` and keep the fastest (a single
    allowed path is taken without timing)."""
    captured = layer_inputs(generator, semantics) if getattr(generator, "modulation", None) is not None else {}
    plan = SpeedPlan(semantics.device.type, {}, {})
    for name, layer in spade_layers(generator).items():
        if name not in captured:  # the official layer (speed.fused_modulation off): dense
            plan.layers[name] = "dense"
            continue
        x, labels = captured[name]
        key = shape_key(x.shape[1], x.shape[2], x.shape[3])
        if key not in plan.paths:
            if len(allowed) == 1:
                plan.paths[key] = allowed[0]
            else:
                plan.timings[key] = _time_paths(layer, x, labels, key, allowed, timer)
                plan.paths[key] = min(allowed, key=lambda p: plan.timings[key][p])
        plan.layers[name] = plan.paths[key]
    return plan


def _time_paths(layer: SPADE, x: Tensor, labels: LabelMaps, key: str, allowed: tuple[str, ...],
                timer: Timer) -> dict[str, float]:
    params = [p for p in layer.parameters() if p.requires_grad]
    seconds: dict[str, float] = {}
    for path in allowed:
        def run(path: str = path) -> None:
            normalized = x.clone().requires_grad_(True)
            out = modulation.modulate(layer, normalized, labels, path)
            torch.autograd.grad(out.float().sum(), [normalized, *params], allow_unused=True)
        seconds[path] = timer(key, path, run)
    return seconds


def _broadcast(plan: Optional[SpeedPlan]) -> SpeedPlan:
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        assert plan is not None
        return plan
    box = [asdict(plan) if plan is not None else None]
    dist.broadcast_object_list(box, src=0)
    return SpeedPlan(**box[0])


def load_plan(path: Path, allowed: tuple[str, ...]) -> Optional[SpeedPlan]:
    """The recorded plan, or None when there is none, it is not a plan, or it names a path that
    ``allowed`` excludes (then it is chosen again). A record of an earlier version (``layers`` and
    ``timings`` only) is read by taking the fastest allowed timed path per shape."""
    try:
        raw = json.loads(path.read_text())
        timings = {str(k): {str(p): float(s) for p, s in v.items()} for k, v in dict(raw.get("timings", {})).items()}
        paths = dict(raw["paths"]) if "paths" in raw else {
            key: min((p for p in allowed if p in seconds), key=lambda p: seconds[p]) for key, seconds in timings.items()}
        plan = SpeedPlan(device_type=str(raw["device_type"]), paths=paths, layers=dict(raw["layers"]), timings=timings)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    chosen = set(plan.paths.values()) | set(plan.layers.values())
    if not chosen <= set(allowed) or not chosen <= set(SPADE_PATHS):
        return None
    return plan


def save_plan(path: Path, plan: SpeedPlan) -> None:
    write_json_atomic(path, asdict(plan), sort_keys=True)


def apply_plan(generators: list[nn.Module], plan: SpeedPlan) -> None:
    """Give each of ``generators`` (the live one and the EMA copy) its plan with the chosen paths
    (a generator running the official layer has no plan and keeps it)."""
    for generator in generators:
        if getattr(generator, "modulation", None) is not None:
            generator.use_modulation(generator.modulation.with_paths(plan.paths))


def choose_speed_paths(generators: list[nn.Module], semantics: Tensor, speed: SpeedConfig, plan_path: Optional[Path],
                       is_main: bool, timer: Optional[Timer] = None,
                       deterministic: bool = False) -> tuple[SpeedPlan, str]:
    """Decide (rank 0), broadcast, apply to ``generators`` and record. Call on every rank.

    ``generators[0]`` is the one measured (the live generator); the same plan goes to the others.
    ``deterministic`` (``train.deterministic``): no timing, whose noise would make two runs of one
    config round differently; ``auto`` then takes the most specialised allowed path (region >
    gather > dense), as outside training. Returns the plan and where it came from ("measured",
    "forced", "deterministic" or "recorded")."""
    allowed = speed.spade_paths
    if deterministic and len(allowed) > 1:
        allowed = allowed[-1:]
        source = "deterministic"
    else:
        source = "forced" if len(allowed) == 1 else "measured"
    plan: Optional[SpeedPlan] = None
    if is_main:
        recorded = load_plan(plan_path, allowed) if plan_path is not None and len(allowed) > 1 else None
        if (recorded is not None and recorded.device_type == semantics.device.type
                and set(recorded.layers) == set(spade_layers(generators[0]))):
            plan, source = recorded, "recorded"
        else:
            plan = measure(generators[0], semantics, allowed, timer or wall_clock_timer(semantics.device))
            if plan_path is not None:
                save_plan(plan_path, plan)
    plan = _broadcast(plan)
    apply_plan(generators, plan)
    return plan, source


class SpeedPathChoice:
    """The training run's choice, once, on its first real batch (or as recorded by an earlier start
    of the run), under the step's autocast; the same on every rank. The loop calls :meth:`once`
    before every step."""

    def __init__(self, speed: SpeedConfig, generators: list[nn.Module], plan_path: Path, is_main: bool,
                 autocast: Callable[[], ContextManager[Any]], deterministic: bool) -> None:
        self.speed, self.generators, self.plan_path, self.is_main = speed, generators, plan_path, is_main
        self.autocast, self.deterministic = autocast, deterministic
        self.done = False

    def once(self, semantics: Tensor) -> None:
        if self.done:
            return
        with self.autocast():
            plan, source = choose_speed_paths(self.generators, semantics, self.speed, self.plan_path, self.is_main,
                                              deterministic=self.deterministic)
        self.done = True
        log.info(f"speed paths on {semantics.device.type} ({source}): {plan.summary()} -> {self.plan_path}")
