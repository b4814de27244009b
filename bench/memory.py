"""Peak training memory of one full GauGAN iteration, by exact accounting of live tensor bytes.

One training iteration of the project's real step code (``train/step.train_step``: G step with GAN
+ feature matching + VGG and its Adam update, then the D step with a fresh no-grad fake and its
update) runs under :class:`LiveBytes`, a ``TorchDispatchMode`` that sees every tensor an operator
returns and follows its storage until it is freed (a weak reference on the storage): the peak of
the sum of live storage bytes is the iteration's peak training memory, and what is live at that
moment is split into the persistent state (parameters, buffers, gradients and optimizer state,
the EMA generator, the VGG weights and the batch: live before the iteration starts) and the rest (activations kept for the backward,
gradients, temporaries). Nothing is sampled, so the number does not depend on the allocator or on
machine load. One untracked iteration runs first, so Adam's state exists (the steady state of a run).

Modes (``--modes``):

- ``reference``: the official computation (``bench/train_step.py``'s ``REFERENCE_OVERRIDES``);
- ``reference+savings``: ``reference`` with ``speed.activation_checkpointing`` = ``--savings``
  (``generator_spade`` by default, ``generator`` or ``all``);
- ``fast``: the config as given (the project's speed paths, ``speed.activation_checkpointing`` as
  the config says, default off);
- ``fast+savings``: ``fast`` with the same savings.

Accounting (``--accounting``):

- ``real``: tensors are computed (needs the memory; run it under a limit such as ``prlimit --as``);
  the step time of the mode is then measured too (``--time-iters`` untracked iterations, best of);
- ``fake``: the iteration runs under ``FakeTensorMode`` (shapes, dtypes and storage sizes, no data,
  no memory): exact for the reference computation, whose shapes do not depend on the label map's
  content (``reference``, ``reference+savings``). The speed paths' shapes do (classes present, label
  regions), so ``fast`` and ``fast+savings`` need ``real``; ``tests/test_bench_memory.py`` checks
  that both accountings give the same bytes where both run.

Precision (``--precision``): ``fp32``, or ``bf16``: the training step's own autocast
(``train.mixed_precision=bf16``, ``train/step.autocast_context``) on the run's device, every mode,
both accountings. Autocast's op lists are the device's: on a CPU (the accounting machine) the
upsampling, ``sum``, ``exp`` / ``rsqrt`` / ``pow`` keep bf16 inputs in bf16, which CUDA's autocast
runs in fp32 (docs/PERFORMANCE.md section 7), so a CPU ``bf16`` run predicts the CPU's bytes; the
CUDA bytes are measured by ``bench/gpu_check.sh`` (section ``memory``, both precisions).

On a CUDA device (override ``train.device=cuda``, real accounting) each run also records
``torch.cuda.max_memory_allocated`` over the tracked iteration and its ratio to the tracked peak:
what the device adds (cuBLAS / cuDNN workspaces, the allocator's 512-byte rounding) measured
against the prediction; ``bench/gpu_check.sh`` runs that (section ``memory``).

Per batch (``--batch``, at least two for the linear model) and mode the JSON run holds the peak,
its split and, with ``real``, the step time; the summary fits ``peak = fixed + per_sample * batch``
through the two smallest batches of each mode and gives the ratios of per-sample memory against
``reference`` (fp32) and of step time with savings against without; ``table_rows`` holds, per
precision, the planner's row (``spade_dist/memory_table.py``, written by ``bench/memory_table.py``)
of the reference modes that ran. The last output line is the whole result.

    prlimit --as=$((20 * 2**30)) python bench/memory.py --config configs/tiny.yaml --batch 1 2
    python bench/memory.py --config configs/coco_stuff_512.yaml --batch 1 2 --modes reference --accounting fake
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import traceback
import weakref
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.train_step import (  # noqa: E402
    COCO_SAMPLE,
    REFERENCE_OVERRIDES,
    add_label_arguments,
    label_batch,
    machine_info,
    resolve_labels,
)
from spade_dist.config import load_config  # noqa: E402
from spade_dist.losses import VGGLoss, save_random_vgg19_weights  # noqa: E402
from spade_dist.memory_plan import architecture_key  # noqa: E402
from spade_dist.models.fast.choice import choose_speed_paths  # noqa: E402
from spade_dist.train.backends import DDPBackend  # noqa: E402
from spade_dist.train.state import TrainState, build_train_state  # noqa: E402
from spade_dist.train.step import LossSet, MicroBatch, autocast_context, prepare_batch, train_step  # noqa: E402

MODES = {"reference": REFERENCE_OVERRIDES, "reference+savings": REFERENCE_OVERRIDES, "fast": [], "fast+savings": []}
SAVINGS = ("generator", "generator_spade", "all")  # speed.activation_checkpointing of the +savings modes (--savings)
PRECISIONS = {"fp32": "no", "bf16": "bf16"}


def _storages(t: torch.Tensor) -> Iterable[torch.UntypedStorage]:
    if t.layout == torch.strided:
        yield t.untyped_storage()
    elif t.layout == torch.sparse_coo:
        yield from (s for part in (t._indices(), t._values()) for s in _storages(part))
    elif t.layout in (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc):
        compressed, plain = (t.crow_indices(), t.col_indices()) if t.layout in (torch.sparse_csr, torch.sparse_bsr) \
            else (t.ccol_indices(), t.row_indices())
        yield from (s for part in (compressed, plain, t.values()) for s in _storages(part))


# Batch norm's saved mean / inverse std (outputs 1 and 2): the CPU and CUDA kernels keep them in
# fp32 for a bf16 / fp16 input, the meta kernels fake tensors run give them the input's dtype.
_STATS_IN_FP32 = {torch.ops.aten.native_batch_norm.default, torch.ops.aten._native_batch_norm_legit.default,
                  torch.ops.aten._native_batch_norm_legit.no_stats,
                  torch.ops.aten._native_batch_norm_legit_functional.default}


def _code_site(op: str) -> str:
    """Where the running code is: the innermost two frames of the project's code (bench excluded)
    and the operator, e.g. ``spade_dist/losses.py:234 forward < spade_dist/losses.py:254 forward: aten.relu_``."""
    frames = [f for f in reversed(traceback.extract_stack()) if f.filename.startswith(str(REPO_ROOT))
              and not any(part in f.filename for part in ("/bench/", "/site-packages/"))][:2]
    where = " < ".join(f"{Path(f.filename).relative_to(REPO_ROOT)}:{f.lineno} {f.name}" for f in frames)
    return f"{where or '(torch)'}: {op}"


class LiveBytes(TorchDispatchMode):
    """The bytes of every storage alive, followed from the operator that made it until it is freed;
    the peak of their sum and, at that peak, the share of storages marked persistent.

    ``sites``: also note where each non-persistent storage was made (:func:`_code_site`); at the
    peak, :attr:`peak_sites` sums the live bytes by that site and :attr:`peak_op` is the operator
    (and code) that reached it: where the peak is and what it is made of."""

    def __init__(self, sites: bool = False) -> None:
        super().__init__()
        self._live: dict[int, tuple[int, bool, weakref.ref]] = {}  # storage address -> bytes, persistent, ref
        self._sites: Optional[dict[int, str]] = {} if sites else None
        self.total = 0
        self.persistent = 0
        self.peak = 0
        self.peak_persistent = 0
        self.peak_sites: Counter[str] = Counter()
        self.peak_op = ""

    def track(self, tensors: Iterable[torch.Tensor], persistent: bool, as_fp32: Iterable[torch.Tensor] = (),
              op: str = "") -> None:
        """Follow ``tensors``' storages (``as_fp32``: those of them a device kernel makes fp32; ``op``: the
        operator that returned them, for --peak-sites)."""
        widened = {id(t) for t in as_fp32 if t.dtype in (torch.bfloat16, torch.float16)}
        site = None
        for t in tensors:
            for storage in _storages(t):
                key = storage._cdata
                if key in self._live:
                    continue
                nbytes = storage.nbytes() * (2 if id(t) in widened else 1)
                ref = weakref.ref(storage, lambda _r, key=key: self._free(key))
                self._live[key] = (nbytes, persistent, ref)
                self.total += nbytes
                self.persistent += nbytes if persistent else 0
                if self._sites is not None and not persistent:
                    site = site or _code_site(op)
                    self._sites[key] = site
        if self.total > self.peak:
            self.peak, self.peak_persistent = self.total, self.persistent
            if self._sites is not None and site is not None:
                self.peak_op = site
                self.peak_sites = Counter()
                for key, (nbytes, _persistent, _ref) in self._live.items():
                    if key in self._sites:
                        self.peak_sites[self._sites[key]] += nbytes

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if self._sites is not None:
            self._sites.pop(key, None)
        if entry is not None:
            self.total -= entry[0]
            self.persistent -= entry[0] if entry[1] else 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        out = func(*args, **(kwargs or {}))
        stats = out[1:3] if func in _STATS_IN_FP32 else ()
        self.track((t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)), persistent=False, as_fp32=stats,
                   op=str(func))
        return out


def _state_tensors(state: TrainState, vgg: Optional[torch.nn.Module]) -> list[torch.Tensor]:
    nets = [state.generator_side, state.discriminator] + ([vgg] if vgg is not None else [])
    tensors = [t for net in [*nets, state.ema.model] for t in (*net.parameters(), *net.buffers())]
    tensors += [p.grad for net in nets for p in net.parameters() if p.grad is not None]
    for opt in (state.opt_G, state.opt_D):
        tensors += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return tensors


def _make_fake(nets: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer], mode: Any) -> None:
    """Replace every parameter and buffer of ``nets`` by a fake tensor of ``mode`` (same shape,
    dtype, device; no data), and point ``optimizers`` at the new parameters. Done on the built
    modules: torch cannot build them under the fake mode (``Module.to`` and the EMA's deepcopy
    refuse fake parameters)."""
    new: dict[int, torch.nn.Parameter] = {}
    for net in nets:
        for module in net.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    if id(p) not in new:
                        new[id(p)] = torch.nn.Parameter(mode.from_tensor(p), requires_grad=p.requires_grad)
                    module._parameters[name] = new[id(p)]
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = mode.from_tensor(b)
    for opt in optimizers:
        if opt.state:
            raise ValueError("bench: optimizer state exists before the fake conversion")
        for group in opt.param_groups:
            group["params"] = [new[id(p)] for p in group["params"]]


def measure(config: str, overrides: list[str], batch: int, vgg_path: Optional[str], fake: bool,
            time_iters: int, peak_sites: int = 0, labels: str = "blocks", labels_dir: Path = COCO_SAMPLE,
            plan_path: Optional[Path] = None) -> dict[str, Any]:
    """One mode at one batch size: the tracked iteration's peak and split (and step time when real);
    ``peak_sites`` > 0: that many of the largest sites of the bytes live at the peak (:class:`LiveBytes`);
    ``labels``: ``coco-sample`` or ``blocks`` (``bench/train_step.py``'s label maps).

    With real accounting the speed paths are chosen first as a training run chooses them on its
    first batch (``choose_speed_paths``: per SPADE layer shape the fastest allowed path, timed),
    so the bytes and step time are those of the paths a run would take; the plan is in the result.
    ``plan_path``: where the choice is recorded, and read back by a later run (as a resumed run
    does), so that the modes compared at one batch size run the same paths."""
    cfg = load_config(config, [f"data.batch_size={batch}", *overrides])
    torch.manual_seed(0)
    backend = DDPBackend.setup(cfg)
    loader_batch = label_batch(cfg, batch, labels, labels_dir)
    state = build_train_state(cfg, backend.device, fused_adam=True)
    backend.wrap(state.generator_side, state.discriminator, state.opt_G, state.opt_D, state.scaler_G, state.scaler_D)
    vgg = None if cfg.loss.no_vgg_loss else VGGLoss.from_file(vgg_path).to(backend.device)
    losses = LossSet.from_config(cfg, vgg)
    micro = [prepare_batch(loader_batch, cfg, backend.device)]
    plan = None
    if not fake:  # as the loop's SpeedPathChoice (a generator running the official layer keeps no plan)
        with autocast_context(cfg.train.mixed_precision, backend.device):
            plan = choose_speed_paths([state.generator, state.ema.model], micro[0].semantics, cfg.speed, plan_path,
                                      True, deterministic=cfg.train.deterministic)[0].summary()
    mode: Any = contextlib.nullcontext()
    if fake:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode()
        _make_fake([state.generator_side, state.discriminator] + ([vgg] if vgg is not None else []),
                   [state.opt_G, state.opt_D], mode)
        micro = [MicroBatch(mode.from_tensor(micro[0].semantics), mode.from_tensor(micro[0].real))]
    with mode:
        train_step(backend, losses, micro, 0, cfg)  # Adam's state, as in every later step
        tracker = LiveBytes(sites=peak_sites > 0)
        tracker.track(_state_tensors(state, vgg) + [micro[0].semantics, micro[0].real], persistent=True)
        start_bytes = tracker.total
        cuda = backend.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(backend.device)
            torch.cuda.reset_peak_memory_stats(backend.device)
        with tracker:
            train_step(backend, losses, micro, 1, cfg)
        # What the CUDA caching allocator handed out at its peak, for the same iteration: the
        # prediction's check (kernels' workspaces included; the allocator's reserved cache is not).
        device_peak = torch.cuda.max_memory_allocated(backend.device) if cuda else None
        seconds = []
        for step in range(2, 2 + (0 if fake else time_iters)):
            t0 = time.perf_counter()
            train_step(backend, losses, micro, step, cfg)
            seconds.append(time.perf_counter() - t0)
    sites = {"peak_op": tracker.peak_op, "peak_sites": tracker.peak_sites.most_common(peak_sites)} if peak_sites else {}
    return {"batch": batch, "speed_paths": plan, "peak_bytes": tracker.peak, "persistent_bytes_at_peak": tracker.peak_persistent,
            "other_bytes_at_peak": tracker.peak - tracker.peak_persistent, "persistent_bytes_at_start": start_bytes,
            "step_s": min(seconds) if seconds else None, "cuda_max_memory_allocated_bytes": device_peak,
            "cuda_over_tracked": round(device_peak / tracker.peak, 4) if device_peak else None, **sites}


def fit(points: list[dict[str, Any]]) -> dict[str, float]:
    """``peak = fixed + per_sample * batch`` through the two smallest batches."""
    a, b = sorted(points, key=lambda r: r["batch"])[:2]
    per_sample = (b["peak_bytes"] - a["peak_bytes"]) / (b["batch"] - a["batch"])
    return {"fixed_bytes": a["peak_bytes"] - per_sample * a["batch"], "per_sample_bytes": per_sample}


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(REPO_ROOT / "configs" / "coco_stuff.yaml"))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2], help="per-GPU batch sizes (>= 2 of them for the fit)")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    p.add_argument("--precision", nargs="+", choices=list(PRECISIONS), default=["fp32"],
                   help="bf16: the training step's autocast (train.mixed_precision=bf16) on the run's device; "
                        "ratios stay against reference/fp32")
    p.add_argument("--accounting", choices=("real", "fake"), default="real")
    p.add_argument("--savings", choices=SAVINGS, default="generator_spade",
                   help="speed.activation_checkpointing of the +savings modes")
    p.add_argument("--time-iters", type=int, default=2, help="untracked iterations timed per run (real accounting)")
    p.add_argument("--peak-sites", type=int, default=0, metavar="N",
                   help="per run, the N largest sites (code and operator) of the bytes live at the peak")
    p.add_argument("--vgg-weights", default="", help="VGG19 weights file (default: random weights of the right shapes)")
    add_label_arguments(p)
    p.add_argument("overrides", nargs="*", help="dotted config overrides applied to every mode (e.g. train.device=cuda)")
    args = p.parse_args(argv)
    if args.accounting == "fake" and any(m.startswith("fast") for m in args.modes):
        p.error("--accounting fake runs the reference modes only (the speed paths' shapes depend on the label "
                "map's content); measure fast and fast+savings with --accounting real")
    if len(set(args.batch)) < 2:
        p.error("--batch needs two different sizes to fit memory = fixed + per_sample * batch")
    return args


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    runs: list[dict[str, Any]] = []
    cfg = load_config(args.config, list(args.overrides))
    labels = resolve_labels(cfg, args.labels, Path(args.labels_dir))
    with tempfile.TemporaryDirectory() as tmp:
        vgg_path = args.vgg_weights or str(save_random_vgg19_weights(Path(tmp) / "vgg19.pth", seed=0))
        for mode in args.modes:
            for precision in args.precision:
                for batch in args.batch:
                    savings = [f"speed.activation_checkpointing={args.savings}"] if mode.endswith("+savings") else []
                    overrides = [*args.overrides, *MODES[mode], *savings, f"train.mixed_precision={PRECISIONS[precision]}"]
                    # fast and fast+savings at one batch size and precision take the same speed paths
                    plan_path = Path(tmp) / f"speed_paths_{batch}_{precision}.json" if mode.startswith("fast") else None
                    run = {"mode": mode, "precision": precision, "accounting": args.accounting,
                           **measure(args.config, overrides, batch, vgg_path, args.accounting == "fake", args.time_iters,
                                    args.peak_sites, labels, Path(args.labels_dir), plan_path)}
                    runs.append(run)
                    print(json.dumps({"run": run}), flush=True)
    models = {}
    for run in runs:
        models.setdefault(f"{run['mode']}/{run['precision']}", []).append(run)
    fitted = {key: fit(points) for key, points in models.items()}
    ratios: dict[str, Any] = {}
    reference = fitted.get("reference/fp32")
    for key, model in fitted.items():
        if reference is not None and key != "reference/fp32":
            ratios[f"{key} per_sample / reference"] = round(model["per_sample_bytes"] / reference["per_sample_bytes"], 4)
    for precision in args.precision:
        for base in ("reference", "fast"):
            plain, saved = models.get(f"{base}/{precision}"), models.get(f"{base}+savings/{precision}")
            if plain and saved and all(r["step_s"] for r in plain + saved):
                ratios[f"{base}+savings/{precision} step_s / {base}"] = round(
                    sum(r["step_s"] for r in saved) / sum(r["step_s"] for r in plain), 4)
    # Rows of spade_dist/memory_table.py (the planner's tables, one per precision): the reference
    # computation's model, by speed.activation_checkpointing value (bench/memory_table.py merges them).
    table_rows = {}
    for precision in args.precision:
        settings = {setting: [round(fitted[key]["fixed_bytes"]), round(fitted[key]["per_sample_bytes"])]
                    for setting, key in (("off", f"reference/{precision}"), (args.savings, f"reference+savings/{precision}"))
                    if key in fitted}
        if settings:
            table_rows[precision] = {"key": list(architecture_key(cfg)), **settings}
    out = {"benchmark": "memory", "config": str(args.config), "overrides": args.overrides, "savings": args.savings,
           "labels": labels,
           "crop_size": cfg.data.crop_size, "aspect_ratio": cfg.data.aspect_ratio, "accounting": args.accounting,
           "runs": runs, "linear_model": fitted, "ratios": ratios, "table_rows": table_rows,
           "machine": machine_info(torch.device(cfg.train.device if cfg.train.device != "auto" else "cpu"))}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
