"""``spade-data verify``: check shards against the manifest, optionally decoding every sample.

Shallow checks (existence, byte count, sha256, sample keys) catch truncated copies and bit rot on
shared storage; ``--deep`` re-validates content the same way sharding did, for shards that came
from elsewhere or an older tool version.
"""
from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from PIL import Image

from data_tools.layouts import DONTCARE, DataToolsError
from data_tools.manifest import load_manifest
from data_tools.records import ID_MAP_MODES
from data_tools.tario import read_tar_samples
from spade_dist.files import sha256_file
from spade_dist.progress import progress_bar


@dataclass(frozen=True)
class Problem:
    """One finding: which split / shard (and sample key, when known) and what is wrong."""

    split: str
    shard: str
    key: Optional[str]
    message: str

    def __str__(self) -> str:
        where = f"{self.shard}" + (f" sample {self.key!r}" if self.key else "")
        return f"[{self.split}] {where}: {self.message}"


def _decode(payload: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(payload))
    image.load()
    return image


def _check_sample(key: str, fields: dict[str, bytes], manifest: dict) -> list[str]:
    """Everything wrong with one sample (empty list when fine)."""
    errors = []
    image_fields = [f for f in fields if f.startswith("image.")]
    if len(image_fields) != 1:
        return [f"expected one image.* member, found {sorted(fields)}"]
    if "label.png" not in fields:
        return [f"no label.png member (members: {sorted(fields)})"]
    try:
        image = _decode(fields[image_fields[0]])
    except Exception as err:
        return [f"{image_fields[0]} does not decode: {err}"]
    try:
        label = _decode(fields["label.png"])
    except Exception as err:
        return [f"label.png does not decode: {err}"]
    if label.mode not in ID_MAP_MODES or label.mode == "P":
        errors.append(f"label.png has mode {label.mode}, expected a single-channel integer PNG")
    elif label.size != image.size:
        errors.append(f"image is {image.size[0]}x{image.size[1]} but label is {label.size[0]}x{label.size[1]}")
    else:
        ids = np.unique(np.asarray(label).astype(np.int64))
        allowed = (ids >= 0) & (ids < manifest["label_nc"])
        if manifest.get("contain_dontcare_label"):
            allowed |= ids == DONTCARE
        if (~allowed).any():
            errors.append(f"label ids {[int(v) for v in ids[~allowed][:20]]} outside 0..{manifest['label_nc'] - 1}"
                          + (f" / {DONTCARE}" if manifest.get("contain_dontcare_label") else ""))
    if manifest.get("instance"):
        if "instance.png" not in fields:
            errors.append("no instance.png member although the manifest says the dataset has instance maps")
        else:
            try:
                instance = _decode(fields["instance.png"])
                if instance.size != image.size:
                    errors.append(f"image is {image.size[0]}x{image.size[1]} but instance map is "
                                  f"{instance.size[0]}x{instance.size[1]}")
                elif instance.mode not in ID_MAP_MODES:
                    errors.append(f"instance.png has mode {instance.mode}, expected a single-channel integer PNG")
            except Exception as err:
                errors.append(f"instance.png does not decode: {err}")
    if "meta.json" in fields:
        try:
            meta = json.loads(fields["meta.json"])
            if meta.get("key") != key or (meta.get("width"), meta.get("height")) != image.size:
                errors.append(f"meta.json {meta} does not match key {key!r} / image size {image.size}")
        except ValueError as err:
            errors.append(f"meta.json is not JSON: {err}")
    else:
        errors.append("no meta.json member")
    return errors


def verify_shards(directory: Union[str, Path], deep: bool = False, progress: bool = False) -> list[Problem]:
    """Check every shard listed in ``directory/manifest.json``; returns the problems (empty = all good).

    ``progress``: a bar over the listed samples, advanced shard by shard."""
    directory = Path(directory)
    manifest = load_manifest(directory)
    problems: list[Problem] = []
    listed = sum(entry["num_samples"] for entry in manifest["splits"].values())
    with progress_bar(total=listed, desc=f"verify{' --deep' if deep else ''}", unit="sample", enabled=progress) as bar:
        for split, entry in manifest["splits"].items():
            problems += _verify_split(directory, manifest, split, entry, deep, bar)
    return problems


def _verify_split(directory: Path, manifest: dict, split: str, entry: dict, deep: bool, bar: Any) -> list[Problem]:
    problems: list[Problem] = []
    for shard in entry["shards"]:
        problems += _verify_shard(directory, manifest, split, shard, deep)
        bar.update(shard["samples"])
    total = sum(shard["samples"] for shard in entry["shards"])
    if total != entry["num_samples"]:
        problems.append(Problem(split, "-", None, f"shards hold {total} samples, num_samples is {entry['num_samples']}"))
    return problems


def _verify_shard(directory: Path, manifest: dict, split: str, shard: dict, deep: bool) -> list[Problem]:
    problems: list[Problem] = []
    name, path = shard["file"], directory / shard["file"]
    if not path.is_file():
        problems.append(Problem(split, name, None, f"shard file missing: {path}"))
        return problems
    size = path.stat().st_size
    if size != shard["bytes"]:
        problems.append(Problem(split, name, None, f"{size} bytes on disk, manifest says {shard['bytes']}"))
    digest = sha256_file(path)
    if digest != shard["sha256"]:
        problems.append(Problem(split, name, None, f"sha256 {digest} differs from the manifest's {shard['sha256']}"))
    try:
        samples = read_tar_samples(path)
    except (tarfile.TarError, OSError, EOFError) as err:
        problems.append(Problem(split, name, None, f"not a readable tar: {err}"))
        return problems
    if list(samples) != shard["keys"] or len(samples) != shard["samples"]:
        problems.append(Problem(split, name, None,
                                f"holds {len(samples)} samples, manifest lists {shard['samples']} "
                                f"(keys differ: {sorted(set(samples) ^ set(shard['keys']))[:10]})"))
    if deep:
        for key, fields in samples.items():
            for message in _check_sample(key, fields, manifest):
                problems.append(Problem(split, name, key, message))
    return problems


def check_directory(directory: Union[str, Path], deep: bool = False, progress: bool = False) -> list[Problem]:
    """Like :func:`verify_shards` but turns a missing/broken manifest into a Problem instead of raising.
    A path that is no directory is bad input, not a finding: :class:`DataToolsError` (exit 2, as ``stats``)."""
    if not Path(directory).is_dir():
        raise DataToolsError(f"{directory}: no such shard directory")
    try:
        return verify_shards(directory, deep, progress)
    except DataToolsError as err:
        return [Problem("-", "manifest.json", None, str(err))]
