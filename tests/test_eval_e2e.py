"""End to end: a short CPU training run with ``eval.mode: subprocess`` gets its checkpoints scored
while it trains; the best is the lowest FID; a restarted watcher redoes nothing and exits on DONE."""
from __future__ import annotations

import fcntl
import json
from pathlib import Path

import pytest
import torch

from spade_dist.data import build_eval_loader
from spade_dist.eval.inception import make_test_inception_weights
from spade_dist.eval.launch import start_eval_watcher, stop_eval_watcher
from spade_dist.eval.watcher import committed_checkpoints, read_records
from tests.kit import cli_env, run_cli, synthetic_shards, tiny_config, train_cmd, wait_for


def _lock_is_free(path: Path) -> bool:
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


@pytest.mark.e2e
def test_training_with_subprocess_eval(tmp_path: Path) -> None:
    manifest = synthetic_shards(tmp_path / "data", count=16, val_count=4)
    run_dir = tmp_path / "run"
    weights = tmp_path / "inception.pth"
    overrides = [
        f"data.shards={manifest}", f"data.val_shards={manifest}", f"train.run_dir={run_dir}",
        # Long enough that the watcher scores the first checkpoint while training still runs (with
        # the speed paths measured per layer this tiny model trains faster than with the region path everywhere).
        "train.max_steps=96", "train.sample_every=1000", "checkpoint.every_steps=24", "checkpoint.keep_last=10",
        "checkpoint.async_save=false", "eval.mode=subprocess", f"eval.inception_weights={weights}",
        f"eval.reference_cache_dir={tmp_path / 'cache'}", "eval.kid_subset_size=4", "eval.poll_seconds=0.5",
    ]
    cfg = tiny_config(*overrides)
    photos = torch.cat([b["image"] for b in build_eval_loader(cfg.data, split="val")])
    make_test_inception_weights(weights, photos, seed=0)

    run_cli(train_cmd(*overrides), env=cli_env(), timeout=600)
    done = json.loads((run_dir / "DONE").read_text())
    steps = [c.step for c in committed_checkpoints(run_dir)]
    assert steps == [24, 48, 72, 96]

    # The trainer's watcher keeps going after training and stops by itself once all are scored.
    metrics_path = run_dir / "eval" / "metrics.jsonl"
    wait_for(lambda: len(read_records(metrics_path)) == len(steps), 400, "the watcher to score every checkpoint")
    records = read_records(metrics_path)
    assert [r["step"] for r in records] == steps and all(r["status"] == "ok" for r in records)
    assert all(r["protocol"]["images"]["num_images"] == 4 and r["protocol"]["images"]["resolution"] == [32, 32]
               for r in records)
    # Scored while training ran: the first result came before the run wrote DONE.
    assert records[0]["time"] < done["time"]
    best = json.loads((run_dir / "eval" / "best.json").read_text())
    assert best["fid"] == min(r["fid"] for r in records)
    assert (run_dir / "eval" / "best_generator.pt").is_file()
    assert "<svg" in (run_dir / "eval" / "fid.html").read_text()

    # The trainer's watcher exits by itself (its lock on the run is released) ...
    wait_for(lambda: _lock_is_free(run_dir / "eval" / "watcher.lock"), 120, "the trainer's watcher to exit")
    # ... and a restarted watcher (e.g. after a crash) finds everything done and exits without new lines.
    proc = start_eval_watcher(cfg, run_dir)
    assert stop_eval_watcher(proc, timeout=300) == 0
    assert read_records(metrics_path) == records
