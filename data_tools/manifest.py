"""Shard plans, per-shard sidecar records, and assembling ``manifest.json`` from them.

Layout inside the output directory::

    manifest.json                       the contract read by spade_dist.data (docs/FORMATS.md)
    {name}-{split}-{n:06d}.tar          the shards
    _parts/{name}-{split}.plan.json     the shard plan of a split (same bytes from every writer)
    _parts/{name}-{split}-{n:06d}.tar.json   sidecar: written after its tar, marks it complete

The manifest is only ever derived from plan + sidecars, so a single-process run and a Slurm array
job followed by ``merge-manifest`` produce the same bytes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from data_tools.layouts import DONTCARE, DatasetSpec, DataToolsError, PlannedShard
from spade_dist.files import write_json_atomic

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PARTS_DIR = "_parts"


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataToolsError(f"cannot read {path}: {err}") from err


def plan_path(out: Path, name: str, split: str) -> Path:
    return out / PARTS_DIR / f"{name}-{split}.plan.json"


def sidecar_path(out: Path, shard_file: str) -> Path:
    return out / PARTS_DIR / f"{shard_file}.json"


def read_sidecar(out: Path, shard_file: str) -> Optional[dict]:
    """The completion record of a shard, or None when the shard was never finished."""
    path = sidecar_path(out, shard_file)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None  # a torn sidecar cannot exist (atomic rename), but never trust a broken one


def write_sidecar(out: Path, shard_file: str, record: dict) -> None:
    (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    write_json_atomic(sidecar_path(out, shard_file), record)


def size_summary(values: Sequence[int]) -> dict:
    """Mergeable size statistics of one shard (sum and count, so means combine exactly)."""
    if not values:
        return {"min": None, "max": None, "sum": 0, "count": 0}
    return {"min": min(values), "max": max(values), "sum": sum(values), "count": len(values)}


def _combine_sizes(parts: Iterable[dict]) -> dict:
    parts = [p for p in parts if p["count"]]
    if not parts:
        return {"min": None, "max": None, "mean": None}
    count = sum(p["count"] for p in parts)
    return {"min": min(p["min"] for p in parts), "max": max(p["max"] for p in parts),
            "mean": round(sum(p["sum"] for p in parts) / count, 3)}


def _dataset_fields(spec: DatasetSpec) -> dict:
    return {"dataset": spec.dataset, "label_nc": spec.label_nc,
            "contain_dontcare_label": spec.contain_dontcare_label, "dontcare": DONTCARE,
            "instance": spec.instance, "class_names": list(spec.class_names) if spec.class_names else None}


def check_compatible(out: Path, name: str, spec: DatasetSpec) -> None:
    """One output directory holds one dataset: refuse to mix names or label conventions."""
    wanted = _dataset_fields(spec)
    sources = [(out / MANIFEST_NAME, _load_json(out / MANIFEST_NAME))] if (out / MANIFEST_NAME).is_file() else []
    sources += [(p, _load_json(p)) for p in sorted((out / PARTS_DIR).glob("*.plan.json"))]
    for path, existing in sources:
        dataset = existing.get("dataset_fields", existing) if path.name.endswith(".plan.json") else existing
        if existing.get("name") != name:
            raise DataToolsError(f"{path} belongs to dataset name {existing.get('name')!r}, not {name!r}; "
                                 "use another --out or the same --name")
        for key in ("dataset", "label_nc", "contain_dontcare_label", "instance"):
            if dataset.get(key) != wanted[key]:
                raise DataToolsError(f"{path} has {key}={dataset.get(key)!r} but this run has {wanted[key]!r}; "
                                     "splits of one output directory must share the label convention")


def write_plan(out: Path, name: str, split: str, spec: DatasetSpec, plan: Sequence[PlannedShard],
               pairing_skipped: list[dict], shuffle_seed: Optional[int] = None) -> None:
    (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    write_json_atomic(plan_path(out, name, split), {
        "format_version": FORMAT_VERSION, "name": name, "split": split,
        "dataset_fields": _dataset_fields(spec),
        "shards": [{"index": s.index, "file": s.file, "fingerprint": s.fingerprint,
                    "keys": [sample.key for sample in s.samples]} for s in plan],
        "pairing_skipped": pairing_skipped,
        "shuffle_seed": shuffle_seed,
    })


def _remove_stale_shards(out: Path, name: str, split: str, planned: set[str]) -> None:
    """Shards left by an earlier run of this split with another plan would confuse glob-based loaders."""
    for tar_path in sorted(out.glob(f"{name}-{split}-[0-9]*.tar")):
        if tar_path.name not in planned:
            tar_path.unlink(missing_ok=True)
            sidecar_path(out, tar_path.name).unlink(missing_ok=True)


def assemble_split(out: Path, plan: dict) -> dict:
    """The manifest entry of one split; raises naming every shard that is not complete."""
    missing, records = [], []
    for shard in plan["shards"]:
        record = read_sidecar(out, shard["file"])
        if record is None or record.get("fingerprint") != shard["fingerprint"]:
            missing.append(shard["file"])
            continue
        if record["samples"] and (not (out / shard["file"]).is_file()
                                  or (out / shard["file"]).stat().st_size != record["bytes"]):
            missing.append(shard["file"])
            continue
        records.append(record)
    if missing:
        shown = ", ".join(missing[:10]) + (f" ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise DataToolsError(f"split {plan['split']!r} in {out} is incomplete: shards not written yet: {shown}; "
                             "run the missing shard slices (or shard again) before merging")
    width = plan["dataset_fields"]["label_nc"] + 1
    histogram = [0] * width
    for record in records:
        if record["samples"]:
            histogram = [a + b for a, b in zip(histogram, record["class_histogram"])]
    skipped = list(plan["pairing_skipped"]) + [s for r in records for s in r["skipped"]]
    skipped.sort(key=lambda s: s["key"])
    _remove_stale_shards(out, plan["name"], plan["split"], {s["file"] for s in plan["shards"]})
    return {
        "num_samples": sum(r["samples"] for r in records),
        "shards": [{"file": r["file"], "samples": r["samples"], "bytes": r["bytes"], "sha256": r["sha256"],
                    "keys": r["keys"], "class_histogram": r["class_histogram"]} for r in records if r["samples"]],
        "shuffle_seed": plan.get("shuffle_seed"),  # plans of older versions: sorted by key
        "class_histogram": histogram,
        "image_size": {"width": _combine_sizes(r["width"] for r in records),
                       "height": _combine_sizes(r["height"] for r in records)},
        "skipped": skipped,
    }


def merge_manifest(out: Path, splits: Optional[Sequence[str]] = None) -> dict:
    """Write ``out/manifest.json`` from the plans and sidecars of ``splits`` (all planned splits when None).

    Splits already in an existing manifest and not re-assembled are kept. Nothing is written when any
    requested split is incomplete.
    """
    out = Path(out)
    plans = {}
    for path in sorted((out / PARTS_DIR).glob("*.plan.json")):
        plan = _load_json(path)
        plans[plan["split"]] = plan
    if not plans:
        raise DataToolsError(f"no shard plans in {out / PARTS_DIR}: nothing was sharded into {out}")
    wanted = sorted(plans) if splits is None else list(splits)
    for split in wanted:
        if split not in plans:
            raise DataToolsError(f"no shard plan for split {split!r} in {out / PARTS_DIR}")
    names = {plans[s]["name"] for s in wanted}
    if len(names) != 1:
        raise DataToolsError(f"plans in {out / PARTS_DIR} have different names {sorted(names)}")
    assembled = {split: assemble_split(out, plans[split]) for split in wanted}

    manifest_file = out / MANIFEST_NAME
    existing = _load_json(manifest_file) if manifest_file.is_file() else {"splits": {}}
    first = plans[wanted[0]]
    manifest = {"format_version": FORMAT_VERSION, "name": first["name"], **first["dataset_fields"]}
    all_splits = {**existing.get("splits", {}), **assembled}
    manifest["splits"] = {split: all_splits[split] for split in sorted(all_splits)}
    write_json_atomic(manifest_file, manifest)
    return manifest


def drop_split(out: Path, split: str) -> None:
    """Remove ``split`` from ``out/manifest.json`` (the file itself when no split is left)."""
    manifest_file = out / MANIFEST_NAME
    if not manifest_file.is_file():
        return
    manifest = _load_json(manifest_file)
    if split not in manifest.get("splits", {}):
        return
    del manifest["splits"][split]
    if manifest["splits"]:
        write_json_atomic(manifest_file, manifest)
    else:
        manifest_file.unlink(missing_ok=True)


def load_manifest(directory: Path) -> dict:
    """Read ``directory/manifest.json`` with a clear error when it is absent or malformed."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise DataToolsError(f"no {MANIFEST_NAME} in {directory}")
    manifest = _load_json(path)
    for key in ("name", "label_nc", "splits"):
        if key not in manifest:
            raise DataToolsError(f"{path}: missing key {key!r}")
    return manifest
