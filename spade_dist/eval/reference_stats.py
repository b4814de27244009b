"""Cached results on the real validation images: Inception features (what FID / KID compare against)
and the segmenter's confusion matrix on them (the "real images" row of mIoU / pixel accuracy).

The cache file names carry everything that changes the numbers, so a stale file can never be picked
up (torch-fidelity's own cache name includes none of these):

    inception-<dataset>-<split>-m<data hash[:12]>-<W>x<H>-p<preprocessing hash[:8]>-n<num images>-w<weights sha256[:12]>-<protocol>.pt
    segmentation-<dataset>-<split>-m<data hash[:12]>-<W>x<H>-p<preprocessing hash[:8]>-n<num images>-s<segmenter hash[:12]>.pt

- the data hash: the manifest's split entry plus each shard file's size and mtime (a re-sharded,
  different or replaced dataset gets new statistics),
- the evaluation resolution (the dataset's crop size and aspect ratio) and the preprocessing,
  ``data.image_resample`` included,
- the number of images (``eval.num_images``, 0 = whole split),
- Inception: the sha256 of the weights file (test weights vs real weights) and ``eval.fid_protocol``
  (how images are resized to 299);
- segmentation: a hash of the segmenter's protocol section (weights sha256, class map, input size,
  normalisation).

The Inception file stores the features themselves (KID needs them, not just mean/covariance) in the
canonical order (sorted by ``<key>.png``) with their sample keys, plus the statistics; the
segmentation file the int64 confusion matrix. Both are written atomically (temp file + rename) so
concurrent watchers can share a cache dir.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from spade_dist.config import DataConfig
from spade_dist.eval.fid import FeatureStatistics
from spade_dist.files import atomic_output

CACHE_ENV = "SPADE_FID_CACHE"
DEFAULT_CACHE_DIR = Path("~/.cache/spade-dist/fid-reference")


class ReferenceStatsError(RuntimeError):
    """Reference statistics cannot be identified or read; the message names the file or setting."""


@dataclass
class ReferenceStats:
    features: torch.Tensor  # N x 2048 float32, rows in the canonical order of `keys`
    stats: FeatureStatistics
    meta: dict
    keys: list[str]


@dataclass
class RealSegmentation:
    confusion: torch.Tensor  # int64 C x C, the segmenter on the real images against their label maps
    meta: dict


def evaluation_resolution(data_cfg: DataConfig) -> tuple[int, int]:
    """(width, height) of evaluation images: the crop size, height from the aspect ratio.

    Same rule as the official generator's latent grid (``sh = round(sw / aspect_ratio)``).
    """
    width = int(data_cfg.crop_size)
    height = int(round(width / float(data_cfg.aspect_ratio)))
    return width, height


def _expand_braces(pattern: str) -> list[str]:
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    width = len(lo)
    out: list[str] = []
    for n in range(int(lo), int(hi) + 1):
        out += _expand_braces(pattern[: match.start()] + f"{n:0{width}d}" + pattern[match.end():])
    return out


def dataset_fingerprint(data_cfg: DataConfig, split: str) -> str:
    """sha256 identifying the validation data: the manifest.json beside the shards, else the shards' bytes.

    ``pipe:`` sources without a manifest cannot be identified without reading them through the
    pipe, so they must come with a manifest (error otherwise).
    """
    from spade_dist.data.sources import eval_spec  # the loader's own rule for where val data comes from

    spec = eval_spec(data_cfg.shards, data_cfg.val_shards, data_cfg.manifest)
    if not spec:
        raise ReferenceStatsError("no validation data to compute FID reference statistics on: set data.val_shards "
                                  "or data.manifest")
    first = spec.split("::")[0]
    manifest: Optional[Path] = None
    if data_cfg.manifest:
        manifest = Path(data_cfg.manifest)
    elif first.endswith(".json"):
        manifest = Path(first)
    elif Path(first).is_dir():
        manifest = Path(first) / "manifest.json"
    elif not first.startswith("pipe:"):
        candidate = Path(first).parent / "manifest.json"
        if candidate.is_file():
            manifest = candidate
    if manifest is not None:
        if not manifest.is_file():
            raise ReferenceStatsError(f"manifest {manifest} (from data.manifest / data.val_shards) does not exist")
        try:
            info = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise ReferenceStatsError(f"{manifest}: unreadable manifest: {exc}") from exc
        split_info = info.get("splits", {}).get(split)
        if split_info is None:
            raise ReferenceStatsError(f"{manifest}: no split '{split}' (has {sorted(info.get('splits', {}))})")
        # Hash the split's entry (shard names, sizes, sha256s), not the whole file: adding a train
        # shard must not invalidate validation statistics. The shard files' own size and mtime join
        # it, so shards replaced under an unchanged manifest are noticed without reading their bytes.
        canonical = json.dumps({"dataset": info.get("dataset"), "label_nc": info.get("label_nc"), "split": split,
                                "shards": split_info.get("shards"),
                                "files": _shard_file_stats(manifest.parent, split_info.get("shards") or [])},
                               sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()
    if first.startswith("pipe:"):
        raise ReferenceStatsError(f"data.val_shards '{spec}': pipe sources need a manifest.json path to identify the data")
    files: list[str] = []
    for part in spec.split("::"):
        for pattern in _expand_braces(part):
            files += sorted(glob.glob(pattern))
    if not files:
        raise ReferenceStatsError(f"data.val_shards '{spec}' matches no files")
    digest = hashlib.sha256()
    for name in files:
        digest.update(os.path.basename(name).encode())
        with open(name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _shard_file_stats(directory: Path, shards: list) -> list:
    """[name, size, mtime_ns] of each listed shard file beside the manifest ("missing" when absent,
    e.g. shards read through pipe: commands); a rewritten file changes its size or mtime."""
    stats: list = []
    for entry in shards:
        name = entry.get("file") if isinstance(entry, dict) else None
        if not isinstance(name, str) or Path(name).name != name:
            continue  # shard entries are plain file names beside the manifest; nothing else is looked up
        try:
            st = (directory / name).stat()
            stats.append([name, st.st_size, st.st_mtime_ns])
        except OSError:
            stats.append([name, "missing"])
    return stats


def preprocessing_key(data_cfg: DataConfig) -> str:
    """Short hash of the settings that change which pixels the reference images have
    (``image_resample``: the fast decode path gives slightly different pixels than the exact one)."""
    fields = {k: getattr(data_cfg, k)
              for k in ("preprocess_mode", "load_size", "crop_size", "aspect_ratio", "image_resample")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]


def _cache_name(kind: str, dataset: str, split: str, manifest_sha256: str, resolution: tuple[int, int],
                preprocess_key: str, num_images: int, suffix: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{dataset}-{split}")
    return (f"{kind}-{safe}-m{manifest_sha256[:12]}-{resolution[0]}x{resolution[1]}-p{preprocess_key}"
            f"-n{num_images}-{suffix}.pt")


def reference_cache_name(dataset: str, split: str, manifest_sha256: str, resolution: tuple[int, int],
                         preprocess_key: str, num_images: int, weights_sha256: str,
                         fid_protocol: str = "torch-fidelity") -> str:
    """File name of the real images' Inception features (see the module doc)."""
    weights = re.sub(r"[^A-Za-z0-9]", "", weights_sha256)[:12] or "unknown"
    protocol = re.sub(r"[^A-Za-z0-9-]", "", fid_protocol)
    return _cache_name("inception", dataset, split, manifest_sha256, resolution, preprocess_key, num_images,
                       f"w{weights}-{protocol}")


