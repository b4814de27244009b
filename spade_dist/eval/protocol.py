"""The protocol record: everything that made a score, written next to it, and a short hash per metric.

FID and mIoU numbers only compare when they were made the same way (which images and how many, how
they were decoded and cropped, how generated images became pixels, which Inception or segmenter
weights, which class map and ignore rule, which package versions). Every ``metrics.jsonl`` line and
``spade-eval once`` result carries

- ``protocol``: sections ``images`` (shared by all metrics), ``inception`` (fid, kid), ``kid``,
  ``segmentation`` (miou, pixel_accuracy) and ``versions``;
- ``protocol_hash``: per metric, the first 12 hex digits of the sha256 of the parts that metric
  depends on (:func:`metric_protocol`). Two scores of a metric compare iff their hashes are equal.

The reports and ``spade-eval compare`` show scores of different hashes apart (:func:`protocol_groups`,
a letter per protocol) and name the fields that differ (:func:`protocol_notes`).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
from typing import Any, Optional, Sequence

from spade_dist.config import Config
from spade_dist.eval.scores import METRICS, metric_value, protocol_hash_of

# The sections of the protocol each metric's hash covers (besides "images" and its package versions).
METRIC_SECTIONS = {"fid": ("inception",), "kid": ("inception", "kid"), "miou": ("segmentation",),
                   "pixel_accuracy": ("segmentation",)}
# Generated images reach the metrics in memory, as uint8 (what a PNG of them would hold).
GENERATED_IMAGE_FORMAT = "uint8 RGB in memory: generator output (x + 1) / 2 * 255, truncated (lossless, as a PNG)"
REAL_IMAGE_FORMAT = "uint8 RGB from the shards, decoded and cropped by the eval loader"
FEATURE_ORDER = "sorted by file name <sample key>.png (the order torch-fidelity reads a folder)"
IGNORE_RULE = "ground-truth label ids in no class-map entry (and the don't-care 255) are not counted"
MIOU_RULE = "mean IoU over the class map's scored classes with a non-empty union; accuracy = correct / counted pixels"
HASH_DIGITS = 12


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions of ``names`` (``"absent"`` when not installed)."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def build_protocol(cfg: Config, *, num_images: int, resolution: tuple[int, int], data_sha256: str,
                   inception_sha256: Optional[str] = None, kid_subset_size: Optional[int] = None,
                   segmentation: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The protocol of an evaluation under ``cfg`` (sections of the metrics in ``eval.metrics`` only).

    ``segmentation``: the segmenter's own description (:meth:`Segmenter.protocol`)."""
    metrics = cfg.eval.metrics
    d = cfg.data
    protocol: dict[str, Any] = {"images": {
        "dataset": d.dataset, "split": d.val_split, "data_sha256": data_sha256, "num_images": int(num_images),
        "resolution": list(resolution),
        "preprocessing": {"preprocess_mode": d.preprocess_mode, "load_size": d.load_size, "crop_size": d.crop_size,
                          "aspect_ratio": d.aspect_ratio, "image_resample": d.image_resample},
        "generated_format": GENERATED_IMAGE_FORMAT, "real_format": REAL_IMAGE_FORMAT,
        "generator_seed": cfg.train.seed,
    }}
    packages = ["torch"]
    if "fid" in metrics or "kid" in metrics:
        protocol["inception"] = {"weights_sha256": inception_sha256, "fid_protocol": cfg.eval.fid_protocol,
                                 "feature_order": FEATURE_ORDER}
        packages.append("torch-fidelity")
    if "kid" in metrics:
        from spade_dist.eval.fid import KID_RNG_SEED, KID_SUBSETS  # local: fid.py imports torch-fidelity

        protocol["kid"] = {"subsets": KID_SUBSETS, "subset_size": kid_subset_size, "seed": KID_RNG_SEED}
    if segmentation is not None:
        protocol["segmentation"] = {**segmentation, "ignored": IGNORE_RULE, "scores": MIOU_RULE}
        if segmentation.get("format") == "huggingface":
            packages.append("transformers")
    protocol["versions"] = package_versions(*packages)
    return protocol


def metric_protocol(protocol: dict[str, Any], metric: str) -> dict[str, Any]:
    """The parts of ``protocol`` that ``metric`` depends on, with the metric's name."""
    versions = dict(protocol.get("versions", {}))
    if metric in ("miou", "pixel_accuracy"):
        versions.pop("torch-fidelity", None)
    else:
        versions.pop("transformers", None)
    part = {"metric": metric, "images": protocol.get("images"), "versions": versions}
    for section in METRIC_SECTIONS[metric]:
        part[section] = protocol.get(section)
    return part


def protocol_hash(protocol: dict[str, Any], metric: str) -> str:
    """Short hash of :func:`metric_protocol` (canonical JSON)."""
    text = json.dumps(metric_protocol(protocol, metric), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_DIGITS]


def protocol_hashes(protocol: dict[str, Any], metrics: list[str]) -> dict[str, str]:
    return {metric: protocol_hash(protocol, metric) for metric in metrics}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def protocol_differences(a: Optional[dict[str, Any]], b: Optional[dict[str, Any]], metric: str) -> list[str]:
    """``"field: A vs B"`` for each field of ``metric``'s protocol that differs between two records'
    protocols (None: a record without one)."""
    if a is None or b is None:
        return ["protocol: " + ("unrecorded" if a is None else "recorded") + " vs " +
                ("unrecorded" if b is None else "recorded")]
    flat_a, flat_b = _flatten(metric_protocol(a, metric)), _flatten(metric_protocol(b, metric))
    return [f"{key}: {flat_a.get(key)} vs {flat_b.get(key)}" for key in sorted(set(flat_a) | set(flat_b))
            if flat_a.get(key) != flat_b.get(key)]


def protocol_groups(records: Sequence[dict[str, Any]], metric: str) -> dict[str, list[int]]:
    """Protocol hash -> indices of the records with a score of ``metric`` under it, in record order."""
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        if metric_value(record, metric) is not None:
            groups.setdefault(protocol_hash_of(record, metric), []).append(i)
    return groups


def protocol_letter(index: int) -> str:
    """``A``, ``B``, ... for the first, second, ... protocol of a column."""
    return chr(ord("A") + index) if index < 26 else f"P{index}"


def protocol_notes(records: Sequence[dict[str, Any]], labels: Sequence[str], metric: str) -> list[str]:
    """Lines saying that ``metric`` was computed under several protocols: per protocol its letter,
    hash and records, and the fields in which it differs from the first. Empty for one protocol."""
    groups = protocol_groups(records, metric)
    if len(groups) < 2:
        return []
    first = records[next(iter(groups.values()))[0]]
    lines = [f"{METRICS[metric].label}: {len(groups)} different protocols; scores compare only within one letter"]
    for k, (digest, members) in enumerate(groups.items()):
        diff = protocol_differences(first.get("protocol"), records[members[0]].get("protocol"), metric) if k else []
        lines.append(f"  [{protocol_letter(k)}] {digest}: {', '.join(labels[i] for i in members)}"
                     + (f"; differs from [A] in {'; '.join(diff)}" if diff else ""))
    return lines
