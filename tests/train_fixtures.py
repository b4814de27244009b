"""Helpers shared by the tests/test_train_*.py files: a tiny synthetic sharded dataset and CLI runs."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# A model small enough for 2 shared CPU cores; override on top of configs/quickstart.yaml.
TINY_OVERRIDES = [
    "model.ngf=8", "model.ndf=8", "model.n_layers_D=2", "data.batch_size=2", "data.num_workers=0",
    "data.load_size=32", "data.crop_size=32", "train.log_every=2",
]


def make_synthetic_shards(root: Path, count: int = 32, val_count: int = 4, size: int = 32) -> Path:
    """``spade-data synth`` + ``spade-data shard --layout custom``; returns the manifest path."""
    raw, shards = root / "raw", root / "shards"
    run_cli([PYTHON, "-m", "data_tools", "synth", "--out", str(raw), "--count", str(count),
             "--val-count", str(val_count), "--seed", "0", "--size", str(size)])
    for split in ("train", "val"):
        run_cli([PYTHON, "-m", "data_tools", "shard", "--layout", "custom", "--root", str(raw), "--out", str(shards),
                 "--split", split, "--max-count", "8", "--no-progress", "--workers", "1"])
    return shards / "manifest.json"


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(extra)
    return env


def run_cli(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env or cli_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.5) -> None:
    """Poll ``predicate`` every ``poll`` seconds; fail the test naming ``what`` after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)
