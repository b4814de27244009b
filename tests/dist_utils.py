"""Run a function in N gloo processes on this machine and collect what each rank returns.

    results = run_distributed(my_fn, world_size=2, args=(x,))   # [rank0_result, rank1_result]

``my_fn(rank, world_size, *args)`` must be a module-level function (it is pickled for spawn). The
process group is initialised (gloo, or ``backend="nccl"`` with rank r on GPU r; 127.0.0.1, a free
port) before it runs and destroyed after.
An exception in any rank fails the call with that rank's traceback.
"""
from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: Sequence, out_dir: str, env: dict,
            backend: str = "gloo") -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    out = Path(out_dir) / f"rank{rank}.pt"
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)  # one GPU per rank: NCCL refuses two ranks on one device
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, out)
    except BaseException:  # noqa: BLE001 - reported to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, out)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, args: Sequence = (), env: dict | None = None, timeout: float = 600,
                    backend: str = "gloo") -> list[Any]:
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, fn, tuple(args), out_dir, dict(env or {}), backend))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        results = []
        for r in range(world_size):
            path = Path(out_dir) / f"rank{r}.pt"
            if not path.exists():
                raise RuntimeError(f"rank {r} died without a result (exit code {procs[r].exitcode})")
            payload = torch.load(path, weights_only=False)
            if not payload["ok"]:
                raise RuntimeError(f"rank {r} failed:\n{payload['error']}")
            results.append(payload["result"])
        return results


def process_alive(pid: int) -> bool:
    """True while any thread of ``pid`` still runs: a zombie main thread can hide a thread still in a
    system call (e.g. a checkpoint fsync) that keeps the process's files and locks."""
    try:
        states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in Path(f"/proc/{pid}/task").iterdir()]
    except OSError:
        return False
    return any(s not in ("Z", "X") for s in states)
