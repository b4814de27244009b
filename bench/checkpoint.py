"""Training stall of an asynchronous checkpoint save vs a synchronous save of the same state.

    python bench/checkpoint.py [--mb 200] [--repeats 3] [--dir /tmp/x]

The state imitates a generator + Adam: parameters, exp_avg and exp_avg_sq in tensors of a
generator's layer sizes, ``--mb`` megabytes in all. Both modes go through CheckpointManager.save:

- sync: ``save(blocking=True)``: staging, DCP write (fsync), sha256 of the files, COMMITTED marker.
- async: ``save(blocking=False)`` returns after staging (copy to private CPU memory); the write and
  commit run in a thread. The stall is the time the training thread spends inside ``save``.
  While the thread writes, the training thread runs matmul "steps"; their mean time is compared
  with the same steps without a save in flight (the interference, reported, not hidden).

Prints one JSON object; the ratio is measured in this run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from spade_dist.checkpoint import CheckpointManager
from spade_dist.config import CheckpointConfig


def make_state(megabytes: float) -> dict[str, torch.Tensor]:
    """Parameter-like tensors (x3 for Adam's moments) adding up to ``megabytes``."""
    per_copy = int(megabytes * 1e6 / 4 / 3)
    shapes = [(1024, 1024, 3, 3), (512, 1024, 3, 3), (256, 512, 3, 3), (128, 184, 3, 3), (1024,)]
    state: dict[str, torch.Tensor] = {}
    total, i = 0, 0
    while total < per_copy:
        shape = shapes[i % len(shapes)]
        numel = min(int(torch.Size(shape).numel()), per_copy - total)
        for kind in ("param", "exp_avg", "exp_avg_sq"):
            state[f"layer{i}.{kind}"] = torch.randn(numel)
        total += numel
        i += 1
    return state


class Holder:
    """A stateful object (what the TrainState is to the manager)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.tensors = state


def compute_steps(n: int, size: int = 384) -> list[float]:
    a = torch.randn(size, size)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        for _ in range(4):
            a = torch.tanh(a @ a.T / size)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=200.0, help="state size in MB")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    state = {"train": Holder(make_state(args.mb))}
    nbytes = sum(t.numel() * t.element_size() for t in state["train"].tensors.values())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        cfg = CheckpointConfig(every_steps=0, keep_last=1, async_save=True)
        mgr = CheckpointManager(Path(tmp) / "run", cfg, install_signal_handlers=False)
        baseline_steps = compute_steps(20)
        sync_s, stall_s, async_total_s, steps_during = [], [], [], []
        step = 0
        for _ in range(args.repeats):
            step += 1
            t0 = time.perf_counter()
            mgr.save(step, state, blocking=True)
            sync_s.append(time.perf_counter() - t0)
            step += 1
            t0 = time.perf_counter()
            mgr.save(step, state, blocking=False)
            stall_s.append(time.perf_counter() - t0)
            while mgr._thread is not None and mgr._thread.is_alive():  # training goes on meanwhile
                steps_during += compute_steps(1)
            mgr.wait()
            async_total_s.append(time.perf_counter() - t0)
        mgr.close()
    sync_med, stall_med = statistics.median(sync_s), statistics.median(stall_s)
    base_step = statistics.median(baseline_steps)
    result = {
        "bench": "checkpoint_async_vs_sync",
        "state_mb": round(nbytes / 1e6, 1),
        "repeats": args.repeats,
        "sync_save_s": round(sync_med, 4),
        "async_stall_s": round(stall_med, 4),
        "stall_ratio": round(stall_med / sync_med, 4),
        "target_stall_ratio": 0.10,
        "meets_target": stall_med / sync_med <= 0.10,
        "async_background_total_s": round(statistics.median(async_total_s), 4),
        "compute_step_s_alone": round(base_step, 5),
        "compute_step_s_during_async_write": round(statistics.median(steps_during), 5) if steps_during else None,
        "all_sync_s": [round(x, 4) for x in sync_s],
        "all_stall_s": [round(x, 4) for x in stall_s],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
