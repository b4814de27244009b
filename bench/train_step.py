"""Images/s of one full GauGAN training iteration: reference mode vs the project's fast path.

Both modes run IN THE SAME PROCESS on the same batch, from the same initial weights, with the
project's real step code (``spade_dist.train.step.train_step``: G step with GAN + feature matching
+ VGG losses and its Adam update, then the D step with a fresh no-grad fake and its update).
Iterations are interleaved (ref, fast, fast, ref, ...) so machine-load drift hits both alike.

- reference: how the official code runs - eager fp32, channels-first, separate gamma/beta convs
  (``speed.fused_modulation=false``), the label map resized in every SPADE layer, dense
  ``mlp_shared`` convolutions, torch's spectral-norm backward, every label channel into D, the G
  step's D in one pass over cat(fake, real) (``speed.g_step_real_pass=joint``), out-of-place
  activations, and every loss read with ``.item()`` after every step (host syncs for logging).
- fast: the config as given (project defaults: fused gamma/beta, one resize per resolution,
  one-hot gather for ``mlp_shared``, gamma/beta per uniform region, fused modulation
  multiply-add with its own backward, in-place activations in the generator's blocks,
  closed-form spectral-norm backward, D's label input as a gather over the classes present, the G
  step's real images judged without a graph, no host sync in the loop),
  with the per-layer speed paths chosen as a training run chooses them on its first batch
  (``auto``: dense / gather / region timed per SPADE layer; JSON ``speed_paths``).

One run per (batch, thread count) of ``--batch`` x ``--threads`` (``0`` = all cores), each with
fresh networks from the same seed; each run prints one ``{"run": ...}`` JSON line as it finishes
and the last output line is one JSON object with every run and a ``ratios`` summary. Per run:
images/s of both modes, ``ratio`` (fast / reference), ``cpu_ratio`` (the same from process CPU
seconds, robust to other jobs at 1 thread), the 1/5/15-minute load averages (as
``uptime`` prints them) at its start and end, peak memory per mode (CPU: sampled RSS high-water
while that mode runs, plus the process ``ru_maxrss`` at the end; CUDA: ``max_memory_allocated``),
FLOPs per image counted with ``torch.utils.flop_counter.FlopCounterMode`` during the warm-up
iteration (the fast path's count is lower: gathers are not multiply-adds) and the loss
difference between the modes at the first iteration (same weights, same batch).

    python bench/train_step.py --config configs/coco_stuff.yaml --batch 1 2 --threads 1 0 --warmup 1 --iters 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from spade_dist.config import Config, load_config  # noqa: E402
from spade_dist.losses import VGGLoss, save_random_vgg19_weights  # noqa: E402
from spade_dist.models.fast.choice import choose_speed_paths  # noqa: E402
from spade_dist.train.backends import DDPBackend  # noqa: E402
from spade_dist.train.state import TrainState, build_train_state  # noqa: E402
from spade_dist.train.step import LossSet, MicroBatch, autocast_context, prepare_batch, train_step  # noqa: E402

REFERENCE_OVERRIDES = [
    "speed.fused_modulation=false", "speed.onehot_gather=false", "speed.region_modulation=false",
    "speed.channels_last=false", "speed.fast_spectral_norm=false",
    "speed.discriminator_labels=dense", "speed.g_step_real_pass=joint",
    "train.mixed_precision='no'", "speed.compile=false",
]


class RssPeak:
    """Highest resident set size seen while active, sampled every few ms from /proc/self/statm."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> "RssPeak":
        self._stop.clear()
        self.peak = max(self.peak, self._rss())
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()


