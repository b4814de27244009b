"""spade-train as a user runs it: clear errors for bad input, and a 2-process accelerate launch."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from spade_dist.distributed import DistributedSetupError, batch_geometry, check_process_group
from tests.dist_utils import free_port
from tests.kit import PYTHON, accelerate_launcher, cli_env, run_cli, synthetic_shards, train_cmd

TRAIN = train_cmd("--resume", "none")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return synthetic_shards(tmp_path_factory.mktemp("synth"))


def _fails_with(args: list[str], *needles: str, env: dict | None = None) -> str:
    proc = run_cli(TRAIN + args, env=env, check=False, timeout=240)
    assert proc.returncode == 2, f"rc={proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in:\n{proc.stderr[-2000:]}"
    return proc.stderr


def test_unknown_tracker_is_a_config_error():
    _fails_with(["train.trackers=[wandb]"], "spade-train: error:", "train.trackers[0]", "'wandb'", "tensorboard")


def test_unknown_config_key_is_named():
    _fails_with(["model.not_a_key=3"], "spade-train: error:", "unknown config key 'model.not_a_key'")


def test_missing_dataset_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "manifest.json"
    _fails_with([f"data.shards={missing}", f"train.run_dir={tmp_path / 'run'}"], "spade-train: error:", str(missing))


def test_global_batch_that_does_not_divide(tmp_path, manifest):
    _fails_with([f"data.shards={manifest}", "train.grad_accum=2", "train.global_batch_size=5",
                 f"train.run_dir={tmp_path / 'run'}"], "train.global_batch_size=5 is not divisible")


def test_multi_process_launch_without_process_group(tmp_path, manifest):
    env = cli_env(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    _fails_with([f"data.shards={manifest}", f"train.run_dir={tmp_path / 'run'}"],
                "WORLD_SIZE=2", "MASTER_ADDR", env=env)


def test_single_process_accelerator_under_world_size_2_is_an_error():
    with pytest.raises(DistributedSetupError, match="accelerator runs 1 process"):
        check_process_group(2, launcher_processes=1)


def test_batch_geometry_keeps_the_global_batch_by_the_chosen_factor():
    assert batch_geometry(3, 2, world=2, global_batch=16, absorb="per_rank_batch") == (4, 2)
    assert batch_geometry(3, 1, world=2, global_batch=0, absorb="per_rank_batch") == (3, 1)
    # An elastic resize 2 -> 1 ranks with the accumulation absorbing it: per-rank batch 4 stays.
    assert batch_geometry(4, 1, world=2, global_batch=16, absorb="grad_accum") == (4, 2)
    assert batch_geometry(4, 1, world=1, global_batch=16, absorb="grad_accum") == (4, 4)
    with pytest.raises(DistributedSetupError, match="not divisible"):
        batch_geometry(1, 1, world=3, global_batch=16, absorb="per_rank_batch")
    with pytest.raises(DistributedSetupError, match=r"world size 3 x data.batch_size 4 = 12 \(train.elastic_batch=grad_accum"):
        batch_geometry(4, 1, world=3, global_batch=16, absorb="grad_accum")


class _Loader:
    """The two things the loop asks a loader about the rest of the run."""

    def __init__(self, batches_left: int, pending_epoch: int) -> None:
        self.batches_left, self._pending = batches_left, pending_epoch

    def __len__(self) -> int:
        return self.batches_left

    def __iter__(self):
        return iter(range(self.batches_left))

    def pending_epoch(self) -> int:
        return self._pending


def test_trailing_partial_accumulation_group_is_an_update_of_its_own():
    from spade_dist.train.loop import ProgressMeter, micro_batches, updates

    groups = list(micro_batches(_Loader(5, 0), 2, ProgressMeter()))
    assert groups == [[0, 1], [2, 3], [4]] and updates(5, 2) == 3


def test_last_step_counts_epochs_from_where_a_resized_run_stands():
    from types import SimpleNamespace

    from spade_dist.config import load_config
    from spade_dist.train.loop import last_step

    cfg = load_config(None, ["optim.niter=1", "optim.niter_decay=2", "train.max_steps=0"])  # 3 epochs
    # Saved at step 4 on 2 ranks mid-epoch 0; now 1 rank: 7 batches left of epoch 0, 12 steps per epoch.
    assert last_step(cfg, SimpleNamespace(step=4), _Loader(7, 0), steps_per_epoch=12, grad_accum=1) == 4 + 7 + 2 * 12
    # Saved after the last batch of epoch 1: the loader goes on with epoch 2, the last one.
    assert last_step(cfg, SimpleNamespace(step=9), _Loader(12, 2), steps_per_epoch=12, grad_accum=2) == 9 + 6
    assert last_step(cfg, SimpleNamespace(step=30), _Loader(12, 3), steps_per_epoch=12, grad_accum=1) == 30
    fixed = load_config(None, ["train.max_steps=50"])
    assert last_step(fixed, SimpleNamespace(step=4), _Loader(7, 0), steps_per_epoch=12, grad_accum=1) == 50


@pytest.mark.e2e
@pytest.mark.dist
def test_accelerate_launch_two_cpu_processes(tmp_path, manifest):
    run_dir = tmp_path / "run"
    cmd = train_cmd("--resume", "none", f"data.shards={manifest}", f"train.run_dir={run_dir}", "train.max_steps=4",
                    "train.sample_every=2", "checkpoint.every_steps=100", launcher=accelerate_launcher())
    proc = run_cli(cmd, timeout=480)
    out = proc.stdout + proc.stderr
    assert "ddp on 2 x cpu" in out  # really two ranks in one gloo group, not two single jobs
    assert "step 4 epoch" in out and "img/s" in out and "data wait" in out
    assert "| 4/4 (100%) ETA 00:00 |" in out and "| 2/4 (50%) ETA " in out
    assert (run_dir / "samples" / "step-000000002.png").is_file()
    assert (run_dir / "samples" / "step-000000004.png").is_file()
    gallery = (run_dir / "samples" / "index.html").read_text()
    assert "step-000000002.png" in gallery and "step-000000004.png" in gallery
    assert "model:" in (run_dir / "config.yaml").read_text()
    assert json.loads((run_dir / "DONE").read_text())["step"] == 4
    assert (run_dir / "checkpoints" / "step-000000004" / "COMMITTED").exists()


@pytest.mark.e2e
@pytest.mark.dist
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_torchrun_and_deepspeed_launchers(tmp_path, manifest, launcher):
    run_dir = tmp_path / "run"
    bin_dir = Path(PYTHON).parent
    port = str(free_port())
    if launcher == "torchrun":
        head = [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", port, "-m", "spade_dist.cli.train"]
        extra = []
    else:
        head = [str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", port, "--module", "spade_dist.cli.train"]
        extra = ["train.backend=deepspeed", "train.zero_stage=1"]
    proc = run_cli(train_cmd("--resume", "none", f"data.shards={manifest}", f"train.run_dir={run_dir}",
                             "train.max_steps=2", "train.sample_every=2", "train.trackers=[tensorboard]", *extra,
                             launcher=head), timeout=480)
    out = proc.stdout + proc.stderr
    backend = "deepspeed" if launcher == "deepspeed" else "ddp"
    assert f"{backend} on 2 x cpu" in out
    assert json.loads((run_dir / "DONE").read_text())["step"] == 2
    assert (run_dir / "samples" / "step-000000002.png").is_file()
    # TensorBoard through Accelerate's tracker API, whatever the backend: scalars and the sample grid.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert f"tensorboard log dir: {run_dir / 'tensorboard'}" in out
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss/GAN", "loss/D_real", "lr/G", "lr/D", "images_per_sec", "data_wait_share"} <= scalars, scalars
    assert [e.step for e in events.Scalars("loss/GAN")] == [2]
    grid = Image.open(run_dir / "samples" / "step-000000002.png")
    assert [(i.step, i.width, i.height) for i in events.Images("samples")] == [(2, *grid.size)]


def test_progress_text_has_step_total_and_eta() -> None:
    from spade_dist.train.loop import progress_text

    assert progress_text(250, 1000, 2.0) == "250/1000 (25%) ETA 25:00"
    assert progress_text(1, 200000, 1.5) == "1/200000 (0%) ETA 83:19:58"
    assert progress_text(300, 300, 9.0) == "300/300 (100%) ETA 00:00"
