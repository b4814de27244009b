"""Write small shards in the docs/FORMATS.md format (tar members + manifest.json) for data tests.

Independent of data_tools on purpose: loader tests must not depend on the sharder's internals,
only on the format contract.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image


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
                jpeg: bool = False) -> dict[str, bytes]:
    """One sample's members: a random RGB image, a label map with ids < label_nc plus some 255."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = rng.integers(0, label_nc, (height, width), dtype=np.uint8)
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


def write_shards(out: Path, shard_sizes: Sequence[int], split: str = "train", name: str = "toy",
                 size: tuple[int, int] = (12, 10), extra_splits: Optional[dict[str, Sequence[int]]] = None,
                 instance: bool = True, label_nc: int = 8) -> Path:
    """Shards with the given sample counts (keys unique across splits); returns the manifest path."""
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
                                                    label_nc=label_nc, instance=instance))
                                   for i, k in enumerate(keys)])
            entries.append((file, keys))
        splits[split_name] = entries
    return write_manifest(out, name, splits, label_nc=label_nc, instance=instance)
