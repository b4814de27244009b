"""Weak scaling on CPU: full-iteration step time at 1, 2, 4 gloo processes, per-rank batch fixed.

For each world size the project's real step (DDP gradient all-reduce of G and D, SyncBN
statistics all-gathers) runs ``iters`` timed iterations after ``warmup``; an iteration's time is
the slowest rank's. Each rank also times a bare all-reduce of G's + D's gradient bytes (fp32) in
the same processes, so the communication term of the scaling model in docs/PERFORMANCE.md is
measured, not assumed. One thread per process: with more processes than cores, compute is
time-sliced, and the JSON carries the core count so the model can account for it.

    python bench/scaling.py --worlds 1 2 4 --iters 3 model.ngf=16 data.crop_size=64
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.dist_utils import run_distributed  # noqa: E402  (spawned gloo ranks on 127.0.0.1)

SMALL_DEFAULTS = ["model.ngf=16", "model.ndf=16", "data.crop_size=64", "data.load_size=64", "loss.no_vgg_loss=true",
                  "train.device=cpu"]


def _rank(rank: int, world: int, config: str, overrides: list[str], batch: int, warmup: int, iters: int) -> dict[str, Any]:
    from bench.train_step import Mode, synthetic_batch
    from spade_dist.config import load_config
    from spade_dist.train.step import prepare_batch

    cfg = load_config(config, SMALL_DEFAULTS + [f"data.batch_size={batch}"] + overrides)
    mode = Mode("fast", cfg, None, host_sync_logging=False, seed=0)
    mb = prepare_batch(synthetic_batch(cfg, batch, seed=rank), cfg, torch.device("cpu"))
    # Accelerate's multi-CPU setup resets torch's thread count (cores / local ranks, unless
    # OMP_NUM_THREADS is set) when the backend is built. On this loaded 2-core machine 2 threads
    # per process made steps 10-20x slower (OpenMP spin-waits time-sliced), so pin one thread per
    # rank again after setup: the timing then depends on this script, not on Accelerate.
    torch.set_num_threads(1)
    step_times = []
    for i in range(warmup + iters):
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        mode.iteration(mb)
        if i >= warmup:
            step_times.append(time.perf_counter() - start)
    n_g = sum(p.numel() for p in mode.state.generator_side.parameters())
    n_d = sum(p.numel() for p in mode.state.discriminator.parameters())
    allreduce_times = []
    if world > 1:
        grads = [torch.zeros(n_g), torch.zeros(n_d)]
        for i in range(warmup + iters):
            dist.barrier()
            start = time.perf_counter()
            for g in grads:
                dist.all_reduce(g)
            if i >= warmup:
                allreduce_times.append(time.perf_counter() - start)
    return {"step": step_times, "allreduce": allreduce_times, "params_G": n_g, "params_D": n_d}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO_ROOT / "configs" / "coco_stuff.yaml"))
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--batch", type=int, default=1, help="per-rank batch (fixed: weak scaling)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("overrides", nargs="*", help="dotted overrides on top of " + " ".join(SMALL_DEFAULTS))
    args = p.parse_args(argv)
    if any(w < 1 for w in args.worlds):
        p.error(f"--worlds must be >= 1, got {args.worlds}")
    results: dict[str, Any] = {}
    for world in args.worlds:
        ranks = run_distributed(_rank, world, (args.config, args.overrides, args.batch, args.warmup, args.iters))
        step = [max(r["step"][i] for r in ranks) for i in range(args.iters)]
        entry: dict[str, Any] = {"step_median_s": statistics.median(step), "step_times_s": [round(t, 4) for t in step],
                                 "images_per_s": world * args.batch / statistics.median(step)}
        if world > 1:
            entry["grad_allreduce_median_s"] = statistics.median(max(r["allreduce"][i] for r in ranks) for i in range(args.iters))
        results[str(world)] = entry
        params = (ranks[0]["params_G"], ranks[0]["params_D"])
    base = results[str(args.worlds[0])]["step_median_s"]
    for entry in results.values():
        entry["step_time_vs_first"] = entry["step_median_s"] / base
    out = {
        "benchmark": "scaling", "mode": "weak (per-rank batch fixed)", "per_rank_batch": args.batch,
        "config": args.config, "overrides": SMALL_DEFAULTS + args.overrides, "threads_per_rank": 1,
        "cpu_count": os.cpu_count(), "params_G": params[0], "params_D": params[1],
        "grad_bytes_fp32": 4 * (params[0] + params[1]), "worlds": results,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
