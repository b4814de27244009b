"""Input pipeline throughput: spade_dist.data (tar shards) vs the official folder loader.

The baseline does what NVlabs/SPADE's Pix2pixDataset does per sample: PIL-open the label,
image and instance files, build the torchvision transform pipeline (Resize, crop, flip,
ToTensor, Normalize for the image; NEAREST + ToTensor * 255 for label / instance), and batch
with a torch DataLoader. Ours streams the same samples from tar shards through
build_train_loader. Both run with the same number of workers, batch size and preprocessing,
in the same process, alternating ours / baseline per repeat so machine load hits both alike.
"ours" uses the default data.image_resample=exact (bit-exact official pixels); "ours_fast" uses
image_resample=fast (JPEG draft + torch uint8 bicubic, not bit-exact).

Datasets, both at COCO settings (resize_and_crop, load 286, crop 256): the project's synthetic
landscapes (data_tools synth, 512x512 PNG photos, 8-bit labels, no instance maps) and the
COCO-Stuff sample (../shared/datasets/coco_stuff_sample: JPEG photos, label + instance PNGs).

    .venv/bin/python bench/data.py [--count 96] [--size 512] [--workers 1 2] [--repeats 3]

Reported per dataset and worker count (medians over repeats): samples/s of wall time (and per
worker), and samples per CPU-second of the whole pipeline (main process + its workers) -- the
per-worker cost, which is robust to other jobs sharing the machine. Progress goes to stderr; the
last stdout line is one JSON object.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from data_tools.synth import generate_synthetic  # noqa: E402
from spade_dist.config import DataConfig  # noqa: E402
from spade_dist.data import build_train_loader  # noqa: E402

COCO_SAMPLE = REPO_ROOT.parent / "shared" / "datasets" / "coco_stuff_sample"
LOAD_SIZE, CROP_SIZE, LABEL_NC = 286, 256, 182


# ----------------------------------------------------------------------------- datasets


def write_synthetic(root: Path, count: int, size: int) -> tuple[Path, Path, None]:
    """The project's embedded synthetic landscapes (data_tools synth: size x size PNG photos,
    8-bit labels, no instance maps), in the custom folder layout."""
    generate_synthetic(root, count, seed=0, size=size)
    return root / "train" / "images", root / "train" / "labels", None


def replicate_folders(root: Path, out: Path, copies: int) -> tuple[Path, Path, Path]:
    """The COCO-Stuff sample's 13 train triples, each ``copies`` times under distinct keys
    (symlinks). Both loaders start their workers once per epoch; a real COCO-Stuff epoch holds
    118k samples, so a 13-sample epoch would mostly time worker start-up, not per-sample work."""
    dirs = {sub: out / sub for sub in ("train_img", "train_label", "train_inst")}
    for path in dirs.values():
        path.mkdir(parents=True)
    for copy in range(copies):
        for label in sorted((root / "train_label").glob("*.png")):
            key = label.stem
            (dirs["train_label"] / f"c{copy:02d}_{key}.png").symlink_to(label)
            (dirs["train_inst"] / f"c{copy:02d}_{key}.png").symlink_to(root / "train_inst" / f"{key}.png")
            image = _image_path(root / "train_img", key)
            (dirs["train_img"] / f"c{copy:02d}_{key}{image.suffix}").symlink_to(image)
    return dirs["train_img"], dirs["train_label"], dirs["train_inst"]


def _image_path(img_dir: Path, key: str) -> Path:
    for ext in (".jpg", ".png"):
        if (img_dir / f"{key}{ext}").is_file():
            return img_dir / f"{key}{ext}"
    raise FileNotFoundError(f"no image for {key} in {img_dir}")


def write_shards_from_folders(img_dir: Path, lab_dir: Path, inst_dir: Optional[Path], out: Path, name: str,
                              per_shard: int) -> Path:
    """Shards in the docs/FORMATS.md layout (original bytes, fixed tar metadata) + manifest."""
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted(p.stem for p in lab_dir.glob("*.png"))
    shards = []
    for start in range(0, len(keys), per_shard):
        chunk = keys[start:start + per_shard]
        file = f"{name}-train-{start // per_shard:06d}.tar"
        with tarfile.open(out / file, "w", format=tarfile.GNU_FORMAT) as tar:
            for key in chunk:
                with Image.open(lab_dir / f"{key}.png") as im:
                    width, height = im.size
                image_path = _image_path(img_dir, key)
                members = {
                    f"image{image_path.suffix}": image_path.read_bytes(),
                    "label.png": (lab_dir / f"{key}.png").read_bytes(),
                    "meta.json": json.dumps({"key": key, "width": width, "height": height}).encode(),
                }
                if inst_dir is not None:
                    members["instance.png"] = (inst_dir / f"{key}.png").read_bytes()
                for field in sorted(members):
                    info = tarfile.TarInfo(f"{key}.{field}")
                    info.size, info.mtime, info.mode = len(members[field]), 0, 0o644
                    tar.addfile(info, io.BytesIO(members[field]))
        shards.append({"file": file, "samples": len(chunk), "keys": chunk})
    manifest = {"format_version": 1, "name": name, "dataset": "custom", "label_nc": LABEL_NC,
                "contain_dontcare_label": True, "dontcare": 255, "instance": inst_dir is not None,
                "splits": {"train": {"num_samples": len(keys), "shards": shards}}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


# ----------------------------------------------------------------------------- baseline


class OfficialFolderDataset(Dataset):
    """Pix2pixDataset.__getitem__ as the official code does it (training mode)."""

    def __init__(self, img_dir: Path, lab_dir: Path, inst_dir: Optional[Path]) -> None:
        self.keys = sorted(p.stem for p in lab_dir.glob("*.png"))
        self.img_dir, self.lab_dir, self.inst_dir = img_dir, lab_dir, inst_dir

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def _params() -> dict[str, Any]:
        x = random.randint(0, max(0, LOAD_SIZE - CROP_SIZE))
        y = random.randint(0, max(0, LOAD_SIZE - CROP_SIZE))
        return {"crop_pos": (x, y), "flip": random.random() > 0.5}

    @staticmethod
    def _transform(params: dict[str, Any], method: int, normalize: bool) -> Callable:
        x, y = params["crop_pos"]
        steps = [
            transforms.Resize([LOAD_SIZE, LOAD_SIZE], interpolation=transforms.InterpolationMode(
                {Image.BICUBIC: "bicubic", Image.NEAREST: "nearest"}[method])),
            transforms.Lambda(lambda img: img.crop((x, y, x + CROP_SIZE, y + CROP_SIZE))),
            transforms.Lambda(lambda img: img.transpose(Image.FLIP_LEFT_RIGHT) if params["flip"] else img),
            transforms.ToTensor(),
        ]
        if normalize:
            steps.append(transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
        return transforms.Compose(steps)

    def __getitem__(self, index: int) -> dict[str, Any]:
        key = self.keys[index]
        label = Image.open(self.lab_dir / f"{key}.png")
        params = self._params()
        transform_label = self._transform(params, Image.NEAREST, normalize=False)
        label_tensor = transform_label(label) * 255.0
        image = Image.open(_image_path(self.img_dir, key)).convert("RGB")
        image_tensor = self._transform(params, Image.BICUBIC, normalize=True)(image)
        if self.inst_dir is None:  # official no_instance
            instance_tensor = torch.zeros(1)
        else:
            instance = Image.open(self.inst_dir / f"{key}.png")
            instance_tensor = (transform_label(instance) * 255).long()
        return {"label": label_tensor, "instance": instance_tensor, "image": image_tensor, "path": key}


# ----------------------------------------------------------------------------- timing


def _drain(batches: Iterable[dict[str, Any]]) -> int:
    count = 0
    for batch in batches:
        count += len(batch["image"])
    return count


def _measure(run: Callable[[], int]) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second). CPU time counts this process and its
    finished children -- the DataLoader workers, joined at the end of each pass -- so it measures
    the work per sample and is far less sensitive than wall time to other jobs on the machine."""
    t0, c0 = time.perf_counter(), os.times()
    n = run()
    wall, c1 = time.perf_counter() - t0, os.times()
    cpu = (c1.user + c1.system + c1.children_user + c1.children_system) - \
          (c0.user + c0.system + c0.children_user + c0.children_system)
    return n / wall, n / max(cpu, 1e-9)


