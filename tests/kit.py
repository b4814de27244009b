"""The test kit: where tests get their tiny configs, shards, training runs and waits.

- Configs: :func:`tiny_config` = ``configs/tiny.yaml`` (the tiny preset, also shipped to users) plus
  the test's overrides; a CLI run passes ``--config`` :data:`TINY` (see :func:`train_cmd`).
- Shards: :func:`synthetic_shards` makes them with the project's own tools (``spade-data synth`` +
  ``shard``, as the quickstart does); :func:`write_shards` and its parts write toy shards straight in
  the docs/FORMATS.md format, independent of data_tools on purpose (loader tests must depend on the
  format contract only, not on the sharder's internals).
- Runs: :func:`cli_env` (one thread, no inherited rank variables), :func:`run_cli`, :func:`wait_for`.
- Inputs: :func:`blocky_labels` (random label maps made of blocks, like segmentations).
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from spade_dist.config import Config, DataConfig, load_config
from spade_dist.resources import preset_path
from tests.dist_utils import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TINY = REPO_ROOT / "configs" / "tiny.yaml"
TRAIN = (PYTHON, "-m", "spade_dist.cli.train")


# ---------------------------------------------------------------------------------------- configs


def _shrink_overrides() -> tuple[str, ...]:
    tiny = load_config(TINY)
    return (f"model.ngf={tiny.model.ngf}", f"model.ndf={tiny.model.ndf}", f"model.n_layers_D={tiny.model.n_layers_D}",
            f"data.load_size={tiny.data.load_size}", f"data.crop_size={tiny.data.crop_size}",
            f"data.batch_size={tiny.data.batch_size}", f"data.num_workers={tiny.data.num_workers}")


# The tiny preset's sizes (widths, image size, batch, loader workers) as overrides: they shrink any
# other preset to the tiny model while keeping that preset's dataset settings (classes, norms).
SHRINK = _shrink_overrides()


def tiny_config(*overrides: str, base: str = "tiny") -> Config:
    """``configs/tiny.yaml`` + ``overrides``; with another preset ``base`` (a name in configs/, e.g.
    ``coco_stuff``): that preset shrunk by :data:`SHRINK`, then ``overrides``."""
    if base == "tiny":
        return load_config(TINY, list(overrides))
    return load_config(preset_path(base), [*SHRINK, *overrides])


def accelerate_launcher() -> list[str]:
    """``accelerate launch`` of spade-train in 2 CPU processes (launch/accelerate_cpu_2proc.yaml), on a free port."""
    return [str(Path(PYTHON).parent / "accelerate"), "launch", "--config_file", "launch/accelerate_cpu_2proc.yaml",
            "--main_process_port", str(free_port()), "-m", "spade_dist.cli.train"]


def train_cmd(*args: str, launcher: Sequence[str] = TRAIN) -> list[str]:
    """``launcher --config configs/tiny.yaml args...``: spade-train on the tiny preset."""
    return [*launcher, "--config", str(TINY), *args]


# ---------------------------------------------------------------------------------------- inputs


def blocky_labels(n: int, label_nc: int, h: int, w: int, generator: torch.Generator, block: int = 4) -> torch.Tensor:
    """(n, 1, h, w) class ids < ``label_nc`` drawn per ``block`` x ``block`` cell (at least one cell)
    and upsampled (nearest): uniform regions with borders, like a segmentation, unlike pixel noise."""
    coarse = torch.randint(0, label_nc, (n, 1, max(h // block, 1), max(w // block, 1)), generator=generator)
    return F.interpolate(coarse.float(), size=(h, w), mode="nearest").long()


# ---------------------------------------------------------------------------------------- runs


def cli_env(**extra: str) -> dict[str, str]:
    """The test's environment for a child process: one thread, this checkout first on the path, and
    none of a surrounding launcher's rank variables."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(extra)
    return env


