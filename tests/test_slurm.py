"""Slurm scripts on a real local two-node cluster (Debian slurm-wlm + munge, started by the test)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.kit import TINY, audited_keys, synthetic_shards, tiny_config
from tests.slurm_cluster import REPO_ROOT, SlurmCluster

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).up()
    yield c
    c.down()


def test_cluster_spans_two_nodes(cluster, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/bash\nsrun -N2 --ntasks-per-node=1 bash -c 'echo $SLURMD_NODENAME' | sort\n")
    job = cluster.sbatch("-N2", "--ntasks-per-node=1", f"--output={tmp_path}/out.txt", str(script))
    assert cluster.wait(job, timeout=60) == "COMPLETED"
    assert (tmp_path / "out.txt").read_text().split() == ["n1", "n2"]


def test_shard_array_job_equals_single_process(cluster, coco_sample, tmp_path):
    single, array = tmp_path / "single", tmp_path / "array"
    common = ["--layout", "coco-stuff", "--root", str(coco_sample), "--split", "train", "--max-count", "3"]
    subprocess.run([str(REPO_ROOT / ".venv/bin/python"), "-m", "data_tools", "shard", *common, "--out", str(single),
                    "--no-progress"], check=True, cwd=REPO_ROOT, capture_output=True)
    env = {"LAYOUT": "coco-stuff", "ROOT": str(coco_sample), "OUT": str(array), "SPLIT": "train"}
    job = cluster.sbatch("--array=0-2", "--cpus-per-task=1", f"--output={tmp_path}/shard-%A_%a.out", "slurm/shard_dataset.sh",
                         "--max-count", "3", env=env)
    for task in range(3):
        assert cluster.wait(f"{job}_{task}", timeout=180) == "COMPLETED", (tmp_path / f"shard-{job}_{task}.out").read_text()
    # Task 0 submitted the merge job with afterok on the whole array: wait for the manifest.
    manifest = array / "manifest.json"
    deadline = time.monotonic() + 120
    while not manifest.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert manifest.exists(), [p.read_text() for p in tmp_path.glob("*.out")]
    # Shards and manifest are the product (the `_parts/` bookkeeping folder is not).
    single_files = sorted(p.name for p in single.iterdir() if p.is_file())
    assert sorted(p.name for p in array.iterdir() if p.is_file()) == single_files
    assert len([n for n in single_files if n.endswith(".tar")]) == 5
    for name in single_files:
        assert (single / name).read_bytes() == (array / name).read_bytes(), name
    assert json.loads(manifest.read_text())["splits"]["train"]["num_samples"] == 13


# ----------------------------------------------------------------------------------------------
# slurm/train_gaugan.sh: 2 nodes x 1 CPU rank (gloo, synchronized BN)
# ----------------------------------------------------------------------------------------------

STEPS_PER_EPOCH = 8  # 32 training samples / (2 ranks x batch 2)


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory):
    return synthetic_shards(tmp_path_factory.mktemp("slurm_data"), count=32, val_count=4, size=32)


def _train_env(manifest: Path, run_dir: Path, max_steps: int, extra: str = "") -> dict:
    overrides = (
        f"data.shards={manifest} data.val_shards= train.log_every=1 train.sample_every=4 "
        f"train.max_steps={max_steps} train.log_keys=true {extra}"  # metrics: the script's default (on)
    )
    return {"CONFIG": str(TINY), "RUN_DIR": str(run_dir), "SPADE_DEVICE": "cpu",
            "OVERRIDES": overrides, "OMP_NUM_THREADS": "1"}


def _submit_training(cluster: SlurmCluster, env: dict, out: Path) -> str:
    return cluster.sbatch("-N2", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={out}",
                          "slurm/train_gaugan.sh", env=env)


def _keys_by_epoch(run_dir: Path) -> dict[int, Counter]:
    by_epoch: dict[int, Counter] = {}
    for path in sorted((run_dir / "logs").glob("keys-rank*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            by_epoch.setdefault(rec["epoch"], Counter()).update(audited_keys(rec))
    return by_epoch


def test_train_two_nodes_to_completion_with_fid_job(cluster, train_shards, tmp_path):
    import torch

    from spade_dist.config import load_config
    from spade_dist.data import build_eval_loader
    from spade_dist.eval.inception import make_test_inception_weights

    run_dir = tmp_path / "run"
    weights = tmp_path / "inception.pth"
    eval_overrides = (f"data.val_shards={train_shards} eval.mode=slurm eval.inception_weights={weights} "
                      f"eval.reference_cache_dir={tmp_path / 'cache'} eval.kid_subset_size=4 eval.poll_seconds=0.5 "
                      "checkpoint.every_steps=3 checkpoint.keep_last=5 checkpoint.async_save=false")
    cfg = tiny_config(f"data.val_shards={train_shards}")
    make_test_inception_weights(weights, torch.cat([b["image"] for b in build_eval_loader(cfg.data, split="val")]), seed=0)
    env = _train_env(train_shards, run_dir, 6, "")
    env["OVERRIDES"] = env["OVERRIDES"].replace("data.val_shards= ", "") + " " + eval_overrides
    env["GPU_MEMORY_GIB"] = "0.08"  # the start-up memory plan, for a GPU too small for tiny's batch of 2
    job = _submit_training(cluster, env, tmp_path / "train.out")
    state = cluster.wait(job, timeout=400)
    log = (tmp_path / "train.out").read_text()
    assert state == "COMPLETED", log[-4000:]
    # Both nodes' launchers log into this file: a successful run ends without a traceback (torchrun's
    # exit barrier, docs/SLURM.md).
    assert "Traceback" not in log and "exit barrier" not in log, log[-6000:]
    # The FID watcher was submitted once, with a dependency on the training job, and scored its checkpoints.
    eval_job = (run_dir / "eval_job").read_text().strip()
    assert f"submitted FID watcher job {eval_job}" in log
    eval_state = cluster.wait(eval_job, timeout=400)
    eval_log = "\n".join(p.read_text() for p in (run_dir / "eval").glob("slurm-*.out"))
    assert eval_state == "COMPLETED", eval_log[-4000:]
    records = [json.loads(line) for line in (run_dir / "eval" / "metrics.jsonl").read_text().splitlines()]
    scored = sorted(r["step"] for r in records if r.get("fid") is not None)
    assert scored == [3, 6], records
    assert json.loads((run_dir / "eval" / "best.json").read_text())["step"] in (3, 6)
    assert "nodes=2" in log and "world=2" in log and "training finished" in log
    assert "memory plan: 2 x 0.08 GiB, global batch 32" in log
    assert "data.batch_size=2 speed.activation_checkpointing=off train.mixed_precision=no: 0.1 GiB, WILL NOT FIT" in log
    assert "warning: the configured data.batch_size will not fit" in log
    assert json.loads((run_dir / "DONE").read_text())["step"] == 6
    assert {p.name for p in (run_dir / "checkpoints").glob("step-*")} >= {"step-000000006"}
    assert (run_dir / "samples" / "index.html").exists() and list((run_dir / "samples").glob("step-*.png"))
    # Live metrics are the script's default for a cluster job.
    resolved = load_config(run_dir / "config.yaml").metrics
    assert (resolved.enabled, resolved.bind, resolved.port_base) == (True, "0.0.0.0", 0)
    # Both ranks trained (keys audit per rank) and the discovery file is gone after the run.
    assert {p.name for p in (run_dir / "logs").glob("keys-rank*.jsonl")} == {"keys-rank0.jsonl", "keys-rank1.jsonl"}
    assert not list((run_dir / "metrics").glob("*.json"))


def test_external_requeue_checkpoints_and_resumes(cluster, train_shards, tmp_path):
    """An operator's (or a PreemptMode=REQUEUE preemption's) `scontrol requeue` mid-epoch: Slurm requeues the
    job itself and TERMs the batch shell, which has the run checkpoint and stop; the script does not requeue
    a second time, says so in one line, and the restarted job resumes and finishes without a traceback.
    (USR1 before the time limit, where the script requeues itself: the DeepSpeed test below.)"""
    run_dir = tmp_path / "run"
    max_steps = STEPS_PER_EPOCH + 4  # the interruption falls in epoch 0, the run ends in epoch 1
    out = tmp_path / "train.out"
    job = _submit_training(cluster, _train_env(train_shards, run_dir, max_steps, "checkpoint.every_steps=100"), out)
    # Wait until training is under way (a few steps logged), then requeue the job from outside.
    deadline = time.monotonic() + 300
    metrics_log = run_dir / "logs" / "train_metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics_log.exists() and len(metrics_log.read_text().splitlines()) >= 3:
            break
        assert cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), out.read_text()[-3000:]
        time.sleep(0.5)
    else:
        raise AssertionError(f"training did not start: {out.read_text()[-3000:]}")
    cluster.run("scontrol", "requeue", job)
    # The job is requeued (SLURM_RESTART_COUNT=1), resumes from the preemption checkpoint and finishes.
    log = _wait_requeued_and_completed(cluster, job, out, timeout=600)
    assert "restart=0" in log and "restart=1" in log, log[-4000:]
    assert f"Slurm has already requeued job {job}: it will continue from the run's last checkpoint" in log, log[-4000:]
    assert "requeueing job" not in log and "resubmit" not in log and "Job is pending execution" not in log, log[-4000:]
    # Slurm TERMs the node agents too: each forwards it and ends in one line, no SignalException traceback
    # (python -m spade_dist.launcher), in the interrupted start as in the resumed one.
    assert "Traceback" not in log and "exit barrier" not in log and "SignalException" not in log, log[-6000:]
    assert "spade-train node agent on " in log, log[-4000:]
    # The requeue came from the run's REQUEUE marker; the job ended with the documented code before being
    # requeued.
    assert "the run asked for a requeue (launcher exit code" in log, log[-4000:]
    assert not (run_dir / "REQUEUE").exists() and not (run_dir / "STOP").exists()
    assert "resumed from" in log and "training finished" in log
    _assert_preempted_mid_epoch_and_exactly_once(log, run_dir, max_steps)


def _assert_preempted_mid_epoch_and_exactly_once(log: str, run_dir: Path, max_steps: int) -> None:
    """DONE at the last step, the stop landed inside epoch 0, and every sample of each epoch was used
    exactly once across the two job runs (key audit)."""
    assert json.loads((run_dir / "DONE").read_text())["step"] == max_steps
    preempt_step = int(re.search(r"stopped by (?:SIGTERM|stop-file:\s*\S+) at step (\d+);", log).group(1))
    assert 0 < preempt_step < STEPS_PER_EPOCH, preempt_step
    keys = _keys_by_epoch(run_dir)
    assert len(keys[0]) == 32 and set(keys[0].values()) == {1}, keys[0]
    assert sum(keys[1].values()) == (max_steps - STEPS_PER_EPOCH) * 4 and set(keys[1].values()) == {1}


def _wait_requeued_and_completed(cluster: SlurmCluster, job: str, out: Path, timeout: float) -> str:
    """Wait until the job has been requeued once and completed; returns its (appended) log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cluster.job_field(job, "Restarts") == "1" and cluster.job_state(job) == "COMPLETED":
            break
        assert cluster.job_state(job) not in ("FAILED", "CANCELLED", "TIMEOUT"), out.read_text()[-4000:]
        time.sleep(1)
    log = out.read_text()
    assert cluster.job_state(job) == "COMPLETED", log[-4000:]
    return log


