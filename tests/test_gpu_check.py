"""bench/gpu_check.sh / gpu_check.py: fail fast without CUDA; the JSON's structure on a tiny CPU run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.kit import TINY

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour; a GPU machine runs the real check")


def test_gpu_check_sh_fails_fast_without_cuda(tmp_path):
    # PATH without nvidia-smi, as on the CPU machines; nothing is installed or run before the check.
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path / "out")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "gpu_check: no CUDA device" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_check_py_refuses_cpu_unless_asked(tmp_path):
    proc = subprocess.run([PYTHON, "bench/gpu_check.py", "--out", str(tmp_path / "x.json")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_gpu_check_json_structure_on_a_tiny_cpu_run(tmp_path):
    junit = tmp_path / "cuda.xml"
    tests = subprocess.run([PYTHON, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider",
                            f"--junitxml={junit}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [PYTHON, "bench/gpu_check.py", "--device", "cpu", "--out", str(out), "--junit", str(junit),
         "--tests-rc", str(tests.returncode), "--config", str(TINY), "--batches", "2",
         "--compare-batch", "2", "--iters", "1", "--fid-images", "4", "--fid-size", "32", "--budget-s", "900",
         "--memory-batches", "2,4", "--sections", "train_step_bf16,memory,speed_paths,channels_last,fid"],
        cwd=REPO, capture_output=True, text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["format"] == "spade-dist-gpu-check/1" and result["device"] == "cpu"
    skipped = result["cuda_tests"]["skipped"]
    assert result["cuda_tests"]["tests"] == len(skipped) > 0
    assert all("no CUDA device" in s or "needs 2 CUDA devices" in s for s in skipped), skipped
    row = result["train_step_bf16"]["2"]
    assert row["images_per_s"] > 0 and row["flops_per_image"] > 0 and row["peak_memory_bytes"] > 0
    assert row["mfu"] is None  # no datasheet peak for a CPU
    memory = result["memory"]
    assert [(r["mode"], r["precision"], r["batch"]) for r in memory["runs"]] == [
        (mode, precision, b) for mode in ("reference", "fast", "fast+savings") for precision in ("fp32", "bf16")
        for b in (2, 4)]
    assert all(r["peak_bytes"] > 0 and r["cuda_max_memory_allocated_bytes"] is None for r in memory["runs"])
    assert {"fast+savings/fp32 per_sample / reference", "fast+savings/bf16 per_sample / reference"} <= set(memory["ratios"])
    paths = result["speed_paths"]["variants"]
    assert set(paths) == {"off", "on", "auto"} and paths["off"]["ratio"] == 1.0
    assert paths["auto"]["speed_paths"]["source"] == "measured" and paths["on"]["speed_paths"]["summary"].endswith("x region")
    assert set(result["channels_last"]["variants"]) == {"off", "on"}
    assert result["fid"]["images_per_s"] > 0
    assert "compile" not in result
    assert result["load_avg_before"] >= 0 and result["wall_s"] > 0