def segmentation_cache_name(dataset: str, split: str, manifest_sha256: str, resolution: tuple[int, int],
                            preprocess_key: str, num_images: int, segmenter_protocol: dict) -> str:
    """File name of the segmenter's confusion matrix on the real images (see the module doc)."""
    digest = hashlib.sha256(json.dumps(segmenter_protocol, sort_keys=True).encode()).hexdigest()[:12]
    return _cache_name("segmentation", dataset, split, manifest_sha256, resolution, preprocess_key, num_images,
                       f"s{digest}")


def resolve_cache_dir(configured: str = "") -> Path:
    """``eval.reference_cache_dir``, else ``$SPADE_FID_CACHE``, else ``~/.cache/spade-dist/fid-reference``."""
    return Path(configured or os.environ.get(CACHE_ENV, "") or DEFAULT_CACHE_DIR).expanduser()


def _load_payload(path: Path) -> dict:
    """A cache file's payload: tensors, ints and JSON strings only, so it loads with
    ``weights_only=True`` (a cache directory may be shared; a pickle could run code)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_reference(path: Union[str, Path]) -> ReferenceStats:
    """Read an Inception features file written by :func:`save_reference`."""
    path = Path(path)
    try:
        payload = _load_payload(path)
        features = payload["features"]
        stats = FeatureStatistics(mu=payload["mu"].numpy(), sigma=payload["sigma"].numpy(),
                                  num_samples=int(payload["num_samples"]))
        keys = [str(k) for k in json.loads(payload["keys_json"])]
        if len(keys) != features.shape[0]:
            raise ValueError(f"{len(keys)} keys for {features.shape[0]} feature rows")
        return ReferenceStats(features=features, stats=stats, meta=dict(json.loads(payload["meta_json"])), keys=keys)
    except Exception as exc:  # noqa: BLE001 - any failure means "unusable cache file"
        raise ReferenceStatsError(f"{path}: unreadable reference statistics ({exc}); delete it to recompute") from exc


def save_reference(path: Union[str, Path], ref: ReferenceStats) -> None:
    with atomic_output(path) as handle:
        torch.save({"features": ref.features, "mu": torch.from_numpy(np.asarray(ref.stats.mu, dtype=np.float64)),
                    "sigma": torch.from_numpy(np.asarray(ref.stats.sigma, dtype=np.float64)),
                    "num_samples": int(ref.stats.num_samples), "meta_json": json.dumps(ref.meta, sort_keys=True),
                    "keys_json": json.dumps(ref.keys)},
                   handle)


def load_real_segmentation(path: Union[str, Path]) -> RealSegmentation:
    """Read a confusion-matrix file written by :func:`save_real_segmentation`."""
    path = Path(path)
    try:
        payload = _load_payload(path)
        confusion = payload["confusion"]
        if confusion.dtype != torch.int64 or confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
            raise ValueError(f"confusion matrix is {confusion.dtype} {tuple(confusion.shape)}, not int64 C x C")
        return RealSegmentation(confusion=confusion, meta=dict(json.loads(payload["meta_json"])))
    except Exception as exc:  # noqa: BLE001 - any failure means "unusable cache file"
        raise ReferenceStatsError(f"{path}: unreadable real-image segmentation ({exc}); delete it to recompute") from exc


def save_real_segmentation(path: Union[str, Path], real: RealSegmentation) -> None:
    with atomic_output(path) as handle:
        torch.save({"confusion": real.confusion.cpu(), "meta_json": json.dumps(real.meta, sort_keys=True)}, handle)
