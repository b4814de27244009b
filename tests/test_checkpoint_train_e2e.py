"""Checkpointing with the real pieces: the data loader's position across world-size changes, and
``spade-train`` under SIGUSR1 and under ``torchrun --max-restarts=1`` with a rank killed by -9."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from spade_dist.checkpoint import CheckpointManager, GatheredState, find_latest, read_marker
from spade_dist.config import CheckpointConfig
from spade_dist.workers import child_pids
from tests.dist_utils import run_distributed
from tests.kit import TOY_LABELS, cli_env, run_cli, toy_data_config, train_cmd, wait_for, write_shards

NUM_SAMPLES = 24  # 4 shards x 6




def _loader_leg(rank: int, world_size: int, manifest: str, run_dir: str, batches: int, save: bool) -> dict:
    """Restore (if any), take ``batches`` batches (all if < 0) of the epoch, optionally save."""
    from spade_dist.data import build_train_loader, merge_positions

    loader = build_train_loader(toy_data_config(manifest, label_nc=8, contain_dontcare_label=True), rank=rank,
                                world_size=world_size)
    app = {"data": GatheredState(loader, merge_positions), "meta": {"note": "loader only"}}
    ckpt = CheckpointManager(run_dir, CheckpointConfig(every_steps=0), rank=rank, world_size=world_size,
                             install_signal_handlers=False)
    restored = ckpt.restore(app)
    keys: list[str] = []
    epoch = loader.epoch
    for i, batch in enumerate(loader):  # a batch counts as delivered once handed out: stop right after
        keys += batch["key"]
        if i + 1 == batches:
            break
    if save:
        ckpt.save(len(keys), app, blocking=False)  # asynchronous, as periodic saves are
    ckpt.close()
    return {"keys": keys, "epoch": epoch, "restored": restored.step if restored else None}


def _exactly_once_across(tmp_path: Path, ws_before: int, batches_before: int, ws_after: int) -> None:
    manifest = write_shards(tmp_path / "shards", [6, 6, 6, 6], size=(16, 16))
    run_dir = str(tmp_path / "run")
    before = run_distributed(_loader_leg, ws_before, args=(str(manifest), run_dir, batches_before, True))
    after = run_distributed(_loader_leg, ws_after, args=(str(manifest), run_dir, -1, False))
    assert all(r["epoch"] == 0 for r in before + after)
    assert all(r["restored"] is not None for r in after)
    delivered = Counter(k for r in before + after for k in r["keys"])
    assert len(delivered) == NUM_SAMPLES and set(delivered.values()) == {1}, delivered
    assert sum(len(r["keys"]) for r in before) == ws_before * batches_before * 2


@pytest.mark.dist
def test_real_loader_two_to_one_rank_every_sample_once(tmp_path):
    _exactly_once_across(tmp_path, ws_before=2, batches_before=2, ws_after=1)


@pytest.mark.dist
def test_real_loader_one_to_three_ranks_every_sample_once(tmp_path):
    _exactly_once_across(tmp_path, ws_before=1, batches_before=3, ws_after=3)


# ----------------------------------------------------------------------------------------------
# spade-train
# ----------------------------------------------------------------------------------------------


def _train_overrides(manifest: Path, run_dir: Path, max_steps: int) -> list[str]:
    return [
        f"data.shards={manifest}", "data.val_shards=", *TOY_LABELS, "model.num_D=1", "train.log_every=1",
        "train.sample_every=100000", "checkpoint.every_steps=2", f"train.run_dir={run_dir}",
        f"train.max_steps={max_steps}",
    ]


def _wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    wait_for(lambda: path.exists() and text in path.read_text(errors="replace"), timeout, f"'{text}' in {path}",
             poll=0.2, procs=[proc], log=lambda: path.read_text(errors="replace")[-3000:])


@pytest.mark.e2e
def test_spade_train_sigusr1_requeue_then_resume_to_the_end(repo_root, tmp_path):
    manifest = write_shards(tmp_path / "shards", [6, 6], size=(32, 32))
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    cmd = train_cmd(*_train_overrides(manifest, run_dir, max_steps=9))
    env = cli_env()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _wait_for_text(log, "step 3 epoch", proc, 240)
        proc.send_signal(signal.SIGUSR1)
        rc = proc.wait(timeout=240)
    text = log.read_text()
    assert rc == CheckpointConfig().requeue_exit_code, text[-3000:]
    assert "stopped by SIGUSR1" in text
    stop_dir = find_latest(run_dir)
    stop_step = read_marker(stop_dir)["step"]
    assert 3 <= stop_step < 9 and not (run_dir / "DONE").exists()
    with open(log, "ab") as fh:
        rerun = subprocess.run(cmd, cwd=repo_root, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert rerun.returncode == 0, text[-3000:]
    assert f"resumed from {stop_dir} (step {stop_step}" in text
    assert (run_dir / "DONE").exists() and '"step": 9' in (run_dir / "DONE").read_text()
    assert find_latest(run_dir).name == "step-000000009"


@pytest.mark.e2e
@pytest.mark.dist
def test_spade_train_kill_minus_9_under_torchrun_restarts_and_completes(repo_root, tmp_path):
    manifest = write_shards(tmp_path / "shards", [6, 6], size=(32, 32))
    run_dir, log = tmp_path / "run", tmp_path / "torchrun.log"
    torchrun = Path(sys.executable).parent / "torchrun"
    launcher = [str(torchrun), "--nnodes=1", "--nproc-per-node=2", "--max-restarts=1", "--rdzv-backend=c10d",
                "--rdzv-endpoint=127.0.0.1:0", "--monitor-interval=0.2", "-m", "spade_dist.cli.train"]
    cmd = train_cmd(*_train_overrides(manifest, run_dir, max_steps=10), launcher=launcher)
    env = cli_env()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=fh, stderr=subprocess.STDOUT)
        _wait_for_text(log, "step 5 epoch", proc, 300)
        workers = child_pids(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        rc = proc.wait(timeout=400)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert "resumed from" in text
    done = (run_dir / "DONE").read_text()
    assert '"step": 10' in done
    assert find_latest(run_dir).name == "step-000000010"
    # The restarted workers continued from a committed checkpoint of the first attempt.
    resumed_line = next(line for line in text.splitlines() if "resumed from" in line)
    assert "step-00000000" in resumed_line


def _final_train_state(run_dir: Path, step: int) -> dict:
    from spade_dist.checkpoint import StepReader

    return StepReader(run_dir / "checkpoints" / f"step-{step:09d}").read_trees(["train"])["train"]


def _flat_tensors(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if isinstance(tree, torch.Tensor):
        out[prefix] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flat_tensors(v, f"{prefix}.{k}"))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(_flat_tensors(v, f"{prefix}.{i}"))
    return out


@pytest.mark.e2e
def test_spade_train_save_resume_equals_uninterrupted(tmp_path):
    """Deterministic mode: 0->6 in one go == 0->4, stop, resume 4->6 (weights, EMA, optimizer moments)."""
    manifest = write_shards(tmp_path / "shards", [6, 6], size=(32, 32))
    extra = ["train.deterministic=true", "data.shuffle_buffer=0", "checkpoint.every_steps=0"]

    def spade_train(run_dir: Path, max_steps: int, resume: str) -> None:
        run_cli(train_cmd("--resume", resume, *_train_overrides(manifest, run_dir, max_steps), *extra))

    spade_train(tmp_path / "full", 6, "none")
    spade_train(tmp_path / "cut", 4, "none")
    spade_train(tmp_path / "cut", 6, "auto")
    full, resumed = _flat_tensors(_final_train_state(tmp_path / "full", 6)), \
        _flat_tensors(_final_train_state(tmp_path / "cut", 6))
    assert full.keys() == resumed.keys() and any(".opt_G." in k for k in full)
    worst = max(((full[k].double() - resumed[k].double()).abs().max().item(), k) for k in full if full[k].numel())
    assert worst[0] <= 1e-6, worst


@pytest.mark.e2e
def test_spade_train_bad_resume_path_is_a_one_line_error(tmp_path):
    manifest = write_shards(tmp_path / "shards", [6, 6], size=(32, 32))
    missing = tmp_path / "run" / "checkpoints" / "step-000000004"
    proc = run_cli(train_cmd("--resume", str(missing), *_train_overrides(manifest, tmp_path / "run", max_steps=6)),
                   check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"spade-train: error: checkpoint path does not exist: {missing}" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.e2e
@pytest.mark.dist
def test_spade_train_two_ranks_then_one_rank_continues_the_run(tmp_path):
    """torchrun 2 ranks to step 2 (mid-epoch: 12 samples, 3 steps/epoch), then 1 process to step 5."""
    manifest = write_shards(tmp_path / "shards", [6, 6], size=(32, 32))
    run_dir = tmp_path / "run"
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nnodes=1", "--nproc-per-node=2",
                "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "-m", "spade_dist.cli.train"]
    run_cli(train_cmd(*_train_overrides(manifest, run_dir, max_steps=2), launcher=torchrun))
    assert read_marker(find_latest(run_dir))["world_size"] == 2
    from spade_dist.checkpoint import StepReader

    saved = StepReader(find_latest(run_dir)).read_trees(["data"])["data"]
    assert saved["epoch"] == 0  # 8 of 12 samples delivered: mid-epoch
    one = run_cli(train_cmd(*_train_overrides(manifest, run_dir, max_steps=5)), check=False)
    out = one.stdout + one.stderr
    assert one.returncode == 0, out[-3000:]
    assert "resumed from" in out and "step-000000002 (step 2, epoch 0)" in out
    assert "saved by 2 ranks, now 1" in out
    # 1 rank x batch 2: the 4 samples left of epoch 0 take steps 3-4, step 5 opens epoch 1.
    assert "step 4 epoch 0" in out and "step 5 epoch 1" in out
    assert '"step": 5' in (run_dir / "DONE").read_text()
