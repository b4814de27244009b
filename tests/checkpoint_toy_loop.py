"""A tiny stand-alone training loop driving CheckpointManager, for the checkpoint tests.

It exercises everything the manager must handle without the real trainer: a model with dropout (so
RNG state matters), Adam (optimizer state), an lr scheduler, a per-rank sampler whose position is
merged across ranks, preemption signals and crashes. Run as a script (also under torchrun):

    python tests/checkpoint_toy_loop.py RUN_DIR --steps 12 [--every 3] [--sleep 0.05] [--ballast-mb 0]

Like spade-train it writes the run's REQUEUE marker on a checkpoint-and-stop, DONE at the end, dies with
its launcher, and (rank 0) appends every commit to ``RUN_DIR/commits.jsonl`` ({"step", "lineage"}).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spade_dist.checkpoint import CheckpointManager, GatheredState  # noqa: E402
from spade_dist.config import CheckpointConfig  # noqa: E402

NUM_SAMPLES = 24


class ToySampler:
    """Every sample exactly once per epoch across ranks, resumable on any world size.

    Position (global) = epoch + the set of sample ids already delivered in it. Each rank takes the
    remaining ids of the epoch's permutation round-robin, in batches of ``batch_size``.
    """

    def __init__(self, rank: int, world_size: int, batch_size: int, seed: int = 0) -> None:
        self.rank, self.world_size, self.batch_size, self.seed = rank, world_size, batch_size, seed
        self.epoch = 0
        self.delivered_before: set[int] = set()  # delivered in this epoch before this process started
        self.delivered_here: list[int] = []
        self._plan()

    def _plan(self) -> None:
        perm = torch.randperm(NUM_SAMPLES, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        remaining = [i for i in perm if i not in self.delivered_before]
        per_rank = len(remaining) // self.world_size  # equal share: ranks must make the same number of steps
        self.mine = remaining[self.rank * per_rank:(self.rank + 1) * per_rank]
        self.cursor = 0

    def next_batch(self) -> tuple[int, list[int]]:
        if self.cursor + self.batch_size > len(self.mine):
            self.epoch += 1
            self.delivered_before, self.delivered_here = set(), []
            self._plan()
        ids = self.mine[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        self.delivered_here += ids
        return self.epoch, ids

    def state_dict(self) -> dict[str, Any]:
        # Including what was delivered before this process resumed: a second checkpoint in the same
        # epoch must not forget it (every rank lists it; the merged list is read as a set).
        return {"epoch": self.epoch, "delivered": sorted(self.delivered_before) + list(self.delivered_here)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = state["epoch"]
        self.delivered_before = set(state["delivered"])
        self.delivered_here = []
        self._plan()


def merge_positions(states: list[dict[str, Any]]) -> dict[str, Any]:
    epochs = {s["epoch"] for s in states}
    if len(epochs) != 1:
        raise ValueError(f"ranks disagree on the epoch: {epochs}")
    delivered: list[int] = []
    for s in states:
        delivered += s["delivered"]
    return {"epoch": epochs.pop(), "delivered": delivered}


class ToyTrainState:
    """Model + optimizer + scheduler + step: what the real TrainState bundles."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 2))
        self.ema = torch.nn.Linear(4, 2)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=0.01, betas=(0.0, 0.9))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0 / (1 + 0.1 * s))
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.step = state["step"]


