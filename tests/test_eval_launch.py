"""Starting the watcher from the trainer: fails in the trainer at start, carries the eval settings."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from spade_dist.config import load_config
from spade_dist.eval.inception import InceptionWeightsError
from spade_dist.eval.launch import start_eval_watcher, watcher_command


def test_missing_weights_fail_in_the_trainer_before_spawning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPADE_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    cfg = load_config(None, ["eval.mode=subprocess"])
    with pytest.raises(InceptionWeightsError, match="eval.inception_weights"):
        start_eval_watcher(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "eval").exists()  # nothing was started


def test_missing_run_config_is_named(tmp_path: Path) -> None:
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"not used before the child starts")
    cfg = load_config(None, [f"eval.inception_weights={weights}"])
    with pytest.raises(FileNotFoundError, match="config.yaml does not exist"):
        start_eval_watcher(cfg, tmp_path / "run")


def test_watcher_command_carries_policy_device_and_parent(tmp_path: Path) -> None:
    cfg = load_config(None, ["eval.policy=every_k", "eval.every_k=3", "eval.device=cuda:1"])
    cmd = watcher_command(cfg, tmp_path, tmp_path / "c.yaml", parent_pid=1234)
    joined = " ".join(cmd[1:])
    assert "-m spade_dist.cli.eval watch --run-dir" in joined
    for part in ("--policy every_k", "--every-k 3", "--device cuda:1", f"--config {tmp_path / 'c.yaml'}",
                 "--parent-pid 1234"):
        assert part in joined


def test_slurm_script_checks_settings_and_reports_missing_weights(tmp_path: Path, repo_root: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "SPADE_INCEPTION_WEIGHTS"}
    env.update(SPADE_ENV=str(tmp_path / "no-venv"), TORCH_HOME=str(tmp_path / "torch-home"), PYTHONPATH=str(repo_root),
               PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}")
    script = str(repo_root / "slurm" / "eval_fid.sh")
    no_run_dir = subprocess.run(["bash", script], cwd=repo_root, env=env, capture_output=True, text=True, timeout=60)
    assert no_run_dir.returncode == 2 and "RUN_DIR is required" in no_run_dir.stdout

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(load_config(None).to_yaml())
    no_weights = subprocess.run(["bash", script], cwd=repo_root, env={**env, "RUN_DIR": str(run_dir)},
                                capture_output=True, text=True, timeout=120)
    assert no_weights.returncode == 2, no_weights.stdout + no_weights.stderr
    assert "SPADE_INCEPTION_WEIGHTS" in no_weights.stderr


def test_spade_eval_once_missing_checkpoint_is_a_one_line_error(tmp_path: Path, repo_root: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "spade_dist.cli.eval", "once", "--checkpoint", str(tmp_path / "nope")],
                          cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"spade-eval: error: {tmp_path / 'nope'}: checkpoint does not exist (pruned?)"


def test_eval_device_auto_is_the_default_and_resolves_to_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from spade_dist.config import ConfigError
    from spade_dist.eval.commands import init_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert load_config(None).eval.device == "auto"
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert init_distributed("auto") == (0, 1, expected)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert init_distributed("auto") == (0, 1, "cpu")
    for bad in ("gpu", "cuda:x", ""):
        with pytest.raises(ConfigError, match="eval.device must be auto, cpu, cuda or cuda:N"):
            load_config(None, [f"eval.device={bad}"])


def test_eval_batches_have_eval_batch_size(tmp_path: Path) -> None:
    from spade_dist.eval.evaluate import default_batches_factory
    from tests.kit import synthetic_shards, tiny_config

    manifest = synthetic_shards(tmp_path, count=4, val_count=7, size=32)
    cfg = tiny_config(f"data.shards={manifest}", "data.batch_size=1", "eval.batch_size=3")
    sizes = [batch["image"].shape[0] for batch in default_batches_factory(cfg, 0, 1)()]
    assert sizes == [3, 3, 1]  # eval.batch_size, not data.batch_size; every image once