def synthetic_batch(cfg: Config, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A loader-format batch (docs/FORMATS.md) with blocky label / instance regions like real maps."""
    g = torch.Generator().manual_seed(seed)
    crop = cfg.data.crop_size
    h, w = round(crop / cfg.data.aspect_ratio), crop
    coarse = (batch, 1, max(h // 16, 1), max(w // 16, 1))
    label = torch.randint(0, cfg.data.label_nc, coarse, generator=g)
    if cfg.data.contain_dontcare_label:
        label = torch.where(torch.rand(coarse, generator=g) < 0.05, torch.full_like(label, 255), label)
    instance = torch.randint(0, 20, coarse, generator=g)
    up = torch.nn.functional.interpolate
    return {
        "image": torch.randint(0, 256, (batch, 3, h, w), generator=g, dtype=torch.uint8),
        "label": up(label.float(), size=(h, w), mode="nearest").long(),
        "instance": up(instance.float(), size=(h, w), mode="nearest").long(),
    }


COCO_SAMPLE = REPO_ROOT.parent / "shared" / "datasets" / "coco_stuff_sample"


def coco_sample_batch(cfg: Config, batch: int, root: Path) -> dict[str, torch.Tensor]:
    """A loader-format batch of REAL label maps: the first ``batch`` training triples of the
    COCO-Stuff sample, through the project's own training preprocessing (seeded crop, no flip).

    The cost of the region path depends on how much of a label map lies near a region border
    (region_modulation.py); real maps, not random blocks, are what a training run sees.
    """
    import random

    import numpy as np
    from PIL import Image

    from spade_dist.data.transforms import PreprocessOptions, sample_geometry, transform_ids, transform_image

    labels = sorted((root / "train_label").glob("*.png"))
    if len(labels) < batch:
        raise SystemExit(f"bench: {root / 'train_label'} has {len(labels)} label maps, --batch {batch} needs that many")
    d = cfg.data
    opts = PreprocessOptions(d.preprocess_mode, d.load_size, d.crop_size, d.aspect_ratio, flip=False)
    images, label_maps, instance_maps = [], [], []
    for i, label_path in enumerate(labels[:batch]):
        key = label_path.stem
        label = np.asarray(Image.open(label_path))
        geo = sample_geometry(opts, label.shape[1], label.shape[0], random.Random(i))
        with Image.open(root / "train_img" / f"{key}.jpg") as photo:
            images.append(torch.from_numpy(np.ascontiguousarray(transform_image(photo.convert("RGB"), geo))))
        label_maps.append(torch.from_numpy(transform_ids(label, geo).astype(np.int64)))
        instance = np.asarray(Image.open(root / "train_inst" / f"{key}.png"))
        instance_maps.append(torch.from_numpy(transform_ids(instance, geo).astype(np.int64)))
    return {"image": torch.stack(images), "label": torch.stack(label_maps).unsqueeze(1),
            "instance": torch.stack(instance_maps).unsqueeze(1)}


def add_label_arguments(p: argparse.ArgumentParser) -> None:
    """``--labels`` / ``--labels-dir``, as this bench and ``bench/memory.py`` take them."""
    p.add_argument("--labels", choices=("auto", "coco-sample", "blocks"), default="auto",
                   help="label maps: the real COCO-Stuff sample (--labels-dir; 'auto' = when present and the config "
                        "has COCO's 182 labels) or random 16-px blocks (a pessimistic case for the region path)")
    p.add_argument("--labels-dir", default=str(COCO_SAMPLE), help="COCO-Stuff sample (train_img/_label/_inst)")


def resolve_labels(cfg: Config, labels: str, labels_dir: Path) -> str:
    """``--labels`` as run: ``auto`` is the COCO-Stuff sample where it applies, random blocks elsewhere."""
    if labels != "auto":
        return labels
    coco_like = cfg.data.label_nc == 182 and not cfg.data.no_instance
    return "coco-sample" if coco_like and labels_dir.is_dir() else "blocks"


def label_batch(cfg: Config, batch: int, labels: str, labels_dir: Path) -> dict[str, torch.Tensor]:
    """The loader-format batch of a resolved ``labels`` choice."""
    return coco_sample_batch(cfg, batch, labels_dir) if labels == "coco-sample" else synthetic_batch(cfg, batch)


class Mode:
    """One variant: its config, networks, optimizers and backend (world size 1)."""

    def __init__(self, name: str, cfg: Config, vgg: Optional[VGGLoss], host_sync_logging: bool, seed: int,
                 dtype: torch.dtype = torch.float32) -> None:
        self.name = name
        self.cfg = cfg
        self.host_sync_logging = host_sync_logging
        torch.manual_seed(seed)  # same initial weights in both modes
        self.backend = DDPBackend.setup(cfg)
        self.state: TrainState = build_train_state(cfg, self.backend.device, fused_adam=True, dtype=dtype)
        self.backend.wrap(self.state.generator_side, self.state.discriminator, self.state.opt_G, self.state.opt_D,
                          self.state.scaler_G, self.state.scaler_D)
        self.losses = LossSet.from_config(cfg, vgg)
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # process CPU seconds (all threads) per timed iteration
        self.peak_bytes = 0
        self.step = 0

    def iteration(self, mb: MicroBatch) -> dict[str, float]:
        """One full iteration; returns the losses only in reference mode (that is its host sync)."""
        result = train_step(self.backend, self.losses, [mb], self.step, self.cfg)
        self.step += 1
        if self.host_sync_logging:
            return {k: v.item() for k, v in result.losses.items()}
        return {}

    def sync(self) -> None:
        if self.backend.device.type == "cuda":
            torch.cuda.synchronize(self.backend.device)


def count_flops(mode: Mode, mb: MicroBatch) -> tuple[int, dict[str, float]]:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        result = train_step(mode.backend, mode.losses, [mb], mode.step, mode.cfg)
    mode.step += 1
    return counter.get_total_flops(), {k: float(v) for k, v in result.losses.items()}


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "device": str(device),
        "load_avg_1m": os.getloadavg()[0],
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO_ROOT / "configs" / "coco_stuff.yaml"))
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="per-rank batch sizes (data.batch_size), one run each")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per mode and run")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per mode and run (the first counts FLOPs)")
    p.add_argument("--threads", type=int, nargs="+", default=[0],
                   help="torch thread counts, one run each (0 = all cores: os.cpu_count())")
    p.add_argument("--vgg-weights", default="", help="VGG19 weights file (default: random weights, same cost)")
    p.add_argument("--fast-override", action="append", default=[], help="dotted override for the fast mode only")
    p.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    add_label_arguments(p)
    p.add_argument("overrides", nargs="*", help="dotted config overrides for both modes, e.g. model.ngf=32")
    args = p.parse_args(argv)
    if min(args.batch) < 1 or args.iters < 1 or args.warmup < 0 or min(args.threads) < 0:
        p.error(f"--batch and --iters must be >= 1, --warmup and --threads >= 0 "
                f"(got {args.batch}, {args.iters}, {args.warmup}, {args.threads})")
    return args


def run_one(args: argparse.Namespace, batch: int, threads: int, labels: str, vgg: Optional[VGGLoss]) -> dict[str, Any]:
    """Both modes at one (batch, thread count): fresh networks from the same seed, ABBA-interleaved."""
    torch.set_num_threads(threads)
    common = [f"data.batch_size={batch}"] + list(args.overrides)
    ref_cfg = load_config(args.config, common + REFERENCE_OVERRIDES)
    fast_cfg = load_config(args.config, common + list(args.fast_override))
    modes = [Mode("reference", ref_cfg, vgg, host_sync_logging=True, seed=0),
             Mode("fast", fast_cfg, vgg, host_sync_logging=False, seed=0)]
    device = modes[0].backend.device
    if vgg is not None:
        vgg.to(device)  # in place; the same module serves every run
    raw = label_batch(ref_cfg, batch, labels, Path(args.labels_dir))
    batches = {m.name: prepare_batch(raw, m.cfg, device) for m in modes}
    # The speed paths as a training run picks them on its first batch (speed.onehot_gather /
    # region_modulation: auto times dense / gather / region per SPADE layer shape; the reference has none).
    plans = {}
    for m in modes:
        with autocast_context(m.cfg.train.mixed_precision, device):  # as the loop's SpeedPathChoice
            plans[m.name] = choose_speed_paths([m.state.generator, m.state.ema.model], batches[m.name].semantics,
                                               m.cfg.speed, None, True, deterministic=m.cfg.train.deterministic)[0].summary()
    load_start = os.getloadavg()

    flops: dict[str, int] = {}
    first_losses: dict[str, dict[str, float]] = {}
    for m in modes:  # first warm-up iteration: FLOPs and the losses of identical starting points
        if args.no_flops:
            first_losses[m.name] = {k: float(v) for k, v in train_step(m.backend, m.losses, [batches[m.name]], m.step, m.cfg).losses.items()}
            m.step += 1
        else:
            flops[m.name], first_losses[m.name] = count_flops(m, batches[m.name])
    for _ in range(max(args.warmup - 1, 0)):
        for m in modes:
            m.iteration(batches[m.name])
    for i in range(args.iters):
        order = modes if i % 2 == 0 else modes[::-1]  # ABBA interleaving
        for m in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            with RssPeak() as rss:
                m.sync()
                start, cpu_start = time.perf_counter(), time.process_time()
                m.iteration(batches[m.name])
                m.sync()
                m.times.append(time.perf_counter() - start)
                m.cpu_times.append(time.process_time() - cpu_start)
            m.peak_bytes = max(m.peak_bytes, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.peak)

    run: dict[str, Any] = {"batch": batch, "threads": threads, "device": str(device), "load_avg_start": list(load_start),
                           "load_avg_end": list(os.getloadavg())}
    for m in modes:
        med = statistics.median(m.times)
        run[m.name] = {
            "images_per_s": batch / med, "median_s": med, "times_s": [round(t, 4) for t in m.times],
            "median_cpu_s": statistics.median(m.cpu_times), "cpu_times_s": [round(t, 4) for t in m.cpu_times],
            "peak_memory_bytes": m.peak_bytes, "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_sampled",
            "speed_paths": plans[m.name],
        }
        if m.name in flops:
            run[m.name]["flops_per_image"] = flops[m.name] / batch
            run[m.name]["achieved_gflops"] = flops[m.name] / med / 1e9
    run["ratio"] = run["fast"]["images_per_s"] / run["reference"]["images_per_s"]
    # CPU seconds ratio: at 1 thread close to the quiet-machine wall ratio even when other jobs
    # time-slice the cores (they do not add to this process's CPU time); at more threads it also
    # counts OpenMP threads spinning at barriers, so the wall ratio is the one that counts there.
    run["cpu_ratio"] = run["reference"]["median_cpu_s"] / run["fast"]["median_cpu_s"]
    run["first_iteration_loss_rel_diff"] = {
        k: abs(first_losses["fast"][k] - v) / max(abs(v), 1e-12) for k, v in first_losses["reference"].items()
    }
    return run


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    probe = load_config(args.config, [f"data.batch_size={args.batch[0]}"] + list(args.overrides) + list(args.fast_override))
    if probe.train.mixed_precision != "no" and probe.train.device == "cpu":
        raise SystemExit("bench: mixed precision on CPU is not a fast path here (no bf16 hardware); leave it 'no'")
    labels = resolve_labels(probe, args.labels, Path(args.labels_dir))
    thread_counts = [t or (os.cpu_count() or 1) for t in args.threads]
    initial_threads = torch.get_num_threads()

    runs: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            vgg: Optional[VGGLoss] = None
            if not probe.loss.no_vgg_loss:
                path = args.vgg_weights or str(save_random_vgg19_weights(Path(tmp) / "vgg19.pth", seed=0))
                vgg = VGGLoss.from_file(path)
            for batch in args.batch:
                for threads in thread_counts:
                    run = run_one(args, batch, threads, labels, vgg)
                    runs.append(run)
                    # One line per run as it finishes (a long sweep shows progress); the last line is the whole result.
                    print(json.dumps({"run": run}), flush=True)
    finally:
        torch.set_num_threads(initial_threads)

    out: dict[str, Any] = {"benchmark": "train_step", "config": str(args.config), "overrides": args.overrides,
                           "fast_overrides": args.fast_override, "iters": args.iters, "warmup": args.warmup,
                           "crop_size": probe.data.crop_size, "ngf": probe.model.ngf,
                           "semantic_nc": probe.data.label_layout.semantic_nc, "labels": labels, "runs": runs,
                           "ratios": [{"batch": r["batch"], "threads": r["threads"], "ratio": round(r["ratio"], 4)} for r in runs],
                           "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                           "machine": machine_info(torch.device(runs[-1]["device"]))}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