def _wait_for_steps(cluster: SlurmCluster, job: str, run_dir: Path, out: Path, steps: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    metrics_log = run_dir / "logs" / "train_metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics_log.exists() and len(metrics_log.read_text().splitlines()) >= steps:
            return
        state = cluster.job_state(job)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), out.read_text()[-3000:] if out.exists() else state
        time.sleep(0.5)
    raise AssertionError(f"training did not start: {out.read_text()[-3000:] if out.exists() else 'no log'}")


def test_deepspeed_zero1_two_nodes_preempted_requeued_resumed(cluster, train_shards, tmp_path):
    """DeepSpeed's launcher on each node (--no_ssh --node_rank, generated hostfile), ZeRO-1 over gloo,
    with a user DeepSpeed config merged in; USR1 mid-epoch -> checkpoint, requeue, resume, finish."""
    run_dir = tmp_path / "run"
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 100000}, "steps_per_print": 1000}))
    max_steps = STEPS_PER_EPOCH + 2
    out = tmp_path / "train.out"
    env = _train_env(train_shards, run_dir, max_steps, f"checkpoint.every_steps=100 train.backend=deepspeed "
                                                       f"train.zero_stage=1 train.deepspeed_config={ds_json}")
    env["SPADE_EXTRA_ENV"] = "SPADE_TEST_MARKER=from_extra_env"
    job = _submit_training(cluster, env, out)
    _wait_for_steps(cluster, job, run_dir, out, 2, timeout=600)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    log = _wait_requeued_and_completed(cluster, job, out, timeout=900)
    assert "PYTHONFAULTHANDLER=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1 SPADE_EXTRA_ENV='SPADE_TEST_MARKER=from_extra_env'" in log
    assert "launcher=deepspeed" in log and "nodes=2" in log and "world=2" in log
    assert "deepspeed on 2 x cpu" in log, log[-4000:]  # one process group of 2 ranks across both nodes
    assert (run_dir / "deepspeed_hostfile").read_text().split() == ["n1", "slots=1", "n2", "slots=1"]
    assert "requeueing job" in log and "resumed from" in log and "training finished" in log, log[-4000:]
    # speed.*: auto speed paths were measured once, recorded, and the requeued job kept that plan.
    assert log.count("speed paths on cpu (measured)") == 1 and log.count("speed paths on cpu (recorded)") == 1
    assert json.loads((run_dir / "speed_paths.json").read_text())["device_type"] == "cpu"
    _assert_preempted_mid_epoch_and_exactly_once(log, run_dir, max_steps)


def test_bad_extra_env_is_refused_before_launch(tmp_path):
    env = {**os.environ, "CONFIG": str(TINY), "RUN_DIR": str(tmp_path / "run"),
           "SPADE_EXTRA_ENV": "GOOD=1 not-a-pair"}
    proc = subprocess.run(["bash", "slurm/train_gaugan.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "SPADE_EXTRA_ENV: 'not-a-pair' is not NAME=VALUE" in proc.stdout


def test_unknown_launcher_is_refused_before_launch(tmp_path):
    """LAUNCHER=accelerate (the value before torchrun hosted its store outside the launchers) is one line, exit 2."""
    env = {**os.environ, "CONFIG": str(TINY), "RUN_DIR": str(tmp_path / "run"), "LAUNCHER": "accelerate"}
    proc = subprocess.run(["bash", "slurm/train_gaugan.sh"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "LAUNCHER: 'accelerate' is not torchrun, deepspeed or auto" in proc.stdout and "Traceback" not in proc.stderr