def sample_input(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([torch.arange(4, dtype=torch.float32) * (i + 1) / NUM_SAMPLES for i in ids])
    return x, torch.stack([x.sum(1), x[:, 0] - x[:, 3]], 1)


def train_step(state: ToyTrainState, ids: list[int], world_size: int) -> None:
    x, y = sample_input(ids)
    x = x + 0.01 * torch.randn_like(x) + 0.01 * float(np.random.rand()) + 0.01 * random.random()
    loss = ((state.model(x) - y) ** 2).mean()
    state.opt.zero_grad()
    loss.backward()
    if world_size > 1:
        for p in state.model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= world_size
    state.opt.step()
    state.sched.step()
    with torch.no_grad():
        state.ema.weight.mul_(0.9).add_(0.1 * state.model[0].weight[:2, :])
    state.step += 1


def run(run_dir: Path, steps: int, rank: int, world_size: int, cfg: CheckpointConfig, batch_size: int = 2,
        sleep: float = 0.0, stop_at_step: int = -1,
        final_save: bool = True, ballast_mb: int = 0) -> dict[str, Any]:
    """Train to ``steps`` (resuming per ``cfg.resume``); returns final params and delivered keys.

    ``stop_at_step`` emulates a preemption signal arriving on rank 0 only at that step.
    Exits the process with the requeue code on a collective stop.
    """
    torch.manual_seed(1234 + rank)
    np.random.seed(1234 + rank)
    random.seed(1234 + rank)
    state = ToyTrainState()
    sampler = ToySampler(rank, world_size, batch_size)
    app: dict[str, Any] = {"train": state, "data": GatheredState(sampler, merge_positions)}
    if ballast_mb:  # makes a save take long enough to be interrupted by a test
        app["ballast"] = torch.zeros(ballast_mb * 2**18 // world_size * world_size)
    commits = Path(run_dir) / "commits.jsonl"

    def on_commit(step: int, step_dir: Path, seconds: float) -> None:
        if rank == 0:
            with open(commits, "a") as fh:
                fh.write(json.dumps({"step": step, "lineage": ckpt.lineage}) + "\n")

    ckpt = CheckpointManager(run_dir, cfg, rank=rank, world_size=world_size, config_yaml="toy: true\n",
                             generator_paths={"ema": ["train", "ema"], "raw": ["train", "model"]}, on_commit=on_commit)
    restored = ckpt.restore(app)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    keys_log = Path(run_dir) / f"keys-rank{rank}.jsonl"
    delivered: list[tuple[int, int]] = []
    try:
        while state.step < steps:
            epoch, ids = sampler.next_batch()
            train_step(state, ids, world_size)
            delivered += [(epoch, i) for i in ids]
            with open(keys_log, "a") as fh:
                fh.write(json.dumps({"step": state.step, "epoch": epoch, "ids": ids}) + "\n")
            if sleep:
                time.sleep(sleep)
            if state.step == stop_at_step and rank == 0:
                ckpt.request_stop("test")
            ckpt.maybe_save(state.step, app)
            if ckpt.should_stop():
                ckpt.save(state.step, app, blocking=True)
                ckpt.request_requeue(state.step)
                ckpt.close()
                return {"stopped": True, "step": state.step, "delivered": delivered,
                        "restored": restored.step if restored else None}
        if final_save:
            ckpt.save(state.step, app, blocking=True)
    finally:
        ckpt.close()
    return {"stopped": False, "step": state.step, "delivered": delivered,
            "params": {k: v.clone() for k, v in state.model.state_dict().items()},
            "opt": state.opt.state_dict(), "lr": state.sched.get_last_lr(),
            "restored": restored.step if restored else None, "restored_from_ws": restored.saved_world_size if restored else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--ballast-mb", type=int, default=0)
    args = parser.parse_args()
    from spade_dist.workers import die_with_parent, launched_by_a_launcher

    if launched_by_a_launcher():
        die_with_parent()
    torch.set_num_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1:
        from datetime import timedelta

        from spade_dist.distributed import elastic_restart_store

        timeout = timedelta(seconds=120)
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout,
                                **elastic_restart_store(world_size, timeout))
    cfg = CheckpointConfig(every_steps=args.every, keep_last=2, async_save=True, resume="auto")
    Path(args.run_dir).mkdir(parents=True, exist_ok=True)
    result = run(Path(args.run_dir), args.steps, rank, world_size, cfg, sleep=args.sleep, ballast_mb=args.ballast_mb)
    if result["stopped"]:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(cfg.requeue_exit_code)
    if rank == 0:
        (Path(args.run_dir) / "DONE").write_text(json.dumps({"step": result["step"], "restored": result["restored"]}))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
