"""The stop file asks for a checkpoint-and-stop like a preemption signal (used by slurm/train_gaugan.sh)."""
from spade_dist.checkpoint.manager import CheckpointManager
from spade_dist.config import CheckpointConfig


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
