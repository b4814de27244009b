"""Overhead of the run-health monitor (train.health) against the training step, in the same process.

One network, one batch, the project's real step (``train_step``) and the real monitor
(``spade_dist.train.health.HealthMonitor``). Timed, each as a median over ``--iters`` repeats:

- ``step_s``: one training iteration (G + D step);
- ``observe_s``: the monitor's work on an ordinary step (appending the step's device tensors);
- ``judge_s``: a logging step's judgement (stack, one device-to-host copy, spike / streak checks);
- ``collapse_s``: one generator-diversity check (EMA generator on the fixed labels, 2 draws);
- ``drift_s``: one parameter checksum (the collective is absent at world size 1).

``overhead`` = (observe_s + judge_s / log_every + collapse_s / collapse_every + drift_s /
consistency_every) / step_s with the config's schedules: the monitor's share of the step time
(issue #29 target: <= 0.03 at the default config). The last output line is one JSON object.

    python bench/health.py --config configs/coco_stuff.yaml --iters 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for path in (REPO_ROOT, BENCH_DIR):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from train_step import Mode, machine_info, synthetic_batch  # noqa: E402

from spade_dist.config import load_config  # noqa: E402
from spade_dist.run_dir import RunDir  # noqa: E402
from spade_dist.train.health import HealthMonitor  # noqa: E402
from spade_dist.train.step import prepare_batch, train_step  # noqa: E402


def _median_time(fn: Callable[[], Any], iters: int, sync: Callable[[], None]) -> float:
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO_ROOT / "configs" / "coco_stuff.yaml"))
    p.add_argument("--iters", type=int, default=5, help="timed repeats per quantity (median)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. data.batch_size=1")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        cfg = load_config(args.config, ["loss.no_vgg_loss=true", *args.overrides])
        mode = Mode("health", cfg, vgg=None, host_sync_logging=False, seed=0)
        state, device = mode.state, mode.backend.device
        mb = prepare_batch(synthetic_batch(cfg, cfg.data.batch_size), cfg, device)
        hc = cfg.train.health
        with tempfile.TemporaryDirectory() as tmp:
            monitor = HealthMonitor(cfg, state, RunDir(tmp), None, device, rank=0, world_size=1, max_steps=10**9,
                                    vgg=None, syncbn_ranks=1)
            result = train_step(mode.backend, mode.losses, [mb], 0, cfg)  # warm-up; also the observed result
            step_s = _median_time(lambda: mode.iteration(mb), args.iters, mode.sync)

            observe_s = _median_time(lambda: monitor.observe(result, mb.semantics), args.iters, mode.sync)
            judge_s = []
            for _ in range(args.iters):  # a full interval observed, then judged
                for _ in range(cfg.train.log_every):
                    monitor.observe(result, mb.semantics)
                judge_s.append(_median_time(lambda: monitor.judge_interval(cfg.train.log_every), 1, mode.sync))
            judge_s = statistics.median(judge_s)
            collapse_s = _median_time(lambda: monitor.output_diversity(state.ema_generator), args.iters, mode.sync)
            drift_s = _median_time(monitor.replica_checksum, args.iters, mode.sync)
    finally:
        torch.set_num_threads(threads)
    collapse_every = hc.collapse_every or cfg.train.sample_every
    per_step = (observe_s + judge_s / cfg.train.log_every + collapse_s / collapse_every
                + (drift_s / hc.consistency_every if hc.consistency_every else 0.0))
    out = {
        "config": args.config, "overrides": args.overrides, "batch": cfg.data.batch_size,
        "schedules": {"log_every": cfg.train.log_every, "collapse_every": collapse_every,
                      "consistency_every": hc.consistency_every},
        "step_s": step_s, "observe_s": observe_s, "judge_s": judge_s, "collapse_s": collapse_s, "drift_s": drift_s,
        "monitor_s_per_step": per_step, "overhead": per_step / step_s, "machine": machine_info(device),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
