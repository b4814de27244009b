"""The benchmark half of ``bench/gpu_check.sh``: one JSON with the GPU numbers (docs/PERFORMANCE.md).

    python bench/gpu_check.py --out gpu_check.json [--junit cuda_tests.xml --tests-rc N] [--budget-s 200]

Sections, in this order (each checks the remaining time budget first and is recorded as
``{"skipped": "time budget"}`` when it would not fit):

- ``train_step_bf16``: images/s of the full bf16 training iteration at the COCO-Stuff 256² config
  (``configs/coco_stuff.yaml``, VGG loss with random weights: same cost) for per-GPU batch 1, 4, 16;
  FLOPs counted with ``FlopCounterMode``, model FLOPs utilisation = counted FLOPs per second /
  the device's dense bf16 peak (``PEAK_BF16_FLOPS``), peak memory (``max_memory_allocated``);
- ``memory``: ``bench/memory.py`` with real accounting on the device, per-GPU batch 1 and 2
  (``--memory-batches``), reference / fast / fast + savings (``all``) in fp32 and bf16: the tracked peak (the
  prediction: device-independent in fp32; in bf16 the CUDA autocast's bytes, against the planner's
  CPU-autocast bf16 rows) next to ``torch.cuda.max_memory_allocated`` of the same iteration;
- ``speed_paths``: off (dense) vs on (gather + region) vs auto (measured per layer), batch 4 bf16;
- ``channels_last``: off vs on, batch 4 bf16;
- ``compile``: eager vs ``speed.compile=true``, batch 4 bf16 (compilation time in
  ``first_iteration_s``);
- ``fid``: Inception feature extraction images/s at 256² (``eval.batch_size`` images per forward).

Every comparison is one ``bench/variants.py`` run: same process, same batch, interleaved timing,
ratios against the first variant. ``--device cpu`` exists only for the structural test on CPU
machines (tiny configs); without it, a machine without CUDA exits 2 with "no CUDA device".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Callable, Optional

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.variants import time_variants  # noqa: E402

EXIT_NO_CUDA = 2
# Dense (no sparsity) bf16 tensor-core peak from the vendors' datasheets, by device-name substring;
# the first match wins (PCIe before the SXM default of the same chip).
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12),
]
COCO_CONFIG = str(REPO_ROOT / "configs" / "coco_stuff.yaml")


def peak_bf16_flops(device_name: str) -> Optional[float]:
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in device_name), None)


def junit_summary(path: Path, rc: Optional[int]) -> dict[str, Any]:
    """Counts and failing test names from pytest's JUnit XML."""
    if not path.is_file():
        return {"exit_code": rc, "error": f"{path} not written (pytest did not run to the end)"}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    assert suite is not None
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    skipped = [f"{case.get('name')}: {case.find('skipped').get('message')}" for case in suite.iter("testcase")
               if case.find("skipped") is not None]
    return {"exit_code": rc, "tests": int(suite.get("tests", 0)), "failures": int(suite.get("failures", 0)),
            "errors": int(suite.get("errors", 0)), "skipped": skipped, "failed": failed,
            "seconds": float(suite.get("time", 0.0))}


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _section(out: dict[str, Any], name: str, budget: Budget, needs_s: float, run: Callable[[], Any]) -> None:
    if budget.left() < needs_s:
        out[name] = {"skipped": f"time budget ({budget.left():.0f} s left, needs ~{needs_s:.0f} s)"}
        return
    start = time.monotonic()
    try:
        out[name] = run()
    except Exception as exc:  # noqa: BLE001 - one failing section must not lose the others' numbers
        out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    out[name + "_wall_s"] = round(time.monotonic() - start, 1)


def _compact(result: dict[str, Any]) -> dict[str, Any]:
    """The variants' numbers without the per-iteration lists (the JSON stays readable)."""
    keep = ("images_per_s", "ratio", "median_s", "first_iteration_s", "peak_memory_bytes", "flops_per_image",
            "achieved_flops_per_s", "speed_paths")
    return {"batch": result["batch"], "labels": result["labels"], "load_avg": result["load_avg"],
            "variants": {name: {k: v[k] for k in keep if k in v} for name, v in result["variants"].items()}}


def train_step_table(config: str, common: list[str], batches: list[int], iters: int, peak: Optional[float]) -> dict[str, Any]:
    table = {}
    for batch in batches:
        result = _compact(time_variants(config, [("bf16", ["train.mixed_precision=bf16"])], common, batch, iters, warmup=2))
        row = result["variants"]["bf16"]
        row["mfu"] = row["achieved_flops_per_s"] / peak if peak and "achieved_flops_per_s" in row else None
        table[str(batch)] = {**row, "labels": result["labels"]}
    return table


def fid_throughput(device: str, size: int, images: int, batch: int) -> dict[str, Any]:
    from spade_dist.eval.inception import build_inception, extract_features, make_test_inception_weights

    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (images, 3, size, size), generator=g, dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        # Random weights with calibrated BN: the real weights' cost, no download.
        weights = make_test_inception_weights(Path(tmp) / "inception.pth", data[: min(images, 16)], seed=0)
        extractor = build_inception(weights, device)
    extract_features(extractor, data[:batch])  # warm-up (cuDNN algorithm choice)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, images, batch):
        extract_features(extractor, data[i:i + batch])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"images_per_s": images / seconds, "images": images, "size": size, "batch_size": batch}


