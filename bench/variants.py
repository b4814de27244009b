"""Images/s of the full training iteration for config variants, each against the first (baseline).

    python bench/variants.py --config configs/quickstart.yaml --batch 2 \
        --variant eager= --variant compiled=speed.compile=true [overrides for all ...]

Every variant is a :class:`bench.train_step.Mode` (the project's real step: G step with its losses and
Adam update, then the D step) built from the same seed, run on the same batch IN THE SAME PROCESS;
timed iterations are interleaved (A B C, C B A, ...) so load drift hits all alike. Warm-up iterations
are untimed: they include ``torch.compile``'s compilation (reported separately as
``first_iteration_s``) and, for ``auto`` speed paths, the per-layer measurement
(``spade_dist.models.fast.choice``, as the training loop does on its first batch).

The last output line is one JSON object (docs/PERFORMANCE.md): per variant images/s, median and all
times, first-iteration seconds, peak memory, FLOPs per image when counted, the chosen speed paths;
``ratio`` = images/s / the baseline's; the overrides; ``load_avg`` before and after; machine info.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.train_step import COCO_SAMPLE, Mode, RssPeak, coco_sample_batch, count_flops, machine_info, synthetic_batch  # noqa: E402
from spade_dist.config import Config, load_config  # noqa: E402
from spade_dist.losses import VGGLoss, save_random_vgg19_weights  # noqa: E402
from spade_dist.models.fast.choice import choose_speed_paths  # noqa: E402
from spade_dist.train.step import autocast_context, prepare_batch  # noqa: E402


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``name=key=value,key=value`` (or ``name=`` for the config as given) -> (name, overrides)."""
    name, _, rest = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"--variant {text!r}: expected NAME=[dotted.key=value,...]")
    return name, [o for o in rest.split(",") if o]


def load_raw_batch(cfg: Config, batch: int, labels: str, labels_dir: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Real COCO-Stuff sample label maps when asked / available for a COCO config, else blocks."""
    if labels == "auto":
        coco_like = cfg.data.label_nc == 182 and not cfg.data.no_instance
        labels = "coco-sample" if coco_like and labels_dir.is_dir() and len(list((labels_dir / "train_label").glob("*.png"))) >= batch else "blocks"
    raw = coco_sample_batch(cfg, batch, labels_dir) if labels == "coco-sample" else synthetic_batch(cfg, batch)
    return raw, labels


def time_variants(config: str, variants: list[tuple[str, list[str]]], common: list[str], batch: int, iters: int,
                  warmup: int, flops: bool = True, labels: str = "auto", labels_dir: Path = COCO_SAMPLE,
                  vgg_weights: str = "") -> dict[str, Any]:
    """Build every variant, warm up, time interleaved; returns the JSON-able result."""
    if warmup < 1:
        raise ValueError("warmup must be >= 1 (compilation and speed-path measurement happen there)")
    cfgs = {name: load_config(config, [f"data.batch_size={batch}", *common, *extra]) for name, extra in variants}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        first_cfg = next(iter(cfgs.values()))
        vgg: Optional[VGGLoss] = None
        if not first_cfg.loss.no_vgg_loss:
            vgg = VGGLoss.from_file(vgg_weights or str(save_random_vgg19_weights(Path(tmp) / "vgg19.pth", seed=0)))
        modes = [Mode(name, cfg, vgg, host_sync_logging=False, seed=0) for name, cfg in cfgs.items()]
        device = modes[0].backend.device
        if vgg is not None:
            vgg.to(device)
        raw, labels_used = load_raw_batch(first_cfg, batch, labels, labels_dir)
        batches = {m.name: prepare_batch(raw, m.cfg, device) for m in modes}
        out: dict[str, Any] = {"benchmark": "variants", "config": config, "common_overrides": common, "batch": batch,
                               "iters": iters, "warmup": warmup, "labels": labels_used, "variants": {}}
        for m in modes:
            record: dict[str, Any] = {"overrides": dict(variants)[m.name]}
            if m.cfg.model.netG == "spade":
                with autocast_context(m.cfg.train.mixed_precision, device):  # as the training loop does
                    plan, source = choose_speed_paths([m.state.generator, m.state.ema.model], batches[m.name].semantics,
                                                      m.cfg.speed, None, True)
                record["speed_paths"] = {"source": source, "summary": plan.summary(), "timings_s": plan.timings}
            if m.cfg.speed.compile:
                m.state.compile(m.cfg.speed.compile_mode)
            m.sync()
            start = time.perf_counter()
            m.iteration(batches[m.name])  # compiles when speed.compile
            m.sync()
            record["first_iteration_s"] = time.perf_counter() - start
            if flops:
                record["flops_per_image"] = count_flops(m, batches[m.name])[0] / batch
            for _ in range(warmup - 1):
                m.iteration(batches[m.name])
            out["variants"][m.name] = record
        for i in range(iters):
            for m in (modes if i % 2 == 0 else modes[::-1]):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                with RssPeak() as rss:
                    m.sync()
                    start = time.perf_counter()
                    m.iteration(batches[m.name])
                    m.sync()
                    m.times.append(time.perf_counter() - start)
                m.peak_bytes = max(m.peak_bytes, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.peak)
    base = modes[0]
    for m in modes:
        med = statistics.median(m.times)
        record = out["variants"][m.name]
        record.update({"images_per_s": batch / med, "median_s": med, "times_s": [round(t, 5) for t in m.times],
                       "ratio": statistics.median(base.times) / med, "peak_memory_bytes": m.peak_bytes,
                       "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "cpu_rss_sampled"})
        if "flops_per_image" in record:
            record["achieved_flops_per_s"] = record["flops_per_image"] * batch / med
    out["baseline"] = base.name
    out["load_avg"] = {"before": load_before, "after": os.getloadavg()[0]}
    out["machine"] = machine_info(device)
    return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO_ROOT / "configs" / "coco_stuff.yaml"))
    p.add_argument("--variant", action="append", type=parse_variant, required=True,
                   help="NAME=[dotted.key=value,...]; the first is the baseline")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    p.add_argument("--no-flops", action="store_true")
    p.add_argument("--labels", choices=("auto", "coco-sample", "blocks"), default="auto")
    p.add_argument("--out", default="", help="also write the JSON here")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every variant")
    args = p.parse_args(argv)
    if args.batch < 1 or args.iters < 1 or args.warmup < 1:
        p.error("--batch, --iters and --warmup must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = time_variants(args.config, args.variant, list(args.overrides), args.batch, args.iters, args.warmup,
                        flops=not args.no_flops, labels=args.labels)
    text = json.dumps(out)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return out


if __name__ == "__main__":
    main()
