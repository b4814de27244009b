"""Where one training iteration spends its time: torch.profiler per-op self CPU time, per thread count.

A diagnostic next to ``bench/train_step.py`` (which makes the speed claims): the same ``Mode``
(networks, optimizers, the project's real ``train_step``) and the same real COCO-Stuff label
maps, one untimed warm-up iteration, then one profiled iteration per ``--threads`` value.
Prints one JSON line per thread count: the iteration's wall time, the load averages (as
``uptime`` prints them), the profiler's total self CPU time and the ``--top`` operators by self
CPU time (name, seconds, share, calls). Self CPU time summed over ops exceeds the wall time when
an op runs on several threads; comparing an op's share at 1 and at all threads shows which
parts do not scale.

    python bench/profile_step.py --threads 1 0 --mode fast model.ngf=32 model.ndf=32 data.crop_size=128 data.load_size=144
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch.profiler import ProfilerActivity, profile

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.train_step import COCO_SAMPLE, REFERENCE_OVERRIDES, Mode, coco_sample_batch, synthetic_batch  # noqa: E402
from spade_dist.config import load_config  # noqa: E402
from spade_dist.losses import VGGLoss, save_random_vgg19_weights  # noqa: E402
from spade_dist.train.step import prepare_batch  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO_ROOT / "configs" / "coco_stuff.yaml"))
    p.add_argument("--mode", choices=("fast", "reference"), default="fast")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="thread counts (0 = all cores)")
    p.add_argument("--top", type=int, default=15, help="operators listed per thread count")
    p.add_argument("--labels", choices=("coco-sample", "blocks"), default="coco-sample")
    p.add_argument("--labels-dir", default=str(COCO_SAMPLE))
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.ngf=32")
    args = p.parse_args(argv)
    if args.batch < 1 or args.top < 1 or min(args.threads) < 0:
        p.error(f"--batch and --top must be >= 1 and --threads >= 0 (got {args.batch}, {args.top}, {args.threads})")
    return args


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    overrides = [f"data.batch_size={args.batch}"] + list(args.overrides)
    if args.mode == "reference":
        overrides += REFERENCE_OVERRIDES
    cfg = load_config(args.config, overrides)
    initial_threads = torch.get_num_threads()
    results: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            vgg = None if cfg.loss.no_vgg_loss else VGGLoss.from_file(save_random_vgg19_weights(Path(tmp) / "vgg19.pth", seed=0))
            raw = (coco_sample_batch(cfg, args.batch, Path(args.labels_dir)) if args.labels == "coco-sample"
                   else synthetic_batch(cfg, args.batch))
            for threads in [t or (os.cpu_count() or 1) for t in args.threads]:
                torch.set_num_threads(threads)
                mode = Mode(args.mode, cfg, vgg, host_sync_logging=args.mode == "reference", seed=0)
                if vgg is not None:
                    vgg.to(mode.backend.device)
                mb = prepare_batch(raw, cfg, mode.backend.device)
                mode.iteration(mb)  # warm-up: allocator, oneDNN primitives, optimizer state
                load_start = os.getloadavg()
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    start = time.perf_counter()
                    mode.iteration(mb)
                    mode.sync()
                    wall = time.perf_counter() - start
                events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
                total_us = sum(e.self_cpu_time_total for e in events)
                result = {
                    "benchmark": "profile_step", "mode": args.mode, "batch": args.batch, "threads": threads,
                    "overrides": args.overrides, "labels": args.labels, "iteration_s": wall,
                    "load_avg_start": list(load_start), "load_avg_end": list(os.getloadavg()),
                    "self_cpu_total_s": total_us / 1e6,
                    "top_ops": [{"op": e.key, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 4),
                                 "share": round(e.self_cpu_time_total / max(total_us, 1), 4), "calls": e.count}
                                for e in events[:args.top]],
                }
                results.append(result)
                print(json.dumps(result), flush=True)
    finally:
        torch.set_num_threads(initial_threads)
    return results


if __name__ == "__main__":
    main()
