"""The stop file asks for a checkpoint-and-stop like a preemption signal (used by slurm/train_gaugan.sh)."""
import pytest

from spade_dist.checkpoint.manager import CheckpointManager
from spade_dist.config import CheckpointConfig
from spade_dist.run_dir import RunDir
from tests.kit import run_cli, synthetic_shards, train_cmd


def test_stop_file_triggers_stop(tmp_path):
    mgr = CheckpointManager(tmp_path / "run", CheckpointConfig(), install_signal_handlers=False)
    try:
        assert mgr.stop_file == tmp_path / "run" / "STOP"
        assert not mgr.should_stop()
        mgr._stop_file_checked = float("-inf")  # skip the once-a-second throttle
        (tmp_path / "run").mkdir(exist_ok=True)
        mgr.stop_file.touch()
        assert mgr.should_stop()
        assert mgr.stop_reason == f"stop-file:{mgr.stop_file}"
    finally:
        mgr.close()


def test_configured_stop_file(tmp_path):
    cfg = CheckpointConfig(stop_file=str(tmp_path / "custom.stop"))
    mgr = CheckpointManager(tmp_path / "run", cfg, install_signal_handlers=False)
    try:
        (tmp_path / "custom.stop").touch()
        assert mgr.should_stop()
    finally:
        mgr.close()


@pytest.mark.e2e
@pytest.mark.slow  # three / two spade-train runs
def test_start_up_warns_of_a_leftover_stop_file_and_of_max_steps_below_the_resumed_step(tmp_path):
    """A STOP left by an earlier stop makes a plain rerun train one step and exit 75 again: the run
    says so at start-up. Resuming with max_steps below the resumed step trains nothing, says so, and
    does not commit the resumed step a second time."""
    run = RunDir(tmp_path / "run")
    manifest = synthetic_shards(tmp_path / "data", count=8, val_count=2)
    common = [f"data.shards={manifest}", f"train.run_dir={run.root}", "checkpoint.every_steps=2"]
    run_cli(train_cmd(*common, "train.max_steps=2"))
    run.stop.touch()
    stopped = run_cli(train_cmd(*common, "train.max_steps=10"), check=False)
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    assert f"warning: {run.stop} exists (left by an earlier stop?): this run will checkpoint and stop after its " \
           "first step with exit 75" in stopped.stdout, stopped.stdout
    assert "stopped by stop-file" in stopped.stdout and run.outcome() == ("requeue", 3)

    run.clear_launch_markers()
    marker = run.checkpoints / "step-000000003" / "COMMITTED"
    committed = marker.read_bytes()
    below = run_cli(train_cmd(*common, "train.max_steps=1"))
    assert ("warning: train.max_steps=1 is below the step this run resumed from (3): nothing to train; the run ends "
            "at step 3 and commits no new checkpoint") in below.stdout, below.stdout
    assert "exists (left by an earlier stop?)" not in below.stdout
    assert "done at step 3" in below.stdout and "to step 3 " in below.stdout
    assert marker.read_bytes() == committed and "committed" not in below.stderr  # not written again