def time_ours(shard_dir: Path, workers: int, batch: int, epochs: int, image_resample: str,
              no_instance: bool) -> tuple[float, float]:
    cfg = DataConfig(shards=str(shard_dir), preprocess_mode="resize_and_crop", load_size=LOAD_SIZE,
                     crop_size=CROP_SIZE, batch_size=batch, num_workers=workers, shuffle_buffer=16,
                     label_nc=LABEL_NC, pin_memory=False, image_resample=image_resample,
                     no_instance=no_instance)
    loader = build_train_loader(cfg)

    def run() -> int:
        n = 0
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            n += _drain(loader)
        return n
    return _measure(run)


def time_baseline(folders: tuple[Path, Path, Optional[Path]], workers: int, batch: int,
                  epochs: int) -> tuple[float, float]:
    loader = DataLoader(OfficialFolderDataset(*folders), batch_size=batch, shuffle=True, num_workers=workers,
                        drop_last=False)
    return _measure(lambda: sum(_drain(loader) for _ in range(epochs)))


def compare(name: str, folders: tuple[Path, Path, Optional[Path]], shard_dir: Path, workers_list: list[int], batch: int,
            epochs: int, repeats: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for workers in workers_list:
        runs: dict[str, list[tuple[float, float]]] = {"ours": [], "ours_fast": [], "baseline": []}
        no_instance = folders[2] is None
        for r in range(repeats):
            runs["ours"].append(time_ours(shard_dir, workers, batch, epochs, "exact", no_instance))
            runs["ours_fast"].append(time_ours(shard_dir, workers, batch, epochs, "fast", no_instance))
            runs["baseline"].append(time_baseline(folders, workers, batch, epochs))
            print(f"[{name}] workers={workers} repeat={r}: " + ", ".join(
                f"{k} {v[-1][0]:.1f}/s wall {v[-1][1]:.1f}/cpu-s" for k, v in runs.items()),
                file=sys.stderr, flush=True)
        wall = {k: statistics.median(x[0] for x in v) for k, v in runs.items()}
        cpu = {k: statistics.median(x[1] for x in v) for k, v in runs.items()}
        per = max(1, workers)
        result[f"workers_{workers}"] = {
            "ours_samples_per_s": round(wall["ours"], 2), "ours_fast_samples_per_s": round(wall["ours_fast"], 2),
            "baseline_samples_per_s": round(wall["baseline"], 2),
            "ours_per_worker": round(wall["ours"] / per, 2), "ours_fast_per_worker": round(wall["ours_fast"] / per, 2),
            "baseline_per_worker": round(wall["baseline"] / per, 2),
            "ratio": round(wall["ours"] / wall["baseline"], 3),
            "ratio_fast": round(wall["ours_fast"] / wall["baseline"], 3),
            "ours_samples_per_cpu_s": round(cpu["ours"], 2), "ours_fast_samples_per_cpu_s": round(cpu["ours_fast"], 2),
            "baseline_samples_per_cpu_s": round(cpu["baseline"], 2),
            "cpu_ratio": round(cpu["ours"] / cpu["baseline"], 3),
            "cpu_ratio_fast": round(cpu["ours_fast"] / cpu["baseline"], 3),
            "runs_wall": {k: [round(x[0], 2) for x in v] for k, v in runs.items()},
        }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=96, help="synthetic samples")
    parser.add_argument("--size", type=int, default=512, help="synthetic image side (px)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=1, help="official COCO batch per GPU is 1")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the synthetic set per measurement")
    parser.add_argument("--coco-epochs", type=int, default=1, help="passes over the (replicated) COCO train samples")
    parser.add_argument("--coco-copies", type=int, default=8,
                        help="the 13 COCO train triples appear this many times per epoch (under distinct keys)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-shard", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    report: dict[str, Any] = {
        "bench": "data", "settings": {"preprocess_mode": "resize_and_crop", "load_size": LOAD_SIZE,
                                      "crop_size": CROP_SIZE, "batch_size": args.batch, "repeats": args.repeats,
                                      "statistic": "median samples/s"},
        "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg()[0],
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        folders = write_synthetic(tmp_path / "synth", args.count, args.size)
        shards = write_shards_from_folders(*folders, tmp_path / "synth_shards", "synth", args.per_shard)
        report["synthetic"] = {"samples": args.count, "size": f"{args.size}x{args.size} png, no instance maps", **compare(
            "synthetic", folders, shards, args.workers, args.batch, args.epochs, args.repeats)}
        if COCO_SAMPLE.is_dir():
            coco = replicate_folders(COCO_SAMPLE, tmp_path / "coco", args.coco_copies)
            coco_shards = write_shards_from_folders(*coco, tmp_path / "coco_shards", "coco-stuff", args.per_shard)
            report["coco_stuff_sample"] = {"samples": 13 * args.coco_copies, "copies_of_each": args.coco_copies, **compare(
                "coco", coco, coco_shards, args.workers, args.batch, args.coco_epochs, args.repeats)}
        else:
            report["coco_stuff_sample"] = {"error": f"not found at {COCO_SAMPLE}"}
    report["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