def memory_table(config: str, common: list[str], batches: list[int]) -> dict[str, Any]:
    from bench.memory import main as memory_main

    result = memory_main(["--config", config, "--batch", *map(str, batches), "--modes", "reference", "fast",
                          "fast+savings", "--savings", "all", "--precision", "fp32", "bf16", "--accounting", "real",
                          "--time-iters", "1", "--", *common])
    keep = ("mode", "precision", "batch", "peak_bytes", "cuda_max_memory_allocated_bytes", "cuda_over_tracked", "step_s",
            "speed_paths")
    return {"labels": result["labels"], "runs": [{k: r[k] for k in keep} for r in result["runs"]],
            "linear_model": result["linear_model"], "ratios": result["ratios"]}


def run_checks(device: str, config: str, common: list[str], batches: list[int], compare_batch: int, iters: int,
               budget_s: float, fid_images: int, fid_size: int, sections: tuple[str, ...],
               memory_batches: tuple[int, ...] = (1, 2)) -> dict[str, Any]:
    budget = Budget(budget_s)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    peak = peak_bf16_flops(name) if device == "cuda" else None
    common = [f"train.device={device}", *common]
    bf16 = "train.mixed_precision=bf16"
    out: dict[str, Any] = {"device": name, "peak_bf16_flops": peak,
                           "peak_source": "vendor datasheet, dense bf16 tensor-core peak" if peak else None,
                           "config": config, "common_overrides": common}

    def compare(variants: list[tuple[str, list[str]]]) -> Callable[[], dict[str, Any]]:
        return lambda: _compact(time_variants(config, variants, common, compare_batch, iters, warmup=2))

    plan: list[tuple[str, float, Callable[[], Any]]] = [
        ("train_step_bf16", 60, lambda: train_step_table(config, common, batches, iters, peak)),
        ("memory", 60, lambda: memory_table(config, common, list(memory_batches))),
        ("speed_paths", 30, compare([("off", [bf16, "speed.onehot_gather=off", "speed.region_modulation=off"]),
                                     ("on", [bf16, "speed.onehot_gather=on", "speed.region_modulation=on"]),
                                     ("auto", [bf16])])),
        ("channels_last", 20, compare([("off", [bf16, "speed.channels_last=false"]),
                                       ("on", [bf16, "speed.channels_last=true"])])),
        ("fid", 10, lambda: fid_throughput(device, fid_size, fid_images, 64 if device == "cuda" else 4)),
        ("compile", 60, compare([("eager", [bf16]), ("compiled", [bf16, "speed.compile=true"])])),
    ]
    for section, needs, run in plan:
        if section in sections:
            _section(out, section, budget, needs, run)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the JSON file to write")
    p.add_argument("--junit", default="", help="JUnit XML of the cuda tests (from gpu_check.sh)")
    p.add_argument("--tests-rc", type=int, default=None, help="exit code of the cuda test run")
    p.add_argument("--budget-s", type=float, default=200.0, help="seconds for all benchmark sections")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu only for the structural test on machines without a GPU")
    p.add_argument("--config", default=COCO_CONFIG)
    p.add_argument("--batches", default="1,4,16", help="per-GPU batches of the bf16 table")
    p.add_argument("--compare-batch", type=int, default=4)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--fid-images", type=int, default=512)
    p.add_argument("--fid-size", type=int, default=256)
    p.add_argument("--memory-batches", default="1,2", help="per-GPU batches of the memory section (two, for the fit)")
    p.add_argument("--sections", default="train_step_bf16,memory,speed_paths,channels_last,fid,compile")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run (e.g. a smaller model for a test)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is false); run this on a GPU machine",
              file=sys.stderr)
        return EXIT_NO_CUDA
    started = time.time()
    result: dict[str, Any] = {"format": "spade-dist-gpu-check/1", "started_unix": started,
                              "load_avg_before": os.getloadavg()[0]}
    if args.junit:
        result["cuda_tests"] = junit_summary(Path(args.junit), args.tests_rc)
    try:
        result["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        result["nvidia_smi"] = None
    result["torch"] = torch.__version__
    result.update(run_checks(args.device, args.config, list(args.overrides), [int(b) for b in args.batches.split(",")],
                             args.compare_batch, args.iters, args.budget_s, args.fid_images, args.fid_size,
                             tuple(args.sections.split(",")), tuple(int(b) for b in args.memory_batches.split(","))))
    result["load_avg_after"] = os.getloadavg()[0]
    result["wall_s"] = round(time.time() - started, 1)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    failed_sections = [k for k, v in result.items() if isinstance(v, dict) and "error" in v]
    return 1 if failed_sections or (args.tests_rc not in (None, 0)) else 0


if __name__ == "__main__":
    sys.exit(main())
