"""Step-time overhead of synchronized BatchNorm vs plain BatchNorm at N gloo ranks on CPU.

Every rank builds two copies of the same GauGAN setup that differ ONLY in ``model.norm_G``
(``spectralspadesyncbatch3x3`` vs ``spectralspadebatch3x3``), both DDP-wrapped, and runs full
training iterations of the project's step code, interleaved (sync, plain, plain, sync, ...), each
started behind a barrier. An iteration's time is the slowest rank's. The last output line is
one JSON object with both medians and ``overhead`` = sync / plain - 1.

It also counts the SyncBN statistics traffic of one forward: each SyncBN layer all-gathers
(count, mean, M2) per channel, i.e. (2C + 1) floats from every rank.

    python bench/syncbn.py --world 2 --iters 4 model.ngf=16 data.crop_size=64
"""
from __future__ import annotations

import argparse
import json
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


def syncbn_layers(module: torch.nn.Module) -> list[int]:
    """Channel counts of the SyncBatchNorm layers of ``module``."""
    return [m.num_features for m in module.modules() if isinstance(m, torch.nn.SyncBatchNorm)]


def _rank(rank: int, world: int, config: str, overrides: list[str], batch: int, warmup: int, iters: int) -> dict[str, Any]:
    from bench.train_step import Mode, synthetic_batch
    from spade_dist.config import load_config
    from spade_dist.train.step import prepare_batch

    common = SMALL_DEFAULTS + [f"data.batch_size={batch}"] + overrides
    cfgs = {
        "syncbn": load_config(config, common + ["model.norm_G=spectralspadesyncbatch3x3"]),
        "plain": load_config(config, common + ["model.norm_G=spectralspadebatch3x3"]),
    }
    modes = {name: Mode(name, cfg, None, host_sync_logging=False, seed=0) for name, cfg in cfgs.items()}
    raw = synthetic_batch(cfgs["plain"], batch, seed=rank)
    # Accelerate's multi-CPU setup resets torch's thread count (cores / local ranks, unless
    # OMP_NUM_THREADS is set) when the backend is built. On this loaded 2-core machine 2 threads
    # per process made steps 10-20x slower (OpenMP spin-waits time-sliced), so pin one thread per
    # rank again after setup: the timing then depends on this script, not on Accelerate.
    torch.set_num_threads(1)
    batches = {name: prepare_batch(raw, cfg, torch.device("cpu")) for name, cfg in cfgs.items()}
    times: dict[str, list[float]] = {name: [] for name in modes}
    order = ["syncbn", "plain"]
    for i in range(warmup + iters):
        for name in (order if i % 2 == 0 else order[::-1]):
            dist.barrier()
            start = time.perf_counter()
            modes[name].iteration(batches[name])
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[name].append(elapsed)
    channels = syncbn_layers(modes["syncbn"].state.generator)
    return {"times": times, "syncbn_channels": channels}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO_ROOT / "configs" / "coco_stuff.yaml"))
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--batch", type=int, default=2, help="per-rank batch")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=4)
    p.add_argument("overrides", nargs="*", help="dotted overrides on top of the small defaults " + " ".join(SMALL_DEFAULTS))
    args = p.parse_args(argv)
    if args.world < 2:
        p.error("--world must be >= 2 (SyncBN is plain BN on one rank)")
    ranks = run_distributed(_rank, args.world, (args.config, args.overrides, args.batch, args.warmup, args.iters))
    per_iter = {name: [max(r["times"][name][i] for r in ranks) for i in range(args.iters)] for name in ("syncbn", "plain")}
    med = {name: statistics.median(v) for name, v in per_iter.items()}
    channels = ranks[0]["syncbn_channels"]
    floats_per_rank = sum(2 * c + 1 for c in channels)
    out = {
        "benchmark": "syncbn", "world": args.world, "per_rank_batch": args.batch, "config": args.config,
        "overrides": SMALL_DEFAULTS + args.overrides, "threads_per_rank": 1,
        "syncbn": {"median_s": med["syncbn"], "times_s": [round(t, 4) for t in per_iter["syncbn"]]},
        "plain": {"median_s": med["plain"], "times_s": [round(t, 4) for t in per_iter["plain"]]},
        "overhead": med["syncbn"] / med["plain"] - 1.0,
        "syncbn_layers_G": len(channels),
        # each layer all-gathers (2C+1) floats from every rank, once per G forward
        "syncbn_floats_gathered_per_forward": floats_per_rank * args.world,
        "syncbn_bytes_gathered_per_forward_fp32": floats_per_rank * args.world * 4,
        "G_forwards_per_iteration": 2,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
