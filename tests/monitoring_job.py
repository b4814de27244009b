"""A small real 2-rank GAN training job (gloo DDP) that reports through TrainingMetrics the way the trainer does.

Used by the monitoring end-to-end test while it needs a run that stays alive until Prometheus has
scraped enough history: it trains until a stop file appears (rank 0 sees it, all ranks agree through
an all-reduce, as a real stop signal would be propagated) or ``max_seconds`` pass.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from spade_dist.config import MetricsConfig
from spade_dist.metrics import TrainingMetrics


def _grad_norm(module: nn.Module) -> float:
    norms = [p.grad.detach().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def _rss_bytes() -> int:
    """Resident memory of this process: the CPU stand-in for device memory."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def train_with_metrics(rank: int, world_size: int, run_dir: str, metrics_cfg: MetricsConfig, stop_file: str,
                       max_seconds: float, checkpoint_every: int = 5, step_sleep: float = 0.2) -> dict:
    torch.manual_seed(rank)
    gen = DDP(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1), nn.Tanh()))
    disc = DDP(nn.Sequential(nn.Conv2d(3, 8, 4, stride=2, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 4)))
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-4, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=4e-4, betas=(0.0, 0.9))

    metrics = TrainingMetrics(metrics_cfg, run_dir=run_dir, rank=rank, local_rank=rank, world_size=world_size,
                              node=socket.gethostname())
    metrics.start()
    start, step, batch = time.monotonic(), 0, 2
    ckpt_dir = Path(run_dir) / "checkpoints"
    try:
        while True:
            t0 = time.perf_counter()
            label = torch.rand(batch, 4, 16, 16)
            real = torch.rand(batch, 3, 16, 16) * 2 - 1
            t1 = time.perf_counter()

            fake = gen(label)
            d_loss_fake = F.relu(1 + disc(fake.detach())).mean()
            d_loss_real = F.relu(1 - disc(real)).mean()
            opt_d.zero_grad()
            (d_loss_fake + d_loss_real).backward()
            d_norm = _grad_norm(disc)
            opt_d.step()
            g_loss = -disc(fake).mean() + F.l1_loss(fake, real)
            opt_g.zero_grad()
            disc.zero_grad()
            g_loss.backward()
            g_norm = _grad_norm(gen)
            losses = {"GAN": float(g_loss), "D_Fake": float(d_loss_fake), "D_real": float(d_loss_real)}
            if all(torch.isfinite(torch.tensor(list(losses.values())))):
                opt_g.step()
            else:
                metrics.record_nonfinite_skip()
            step += 1
            t2 = time.perf_counter()

            metrics.record_step(step=step, epoch=step // 20, images=batch, data_seconds=t1 - t0,
                                compute_seconds=t2 - t1, losses=losses,
                                lrs={"G": opt_g.param_groups[0]["lr"], "D": opt_d.param_groups[0]["lr"]},
                                grad_norms={"G": g_norm, "D": d_norm})
            metrics.record_corrupt(0)
            metrics.record_device_memory(_rss_bytes())
            if step % checkpoint_every == 0:
                t_save = time.perf_counter()
                path = ckpt_dir / f"step-{step:09d}" / f"rank{rank}.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"G": gen.module.state_dict(), "D": disc.module.state_dict(), "step": step}, path)
                metrics.record_checkpoint(seconds=time.perf_counter() - t_save, bytes=path.stat().st_size, success=True)

            stop = torch.tensor([float(rank == 0 and (Path(stop_file).exists()
                                                       or time.monotonic() - start > max_seconds))])
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
            if stop.item() > 0:
                break
            time.sleep(step_sleep)  # leave CPU to Prometheus on a 2-core machine
    finally:
        metrics.close()
    return {"steps": step, "port": metrics.port, "sd_path": str(metrics.sd_path),
            "timed_out": time.monotonic() - start > max_seconds}
