"""Evaluation throughput: images/s of generation + Inception feature extraction (what one FID costs).

    python bench/eval.py [--preset coco_stuff] [--crop 64] [--ngf 16] [--images 16] [--batch 8]
                         [--threads 1 2] [--device cpu|cuda]

Prints one JSON object: per thread count, images/s for generation alone, feature extraction alone and
both (the evaluator's loop), plus ratios measured in the same run (extraction share of the time, speedup
of each thread count over the first). The Inception weights are built like the tests' (random init,
calibrated BN): timing does not depend on the weight values, only on the architecture, and the
extractor resizes every image to 299x299, so its cost per image is independent of --crop.
Label maps are random ids (timing does not depend on them either).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from spade_dist.config import load_config  # noqa: E402
from spade_dist.eval.inception import build_inception, extract_features, make_test_inception_weights  # noqa: E402
from spade_dist.labels import encode_semantics  # noqa: E402
from spade_dist.models.factory import build_generator  # noqa: E402
from spade_dist.visualize import to_uint8_image  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="coco_stuff")
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--ngf", type=int, default=16)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    device = torch.device(args.device)
    cfg = load_config(REPO_ROOT / "configs" / f"{args.preset}.yaml",
                      [f"data.crop_size={args.crop}", f"data.load_size={args.crop}", f"model.ngf={args.ngf}",
                       # Single process: plain BN is what SyncBN does outside a group, without the checks.
                       "model.norm_G=spectralspadebatch3x3"])
    generator = build_generator(cfg).to(device).eval()
    data = cfg.data
    height = int(round(args.crop / data.aspect_ratio))
    gen = torch.Generator().manual_seed(0)
    batches = []
    for start in range(0, args.images, args.batch):
        n = min(args.batch, args.images - start)
        label = torch.randint(0, data.label_nc, (n, 1, height, args.crop), generator=gen)
        instance = torch.randint(0, 4, (n, 1, height, args.crop), generator=gen)
        batches.append((label, instance))
    with tempfile.TemporaryDirectory() as tmp:
        calib = torch.randint(0, 256, (4, 3, height, args.crop), dtype=torch.uint8, generator=gen)
        weights = make_test_inception_weights(Path(tmp) / "inception.pth", calib, seed=0)
        extractor = build_inception(weights, device)

    results = []
    fakes: list[torch.Tensor] = []  # the generated batches of one thread count (generate() refills it)
    for threads in args.threads:
        torch.set_num_threads(threads)

        @torch.no_grad()
        def generate() -> None:
            fakes.clear()
            for label, instance in batches:
                sem = encode_semantics(label.to(device), instance.to(device), data.label_layout)
                fakes.append(to_uint8_image(generator(sem)))

        def extract() -> None:
            for images in fakes:
                extract_features(extractor, images)

        generate()  # warm-up (allocator, oneDNN primitive caches)
        extract_features(extractor, fakes[0][:1])
        t_gen = _timed(generate, device)
        t_ext = _timed(extract, device)
        total = t_gen + t_ext
        results.append({
            "threads": threads,
            "generation_images_per_s": round(args.images / t_gen, 3),
            "extraction_images_per_s": round(args.images / t_ext, 3),
            "eval_images_per_s": round(args.images / total, 3),
            "extraction_share": round(t_ext / total, 3),
        })
    base = results[0]["eval_images_per_s"]
    for r in results:
        r["speedup_vs_first"] = round(r["eval_images_per_s"] / base, 3)
    print(json.dumps({
        "bench": "eval", "device": str(device), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "preset": args.preset, "resolution": [args.crop, height], "ngf": args.ngf,
        "images": args.images, "batch": args.batch, "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()