def run_cli(cmd: Sequence[str], env: Optional[dict[str, str]] = None, timeout: float = 300,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the checkout; with ``check`` a non-zero exit fails the test with its output."""
    proc = subprocess.run(list(cmd), cwd=REPO_ROOT, env=env or cli_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.5,
             procs: Sequence[subprocess.Popen] = (), log: Callable[[], str] = lambda: "") -> None:
    """Poll ``predicate`` every ``poll`` seconds. Fail the test naming ``what`` (and showing ``log()``)
    after ``timeout`` seconds, or as soon as one of ``procs`` has ended before ``predicate`` held."""
    deadline = time.monotonic() + timeout
    while not predicate():
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"process ended (rc {proc.returncode}) before {what}:\n{log()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{log()}")
        time.sleep(poll)


def audited_keys(record: dict) -> list[str]:
    """The samples one key-audit record (``train.log_keys``) accounts for: its trained keys less the
    ones repeated to fill a batch, plus the ones retired without training (corrupt, dropped)."""
    keys = list(record["keys"])
    for key in record.get("repeats", []):
        keys.remove(key)
    return keys + [r["key"] for r in record.get("retired", [])]


# ---------------------------------------------------------------------------------------- shards


def synthetic_shards(root: Path, count: int = 32, val_count: int = 4, size: int = 32) -> Path:
    """``spade-data synth`` + ``spade-data shard --layout custom`` (train and val, 8 samples a shard)
    under ``root``; returns the manifest path."""
    raw, shards = root / "raw", root / "shards"
    run_cli([PYTHON, "-m", "data_tools", "synth", "--out", str(raw), "--count", str(count),
             "--val-count", str(val_count), "--seed", "0", "--size", str(size)])
    for split in ("train", "val"):
        run_cli([PYTHON, "-m", "data_tools", "shard", "--layout", "custom", "--root", str(raw), "--out", str(shards),
                 "--split", split, "--max-count", "8", "--no-progress", "--workers", "1"])
    return shards / "manifest.json"


def png_bytes(array: np.ndarray) -> bytes:
    """Single-channel uint8 -> 8-bit PNG, uint16 -> 16-bit PNG, HxWx3 uint8 -> RGB PNG."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_sample(key: str, width: int, height: int, seed: int, label_nc: int = 8, instance: bool = True,
                jpeg: bool = False, dontcare: bool = True) -> dict[str, bytes]:
    """One sample's members: a random RGB image, a label map with ids < label_nc plus (``dontcare``)
    some 255."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = rng.integers(0, label_nc, (height, width), dtype=np.uint8)
    if dontcare:
        label[: max(1, height // 8)] = 255
    members = {
        "image.jpg" if jpeg else "image.png": jpeg_bytes(image) if jpeg else png_bytes(image),
        "label.png": png_bytes(label),
        "meta.json": json.dumps({"key": key, "width": width, "height": height,
                                 "source": {"image": f"img/{key}", "label": f"lbl/{key}"}}).encode(),
    }
    if instance:
        members["instance.png"] = png_bytes(rng.integers(0, 3000, (height, width), dtype=np.uint16))
    return members


def write_tar(path: Path, samples: Sequence[tuple[str, dict[str, bytes]]]) -> None:
    """Members in key order then field order, fixed metadata (as data_tools writes them)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for key, members in samples:
            for field in sorted(members):
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(members[field])
                info.mode = 0o644
                info.mtime = 0
                tar.addfile(info, io.BytesIO(members[field]))


def write_manifest(out: Path, name: str, splits: dict[str, list[tuple[str, list[str]]]], label_nc: int = 8,
                   instance: bool = True) -> Path:
    manifest = {
        "format_version": 1, "name": name, "dataset": "custom", "label_nc": label_nc,
        "contain_dontcare_label": True, "dontcare": 255, "instance": instance,
        "splits": {
            split: {"num_samples": sum(len(k) for _, k in shards),
                    "shards": [{"file": f, "samples": len(k), "keys": k} for f, k in shards]}
            for split, shards in splits.items()
        },
    }
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1))
    return path


def toy_data_config(shards: str, **overrides) -> DataConfig:
    """Loader settings sized for :func:`write_shards`' default 12 x 10 images (resize to 12, crop 8,
    batch 2, loading in the test's process, a fixed seed, its labels: :data:`TOY_LABELS`) +
    ``overrides`` (DataConfig fields)."""
    return DataConfig(**{**dict(shards=shards, preprocess_mode="resize_and_crop", load_size=12, crop_size=8,
                                batch_size=2, num_workers=0, shuffle_buffer=4, seed=3, pin_memory=False,
                                label_nc=8, contain_dontcare_label=True, no_instance=False),
                         **overrides})


# Overrides that match what write_shards writes by default: 8 classes, 255 as don't care, instance maps.
TOY_LABELS = ("data.label_nc=8", "data.contain_dontcare_label=true", "data.no_instance=false")


def write_shards(out: Path, shard_sizes: Sequence[int], split: str = "train", name: str = "toy",
                 size: tuple[int, int] = (12, 10), extra_splits: Optional[dict[str, Sequence[int]]] = None,
                 instance: bool = True, label_nc: int = 8, dontcare: bool = True) -> Path:
    """Toy shards with the given sample counts (keys unique across splits); returns the manifest path.
    ``dontcare=False``: no 255 in the label maps (for a model without a don't-care channel)."""
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[tuple[str, list[str]]]] = {}
    counter = 0
    for split_name, sizes in {split: shard_sizes, **(extra_splits or {})}.items():
        entries = []
        for n_shard, count in enumerate(sizes):
            file = f"{name}-{split_name}-{n_shard:06d}.tar"
            keys = [f"{split_name}_{counter + i:05d}" for i in range(count)]
            counter += count
            write_tar(out / file, [(k, make_sample(k, size[0], size[1], seed=counter - count + i,
                                                    label_nc=label_nc, instance=instance, dontcare=dontcare))
                                   for i, k in enumerate(keys)])
            entries.append((file, keys))
        splits[split_name] = entries
    return write_manifest(out, name, splits, label_nc=label_nc, instance=instance)
