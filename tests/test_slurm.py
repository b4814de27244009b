"""Slurm scripts on a real local two-node cluster (Debian slurm-wlm + munge, started by the test)."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

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
